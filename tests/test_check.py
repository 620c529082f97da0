"""``instar check`` against the real ``qemu-img check`` 7.2.

Every image here is made by qemu-img and qemu-io, then (for the damaged
ones) edited in place with struct pokes; instar and qemu-img check the same
file from the same directory and must agree on the exit status, stdout
(human and JSON) and stderr (after the program name): every ERROR, Leaked
and warning line, in order.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_io, run_instar, run_qemu_img
from instar import check_image
from instar.findings import CORRUPTION, LEAK, CheckResult
from instar.formats.qcow2 import layout as L
from instar.formats.vhdx import layout as vhdx_layout

MiB = 1 << 20
Build = Callable[[Path], str]


def same(directory: Path, *args: str) -> tuple[int, str, str]:
    """``check ARGS`` by instar and qemu-img in ``directory``: the same status,
    stdout and stderr; returns qemu's."""
    ours = run_instar("check", *args, cwd=directory)
    theirs = run_qemu_img("check", *args, cwd=directory)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        theirs.rc, theirs.stdout, theirs.normalised_stderr()), args
    return theirs.rc, theirs.stdout, theirs.stderr


def both_outputs(directory: Path, name: str, fmt: str | None = None) -> int:
    """Human and JSON, probed (and with ``-f`` where given); returns the status."""
    rc, _, _ = same(directory, name)
    same(directory, "--output=json", name)
    if fmt is not None:
        same(directory, "-f", fmt, "--output=json", name)
    return rc


# --------------------------------------------------------------------------
# qcow2 pokes


class Qcow2:
    """A qcow2 file made by qemu, its structures found from its header, to poke."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as file:
            self.header = L.Header.parse(file.read(L.V3_HEADER_LENGTH))
        self.bits = self.header.cluster_bits
        self.cluster = 1 << self.bits
        self.entry_bytes = 16 if self.header.extended_l2 else 8

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as file:
            file.seek(offset)
            return file.read(length)

    def put(self, offset: int, fmt: str, value: int) -> None:
        with open(self.path, "r+b") as file:
            file.seek(offset)
            file.write(struct.pack(fmt, value))

    def u64(self, offset: int) -> int:
        value: int = struct.unpack(">Q", self.read(offset, 8))[0]
        return value

    def l1_slot(self, guest: int) -> int:
        span = self.cluster * (self.cluster // self.entry_bytes)
        return self.header.l1_table_offset + 8 * (guest // span)

    def l2_slot(self, guest: int) -> int:
        """Where in the file the L2 entry of ``guest`` lies."""
        table = self.u64(self.l1_slot(guest)) & L.L1E_OFFSET_MASK
        index = (guest >> self.bits) % (self.cluster // self.entry_bytes)
        return table + self.entry_bytes * index

    def l2_entry(self, guest: int) -> int:
        return self.u64(self.l2_slot(guest))

    def host(self, guest: int) -> int:
        return self.l2_entry(guest) & L.L2E_OFFSET_MASK

    def refcount_slot(self, cluster: int) -> int:
        assert self.header.refcount_order == 4
        per_block = self.cluster // 2
        table = self.header.refcount_table_offset
        block = self.u64(table + 8 * (cluster // per_block)) & L.REFTABLE_OFFSET_MASK
        return block + 2 * (cluster % per_block)

    def set_refcount(self, cluster: int, value: int) -> None:
        self.put(self.refcount_slot(cluster), ">H", value)

    def snapshot_entry(self) -> int:
        """Where the first snapshot table entry lies."""
        return self.header.snapshots_offset


def make_qcow2(tmp: Path, name: str = "t.qcow2", size: str = "10M",
               options: str = "", writes: tuple[str, ...] = ("write -P 0x11 0 1M",
                                                              "write -P 0x22 5M 192k")) -> Qcow2:
    args = ["create", "-q", "-f", "qcow2"] + (["-o", options] if options else [])
    qemu_img_ok(*args, str(tmp / name), size)
    for command in writes:
        qemu_io(tmp / name, command, "qcow2")
    return Qcow2(tmp / name)


def poked(options: str = "", writes: tuple[str, ...] | None = None, size: str = "10M",
          ) -> Callable[[Callable[[Qcow2], None]], Build]:
    """A builder: qemu's image, then ``change`` pokes it."""
    def wrap(change: Callable[[Qcow2], None]) -> Build:
        def build(tmp: Path) -> str:
            image = make_qcow2(tmp, size=size, options=options,
                               **({"writes": writes} if writes is not None else {}))
            change(image)
            return image.path.name
        build.__name__ = change.__name__
        return build
    return wrap


def _append_cluster(image: Qcow2) -> int:
    """Grow the file by a cluster; returns its index."""
    size = image.path.stat().st_size
    index = -(-size // image.cluster)
    with open(image.path, "r+b") as file:
        file.truncate((index + 1) * image.cluster)
    return index


@poked()
def leaked_cluster(image: Qcow2) -> None:
    image.set_refcount(_append_cluster(image), 1)


@poked(options="cluster_size=4k", writes=("write -P 1 0 64k", "write -P 2 3M 64k"))
def dropped_l2_table(image: Qcow2) -> None:
    """An L1 entry cleared: its L2 table and data clusters leak."""
    image.put(image.l1_slot(3 * MiB), ">Q", 0)


@poked()
def refcount_too_low(image: Qcow2) -> None:
    image.set_refcount(image.host(64 << 10) >> image.bits, 0)


@poked()
def refcount_too_high(image: Qcow2) -> None:
    image.set_refcount(image.host(128 << 10) >> image.bits, 2)


@poked()
def refcount_block_zeroed(image: Qcow2) -> None:
    block = image.refcount_slot(0)
    with open(image.path, "r+b") as file:
        file.seek(block)
        file.write(bytes(image.cluster))


@poked()
def l2_entry_into_l1_table(image: Qcow2) -> None:
    image.put(image.l2_slot(0), ">Q", L.OFLAG_COPIED | image.header.l1_table_offset)


@poked()
def l2_entry_into_refcount_block(image: Qcow2) -> None:
    block = image.refcount_slot(0)
    image.put(image.l2_slot(64 << 10), ">Q", L.OFLAG_COPIED | block)


@poked()
def l2_entry_past_eof(image: Qcow2) -> None:
    end = -(-image.path.stat().st_size // image.cluster) * image.cluster
    image.put(image.l2_slot(0), ">Q", L.OFLAG_COPIED | (end + 100 * image.cluster))


@poked()
def l2_entry_in_last_cluster(image: Qcow2) -> None:
    """A reference to the cluster the file ends in the middle of: counted, not past."""
    size = image.path.stat().st_size
    with open(image.path, "r+b") as file:
        file.truncate(size + image.cluster + 100)
    image.put(image.l2_slot(0), ">Q", L.OFLAG_COPIED | (size + image.cluster))


@poked()
def two_l2_entries_share_a_cluster(image: Qcow2) -> None:
    image.put(image.l2_slot(5 * MiB), ">Q", image.l2_entry(0))


@poked()
def oflag_copied_cleared_in_l2(image: Qcow2) -> None:
    image.put(image.l2_slot(192 << 10), ">Q", image.l2_entry(192 << 10) & ~L.OFLAG_COPIED)


@poked()
def oflag_copied_cleared_in_l1(image: Qcow2) -> None:
    slot = image.l1_slot(0)
    image.put(slot, ">Q", image.u64(slot) & ~L.OFLAG_COPIED)


@poked()
def l1_entry_unaligned(image: Qcow2) -> None:
    slot = image.l1_slot(0)
    image.put(slot, ">Q", image.u64(slot) + 512)


@poked()
def l2_entry_unaligned(image: Qcow2) -> None:
    image.put(image.l2_slot(64 << 10), ">Q", image.l2_entry(64 << 10) + 512)


@poked()
def zero_cluster_unaligned(image: Qcow2) -> None:
    image.put(image.l2_slot(64 << 10), ">Q", image.l2_entry(64 << 10) + 512 | L.OFLAG_ZERO)


@poked()
def l1_reserved_bits(image: Qcow2) -> None:
    slot = image.l1_slot(0)
    image.put(slot, ">Q", image.u64(slot) | 1 << 56)


@poked()
def l2_reserved_bits(image: Qcow2) -> None:
    image.put(image.l2_slot(0), ">Q", image.l2_entry(0) | 2)


@poked()
def l1_entry_without_offset(image: Qcow2) -> None:
    """An L1 entry that is only a flag: qemu counts the header cluster as an L2 table."""
    image.put(image.l1_slot(0), ">Q", L.OFLAG_COPIED)


@poked()
def refcount_table_reserved_bits(image: Qcow2) -> None:
    slot = image.header.refcount_table_offset
    image.put(slot, ">Q", image.u64(slot) | 1)


@poked()
def refcount_block_unaligned(image: Qcow2) -> None:
    slot = image.header.refcount_table_offset
    image.put(slot, ">Q", image.u64(slot) + 512)


@poked()
def refcount_block_outside_image(image: Qcow2) -> None:
    image.put(image.header.refcount_table_offset + 8, ">Q", 1 << 40)


@poked()
def refcount_table_past_eof(image: Qcow2) -> None:
    """The refcount table moved to the last cluster and said to be 4 MiB long."""
    table = image.read(image.header.refcount_table_offset, image.cluster)
    last = _append_cluster(image)
    with open(image.path, "r+b") as file:
        file.seek(last * image.cluster)
        file.write(table)
    image.put(48, ">Q", last * image.cluster)
    image.put(56, ">I", 64)


@poked()
def truncated(image: Qcow2) -> None:
    with open(image.path, "r+b") as file:
        file.truncate(image.host(5 * MiB) + 4096)


@poked()
def dirty_with_lazy_refcounts(image: Qcow2) -> None:
    image.put(72, ">Q", L.INCOMPAT_DIRTY)
    image.set_refcount(image.host(0) >> image.bits, 0)


@poked(options="refcount_bits=1")
def refcount_overflow(image: Qcow2) -> None:
    """Refcounts of one bit: a cluster named twice overflows (qemu's order of lines)."""
    image.put(image.l2_slot(5 * MiB), ">Q", image.l2_entry(64 << 10))
    image.put(image.l2_slot(5 * MiB + (64 << 10)), ">Q", image.l2_entry(64 << 10))


def _compressed(tmp: Path, options: str = "") -> Qcow2:
    raw = tmp / "source.raw"
    data = bytearray(pattern(3 * MiB, seed=5))
    data[MiB : 2 * MiB] = bytes(MiB)
    raw.write_bytes(bytes(data))
    args = ["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"]
    qemu_img_ok(*args, *(["-o", options] if options else []), str(raw), str(tmp / "c.qcow2"))
    raw.unlink()
    return Qcow2(tmp / "c.qcow2")


def compressed_copied_flag(tmp: Path) -> str:
    image = _compressed(tmp)
    image.put(image.l2_slot(0), ">Q", image.l2_entry(0) | L.OFLAG_COPIED)
    return "c.qcow2"


def compressed_past_eof(tmp: Path) -> str:
    image = _compressed(tmp)
    shift = L.compressed_shift(image.bits)
    entry = image.l2_entry(64 << 10)
    image.put(image.l2_slot(64 << 10), ">Q", (entry & ~((1 << shift) - 1)) | (1 << 40))
    return "c.qcow2"


def compressed_shared_with_data(tmp: Path) -> str:
    image = _compressed(tmp)
    host = image.l2_entry(0) & ((1 << L.compressed_shift(image.bits)) - 1)
    image.put(image.l2_slot(2 * MiB), ">Q", L.OFLAG_COPIED | (host & ~(image.cluster - 1)))
    return "c.qcow2"


def _with_snapshots(tmp: Path, options: str = "") -> Qcow2:
    image = make_qcow2(tmp, options=options)
    qemu_img_ok("snapshot", "-c", "first", str(image.path))
    qemu_io(image.path, "write -P 0x33 64k 128k", "qcow2")
    qemu_img_ok("snapshot", "-c", "second", str(image.path))
    qemu_io(image.path, "write -P 0x44 6M 64k", "qcow2")
    return Qcow2(image.path)


def snapshot_l1_unaligned(tmp: Path) -> str:
    image = _with_snapshots(tmp)
    at = image.snapshot_entry()
    image.put(at, ">Q", image.u64(at) + 512)
    return image.path.name


def snapshot_l1_too_large(tmp: Path) -> str:
    image = _with_snapshots(tmp)
    image.put(image.snapshot_entry() + 8, ">I", 0x1000000)
    return image.path.name


def snapshot_l1_past_eof(tmp: Path) -> str:
    image = _with_snapshots(tmp)
    image.put(image.snapshot_entry(), ">Q", 1 << 40)
    return image.path.name


def _snapshot_l1_at(offset: int) -> Build:
    """A snapshot L1 table at an offset no file reaches: qemu's int64 arithmetic
    decides between "exceeding the end", an I/O error and running out of memory."""
    def build(tmp: Path) -> str:
        image = _with_snapshots(tmp)
        image.put(image.snapshot_entry(), ">Q", offset)
        return image.path.name
    build.__name__ = f"snapshot_l1_at_{offset:#x}"
    return build


def snapshot_l2_shared_differently(tmp: Path) -> str:
    """A snapshot's L2 entry changed: one L2 table walked twice with other results."""
    image = _with_snapshots(tmp)
    l1 = image.u64(image.snapshot_entry()) & L.L1E_OFFSET_MASK
    table = image.u64(l1) & L.L1E_OFFSET_MASK
    image.put(table + 8 * 3, ">Q", image.u64(table) | L.OFLAG_COPIED)
    return image.path.name


def snapshot_incomplete(tmp: Path) -> str:
    image = _with_snapshots(tmp)
    image.put(image.snapshot_entry() + 36, ">I", 8)  # extra data of 8 bytes, not 24
    return image.path.name


def snapshot_extra_too_large(tmp: Path) -> str:
    image = _with_snapshots(tmp)
    image.put(image.snapshot_entry() + 36, ">I", 2000)
    return image.path.name


def snapshot_count_too_large(tmp: Path) -> str:
    image = _with_snapshots(tmp)
    image.put(60, ">I", 70000)
    return image.path.name


def snapshot_table_unaligned(tmp: Path) -> str:
    image = _with_snapshots(tmp)
    image.put(64, ">Q", image.header.snapshots_offset + 8)
    return image.path.name


def snapshot_table_past_eof(tmp: Path) -> str:
    image = make_qcow2(tmp)
    image.put(60, ">I", 3)
    image.put(64, ">Q", 1 << 28)
    return image.path.name


def _extended(tmp: Path) -> Qcow2:
    return make_qcow2(tmp, options="extended_l2=on",
                      writes=("write -P 1 0 4k", "write -P 2 100k 8k", "write -z 1M 64k"))


def extended_bitmap_both_bits(tmp: Path) -> str:
    image = _extended(tmp)
    slot = image.l2_slot(0)
    image.put(slot + 8, ">Q", image.u64(slot + 8) | 1 << 32)  # subcluster 0: data and zero
    return image.path.name


def extended_unallocated_with_bits(tmp: Path) -> str:
    image = _extended(tmp)
    image.put(image.l2_slot(3 * MiB) + 8, ">Q", 0x3)
    return image.path.name


def _data_file(tmp: Path, raw: bool = False) -> Qcow2:
    options = "data_file=t.data" + (",data_file_raw=on" if raw else "")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", options, "t.qcow2", "10M", cwd=tmp)
    for command in ("write -P 1 0 1M", "write -P 2 5M 64k"):
        qemu_io("t.qcow2", command, "qcow2", cwd=tmp)
    return Qcow2(tmp / "t.qcow2")


def bitmap_data_past_eof(tmp: Path) -> str:
    """A persistent bitmap whose data cluster lies far past the end of the file."""
    image = make_qcow2(tmp)
    qemu_img_ok("bitmap", "--add", str(image.path), "b0")
    qemu_io(image.path, "write -P 2 2M 64k", "qcow2")
    header = image.read(0, image.cluster)
    position = image.header.header_length
    while True:
        kind, length = struct.unpack_from(">II", header, position)
        if kind == L.EXT_BITMAPS:
            directory = struct.unpack_from(">IIQQ", header, position + 8)[3]
            break
        assert kind != L.EXT_END
        position += 8 + (length + 7 & ~7)
    table = image.u64(directory)
    image.put(table, ">Q", 1 << 40)
    return image.path.name


def data_file_compressed_entry(tmp: Path) -> str:
    image = _data_file(tmp)
    image.put(image.l2_slot(0), ">Q", L.OFLAG_COMPRESSED | 4096)
    return "t.qcow2"


def data_file_with_snapshots(tmp: Path) -> str:
    image = _data_file(tmp)
    image.put(60, ">I", 1)
    image.put(64, ">Q", 3 * image.cluster)
    return "t.qcow2"


DAMAGED: list[Build] = [
    leaked_cluster, dropped_l2_table, refcount_too_low, refcount_too_high,
    refcount_block_zeroed, l2_entry_into_l1_table, l2_entry_into_refcount_block,
    l2_entry_past_eof, l2_entry_in_last_cluster, two_l2_entries_share_a_cluster,
    oflag_copied_cleared_in_l2, oflag_copied_cleared_in_l1, l1_entry_unaligned,
    l2_entry_unaligned, zero_cluster_unaligned, l1_reserved_bits, l2_reserved_bits,
    l1_entry_without_offset, refcount_table_reserved_bits, refcount_block_unaligned,
    refcount_block_outside_image, refcount_table_past_eof, truncated,
    dirty_with_lazy_refcounts, refcount_overflow, compressed_copied_flag,
    compressed_past_eof, compressed_shared_with_data, snapshot_l1_unaligned,
    snapshot_l1_too_large, snapshot_l1_past_eof, _snapshot_l1_at(1 << 63),
    _snapshot_l1_at((1 << 63) - MiB), _snapshot_l1_at(0xFFFF_FFFF_FFFF_0000),
    snapshot_l2_shared_differently,
    snapshot_incomplete, snapshot_extra_too_large, snapshot_count_too_large,
    snapshot_table_unaligned, snapshot_table_past_eof, extended_bitmap_both_bits,
    extended_unallocated_with_bits, data_file_compressed_entry, data_file_with_snapshots,
    bitmap_data_past_eof,
]


@pytest.mark.usefixtures("qemu_img", "allow_own_directories")
@pytest.mark.parametrize("build", DAMAGED, ids=[build.__name__ for build in DAMAGED])
def test_damaged_qcow2_like_qemu(build: Build, tmp_path: Path) -> None:
    name = build(tmp_path)
    assert both_outputs(tmp_path, name, "qcow2") != 0
    same(tmp_path, "-q", name)


# --------------------------------------------------------------------------
# clean images of every kind


def _qcow2_clean(options: str, writes: tuple[str, ...] = ("write -P 1 0 1M",
                                                          "write -P 2 3M 100k")) -> Build:
    def build(tmp: Path) -> str:
        return make_qcow2(tmp, options=options, writes=writes).path.name
    build.__name__ = "qcow2 " + (options or "defaults")
    return build


def _snapshots_v2(tmp: Path) -> str:
    return _with_snapshots(tmp, "compat=0.10").path.name


def _snapshots_v3(tmp: Path) -> str:
    return _with_snapshots(tmp).path.name


def _compressed_zlib(tmp: Path) -> str:
    return _compressed(tmp).path.name


def _compressed_zstd(tmp: Path) -> str:
    return _compressed(tmp, "compression_type=zstd,cluster_size=4k").path.name


def _bitmaps(tmp: Path) -> str:
    image = make_qcow2(tmp)
    qemu_img_ok("bitmap", "--add", str(image.path), "b0")
    qemu_img_ok("bitmap", "--add", "-g", "4096", str(image.path), "b1")
    return image.path.name


def _zeroes_and_discards(tmp: Path) -> str:
    return make_qcow2(tmp, writes=("write -P 1 0 2M", "write -z 64k 64k",
                                   "write -z -u 1M 128k", "discard 256k 64k")).path.name


def _backed(tmp: Path) -> str:
    make_qcow2(tmp, name="base.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                str(tmp / "top.qcow2"))
    qemu_io(tmp / "top.qcow2", "write -P 9 128k 64k", "qcow2", cwd=tmp)
    return "top.qcow2"


def _sparse_file(tmp: Path) -> str:
    """A qcow2 whose file goes on (a hole) far past its last cluster."""
    image = make_qcow2(tmp)
    with open(image.path, "r+b") as file:
        file.truncate(4 << 30)
    return image.path.name


def _fragmented(tmp: Path) -> str:
    writes = tuple(f"write -P {n} {(7 - n) * 256}k 64k" for n in range(8))
    return make_qcow2(tmp, writes=writes).path.name


CLEAN: list[Build] = [
    _qcow2_clean(""), _qcow2_clean("compat=0.10"), _qcow2_clean("cluster_size=512"),
    _qcow2_clean("cluster_size=2M"), _qcow2_clean("lazy_refcounts=on"),
    *(_qcow2_clean(f"refcount_bits={bits}") for bits in (1, 2, 4, 8, 32, 64)),
    _qcow2_clean("extended_l2=on", ("write -P 1 0 4k", "write -P 2 100k 40k")),
    _qcow2_clean("", ()), _snapshots_v2, _snapshots_v3, _compressed_zlib, _compressed_zstd,
    _bitmaps, _zeroes_and_discards, _backed, _sparse_file, _fragmented,
    lambda tmp: _data_file(tmp).path.name, lambda tmp: _data_file(tmp, raw=True).path.name,
]
CLEAN_IDS = [build.__name__ for build in CLEAN[:-2]] + ["data file", "raw data file"]


@pytest.mark.usefixtures("qemu_img", "allow_own_directories")
@pytest.mark.parametrize("build", CLEAN, ids=CLEAN_IDS)
def test_clean_qcow2_like_qemu(build: Build, tmp_path: Path) -> None:
    assert both_outputs(tmp_path, build(tmp_path), "qcow2") == 0


def test_empty_qcow2(tmp_path: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "qcow2", str(tmp_path / "e.qcow2"), "0")
    assert both_outputs(tmp_path, "e.qcow2") == 0


# --------------------------------------------------------------------------
# vmdk, vhdx, vpc, raw


def _vmdk(subformat: str) -> Build:
    def build(tmp: Path) -> str:
        qemu_img_ok("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}",
                    str(tmp / "d.vmdk"), "8M")
        if subformat != "streamOptimized":
            qemu_io(tmp / "d.vmdk", "write -P 5 1M 1M", "vmdk", cwd=tmp)
        return "d.vmdk"
    build.__name__ = f"vmdk {subformat}"
    return build


def _vmdk_zeroed_grains(tmp: Path) -> str:
    qemu_img_ok("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", str(tmp / "z.vmdk"), "8M")
    qemu_io(tmp / "z.vmdk", "write -P 5 0 1M", "vmdk")
    qemu_io(tmp / "z.vmdk", "write -z 2M 1M", "vmdk")
    return "z.vmdk"


def _vmdk_child(tmp: Path) -> str:
    qemu_img_ok("create", "-q", "-f", "vmdk", str(tmp / "base.vmdk"), "8M")
    qemu_io(tmp / "base.vmdk", "write -P 5 0 1M", "vmdk")
    qemu_img_ok("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "child.vmdk",
                cwd=tmp)
    qemu_io("child.vmdk", "write -P 6 64k 64k", "vmdk", cwd=tmp)
    return "child.vmdk"


def _stream(tmp: Path) -> str:
    raw = tmp / "s.raw"
    raw.write_bytes(pattern(3 * MiB, seed=2))
    qemu_img_ok("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                str(raw), str(tmp / "s.vmdk"))
    raw.unlink()
    return "s.vmdk"


def _vhdx(options: str) -> Build:
    def build(tmp: Path) -> str:
        qemu_img_ok("create", "-q", "-f", "vhdx", "-o", options, str(tmp / "x.vhdx"), "40M")
        qemu_io(tmp / "x.vhdx", "write -P 7 0 3M", "vhdx")
        qemu_io(tmp / "x.vhdx", "write -P 8 17M 1M", "vhdx")
        return "x.vhdx"
    build.__name__ = f"vhdx {options}"
    return build


def _vpc(subformat: str) -> Build:
    def build(tmp: Path) -> str:
        qemu_img_ok("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}",
                    str(tmp / "v.vhd"), "8M")
        return "v.vhd"
    build.__name__ = f"vpc {subformat}"
    return build


def _raw(tmp: Path) -> str:
    (tmp / "r.img").write_bytes(pattern(MiB))
    return "r.img"


OTHER_CLEAN: list[Build] = [
    *(_vmdk(sub) for sub in ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                             "twoGbMaxExtentFlat", "streamOptimized")),
    _stream, _vmdk_zeroed_grains, _vmdk_child,
    *(_vhdx(options) for options in ("subformat=dynamic", "subformat=fixed",
                                     "block_size=1M", "block_size=32M,log_size=2M")),
]


@pytest.mark.usefixtures("qemu_img", "allow_own_directories")
@pytest.mark.parametrize("build", OTHER_CLEAN, ids=[b.__name__ for b in OTHER_CLEAN])
def test_clean_vmdk_and_vhdx_like_qemu(build: Build, tmp_path: Path) -> None:
    assert both_outputs(tmp_path, build(tmp_path)) == 0


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("build", [_vpc("dynamic"), _vpc("fixed"), _raw],
                         ids=["vpc dynamic", "vpc fixed", "raw"])
def test_formats_without_checks(build: Build, tmp_path: Path) -> None:
    """raw and vpc have no check in qemu: exit 63, "does not support checks"."""
    assert both_outputs(tmp_path, build(tmp_path)) == 63


def _gte_slot(path: Path, grain: int) -> int:
    """Where the grain table entry of ``grain`` lies in a sparse extent."""
    header = path.read_bytes()[:512]
    gtes, gd_sector = struct.unpack_from("<I", header, 44)[0], struct.unpack_from(
        "<Q", header, 56)[0]
    table = struct.unpack_from("<I", path.read_bytes(), gd_sector * 512 + 4 * (grain // gtes))[0]
    return table * 512 + 4 * (grain % gtes)


def _put(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(struct.pack(fmt, value))


def vmdk_grain_past_eof(tmp: Path) -> str:
    name = _vmdk("monolithicSparse")(tmp)
    _put(tmp / name, _gte_slot(tmp / name, 17), "<I", 1 << 24)
    _put(tmp / name, _gte_slot(tmp / name, 30), "<I", 1 << 25)
    return name


def vmdk_stream_grain_past_eof(tmp: Path) -> str:
    name = _stream(tmp)
    _put(tmp / name, _gte_slot(tmp / name, 5), "<I", 1 << 24)
    return name


def vmdk_second_extent_grain_past_eof(tmp: Path) -> str:
    qemu_img_ok("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
                str(tmp / "d.vmdk"), "3G")
    qemu_io(tmp / "d.vmdk", "write -P 5 2047M 2M", "vmdk", cwd=tmp)
    extent = tmp / "d-s002.vmdk"
    _put(extent, _gte_slot(extent, 3), "<I", 1 << 24)
    return "d.vmdk"


def vmdk_flat_extent_empty(tmp: Path) -> str:
    name = _vmdk("monolithicFlat")(tmp)
    (tmp / "d-flat.vmdk").write_bytes(b"")
    return name


def vhdx_bat_past_eof(tmp: Path) -> str:
    name = _vhdx("subformat=dynamic")(tmp)
    _set_bat(tmp / name, 0, (400 * MiB) | vhdx_layout.PAYLOAD_FULLY_PRESENT)
    return name


def vhdx_bat_end_past_eof(tmp: Path) -> str:
    name = _vhdx("block_size=1M")(tmp)
    with open(tmp / name, "r+b") as file:
        file.truncate(file.seek(0, 2) - 512 * 1024)
    return name


def vhdx_bat_into_metadata(tmp: Path) -> str:
    name = _vhdx("subformat=dynamic")(tmp)
    _set_bat(tmp / name, 1, (3 * MiB) | vhdx_layout.PAYLOAD_FULLY_PRESENT)
    _set_bat(tmp / name, 2, (1 * MiB) | vhdx_layout.PAYLOAD_FULLY_PRESENT)
    return name


def vhdx_bat_offset_overflow(tmp: Path) -> str:
    name = _vhdx("subformat=dynamic")(tmp)
    _set_bat(tmp / name, 3, vhdx_layout.OFFSET_MASK | vhdx_layout.PAYLOAD_FULLY_PRESENT)
    return name


def _set_bat(path: Path, index: int, value: int) -> None:
    _put(path, 2 * MiB + 8 * index, "<Q", value)


OTHER_DAMAGED: list[Build] = [
    vmdk_grain_past_eof, vmdk_stream_grain_past_eof, vmdk_second_extent_grain_past_eof,
    vmdk_flat_extent_empty, vhdx_bat_past_eof, vhdx_bat_end_past_eof, vhdx_bat_into_metadata,
    vhdx_bat_offset_overflow,
]


@pytest.mark.usefixtures("qemu_img", "allow_own_directories")
@pytest.mark.parametrize("build", OTHER_DAMAGED, ids=[b.__name__ for b in OTHER_DAMAGED])
def test_damaged_vmdk_and_vhdx_like_qemu(build: Build, tmp_path: Path) -> None:
    assert both_outputs(tmp_path, build(tmp_path)) != 0


def test_vhdx_pending_log_refused_as_qemu(tmp_path: Path) -> None:
    """qemu-img check opens read only and cannot replay a pending log: nor
    does instar's check (its reads replay it in memory)."""
    from test_vhdx_reader import dirty_image

    qemu_img_ok("convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M",
                *_pattern_file(tmp_path, 3 * MiB), str(tmp_path / "bs1.vhdx"))
    image, _ = dirty_image(tmp_path, tmp_path)
    shutil.move(image, tmp_path / "log.vhdx")
    rc, _, stderr = same(tmp_path, "log.vhdx")
    assert rc == 1 and "contains a log that needs to be replayed" in stderr


def _pattern_file(tmp: Path, size: int) -> list[str]:
    raw = tmp / "pattern.raw"
    raw.write_bytes(pattern(size, seed=4))
    return [str(raw)]


# --------------------------------------------------------------------------
# qemu's sample images


def test_sample_images_like_qemu(tmp_path: Path) -> None:
    """Every sample image of a format instar reads: the same check as qemu's
    (the parallels ones among them: one leaks, as qemu says)."""
    from helpers import unpack_sample_image
    from test_sample_images import COMPARED, PENDING_LOG

    for name in [*COMPARED, PENDING_LOG]:
        unpack_sample_image(name, tmp_path)
        same(tmp_path, name)
        same(tmp_path, "--output=json", name)


# --------------------------------------------------------------------------
# the command line


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", [
    [], ["a.qcow2", "b.qcow2"], ["-r", "sometimes", "a.qcow2"], ["--output=xml", "a.qcow2"],
    ["-T", "bogus", "a.qcow2"], ["missing.qcow2"], ["--bogus", "a.qcow2"],
    ["-f", "nope", "a.qcow2"], ["-T", "none", "-U", "a.qcow2"], ["-f", "raw", "a.qcow2"],
], ids=str)
def test_command_line_like_qemu(args: list[str], tmp_path: Path) -> None:
    make_qcow2(tmp_path, name="a.qcow2")
    same(tmp_path, *args)


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_of_a_clean_image_changes_nothing(mode: str, tmp_path: Path) -> None:
    """-r on a clean image: qemu's output, the file as it was (repairs:
    tests/test_check_repair.py)."""
    image = make_qcow2(tmp_path)
    before = image.path.read_bytes()
    same(tmp_path, "-r", mode, image.path.name)
    assert image.path.read_bytes() == before


def test_help() -> None:
    result = run_instar("check", "--help")
    assert result.rc == 0 and result.stdout.startswith("usage: instar check")


# --------------------------------------------------------------------------
# the findings as data (for inspect)


def test_result_is_data(tmp_path: Path) -> None:
    name = refcount_too_high(tmp_path)
    result = check_image(str(tmp_path / name))
    assert isinstance(result, CheckResult)
    assert result.exit_code == 2 and result.format == "qcow2"
    assert [f.code for f in result.of_kind(LEAK)] == ["leaked-cluster"]
    assert [f.code for f in result.of_kind(CORRUPTION)] == ["oflag-copied-data"]
    assert CheckResult.from_data(result.to_data()).to_data() == result.to_data()


# --------------------------------------------------------------------------
# bounds: what instar does where qemu would print or walk without end


@pytest.mark.usefixtures("qemu_img")
def test_lines_past_the_limit_are_counted_not_kept(tmp_path: Path) -> None:
    """A zeroed refcount table: qemu prints a line per cluster (twice for data
    clusters). instar prints its first MAX_FINDINGS lines, says how many more
    there were, and the same summary and exit status."""
    from instar.findings import MAX_FINDINGS

    image = make_qcow2(tmp_path, size="64M", options="cluster_size=512",
                       writes=("write -P 3 0 40M",))
    table = image.header.refcount_table_offset
    with open(image.path, "r+b") as file:
        file.seek(table)
        file.write(bytes(image.header.refcount_table_clusters * image.cluster))
    ours = run_instar("check", image.path.name, cwd=tmp_path)
    theirs = run_qemu_img("check", image.path.name, cwd=tmp_path)
    qemu_lines = theirs.stderr.splitlines()
    assert len(qemu_lines) > MAX_FINDINGS + 1000
    assert (ours.rc, ours.stdout) == (theirs.rc, theirs.stdout)
    assert ours.rc == 2
    assert ours.stderr.splitlines() == [
        *qemu_lines[:MAX_FINDINGS],
        f"instar: {len(qemu_lines) - MAX_FINDINGS} more lines like these were not kept "
        f"(instar keeps the first {MAX_FINDINGS})",
    ]


def _snapshot_entry(l1_offset: int, l1_size: int, name: bytes) -> bytes:
    """A version 3 snapshot table entry (24 bytes of extra data), padded to 8."""
    entry = struct.pack(">QIHHIIQII", l1_offset, l1_size, 1, len(name), 0, 0, 0, 0, 24)
    entry += bytes(24) + b"1" + name
    return entry + bytes(-len(entry) % 8)


def test_tables_named_over_and_over_are_refused(tmp_path: Path) -> None:
    """Snapshots whose L1 tables all lie over the same half megabyte of the
    file: walking them would read far more than the file holds. Refused in
    one line, quickly, where qemu walks every one."""
    image = make_qcow2(tmp_path)
    entries = b"".join(_snapshot_entry(0, 65536, b"s%d" % n) for n in range(64))
    with open(image.path, "r+b") as file:
        at = -(-file.seek(0, 2) // image.cluster) * image.cluster
        file.seek(at)
        file.write(entries)
    image.put(60, ">I", 64)
    image.put(64, ">Q", at)
    result = run_instar("check", image.path.name, cwd=tmp_path)
    assert result.rc == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "instar: checking 't.qcow2' would read more metadata than 4 times the file holds "
        "(tables named over and over): the image is corrupt or hostile; refused")


def test_overflowing_walks_too_long_in_order_are_refused(tmp_path: Path) -> None:
    """One-bit refcounts and a hundred L1 entries naming one L2 table: its
    clusters overflow, and qemu's order of overflow lines would need walking
    800 000 L2 entries one by one. Refused."""
    image = make_qcow2(tmp_path, size="100G", options="refcount_bits=1",
                       writes=("write -P 1 0 64k",))
    l1_entry = image.u64(image.l1_slot(0))
    for index in range(1, 101):
        image.put(image.header.l1_table_offset + 8 * index, ">Q", l1_entry)
    result = run_instar("check", image.path.name, cwd=tmp_path)
    assert (result.rc, result.stdout) == (1, "")
    assert result.stderr == (
        "instar: checking 't.qcow2': clusters are referenced more times than 1-bit refcounts "
        "can count, and walking the 101 L2 tables named in qemu's order would take too long: "
        "the image is corrupt or hostile; refused\n")


@pytest.mark.usefixtures("qemu_img")
def test_info_gives_qemus_advice_on_a_snapshot_table_too_large(tmp_path: Path) -> None:
    """The snapshot table walk is info's too: the same refusal, with qemu's
    advice on the line after it."""
    name = snapshot_extra_too_large(tmp_path)
    ours, theirs = run_instar("info", name, cwd=tmp_path), run_qemu_img("info", name, cwd=tmp_path)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        theirs.rc, theirs.stdout, theirs.normalised_stderr())
    assert theirs.stderr.count("\n") == 2
