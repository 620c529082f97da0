"""The Python API as in-process callers use it: `instar.open_image`, `instar.dd`,
and the module-level entry points of convert, info and compare.

What a caller relies on: resources closed (and a warning when they are not),
the format chosen, argument mistakes refused with documented exceptions before
anything is opened or written, and ``allow`` never read as a string's letters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import instar
from helpers import pattern, qemu_img_ok, qemu_info
from instar.compare import compare
from instar.convert import convert
from instar.errors import InstarError, InvalidArgumentError, OptionError, PolicyError
from instar.formats.base import CreateOptions
from instar.info import info


def _raw(path: Path, size: int = 5120) -> Path:
    path.write_bytes(pattern(size))
    return path


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
        "compare": lambda allow: compare(image, image, allow=allow,  # type: ignore[arg-type]
                                         say=lambda _: None),
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
    said: list[str] = []
    allow = (d for d in [str(base_dir)])
    assert compare(str(a), str(b), allow=allow, say=said.append) == 0
    assert said == ["Images are identical."]


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
              options=CreateOptions(options={"cluster_size": "4096"}))
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
