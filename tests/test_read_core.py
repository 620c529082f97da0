"""The read core: one fall-through and one block status for every format.

- chains of every format over every other that qemu can build, three deep and
  over short backing files, read to qemu-img's bytes by dd, convert and compare;
- every format compared with its own conversion to raw is identical, for
  instar and for qemu-img (the block status walk and the reads agree: before
  the read core, a differencing VHD compared as different from its own copy);
- `BlockImage`'s generic behaviour, on a driver made here: coalesced reads,
  zeros past a short backing file, one decode per compressed unit, block status.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_io, require_qemu, run_instar, run_qemu_img
from instar.errors import FormatError
from instar.files import ExactReads
from instar.image import (
    COMPRESSED,
    DATA,
    OFFSET_VALID,
    ZERO,
    BlockImage,
    Driver,
    Extent,
    ExtentKind,
    Image,
    Run,
    StatusLayer,
)

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

MIB = 1 << 20


def _source(directory: Path, size: int = 6 * MIB) -> Path:
    """A raw file with data, zeros and a hole, in 1 MiB stripes."""
    raw = directory / "source.raw"
    with raw.open("wb") as handle:
        handle.write(pattern(2 * MIB, seed=7))
        handle.write(bytes(MIB))  # zeros written as data
        handle.seek(4 * MIB)  # a hole
        handle.write(pattern(size - 4 * MIB - 4096, seed=9))
        handle.write(bytes(4096))
    return raw


# --- every format against its own conversion ------------------------------------------------

# (name, format, qemu-img convert options); a fixed VHD is read with -f vpc (it probes as raw).
VARIANTS = [
    ("raw", "raw", []),
    ("qcow2", "qcow2", []),
    ("qcow2-v2", "qcow2", ["-o", "compat=0.10"]),
    ("qcow2-compressed", "qcow2", ["-c"]),
    ("qcow2-zstd", "qcow2", ["-c", "-o", "compression_type=zstd"]),
    ("qcow2-extended-l2", "qcow2", ["-o", "extended_l2=on,cluster_size=128k"]),
    ("qcow2-512", "qcow2", ["-o", "cluster_size=512"]),
    ("vmdk", "vmdk", []),
    ("vmdk-stream", "vmdk", ["-o", "subformat=streamOptimized"]),
    ("vmdk-flat", "vmdk", ["-o", "subformat=monolithicFlat"]),
    ("vmdk-2gb-sparse", "vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
    ("vpc", "vpc", []),
    ("vpc-fixed", "vpc", ["-o", "subformat=fixed"]),
    ("vhdx", "vhdx", []),
    ("vhdx-fixed", "vhdx", ["-o", "subformat=fixed"]),
]


@pytest.mark.parametrize(("name", "fmt", "options"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_compare_with_own_conversion(name: str, fmt: str, options: list[str],
                                     tmp_path: Path) -> None:
    require_qemu()
    image = tmp_path / f"image.{fmt}"
    qemu_img_ok("convert", "-f", "raw", "-O", fmt, *options, str(_source(tmp_path)), str(image))
    ours = tmp_path / "ours.raw"
    converted = run_instar("convert", "-f", fmt, "-O", "raw", str(image), str(ours))
    assert converted.rc == 0, converted.stderr
    result = run_instar("compare", "-f", fmt, "-F", "raw", str(image), str(ours))
    assert (result.rc, result.stdout) == (0, "Images are identical.\n"), result.stderr
    qemu = run_qemu_img("compare", "-f", fmt, "-F", "raw", str(image), str(ours))
    assert (qemu.rc, qemu.stdout) == (0, "Images are identical.\n"), qemu.stderr


def test_differencing_vhd_compares_with_own_conversion(tmp_path: Path) -> None:
    """The case that once disagreed: compare followed no parent, reads did."""
    from test_vpc_reader import BLOCK, _bitmap, _utf16le, make_child

    require_qemu()
    base = tmp_path / "base.vhd"
    qemu_img_ok("create", "-q", "-f", "vpc", str(base), "8M")
    qemu_io(base, "write -P 0x5a 0 3M", "vpc")
    child = tmp_path / "child.vhd"
    make_child(child, base, {1: (_bitmap([(0, 8), (100, 200)]), b"\x77" * BLOCK)},
               [(b"W2ru", _utf16le("base.vhd"))])
    flat = tmp_path / "flat.raw"
    assert run_instar("convert", "-O", "raw", str(child), str(flat)).rc == 0
    data = flat.read_bytes()
    assert data[:BLOCK] == b"\x5a" * BLOCK  # from the parent
    assert data[BLOCK : BLOCK + 8 * 512] == b"\x77" * 8 * 512  # the child's sectors
    result = run_instar("compare", str(child), str(flat))
    assert (result.rc, result.stdout) == (0, "Images are identical.\n"), result.stderr


def test_differencing_vhdx_compares_with_own_conversion(tmp_path: Path) -> None:
    from test_vhdx_reader import make_child

    require_qemu()
    base = tmp_path / "base.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(base), "8M")
    qemu_io(base, "write -P 0x5a 0 3M", "vhdx")
    child = tmp_path / "child.vhdx"
    present = [i % 3 == 0 for i in range(2048)]
    make_child(child, base, {1: ("partial", b"\x66" * MIB, present),
                             4: ("full", b"\x44" * MIB, None)}, virtual_size=8 * MIB)
    flat = tmp_path / "flat.raw"
    assert run_instar("convert", "-O", "raw", str(child), str(flat)).rc == 0
    data = flat.read_bytes()
    assert data[MIB : MIB + 512] == b"\x66" * 512 and data[MIB + 512 : MIB + 1024] == b"\x5a" * 512
    assert data[4 * MIB : 5 * MIB] == b"\x44" * MIB
    result = run_instar("compare", "-F", "raw", str(child), str(flat))
    assert (result.rc, result.stdout) == (0, "Images are identical.\n")


# --- chains -------------------------------------------------------------------------------------

# Top to bottom; qemu builds backing files for qcow2 (over anything) and vmdk (over vmdk).
CHAINS = [
    ("qcow2", "qcow2", "raw"),
    ("qcow2", "qcow2", "qcow2"),
    ("qcow2", "qcow2", "vmdk"),
    ("qcow2", "vmdk", "vmdk"),
    ("vmdk", "vmdk", "vmdk"),
    ("qcow2", "qcow2", "vpc"),
    ("qcow2", "qcow2", "vhdx"),
]


def _layer(directory: Path, name: str, fmt: str, below: tuple[Path, str] | None,
           size: str | None = None) -> Path:
    path = directory / f"{name}.{fmt}"
    args = ["create", "-q", "-f", fmt]
    if below is not None:
        args += ["-b", below[0].name, "-F", below[1]]
    qemu_img_ok(*args, str(path), *([size] if size else []))
    return path


@pytest.mark.parametrize("chain", CHAINS, ids=["/".join(c) for c in CHAINS])
def test_three_deep_chain_reads_like_qemu(chain: tuple[str, str, str], tmp_path: Path) -> None:
    require_qemu()
    top_fmt, mid_fmt, base_fmt = chain
    base = tmp_path / f"base.{base_fmt}"
    qemu_img_ok("convert", "-f", "raw", "-O", base_fmt, str(_source(tmp_path, 4 * MIB)),
                str(base))
    mid = _layer(tmp_path, "mid", mid_fmt, (base, base_fmt))
    qemu_io(mid, "write -P 0x11 512k 1M", mid_fmt)
    qemu_io(mid, "write -z 3M 256k", mid_fmt)
    # A qcow2 top may be larger than what it stands on: zeros past a short backing file.
    top = _layer(tmp_path, "top", top_fmt, (mid, mid_fmt), "6M" if top_fmt == "qcow2" else None)
    qemu_io(top, "write -P 0x22 1M 64k", top_fmt)
    qemu_io(top, "write -z 2M 512k", top_fmt)
    if top_fmt == "qcow2":
        qemu_io(top, "write -P 0x33 5M 64k", top_fmt)  # past the backing file's end
    theirs, ours = tmp_path / "theirs.raw", tmp_path / "ours.raw"
    qemu_img_ok("convert", "-O", "raw", str(top), str(theirs))
    assert run_instar("convert", "-O", "raw", str(top), str(ours)).rc == 0
    assert ours.read_bytes() == theirs.read_bytes()
    for window in (["bs=65536", "skip=7", "count=90"], ["bs=1000", "skip=3000"]):
        ours_dd, theirs_dd = tmp_path / "ours-dd.raw", tmp_path / "theirs-dd.raw"
        assert run_instar("dd", *window, f"if={top}", f"of={ours_dd}").rc == 0
        qemu_img_ok("dd", *window, f"if={top}", f"of={theirs_dd}")
        assert ours_dd.read_bytes() == theirs_dd.read_bytes(), window
    for strict in ([], ["-s"]):
        result = run_instar("compare", *strict, str(top), str(theirs))
        qemu = run_qemu_img("compare", *strict, str(top), str(theirs))
        assert (result.rc, result.stdout) == (qemu.rc, qemu.stdout), strict


# --- BlockImage on a driver made here -----------------------------------------------------------


class MemoryFile(ExactReads):
    """Bytes in memory, counting preads."""

    def __init__(self, data: bytes, name: str = "memory") -> None:
        self.data = data
        self.size = len(data)
        self.name = name
        self.reads: list[tuple[int, int]] = []

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


class ScriptedDriver(Driver):
    """A layer whose answers are given as a list of runs over the whole image."""

    def __init__(self, size: int, runs: list[Run], backing: Image | None = None,
                 units: dict[object, bytes] | None = None) -> None:
        self.virtual_size = size
        self.name = "scripted"
        self._runs = runs
        self._backing = backing
        self._units = units or {}
        self.decoded: list[object] = []

    @property
    def backing(self) -> Image | None:
        return self._backing

    def map(self, offset: int, length: int) -> Iterator[Run]:
        end = offset + length
        for run in self._runs:
            lo, hi = max(offset, run.start), min(end, run.end)
            if lo < hi:
                shift = lo - run.start
                yield run._replace(start=lo, end=hi, host=run.host + shift)

    def decompress(self, run: Run) -> bytes:
        self.decoded.append(run.unit)
        return self._units[run.unit]


def test_adjacent_host_runs_are_read_with_one_pread() -> None:
    file = MemoryFile(bytes(range(256)) * 16)
    # Three answers (qemu would give three) that continue each other in the file.
    runs = [Run(0, 1024, DATA | OFFSET_VALID, file, 0),
            Run(1024, 2048, DATA | OFFSET_VALID, file, 1024),
            Run(2048, 4096, DATA | OFFSET_VALID, file, 2048)]
    image = BlockImage(ScriptedDriver(4096, runs))
    assert image.read(100, 3000) == file.data[100:3100]
    assert file.reads == [(100, 3000)]


def test_runs_that_do_not_continue_each_other_are_read_apart() -> None:
    file = MemoryFile(bytes(range(256)) * 16)
    runs = [Run(0, 1024, DATA | OFFSET_VALID, file, 2048),
            Run(1024, 2048, DATA | OFFSET_VALID, file, 0)]
    image = BlockImage(ScriptedDriver(2048, runs))
    assert image.read(0, 2048) == file.data[2048:3072] + file.data[:1024]
    assert file.reads == [(2048, 1024), (0, 1024)]


def test_unallocated_falls_through_with_zeros_past_a_short_backing_file() -> None:
    below_file = MemoryFile(b"\xbb" * 1024)
    below = BlockImage(ScriptedDriver(1024, [Run(0, 1024, DATA | OFFSET_VALID, below_file, 0)]))
    top = BlockImage(ScriptedDriver(4096, [Run(0, 512, ZERO), Run(512, 4096, 0)], below))
    assert top.read(0, 4096) == bytes(512) + b"\xbb" * 512 + bytes(3072)
    assert list(top.extents(0, 4096)) == [
        Extent(0, 512, ExtentKind.ZERO),
        Extent(512, 512, ExtentKind.DATA),
        Extent(1024, 3072, ExtentKind.ZERO),
    ]
    alone = BlockImage(ScriptedDriver(4096, [Run(0, 4096, 0)]))
    assert list(alone.extents(0, 4096)) == [Extent(0, 4096, ExtentKind.UNALLOCATED)]
    assert alone.read(0, 4096) == bytes(4096)


def test_a_compressed_unit_is_decoded_once_for_consecutive_reads() -> None:
    unit = bytes(range(256)) * 4
    driver = ScriptedDriver(1024, [Run(0, 1024, DATA | COMPRESSED, None, 0, "u")],
                            units={"u": unit})
    image = BlockImage(driver)
    assert image.read(0, 100) + image.read(100, 924) == unit
    assert driver.decoded == ["u"]
    assert list(image.status_runs()) == [Run(0, 1024, DATA, None, 0, "u")]


def test_a_unit_decoding_short_is_refused() -> None:
    driver = ScriptedDriver(1024, [Run(0, 1024, DATA | COMPRESSED, None, 0, "u")],
                            units={"u": b"\x01" * 10})
    with pytest.raises(FormatError, match="decodes to fewer bytes"):
        BlockImage(driver).read(0, 1024)


def test_status_above_falls_through_and_marks_allocation() -> None:
    file = MemoryFile(bytes(4096))
    below = BlockImage(ScriptedDriver(2048, [Run(0, 2048, DATA | OFFSET_VALID, file, 0)]))
    top = BlockImage(ScriptedDriver(4096, [Run(0, 1024, 0, step=512, anchor=0),
                                           Run(1024, 4096, 0)], below))
    layer = StatusLayer(top)
    flags, piece_end, run_end = layer.query(0)
    assert flags == DATA | OFFSET_VALID | 0x10 and piece_end == 512 and run_end == 1024
    assert layer.query(2048)[0] == ZERO | 0x10  # past the backing file: zeros, allocated


def test_generic_status_is_one_run_of_data() -> None:
    driver = ScriptedDriver(4096, [Run(0, 4096, ZERO)])
    driver.generic_status = True
    assert list(BlockImage(driver).status_runs()) == [Run(0, 4096, DATA)]


def test_a_read_needing_a_refused_backing_file_fails() -> None:
    class Refusing(ScriptedDriver):
        def check_backing_read(self) -> None:
            raise FormatError("parent CID does not match")

    below = BlockImage(ScriptedDriver(1024, [Run(0, 1024, ZERO)]))
    image = BlockImage(Refusing(1024, [Run(0, 512, ZERO), Run(512, 1024, 0)], below))
    assert image.read(0, 512) == bytes(512)  # this part needs no backing file
    with pytest.raises(FormatError, match="CID"):
        image.read(0, 1024)


def test_out_of_range_reads_are_refused() -> None:
    image = BlockImage(ScriptedDriver(1024, [Run(0, 1024, ZERO)]))
    with pytest.raises(ValueError):
        image.read(512, 1024)
