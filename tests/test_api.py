"""The Python API as in-process callers use it: `instar.open_image`, `instar.dd`,
and the module-level entry points of convert, info and compare.

What a caller relies on: resources closed (and a warning when they are not),
the format chosen, argument mistakes refused with documented exceptions before
anything is opened or written, and ``allow`` never read as a string's letters.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.resources
import os
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import instar
from helpers import pattern, qemu_img_ok, qemu_info
from instar.compare import compare
from instar.convert import convert
from instar.errors import InstarError, InvalidArgumentError, OptionError, PolicyError
from instar.events import Event, Line
from instar.formats.base import CreateOptions
from instar.image import ExtentKind
from instar.info import info

ROOT = Path(__file__).resolve().parent.parent


def _raw(path: Path, size: int = 5120) -> Path:
    path.write_bytes(pattern(size))
    return path


def _qcow2(path: Path, size: int = 5120) -> Path:
    raw = _raw(path.with_suffix(".src"), size)
    qemu_img_ok("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    return path


def _fds_on(path: Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir used, now closed
            count += os.readlink(f"/proc/self/fd/{fd}") == target
    return count


def _chain_outside(tmp_path: Path, name: str = "top.qcow2") -> tuple[Path, Path]:
    """A qcow2 in ``top/`` whose raw backing file lies in ``base/``: (image, base dir)."""
    base_dir, top_dir = tmp_path / "base", tmp_path / "top"
    base_dir.mkdir(exist_ok=True)
    top_dir.mkdir(exist_ok=True)
    base = base_dir / "base.raw"
    if not base.exists():
        _raw(base, 8192)
    top = top_dir / name
    qemu_img_ok("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    return top, base_dir


# ---------------------------------------------------------------------------
# open_image: a context manager that knows its format and closes its files


@pytest.mark.usefixtures("qemu_img")
def test_context_manager_closes_every_file_of_the_chain(tmp_path: Path) -> None:
    top, base_dir = _chain_outside(tmp_path)
    base = base_dir / "base.raw"
    with instar.open_image(top, allow=[base_dir]) as image:
        assert not image.closed
        assert _fds_on(top) >= 1 and _fds_on(base) >= 1
        assert image.read(0, 8192) == pattern(8192)
    assert image.closed
    assert _fds_on(top) == 0 and _fds_on(base) == 0
    image.close()  # a second close is harmless
    assert image.closed
    with pytest.raises(InvalidArgumentError, match="closed"):
        image.read(0, 512)


@pytest.mark.usefixtures("qemu_img")
def test_format_is_the_top_image_format_probed_or_given(tmp_path: Path) -> None:
    top, base_dir = _chain_outside(tmp_path)
    with instar.open_image(top, allow=[base_dir]) as image:
        assert image.format == "qcow2"  # not the raw backing file opened after it
    with instar.open_image(_raw(tmp_path / "plain.img")) as image:
        assert image.format == "raw"
    with instar.open_image(top, fmt="raw") as image:  # read as given, qcow2 bytes and all
        assert image.format == "raw"
        assert image.virtual_size == -(-top.stat().st_size // 512) * 512  # sector-rounded


@pytest.mark.usefixtures("qemu_img")
def test_repr_names_path_format_size_and_state(tmp_path: Path) -> None:
    path = _qcow2(tmp_path / "disk.qcow2", 1 << 20)
    image = instar.open_image(str(path))
    assert repr(image) == f"<OpenedImage {str(path)!r} format='qcow2' virtual_size=1048576 open>"
    image.close()
    assert repr(image).endswith("virtual_size=1048576 closed>")


def test_an_image_dropped_open_warns_and_is_closed(tmp_path: Path) -> None:
    path = _raw(tmp_path / "dropped.raw")
    image = instar.open_image(path)
    with pytest.warns(ResourceWarning, match=r"unclosed image <OpenedImage .*dropped\.raw"):
        del image
        gc.collect()
    assert _fds_on(path) == 0


def test_a_closed_image_does_not_warn(tmp_path: Path) -> None:
    path = _raw(tmp_path / "closed.raw")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with instar.open_image(path):
            pass
        instar.open_image(path).close()
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# ---------------------------------------------------------------------------
# read and extents: the range is checked before a reader sees it


@pytest.mark.parametrize(
    ("offset", "length"),
    [(5120, 1), (5000, 121), (-1, 10), (0, -1), (-512, 512), (1 << 63, 1)],
)
def test_reads_and_extents_outside_the_image_are_invalid_arguments(
    tmp_path: Path, offset: int, length: int
) -> None:
    with instar.open_image(_raw(tmp_path / "in.raw", 5120)) as image:
        with pytest.raises(InvalidArgumentError, match="outside the image") as raised:
            image.read(offset, length)
        assert isinstance(raised.value, ValueError)  # old `except ValueError` still works
        with pytest.raises(InvalidArgumentError):
            image.extents(offset, length)  # at the call, not on first next()


def test_ranges_up_to_the_end_are_fine(tmp_path: Path) -> None:
    with instar.open_image(_raw(tmp_path / "in.raw", 5120)) as image:
        assert image.read(5120, 0) == b""
        assert image.read(5000, 120) == pattern(5120)[5000:]
        assert [e.kind for e in image.extents(0, 5120)] == [ExtentKind.DATA]
        with pytest.raises(TypeError):
            image.read(1.5, 10)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# allow: an iterable of directories, never a bare string


def _entry_points(tmp_path: Path) -> dict[str, Callable[[object], object]]:
    """Every API-level function that takes ``allow``, on a raw image."""
    image = str(_raw(tmp_path / "in.raw"))
    out = str(tmp_path / "out.raw")
    return {
        "open_image": lambda allow: instar.open_image(image, allow=allow),  # type: ignore[arg-type]
        "dd": lambda allow: instar.dd(image, out, allow=allow),  # type: ignore[arg-type]
        "convert": lambda allow: convert([image], out, allow=allow),  # type: ignore[arg-type]
        "info": lambda allow: info(image, allow=allow),  # type: ignore[arg-type]
        "compare": lambda allow: compare(image, image, allow=allow),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("entry", ["open_image", "dd", "convert", "info", "compare"])
@pytest.mark.parametrize(
    "allow", ["/", "/data", b"/data", Path("/data")], ids=["root", "str", "bytes", "path"]
)
def test_a_bare_string_as_allow_is_a_type_error(tmp_path: Path, entry: str, allow: object) -> None:
    with pytest.raises(TypeError, match="allow must be an iterable of directories"):
        _entry_points(tmp_path)[entry](allow)
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.usefixtures("qemu_img")
def test_allow_takes_lists_sets_paths_and_generators(tmp_path: Path) -> None:
    top, base_dir = _chain_outside(tmp_path)
    with pytest.raises(PolicyError):
        instar.open_image(top)
    for allow in ([str(base_dir)], (base_dir,), {str(base_dir)}, (d for d in [str(base_dir)])):
        with instar.open_image(top, allow=allow) as image:
            assert image.read(0, 8192) == pattern(8192)


@pytest.mark.usefixtures("qemu_img")
def test_compare_applies_a_generator_allow_to_both_images(tmp_path: Path) -> None:
    a, base_dir = _chain_outside(tmp_path, "a.qcow2")
    b, _ = _chain_outside(tmp_path, "b.qcow2")
    said: list[Event] = []
    allow = (d for d in [str(base_dir)])
    assert compare(str(a), str(b), allow=allow, events=said.append) == 0
    assert said == [Line("Images are identical.")]


# ---------------------------------------------------------------------------
# dd: bad numbers are refused before anything is opened


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bs": 0}, "bs must be at least 1"),
        ({"bs": -512}, "bs must be at least 1"),
        ({"count": -1}, "count must not be negative"),
        ({"skip": -1}, "skip must not be negative"),
    ],
)
def test_dd_refuses_bad_numbers(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    out = tmp_path / "out.raw"
    with pytest.raises(InvalidArgumentError, match=message) as raised:
        # The input does not exist: the numbers are checked first.
        instar.dd(str(tmp_path / "missing.raw"), str(out), **kwargs)
    assert isinstance(raised.value, InstarError) and isinstance(raised.value, ValueError)
    assert not out.exists()
    with pytest.raises(InvalidArgumentError, match=message):
        instar.dd_window(4096, **{"bs": 512, **kwargs})


def test_dd_count_zero_is_an_empty_copy(tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    window = instar.dd(_raw(tmp_path / "in.raw"), out, count=0)
    assert window.length == 0 and out.read_bytes() == b""


# ---------------------------------------------------------------------------
# options: CreateOptions or a plain dict


@pytest.mark.usefixtures("qemu_img")
def test_dd_and_convert_take_options_as_a_dict(tmp_path: Path) -> None:
    source = str(_raw(tmp_path / "in.raw", 65536))
    dd_out, convert_out = tmp_path / "dd.qcow2", tmp_path / "convert.qcow2"
    options = {"cluster_size": "4096"}
    instar.dd(source, str(dd_out), bs=65536, output_format="qcow2", options=options)
    convert([source], str(convert_out), output_format_name="qcow2", options=options)
    for out in (dd_out, convert_out):
        assert qemu_info(out)["cluster-size"] == 4096
    assert options == {"cluster_size": "4096"}  # the caller's dict is left alone
    same = tmp_path / "same.qcow2"
    instar.dd(source, str(same), bs=65536, output_format="qcow2",
              options=CreateOptions(options=[("cluster_size", "4096")]))
    assert qemu_info(same)["cluster-size"] == 4096


def test_options_are_checked_like_the_command_line(tmp_path: Path) -> None:
    source = str(_raw(tmp_path / "in.raw"))
    out = str(tmp_path / "out.qcow2")
    with pytest.raises(OptionError, match="Invalid parameter 'no_such_option'"):
        instar.dd(source, out, output_format="qcow2", options={"no_such_option": "1"})
    with pytest.raises(TypeError, match="str keys and values"):
        instar.dd(source, out, output_format="qcow2",
                  options={"cluster_size": 4096})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="options must be CreateOptions or a dict"):
        instar.dd(source, out, options=["cluster_size=4096"])  # type: ignore[arg-type]
    assert not Path(out).exists()


# ---------------------------------------------------------------------------
# The package: what dir() shows, what type checkers see


def test_dir_lists_the_api_and_every_name_resolves() -> None:
    names = dir(instar)
    for name in ("open_image", "dd", "OpenedImage", "InstarError", "InvalidArgumentError",
                 "ImageOpenError", "CreateOptions", "__version__"):
        assert name in names
    assert "importlib" not in names and "_LAZY" not in names
    for name in instar.__all__:
        assert getattr(instar, name) is not None
    assert set(instar._LAZY) == set(instar.__all__)
    assert issubclass(instar.InvalidArgumentError, instar.InstarError)


def test_py_typed_is_shipped() -> None:
    assert importlib.resources.files("instar").joinpath("py.typed").is_file()
    with (ROOT / "pyproject.toml").open("rb") as file:
        package_data = tomllib.load(file)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["instar"]
