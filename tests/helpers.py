"""Shared test helpers: run instar and the real qemu-img side by side.

instar runs in-process (``instar.cli.main``) for speed; qemu-img runs as a
subprocess. Both are run in the same directory so relative names in messages
match, and stderr is compared after the program prefix.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from instar.cli import main as instar_main
from instar.formats.base import CreateOptions, Format, ParsedOptions
from instar.formats.options import parse_options
from instar.image import Image
from instar.opener import ImageOpener
from instar.safety import PathPolicy

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def require_qemu(*tools: str) -> None:
    """Fail (in CI, INSTAR_REQUIRE_QEMU=1) or skip (by hand) unless ``tools`` are installed.

    ``tools`` defaults to qemu-img and qemu-io. Every run of either goes through
    here, so a machine without them skips the parity tests instead of erroring.
    """
    import pytest

    paths = {"qemu-img": QEMU_IMG, "qemu-io": QEMU_IO}
    missing = [name for name in tools or paths if not paths[name]]
    if missing:
        message = f"{' and '.join(missing)} not installed (apt-get install qemu-utils)"
        if os.environ.get("INSTAR_REQUIRE_QEMU") == "1":
            pytest.fail(message)
        pytest.skip(message)


def qemu_img_path() -> str:
    """The path of qemu-img, after `require_qemu` (fails or skips without it)."""
    require_qemu("qemu-img")
    assert QEMU_IMG is not None
    return QEMU_IMG


def qemu_io_path() -> str:
    """The path of qemu-io, after `require_qemu` (fails or skips without it)."""
    require_qemu("qemu-io")
    assert QEMU_IO is not None
    return QEMU_IO


_MODULE_NAG = re.compile(r"^qemu: module \S+ not found, do you want to install \S+ package\?\n",
                         re.MULTILINE)


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    def normalised_stderr(self) -> str:
        """stderr with the program name removed, to compare instar with qemu-img.

        Debian's qemu-img also says, at each open of a dmg, that its optional
        dmg-bz2 and dmg-lzfse modules are not installed ("qemu: module ...
        not found, do you want to install ... package?"): a fact about the
        packaging, not the image, so those lines are dropped.
        """
        text = _MODULE_NAG.sub("", self.stderr)
        text = text.replace("qemu-img: ", "PROG: ").replace("instar: ", "PROG: ")
        return text.replace("'qemu-img --help'", "'PROG --help'").replace(
            "'instar --help'", "'PROG --help'"
        )


def run_instar(*args: str, cwd: str | os.PathLike[str] | None = None) -> Result:
    """Run ``instar ARGS`` in-process, in ``cwd``; returns exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = instar_main(list(args))
    finally:
        os.chdir(old)
    return Result(rc, out.getvalue(), err.getvalue())


def run_qemu_img(*args: str, cwd: str | os.PathLike[str] | None = None) -> Result:
    """Run the real ``qemu-img ARGS``.

    Output is text; bytes that are not UTF-8 (names from an image) are kept
    as surrogate escapes, as instar's own output keeps them.
    """
    proc = subprocess.run(
        [qemu_img_path(), *args], cwd=cwd, capture_output=True, text=True, encoding="utf-8",
        errors="surrogateescape", timeout=300, check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def qemu_img_ok(*args: str, cwd: str | os.PathLike[str] | None = None) -> str:
    """Run qemu-img and insist it succeeds; returns stdout."""
    result = run_qemu_img(*args, cwd=cwd)
    assert result.rc == 0, f"qemu-img {' '.join(args)} failed: {result.stderr}"
    return result.stdout


def qemu_io(
    image: str | Path, command: str, fmt: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> None:
    """Run one qemu-io command (e.g. ``write -P 0x5a 0 64k``) on ``image``.

    qemu-io resolves a qcow2 data file against its working directory, not the
    image's: give ``cwd`` for such images.
    """
    args = [qemu_io_path()]
    if fmt:
        args += ["-f", fmt]
    proc = subprocess.run(
        [*args, "-c", command, str(image)], capture_output=True, text=True, check=False,
        cwd=cwd,
    )
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def both(args: list[str], cwd: Path) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """instar's and qemu-img's (status, stdout, stderr after the program name)
    for the same arguments in the same directory."""
    ours = run_instar(*args, cwd=cwd)
    qemu = run_qemu_img(*args, cwd=cwd)
    return ((ours.rc, ours.stdout, ours.normalised_stderr()),
            (qemu.rc, qemu.stdout, qemu.normalised_stderr()))


def assert_same(args: list[str], cwd: Path) -> None:
    """instar and qemu-img give the same status, stdout and stderr for ``args``."""
    ours, qemu = both(args, cwd)
    assert ours == qemu, args


@contextlib.contextmanager
def open_image(path: Path, fmt: str | None = None, allow_own_directory: bool = True
               ) -> Iterator[Image]:
    """``path`` opened with instar's host-side opener (its own directory allowed
    unless told otherwise), everything closed after."""
    opener = ImageOpener(PathPolicy([os.path.dirname(str(path))] if allow_own_directory else []))
    try:
        yield opener.open(str(path), fmt)
    finally:
        opener.close()


def qemu_info(image: str | Path, fmt: str | None = None) -> dict[str, object]:
    """``qemu-img info --output=json`` as a dict."""
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [str(image)]
    info: dict[str, object] = json.loads(qemu_img_ok(*args))
    return info


def qemu_read_raw(image: str | Path, tmp_dir: Path, fmt: str | None = None) -> bytes:
    """The image's contents as qemu reads them (``qemu-img convert -O raw``)."""
    target = tmp_dir / f"readback-{os.getpid()}-{id(image)}.raw"
    args = ["convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", str(image), str(target)]
    qemu_img_ok(*args)
    try:
        return target.read_bytes()
    finally:
        target.unlink()


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic non-repeating-looking bytes: byte i is (i + seed) % 251."""
    block = bytes((i + seed) % 251 for i in range(251 * 16))
    reps = size // len(block) + 1
    return (block * reps)[:size]


DD_INPUT_SIZE = (3 << 20) + 1000
DD_INPUTS = ["pattern.raw", "c64k.qcow2", "c512.qcow2", "ooo.qcow2", "hole.qcow2"]
# The windows every format's parity tests copy: the whole image and three from the issues.
READ_WINDOWS: list[list[str]] = [
    [],
    ["bs=65536", "skip=2", "count=4"],
    ["bs=1000", "count=3"],
    ["bs=513", "skip=1", "count=3"],
]
# Writers also get the empty window.
DD_WINDOWS: list[list[str]] = [*READ_WINDOWS, ["count=0"]]


def build_dd_inputs(directory: Path) -> Path:
    """The inputs of the writers' window matrix, made by qemu-img and qemu-io.

    A patterned raw with a zero stretch; qcow2 copies with 64 KiB and 512-byte
    clusters (one output grain or block spans many input clusters); a qcow2
    whose clusters were allocated out of order; one with a hole before data.
    """
    require_qemu()
    data = bytearray(pattern(DD_INPUT_SIZE, seed=9))
    data[(1 << 20) + 12345 : (2 << 20) + 777] = bytes((1 << 20) - 12345 + 777)
    raw = directory / "pattern.raw"
    raw.write_bytes(bytes(data))
    qemu_img_ok("convert", "-f", "raw", "-O", "qcow2", str(raw), str(directory / "c64k.qcow2"))
    qemu_img_ok("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", str(raw),
                str(directory / "c512.qcow2"))
    qemu_img_ok("create", "-q", "-f", "qcow2", str(directory / "ooo.qcow2"), "3M")
    for command in ("write -P 0x11 2M 128k", "write -P 0x22 1M 64k", "write -P 0x33 0 100k",
                    "write -P 0x44 2500k 1k"):  # later guest offsets first
        qemu_io(directory / "ooo.qcow2", command, "qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", str(directory / "hole.qcow2"), "3M")
    qemu_io(directory / "hole.qcow2", "write -P 0x55 1500k 300k", "qcow2")
    return directory


def write_pieces(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    """A file with ``data`` at each ``offset`` (holes between), cut to ``size`` if given."""
    with open(path, "wb") as file:
        for offset, data in pieces:
            file.seek(offset)
            file.write(data)
        if size is not None:
            file.truncate(size)


def assert_option_refused_like_qemu(fmt: str, option: str, source: Path, tmp_path: Path) -> None:
    """``-o option`` is refused as qemu-img convert refuses it (same exit status and
    stderr), and by ``instar dd`` too, with no output or temporary file left behind."""
    for side in ("i", "q"):
        (tmp_path / side).mkdir()
    args = ["convert", "-O", fmt, "-o", option, str(source), f"out.{fmt}"]
    ours = run_instar(*args, cwd=tmp_path / "i")
    qemu = run_qemu_img(*args, cwd=tmp_path / "q")
    assert ours.rc == qemu.rc == 1
    assert ours.normalised_stderr() == qemu.normalised_stderr()
    assert list((tmp_path / "i").iterdir()) == []
    dd = run_instar("dd", "-O", fmt, "-o", option, f"if={source}", f"of=out.{fmt}",
                    cwd=tmp_path / "i")
    assert dd.rc == 1 and "Traceback" not in dd.stderr
    assert list((tmp_path / "i").iterdir()) == []


def creation_options(fmt: Format, options: dict[str, str] | None = None) -> ParsedOptions:
    """``-o`` options for ``fmt.create``, checked by the format's schema as the CLI does."""
    return parse_options(fmt.create_options, CreateOptions(list((options or {}).items())))


SAMPLE_IMAGES = Path(__file__).parent / "data" / "qemu-sample-images"


def sample_image_names() -> list[str]:
    """qemu's own sample images (made by Hyper-V, Virtual PC, Disk2VHD, ESXi,
    Parallels, hdiutil, bximage, create_compressed_fs and a fuzzer), stored
    bzip2-compressed in ``tests/data``, named without the ``.bz2``."""
    return sorted(path.name.removesuffix(".bz2") for path in SAMPLE_IMAGES.glob("*.bz2"))


def unpack_sample_image(name: str, directory: Path) -> Path:
    """Decompress sample image ``name`` into ``directory``, sparse: zero
    runs of the decompressed stream are skipped with a seek, so a 127 GiB
    mostly-unallocated VHD costs only its data."""
    import bz2

    target = directory / name
    chunk = 1 << 20
    with bz2.open(SAMPLE_IMAGES / f"{name}.bz2", "rb") as source, open(target, "wb") as out:
        while piece := source.read(chunk):
            if piece.count(0) == len(piece):
                out.seek(len(piece), os.SEEK_CUR)
            else:
                out.write(piece)
        out.truncate()
    return target


def make_dirty_qcow2(path: Path, kind: str, size: str = "4M",
                     backing: str | None = None) -> None:
    """A qcow2 image with lazy refcounts whose dirty bit is set, as a crash
    leaves it: ``killed`` (qemu-io killed after its writes: the data's
    refcounts are 0, a repair rebuilds the refcount structure), ``leak`` (a
    cluster past the data counted once but used by nothing) or ``low`` (a
    cluster shared with a snapshot counted once instead of twice); over the
    qcow2 image ``backing`` (named relative to it) if given."""
    import struct

    over = ["-b", backing, "-F", "qcow2"] if backing else []
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", *over, path.name,
                size, cwd=path.parent)
    writes = ["write -P 0x41 0 1M", "write -P 0x42 2M 512k"]
    if kind == "killed":
        args = [qemu_io_path(), "-f", "qcow2"]
        for command in [*writes, "sigraise 9"]:
            args += ["-c", command]
        subprocess.run([*args, str(path)], capture_output=True, check=False)
        return
    for command in writes:
        qemu_io(path, command, "qcow2")
    if kind == "low":
        qemu_img_ok("snapshot", "-c", "s1", str(path))
    data = bytearray(path.read_bytes())
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    reftable = struct.unpack_from(">Q", data, 48)[0]
    refblock = struct.unpack_from(">Q", data, reftable)[0]
    if kind == "leak":
        index = len(data) // cluster
        data += bytes(cluster)
        struct.pack_into(">H", data, refblock + 2 * index, 1)
    else:  # the first data cluster: the L2 table's first entry
        l1 = struct.unpack_from(">Q", data, 40)[0]
        l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
        first = (struct.unpack_from(">Q", data, l2)[0] & 0x00FFFFFFFFFFFE00) // cluster
        struct.pack_into(">H", data, refblock + 2 * first, 1)
    data[79] |= 1  # the dirty bit (incompatible features, the last byte)
    path.write_bytes(bytes(data))


def build_images(directory: Path, steps: list[tuple[str, ...]]) -> None:
    """Images built by qemu: each step ("create", args...) runs ``qemu-img
    create -q args``, ("io", fmt, file, command) runs qemu-io, ("dirty", kind,
    file, backing or "") makes a dirty qcow2 (`make_dirty_qcow2`), ("mkdir",
    name) a directory, any other tuple runs qemu-img with those arguments; all
    in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for step in steps:
        if step[0] == "create":
            qemu_img_ok("create", "-q", *step[1:], cwd=directory)
        elif step[0] == "io":
            qemu_io(directory / step[2], step[3], step[1], cwd=directory)
        elif step[0] == "dirty":
            make_dirty_qcow2(directory / step[2], step[1], backing=step[3] or None)
        elif step[0] == "mkdir":
            (directory / step[1]).mkdir()
        else:
            qemu_img_ok(*step, cwd=directory)


def stop_after_changes(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Make every `instar.mutate.ImageUpdate` stop (raise StoppedUpdate)
    once ``limit`` changes were made, counted across all the updates of one
    command (commit changes its base, then its top image)."""
    from instar import mutate
    from instar.errors import StoppedUpdate

    made = [0]

    def change(update: mutate.ImageUpdate) -> None:
        if made[0] >= limit:
            raise StoppedUpdate(f"stopped after {limit} changes")
        made[0] += 1
        update.changes += 1

    monkeypatch.setattr(mutate.ImageUpdate, "_change", change)


def stopped_runs(monkeypatch: pytest.MonkeyPatch, origin: Path, work: Path,
                 command: Callable[[], object], most: int = 100,
                 across: bool = True) -> Iterator[tuple[int, bool]]:
    """Run ``command`` as if the machine stopped after k changes, for k = 0,
    1, ... until a run finishes: each run on a fresh copy of ``origin`` (a
    file or a directory) at ``work``; yields ``(k, finished)`` after each run,
    for the caller to inspect ``work``. ``across`` counts changes across all
    the updates of the command (`stop_after_changes`), else each update
    counts its own (`instar.mutate.stop_after`). Fails if no run of the
    first ``most`` finishes."""
    from instar import mutate
    from instar.errors import StoppedUpdate

    for k in range(most):
        if origin.is_dir():
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(origin, work)
        else:
            shutil.copyfile(origin, work)
        with monkeypatch.context() as patch:
            if across:
                stop_after_changes(patch, k)
            else:
                patch.setattr(mutate, "stop_after", k)
            try:
                command()
                finished = True
            except StoppedUpdate:
                finished = False
        yield k, finished
        if finished:
            return
    raise AssertionError(f"never finished in {most} runs")


def assert_units_old_or_new(now: bytes, old: bytes, new: bytes, unit: int,
                            *where: object) -> None:
    """Each ``unit`` bytes of ``now`` (an image read after a stopped update)
    equal those of ``old`` (before) or of ``new`` (as finished): never a mix
    within a unit. ``where`` (k, names) goes into the failure message."""
    for at in range(0, len(now), unit):
        assert now[at : at + unit] in (old[at : at + unit], new[at : at + unit]), (*where, at)


def without_keys(info: Any, keys: tuple[str, ...]) -> Any:
    """``info`` (qemu-img info's JSON) with every ``keys`` entry removed at
    any depth: what differs between two runs (names, sizes on disk)."""
    if isinstance(info, dict):
        return {key: without_keys(value, keys) for key, value in info.items()
                if key not in keys}
    if isinstance(info, list):
        return [without_keys(item, keys) for item in info]
    return info
