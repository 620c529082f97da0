"""instar compare against the real qemu-img compare (7.2).

Each row names two images (built once per module) and options; stdout, stderr
and the exit code must be qemu-img's, progress lines included. PAIRS compare
raw files; CROSS_PAIRS the same contents in qcow2, vmdk, vpc and vhdx (converted
with qemu-img, edited with qemu-io, over backing files), in strict mode and
with the meter too, since both show how each qemu driver answers block status.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    Result,
    pattern,
    qemu_img_ok,
    qemu_img_path,
    qemu_io,
    run_instar,
    run_qemu_img,
    write_pieces,
)
from instar.compare import first_difference

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

MIB = 1 << 20
Builder = Callable[[Path], None]


_write = write_pieces


BASE = pattern(3 * MIB)

IMAGES: dict[str, Builder] = {
    "base.raw": lambda p: _write(p, [(0, BASE)]),
    "same.raw": lambda p: _write(p, [(0, BASE)]),
    "first-byte.raw": lambda p: _write(p, [(0, b"\xff" + BASE[1:])]),
    "last-byte.raw": lambda p: _write(p, [(0, BASE[:-1] + b"\xff")]),
    "middle.raw": lambda p: _write(p, [(0, BASE), (MIB + 4097, b"\xee")]),
    "longer-zero.raw": lambda p: _write(p, [(0, BASE)], 5 * MIB),
    "longer-data.raw": lambda p: _write(p, [(0, BASE), (4 * MIB + 1000, b"\x01")], 5 * MIB),
    "shorter.raw": lambda p: _write(p, [(0, BASE[: 2 * MIB])]),
    "k1000.raw": lambda p: _write(p, [(0, BASE[:1000])]),
    "k1000-tail.raw": lambda p: _write(p, [(0, BASE[:1000] + bytes(10) + b"\x02")]),
    "k1601.raw": lambda p: _write(p, [(0, BASE[:1000] + bytes(600) + b"\x02")]),
    "k1601-zero.raw": lambda p: _write(p, [(0, BASE[:1000] + bytes(601))]),
    "empty.raw": lambda p: _write(p, []),
    "hole-64m.raw": lambda p: _write(p, [], 64 * MIB),
    "written-zeros-64m.raw": lambda p: _write(p, [(30 * MIB, bytes(4 * MIB))], 64 * MIB),
    "dot-in-hole-64m.raw": lambda p: _write(p, [(33 * MIB + 12345, b"\x01")], 64 * MIB),
    "dot-in-zeros-64m.raw": lambda p: _write(
        p, [(30 * MIB, bytes(4 * MIB)), (33 * MIB + 12345, b"\x01")], 64 * MIB
    ),
    "half-hole.raw": lambda p: _write(p, [(0, BASE[: MIB + 512])], 3 * MIB),
}


def _qemu_img(p: Path, *args: str) -> None:
    qemu_img_ok(*args, cwd=p.parent)


def _convert(source: str, fmt: str, *options: str) -> Builder:
    """``qemu-img convert`` of an image built earlier into FMT (options: -c, -o)."""
    return lambda p: _qemu_img(p, "convert", "-O", fmt, *options, source, p.name)


def _edited(build: Builder, fmt: str, *writes: str) -> Builder:
    """An image built by ``build``, then changed with qemu-io commands."""
    def run(p: Path) -> None:
        build(p)
        for command in writes:
            qemu_io(p.name, command, fmt, cwd=p.parent)
    return run


def _overlay(fmt: str, backing: str, backing_fmt: str, *writes: str) -> Builder:
    """An image over a backing file, with qemu-io writes of its own."""
    def build(p: Path) -> None:
        _qemu_img(p, "create", "-q", "-f", fmt, "-b", backing, "-F", backing_fmt, p.name)
        for command in writes:
            qemu_io(p.name, command, fmt, cwd=p.parent)
    return build


# The same contents in other formats, and overlays whose bytes come partly
# from a backing file. Built after IMAGES (they convert its raw files).
CROSS_IMAGES: dict[str, Builder] = {
    "base.qcow2": _convert("base.raw", "qcow2"),
    "base-compressed.qcow2": _convert("base.raw", "qcow2", "-c"),
    "base.vmdk": _convert("base.raw", "vmdk"),
    "base-stream.vmdk": _convert("base.raw", "vmdk", "-o", "subformat=streamOptimized"),
    "base-flat.vmdk": _convert("base.raw", "vmdk", "-o", "subformat=monolithicFlat"),
    "base.vhd": _convert("base.raw", "vpc"),  # 3 MiB is no CHS size: the VHD is larger
    "base-forced.vhd": _convert("base.raw", "vpc", "-o", "force_size=on"),
    "first-byte.qcow2": _convert("first-byte.raw", "qcow2"),
    "first-byte.vmdk": _convert("first-byte.raw", "vmdk"),
    "last-byte.qcow2": _convert("last-byte.raw", "qcow2", "-c"),
    "last-byte.vmdk": _convert("last-byte.raw", "vmdk"),
    "last-byte.vhd": _convert("last-byte.raw", "vpc", "-o", "force_size=on"),
    "middle.vhd": _convert("middle.raw", "vpc", "-o", "force_size=on"),
    "shorter.qcow2": _convert("shorter.raw", "qcow2"),
    "longer-data.vmdk": _convert("longer-data.raw", "vmdk"),
    "longer-zero.qcow2": _convert("longer-zero.raw", "qcow2"),
    "half-hole.vhd": _convert("half-hole.raw", "vpc", "-o", "force_size=on"),
    "dot-in-hole-64m.qcow2": _convert("dot-in-hole-64m.raw", "qcow2"),
    "dot-in-hole-64m.vmdk": _convert("dot-in-hole-64m.raw", "vmdk"),
    "hole-64m.vhd": _convert("hole-64m.raw", "vpc", "-o", "force_size=on"),
    "hole-64m.qcow2": _convert("hole-64m.raw", "qcow2"),
    "hole-64m.vmdk": _convert("hole-64m.raw", "vmdk"),
    # zero clusters (plain and allocated), subclusters, small clusters, zeroed grains
    "zeros.qcow2": _edited(_convert("base.raw", "qcow2"), "qcow2",
                           "write -z 1M 64k", "write -z -u 2M 64k"),
    "extl2.qcow2": _edited(_convert("base.raw", "qcow2", "-o", "extended_l2=on"), "qcow2",
                           "write -z 1M 4k", "discard 2M 8k"),
    "c512.qcow2": _convert("half-hole.raw", "qcow2", "-o", "cluster_size=512"),
    "zeroed.vmdk": _edited(_convert("half-hole.raw", "vmdk", "-o", "zeroed_grain=on"), "vmdk",
                           "write -z 64k 64k"),
    "split.vmdk": _convert("half-hole.raw", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"),
    "split-flat.vmdk": _convert("half-hole.raw", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"),
    "fixed.vhd": _convert("half-hole.raw", "vpc", "-o", "subformat=fixed,force_size=on"),
    # backing chains: the difference lies in the backing file, or in the top
    "over-first-byte.qcow2": _overlay("qcow2", "first-byte.raw", "raw"),
    "over-base.qcow2": _overlay("qcow2", "base.qcow2", "qcow2"),
    "over-base-edit.qcow2": _overlay("qcow2", "base.raw", "raw", "write -P 0xee 1052673 1"),
    "over-base.vmdk": _overlay("vmdk", "base.vmdk", "vmdk"),
    "over-first-byte.vmdk": _overlay("vmdk", "first-byte.vmdk", "vmdk",
                                     "write -P 0x33 2M 4k"),
    "over-over.qcow2": _overlay("qcow2", "over-base.qcow2", "qcow2", "write -P 0x44 3145216 512"),
    # vhdx: qemu's driver has no block status, so every byte is data (holes too)
    "base.vhdx": _convert("base.raw", "vhdx"),
    "base-fixed.vhdx": _convert("base.raw", "vhdx", "-o", "subformat=fixed"),
    "first-byte.vhdx": _convert("first-byte.raw", "vhdx"),
    "last-byte.vhdx": _convert("last-byte.raw", "vhdx", "-o", "block_size=1M"),
    "shorter.vhdx": _convert("shorter.raw", "vhdx", "-o", "block_size=32M"),
    "longer-data.vhdx": _convert("longer-data.raw", "vhdx"),
    "hole-64m.vhdx": _convert("hole-64m.raw", "vhdx"),
    "middle.vhdx": _edited(_convert("base.raw", "vhdx", "-o", "block_size=1M"), "vhdx",
                           "write -P 0xee 1052673 1"),
    "zeros.vhdx": _edited(_convert("base.raw", "vhdx", "-o", "block_size=1M"), "vhdx",
                          "write -z 1M 64k", "write -z 2M 64k"),
    "empty.vhdx": lambda p: _qemu_img(p, "create", "-q", "-f", "vhdx", "-o", "block_size=1M",
                                      p.name, "0"),
}

# Pairs across formats: identical, first byte, last byte, a backing file,
# size mismatches (both ways, with zeros or data past the shorter image).
CROSS_PAIRS: list[tuple[str, str]] = [
    ("base.raw", "base.qcow2"),
    ("base.qcow2", "base.raw"),
    ("base-compressed.qcow2", "base.vmdk"),
    ("base-stream.vmdk", "base-flat.vmdk"),
    ("base.vmdk", "base.vhd"),
    ("base.vhd", "base-forced.vhd"),
    ("base-forced.vhd", "base.qcow2"),
    ("base.qcow2", "first-byte.vmdk"),
    ("first-byte.qcow2", "base-stream.vmdk"),
    ("base.vmdk", "last-byte.qcow2"),
    ("last-byte.vhd", "base-compressed.qcow2"),
    ("last-byte.vmdk", "last-byte.raw"),
    ("base-flat.vmdk", "middle.vhd"),
    ("base.vhd", "shorter.qcow2"),
    ("shorter.qcow2", "base.vmdk"),
    ("base.qcow2", "longer-data.vmdk"),
    ("longer-zero.qcow2", "base-forced.vhd"),
    ("half-hole.vhd", "half-hole.raw"),
    ("base.vmdk", "half-hole.vhd"),
    ("hole-64m.vhd", "dot-in-hole-64m.qcow2"),
    ("dot-in-hole-64m.vmdk", "dot-in-hole-64m.qcow2"),
    ("hole-64m.raw", "dot-in-hole-64m.vmdk"),
    ("over-first-byte.qcow2", "base.raw"),
    ("base.vmdk", "over-first-byte.qcow2"),
    ("over-base.qcow2", "base.vhd"),
    ("over-base.qcow2", "base-stream.vmdk"),
    ("over-base-edit.qcow2", "middle.raw"),
    ("over-base-edit.qcow2", "base.vmdk"),
    ("over-base.vmdk", "over-base.qcow2"),
    ("over-first-byte.vmdk", "first-byte.qcow2"),
    ("over-over.qcow2", "last-byte.raw"),
    ("zeros.qcow2", "base.raw"),
    ("zeros.qcow2", "extl2.qcow2"),
    ("extl2.qcow2", "base.vmdk"),
    ("c512.qcow2", "half-hole.vhd"),
    ("zeroed.vmdk", "half-hole.raw"),
    ("zeroed.vmdk", "c512.qcow2"),
    ("split.vmdk", "half-hole.raw"),
    ("split-flat.vmdk", "split.vmdk"),
    ("half-hole.raw", "split-flat.vmdk"),
    # nothing stored: each driver answers differently (allocated or not, with an offset or not)
    ("hole-64m.vhd", "hole-64m.raw"),
    ("hole-64m.qcow2", "hole-64m.vmdk"),
    ("hole-64m.vmdk", "hole-64m.raw"),
    ("hole-64m.qcow2", "hole-64m.vhd"),
    # vhdx: all data, allocated, one answer to the end (no offset)
    ("base.vhdx", "base.raw"),
    ("base.raw", "base-fixed.vhdx"),
    ("base.vhdx", "base-fixed.vhdx"),
    ("base.vhdx", "base.qcow2"),
    ("base-compressed.qcow2", "base.vhdx"),
    ("base-forced.vhd", "base.vhdx"),
    ("base.vhdx", "base.vhd"),
    ("first-byte.vhdx", "base.qcow2"),
    ("base.raw", "first-byte.vhdx"),
    ("first-byte.vhdx", "base-forced.vhd"),
    ("last-byte.vhdx", "last-byte.raw"),
    ("base.qcow2", "last-byte.vhdx"),
    ("last-byte.vhdx", "base-forced.vhd"),
    ("middle.vhdx", "middle.raw"),
    ("middle.vhd", "middle.vhdx"),
    ("middle.vhdx", "base.vhdx"),
    ("shorter.vhdx", "base.qcow2"),
    ("base.raw", "shorter.vhdx"),
    ("shorter.vhdx", "base.vhd"),
    ("longer-data.vhdx", "base.vhd"),
    ("base.qcow2", "longer-data.vhdx"),
    ("longer-zero.qcow2", "base.vhdx"),
    ("zeros.vhdx", "zeros.qcow2"),
    ("zeros.vhdx", "base.raw"),
    ("hole-64m.vhdx", "hole-64m.raw"),
    ("hole-64m.vhd", "hole-64m.vhdx"),
    ("hole-64m.vhdx", "dot-in-hole-64m.qcow2"),
    ("empty.vhdx", "empty.raw"),
]

CROSS_OPTIONS: list[list[str]] = [[], ["-q"], ["-p"], ["-s"], ["-s", "-p"]]

PAIRS: list[tuple[str, str]] = [
    ("base.raw", "same.raw"),
    ("base.raw", "first-byte.raw"),
    ("base.raw", "last-byte.raw"),
    ("last-byte.raw", "base.raw"),
    ("base.raw", "middle.raw"),
    ("base.raw", "longer-zero.raw"),
    ("longer-zero.raw", "base.raw"),
    ("base.raw", "longer-data.raw"),
    ("longer-data.raw", "base.raw"),
    ("base.raw", "shorter.raw"),
    ("shorter.raw", "base.raw"),
    ("k1000.raw", "k1000-tail.raw"),
    ("k1000.raw", "k1601.raw"),
    ("k1601.raw", "k1601-zero.raw"),
    ("k1000.raw", "k1601-zero.raw"),
    ("empty.raw", "empty.raw"),
    ("empty.raw", "k1000.raw"),
    ("hole-64m.raw", "written-zeros-64m.raw"),
    ("hole-64m.raw", "dot-in-hole-64m.raw"),
    ("dot-in-zeros-64m.raw", "hole-64m.raw"),
    ("written-zeros-64m.raw", "dot-in-zeros-64m.raw"),
    ("base.raw", "half-hole.raw"),
    ("half-hole.raw", "half-hole.raw"),
]

OPTIONS: list[list[str]] = [[], ["-s"], ["-q"], ["-p"], ["-s", "-p"], ["-f", "raw", "-F", "raw"]]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("compare")
    for name, build in (IMAGES | CROSS_IMAGES).items():
        build(directory / name)
    return directory


def _qemu_compare(args: list[str], cwd: Path) -> Result:
    """qemu-img compare with its output kept byte for byte (the progress
    meter's carriage returns too, which text mode would turn into newlines)."""
    proc = subprocess.run([qemu_img_path(), "compare", *args], cwd=cwd, capture_output=True,
                          timeout=300, check=False)
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def compare_same_as_qemu(args: list[str], cwd: Path) -> None:
    qemu = _qemu_compare(args, cwd)
    ours = run_instar("compare", *args, cwd=cwd)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr()
    )


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: " ".join(o) or "plain")
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}~{p[1]}")
def test_compare_matches_qemu(pair: tuple[str, str], options: list[str], images: Path) -> None:
    compare_same_as_qemu([*options, *pair], images)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", CROSS_OPTIONS, ids=lambda o: " ".join(o) or "plain")
@pytest.mark.parametrize("pair", CROSS_PAIRS, ids=lambda p: f"{p[0]}~{p[1]}")
def test_compare_across_formats(pair: tuple[str, str], options: list[str],
                                images: Path) -> None:
    compare_same_as_qemu([*options, *pair], images)


def _format_of(name: str) -> str:
    suffix = name.rsplit(".", 1)[1]
    return {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx"}[suffix]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("pair", CROSS_PAIRS[::3], ids=lambda p: f"{p[0]}~{p[1]}")
def test_compare_with_formats_given(pair: tuple[str, str], images: Path) -> None:
    compare_same_as_qemu(["-f", _format_of(pair[0]), "-F", _format_of(pair[1]), *pair], images)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", CROSS_OPTIONS, ids=lambda o: " ".join(o) or "plain")
@pytest.mark.parametrize("other", ["half-hole.raw", "split.vmdk", "c512.qcow2"])
def test_compare_fixed_vhd_as_vpc(other: str, options: list[str], images: Path) -> None:
    """A fixed VHD probes as raw; read as vpc it is its data without the footer."""
    compare_same_as_qemu([*options, "-f", "vpc", "fixed.vhd", other], images)
    compare_same_as_qemu([*options, "fixed.vhd", other], images)


ERROR_ROWS: list[list[str]] = [
    [],
    ["base.raw"],
    ["base.raw", "same.raw", "third.raw"],
    ["base.raw", "missing.raw"],
    ["missing.raw", "base.raw"],
    ["-q", "missing.raw", "base.raw"],
    ["-p", "base.raw", "missing.raw"],
    ["-f", "foo", "base.raw", "same.raw"],
    ["-F", "foo", "base.raw", "same.raw"],
    ["-T", "bogus", "base.raw", "same.raw"],
    ["-T", "none", "base.raw", "same.raw"],
    ["-x", "base.raw", "same.raw"],
    ["--strict", "base.raw", "same.raw"],
    ["-f"],
    [".", "base.raw"],
    ["", "base.raw"],
    ["-U", "--", "base.raw", "same.raw"],
]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", ERROR_ROWS, ids=lambda a: " ".join(a) or "<none>")
def test_compare_errors_match_qemu(args: list[str], images: Path) -> None:
    compare_same_as_qemu(args, images)


@pytest.mark.usefixtures("qemu_img")
def test_compare_sparse_terabyte_is_fast(tmp_path: Path) -> None:
    """Holes are skipped from extents, never read."""
    _write(tmp_path / "a.raw", [], 1 << 40)
    _write(tmp_path / "b.raw", [((1 << 40) - 5000, b"\x01")], 1 << 40)
    started = time.perf_counter()
    ours = run_instar("compare", "a.raw", "b.raw", cwd=tmp_path)
    assert time.perf_counter() - started < 2
    qemu = run_qemu_img("compare", "a.raw", "b.raw", cwd=tmp_path)
    assert (ours.rc, ours.stdout) == (qemu.rc, qemu.stdout) == (
        1, "Content mismatch at offset 1099511622656!\n"
    )


def test_first_difference_is_sector_granular() -> None:
    data = os.urandom(3 * MIB + 100)
    for position in (0, 511, 512, 65535, 65536, 3 * MIB + 99):
        changed = bytearray(data)
        changed[position] ^= 0xFF
        assert first_difference(data, bytes(changed)) == position // 512 * 512
