"""Conformance: damaged images of every format, one table per format, one test body.

Each row names a base image (made by qemu-img and qemu-io: patterned data,
zeros, holes; written by hand only where qemu cannot make it), the damage
done to a copy of it (bytes poked at an offset, often computed from the
header, or a truncation), what instar says (a regex on its one line of
stderr), and whether qemu-img 7.2 refuses the damaged image too. That column
is checked by running ``qemu-img convert -O raw`` and ``qemu-img info`` on
the same file. Rows with no message are read by instar, and must read as
qemu reads them.

One body checks every row with ``instar info``, ``dd``, ``convert -O raw``
and ``compare``: exit 1 (compare: qemu's 2, 3 or 4), one line matching the
row, no traceback, nothing left behind.
"""

from __future__ import annotations

import bz2
import dataclasses
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import test_bochs as bochs_tests
import test_cloop as cloop_tests
import test_dmg as dmg_tests
import test_parallels_reader as parallels_tests
import test_vhdx_reader as vhdx_tests
import test_vpc_reader as vpc_tests
from helpers import (
    Result,
    pattern,
    qemu_img_ok,
    qemu_io,
    run_instar,
    run_qemu_img,
    write_pieces,
)
from instar.formats.vhdx import layout as vhdx_layout

KiB = 1 << 10
MiB = 1 << 20

# --- the language of the tables ------------------------------------------------------------

Offset = int | Callable[[Path], int]
Value = int | bytes | Callable[[Path], int | bytes]


@dataclass(frozen=True)
class Poke:
    """Write ``struct.pack(fmt, *values)`` at ``at`` in the image, or in ``file``
    (another file of the image's directory); an offset or value may be computed
    from the file (a function of its path)."""

    at: Offset
    fmt: str
    values: tuple[Value, ...]
    file: str | None = None

    def apply(self, path: Path) -> None:
        offset = self.at(path) if callable(self.at) else self.at
        values = [value(path) if callable(value) else value for value in self.values]
        with path.open("r+b") as handle:
            handle.seek(offset)
            handle.write(struct.pack(self.fmt, *values))


def poke(at: Offset, fmt: str, *values: Value, file: str | None = None) -> Poke:
    return Poke(at, fmt, values, file)


@dataclass(frozen=True)
class Cut:
    """Truncate the file to ``size`` bytes (or ``size(path)``)."""

    size: Offset
    file: str | None = None

    def apply(self, path: Path) -> None:
        os.truncate(path, self.size(path) if callable(self.size) else self.size)


@dataclass(frozen=True)
class Edit:
    """A step that is no poke: recompute a checksum, rewrite a structure, remove a file."""

    run: Callable[[Path], None]
    file: str | None = None

    def apply(self, path: Path) -> None:
        self.run(path)


Step = Poke | Cut | Edit


@dataclass(frozen=True)
class Base:
    """A directory of files, made once per module; ``image`` is the file the
    commands name (relative to the directory, as in every message)."""

    key: str
    build: Callable[[Path], None]
    image: str


OPENING = "Could not open '{image}': "  # qemu's words before the reason a format gives
IN_IMAGE = "{image}: "  # before the reason a read fails: compare says "... of {image}: "


@dataclass(frozen=True)
class Case:
    """One row.

    ``says``: instar's line of stderr after ``instar: ``, a regex that must
    match all of it (``{image}`` stands for the image's name: OPENING before
    a reason at open, IN_IMAGE before a reason a read fails); None: instar
    reads the image, as qemu does (or, where qemu refuses it, as qemu reads the
    undamaged base). ``qemu_refuses``: qemu-img convert exits non-zero.
    ``fails_at``: where instar stops, which decides what info and compare do:
    "open" (every command fails; compare exits 2), "backing" (the image
    opens, a backing file does not: info works, compare 2), "status" (the
    mapping is wrong: info works, compare 3) or "read" (the data is wrong:
    info works, compare 4). ``info_says``: info's line, where it differs.
    ``same_as_qemu``: instar's line is qemu-img's, word for word. ``fmt``: the
    ``-f`` every command gets ("" for none: probed); ``probes``: the damaged
    file still probes as ``fmt``, so ``dd`` runs a second time without ``-f``.
    """

    name: str
    base: Base
    patch: tuple[Step, ...]
    says: str | None
    qemu_refuses: bool
    fails_at: str = "open"
    info_says: str | None = None
    same_as_qemu: bool = False
    fmt: str | None = None
    probes: bool = True
    family: str = ""


def table(family: str, fmt: str | None, *rows: Case) -> list[Case]:
    """The rows of one format: ``fmt`` is the ``-f`` they take unless they say."""
    return [
        dataclasses.replace(row, family=family, fmt=row.fmt if row.fmt is not None else fmt)
        for row in rows
    ]


def row(name: str, base: Base, patch: Step | tuple[Step, ...], says: str | None,
        qemu_refuses: bool, **more: object) -> Case:
    """A row: its name, base, damage (one step or several), instar's line (None:
    readable), whether qemu-img refuses it; then the other columns by name."""
    steps = patch if isinstance(patch, tuple) else (patch,)
    return Case(name, base, steps, says, qemu_refuses, **more)  # type: ignore[arg-type]


NOTHING: tuple[Step, ...] = ()


def field_at(path: Path, offset: int, fmt: str) -> int:
    with path.open("rb") as handle:
        handle.seek(offset)
        value: int = struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]
    return value


def file_end(path: Path) -> int:
    """The size of the file: an offset just past its end."""
    return path.stat().st_size


def patterned_raw(path: Path, size: int, holes: list[tuple[int, int]], seed: int = 0) -> None:
    """Patterned bytes with zero stretches at ``holes`` ((start, end) pairs)."""
    data = bytearray(pattern(size, seed=seed))
    for start, end in holes:
        data[start:end] = bytes(end - start)
    path.write_bytes(bytes(data))


# --- qcow2 ------------------------------------------------------------------------------------


def build_qcow2(directory: Path) -> None:
    """1 MiB, 64 KiB clusters: data in cluster 0 (the first L2 entry), a zero
    cluster, more data, unallocated clusters, data at the end."""
    patterned_raw(directory / "v.raw", MiB, [(320 * KiB, 768 * KiB)], seed=1)
    qemu_img_ok("convert", "-f", "raw", "-O", "qcow2", str(directory / "v.raw"),
                str(directory / "v.qcow2"))
    qemu_io(directory / "v.qcow2", "write -z 64k 64k", "qcow2")
    (directory / "v.raw").unlink()


def build_qcow2_extl2(directory: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(directory / "v.qcow2"),
                "1M")
    qemu_io(directory / "v.qcow2", "write -P 0x5a 0 64k", "qcow2")
    qemu_io(directory / "v.qcow2", "write -z 256k 8k", "qcow2")


def build_qcow2_compressed(directory: Path) -> None:
    patterned_raw(directory / "v.raw", MiB, [(512 * KiB, 640 * KiB)], seed=2)
    qemu_img_ok("convert", "-c", "-f", "raw", "-O", "qcow2", str(directory / "v.raw"),
                str(directory / "v.qcow2"))
    (directory / "v.raw").unlink()


QCOW2 = Base("qcow2", build_qcow2, "v.qcow2")
QCOW2_EXTL2 = Base("qcow2-extl2", build_qcow2_extl2, "v.qcow2")
QCOW2_COMPRESSED = Base("qcow2-compressed", build_qcow2_compressed, "v.qcow2")


def l1_table(path: Path) -> int:
    return field_at(path, 40, ">Q")


def l2_entry(index: int) -> Callable[[Path], int]:
    """Where entry ``index`` of the first L2 table lies."""

    def at(path: Path) -> int:
        return (field_at(path, l1_table(path), ">Q") & 0x00FF_FFFF_FFFF_FE00) + 8 * index

    return at


def cluster_0_data(path: Path) -> int:
    """The host offset of guest cluster 0's data."""
    return field_at(path, l2_entry(0)(path), ">Q") & 0x00FF_FFFF_FFFF_FE00


def compressed_at_cluster_0(path: Path) -> int:
    """A compressed L2 entry of 8 sectors at guest cluster 0's data cluster."""
    return COMPRESSED | 7 << 54 | cluster_0_data(path)


def past_eof_cluster(path: Path) -> int:
    """The first 64 KiB-aligned offset at or past the end of the file."""
    return -(-file_end(path) // 0x10000) * 0x10000


def name_feature_bit_9(path: Path) -> None:
    """The feature name table's entry for extended L2 (bit 4) renamed to bit 9."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"\x00\x04extended L2 entries")
    data[entry + 1] = 9
    path.write_bytes(bytes(data))


COMPRESSED = 1 << 62
COPIED = 1 << 63

QCOW2_ROWS = table(
    "qcow2", "qcow2",
    row("cluster-bits-30", QCOW2, poke(20, ">I", 30), OPENING + r"Unsupported cluster size: 2\^30",
        True, same_as_qemu=True),
    row("huge-l1-size", QCOW2, poke(36, ">I", 0x7FFFFFFF), OPENING + "Active L1 table too large",
        True, same_as_qemu=True),
    row("l1-past-eof", QCOW2, poke(40, ">Q", 1 << 40),
        OPENING + "L1 table at offset 1099511627776 lies beyond the end of the file", False),
    row("l1-too-small", QCOW2, poke(36, ">I", 0), OPENING + "L1 table is too small", True,
        same_as_qemu=True),
    row("l1-unaligned", QCOW2, poke(40, ">Q", 0x30008), OPENING + "Invalid L1 table offset 0x30008",
        True),
    row("l2-past-eof", QCOW2, poke(l2_entry(0), ">Q", COPIED | 1 << 40),
        IN_IMAGE + "cluster at guest offset 0x0 points to 0x10000000000, beyond the end of the "
        "file", False, fails_at="status"),
    row("l2-unaligned", QCOW2, poke(l2_entry(0), ">Q", COPIED | 0x50200),
        IN_IMAGE + r"cluster allocation offset 0x50200 unaligned \(guest offset 0x0\)", True,
        fails_at="status"),
    row("l2-table-past-eof", QCOW2, poke(l1_table, ">Q", COPIED | 1 << 40),
        IN_IMAGE + "L2 table at offset 1099511627776 lies beyond the end of the file", False,
        fails_at="status"),
    row("unknown-incompatible-bit", QCOW2, poke(72, ">Q", 1 << 40),
        OPENING + r"Unsupported qcow2 feature\(s\): Unknown incompatible feature: 10000000000",
        True, same_as_qemu=True),
    row("unknown-incompatible-bits", QCOW2, poke(72, ">Q", 1 << 40 | 1 << 5),
        OPENING + r"Unsupported qcow2 feature\(s\): Unknown incompatible feature: 10000000020",
        True, same_as_qemu=True),
    row("named-unknown-feature", QCOW2, (Edit(name_feature_bit_9), poke(72, ">Q", 1 << 9)),
        OPENING + r"Unsupported qcow2 feature\(s\): extended L2 entries", True, same_as_qemu=True),
    row("encrypted-aes", QCOW2, poke(32, ">I", 1),
        OPENING + "encrypted images are not supported yet", True),
    row("encrypted-luks", QCOW2, poke(32, ">I", 2),  # qemu-img info dies of SIGSEGV on it
        OPENING + "encrypted images are not supported yet", True),
    row("version-4", QCOW2, poke(4, ">I", 4), OPENING + "Unsupported qcow2 version 4", True,
        same_as_qemu=True),
    row("header-length-huge", QCOW2, poke(100, ">I", 1 << 20),
        OPENING + "qcow2 header exceeds cluster size", True, same_as_qemu=True),
    row("refcount-order-7", QCOW2, poke(96, ">I", 7),
        OPENING + "Reference count entry width too large; may not exceed 64 bits", True,
        same_as_qemu=True),
    row("extension-too-large", QCOW2, poke(116, ">I", 0x7FFFFFF0),
        OPENING + "qcow2 header extension 0x6803f857 is too large", True),
    row("data-file-missing", QCOW2, poke(72, ">Q", 1 << 2),
        OPENING + "'data-file' is required for this image", True, same_as_qemu=True),
    row("compression-bit-zlib", QCOW2, poke(72, ">Q", 1 << 3),
        OPENING + "qcow2: Compression type incompatible feature bit must not be set", True,
        same_as_qemu=True),
    # Garbage where cluster 0's data was (zeros: a stored block of invalid
    # length); pointing into the header instead would alias it.
    row("compressed-garbage", QCOW2, (poke(cluster_0_data, ">Q", 0),
                                      poke(l2_entry(0), ">Q", compressed_at_cluster_0)),
        IN_IMAGE + "compressed cluster at guest offset 0x0 does not decompress: "
        "Error -3 while decompressing data: invalid stored block lengths", True, fails_at="read"),
    row("backing-name-too-long", QCOW2, poke(8, ">QI", 0x1000, 4000),
        OPENING + "Backing file name too long", True, same_as_qemu=True),
    row("invalid-subcluster-bitmap", QCOW2_EXTL2,
        poke(lambda p: l2_entry(0)(p) + 8, ">Q", 1 << 32 | 1),
        IN_IMAGE + "invalid subcluster bitmap 0x0000000100000001 at guest offset 0x0", True,
        fails_at="status"),
    row("corrupt-and-dirty-bits", QCOW2, poke(72, ">Q", 0b11), None, False),
    # New rows.
    row("l1-just-past-eof", QCOW2, poke(40, ">Q", past_eof_cluster),
        OPENING + "L1 table at offset 917504 lies beyond the end of the file", False),
    row("refcount-table-unaligned", QCOW2, poke(48, ">Q", 0x10008),
        OPENING + "Invalid reference count table offset 0x10008", True),
    row("refcount-table-past-eof", QCOW2, poke(48, ">Q", 1 << 40), None, False),
    row("refcount-table-too-large", QCOW2, poke(56, ">I", 0x7FFFFFFF),
        OPENING + "Reference count table too large", True, same_as_qemu=True),
    row("snapshot-table-unaligned", QCOW2, poke(60, ">IQ", 1, 0x10008),
        OPENING + "Invalid snapshot table offset 0x10008", True),
    row("too-many-snapshots", QCOW2, poke(60, ">I", 0x7FFFFFFF), OPENING + "Too many snapshots",
        True),
    row("virtual-size-huge", QCOW2, poke(24, ">Q", 1 << 62), OPENING + "Image is too big",
        True, same_as_qemu=True),
    row("backing-name-past-cluster", QCOW2, poke(8, ">QI", 0x20000, 10),
        OPENING + "Invalid backing file offset", True, same_as_qemu=True),
    row("compressed-cluster-past-eof", QCOW2_COMPRESSED,
        poke(l2_entry(0), ">Q", lambda p: COMPRESSED | past_eof_cluster(p)),
        IN_IMAGE + "compressed cluster at guest offset 0x0 points to 0x60000, beyond the end of "
        "the file", True, fails_at="read"),
    row("dirty-bit", QCOW2, poke(72, ">Q", 0b1), None, False),
    row("unknown-compatible-bit", QCOW2, poke(80, ">Q", 1 << 20), None, False),
    row("unknown-autoclear-bit", QCOW2, poke(88, ">Q", 1 << 20), None, False),
)  # fmt: skip


# --- vmdk -------------------------------------------------------------------------------------


def vmdk_source(directory: Path) -> Path:
    """2 MiB + 1536: patterned, a zero stretch, a ragged last grain."""
    raw = directory / "source.raw"
    patterned_raw(raw, 2 * MiB + 1536, [(MiB, MiB + 384 * KiB)], seed=3)
    return raw


def build_vmdk(directory: Path, *options: str, name: str = "v.vmdk") -> None:
    raw = vmdk_source(directory)
    dash_o = ["-o", ",".join(options)] if options else []
    qemu_img_ok("convert", "-f", "raw", "-O", "vmdk", *dash_o, str(raw), str(directory / name))
    raw.unlink()


def build_vmdk_sparse(directory: Path) -> None:
    build_vmdk(directory)
    qemu_io(directory / "v.vmdk", "write -P 0x11 100k 200k", "vmdk")
    qemu_io(directory / "v.vmdk", "write -z 1600k 64k", "vmdk")


def build_vmdk_stream_footer(directory: Path) -> None:
    """streamOptimized in VMware's layout (footer, end-of-stream marker), as instar writes it."""
    raw = vmdk_source(directory)
    result = run_instar("dd", "-c", "-O", "vmdk", f"if={raw}", f"of={directory / 'v.vmdk'}")
    assert result.rc == 0, result.stderr
    raw.unlink()


def build_vmdk_child(directory: Path) -> None:
    build_vmdk(directory, name="base.vmdk")
    qemu_img_ok("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "child.vmdk",
                cwd=directory)
    qemu_io(directory / "child.vmdk", "write -P 0x44 100k 10k", "vmdk")


def build_vmdk_part(directory: Path) -> None:
    """A 1 MiB sparse extent named by a descriptor that says it has 4096 sectors."""
    patterned_raw(directory / "part.raw", MiB, [], seed=4)
    qemu_img_ok("convert", "-f", "raw", "-O", "vmdk", "part.raw", "part1.vmdk", cwd=directory)
    (directory / "part.raw").unlink()
    write_descriptor(directory / "v.vmdk", "twoGbMaxExtentSparse", ['RW 4096 SPARSE "part1.vmdk"'])


def write_descriptor(path: Path, create_type: str, extents: list[str]) -> None:
    lines = [
        "# Disk DescriptorFile", "version=1", "CID=12345678", "parentCID=ffffffff",
        f'createType="{create_type}"', "", "# Extent description", *extents, "",
        "# The Disk Data Base", "#DDB", "", 'ddb.virtualHWVersion = "4"',
        'ddb.adapterType = "ide"',
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def descriptor(key: str, create_type: str, extents: list[str],
               files: dict[str, bytes] | None = None, image: str = "v.vmdk") -> Base:
    """A hand-written descriptor (and the files it names): what qemu cannot make."""

    def build(directory: Path) -> None:
        for name, data in (files or {}).items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        (directory / image).parent.mkdir(parents=True, exist_ok=True)
        lines = [line.replace("{dir}", str(directory)) for line in extents]
        write_descriptor(directory / image, create_type, lines)

    return Base(key, build, image)


VMDK_SPARSE = Base("vmdk-sparse", build_vmdk_sparse, "v.vmdk")
VMDK_STREAM = Base("vmdk-stream", lambda d: build_vmdk(d, "subformat=streamOptimized"), "v.vmdk")
VMDK_STREAM_FOOTER = Base("vmdk-stream-footer", build_vmdk_stream_footer, "v.vmdk")
VMDK_FLAT = Base("vmdk-flat", lambda d: build_vmdk(d, "subformat=monolithicFlat"), "v.vmdk")
VMDK_CHILD = Base("vmdk-child", build_vmdk_child, "child.vmdk")
VMDK_PART = Base("vmdk-part", build_vmdk_part, "v.vmdk")
VMDK_RAW = Base("vmdk-raw", lambda d: (d / "in.raw").write_bytes(pattern(4096)), "in.raw")
X_BIN = {"x.bin": bytes(4096)}


def gd_offset(path: Path) -> int:
    return field_at(path, 0x38, "<Q") * 512


def grain_table_entry(index: int) -> Callable[[Path], int]:
    def at(path: Path) -> int:
        return field_at(path, gd_offset(path), "<I") * 512 + 4 * index

    return at


def first_grain_marker(path: Path) -> int:
    """A stream's first grain marker: right after the overhead."""
    return field_at(path, 0x40, "<Q") * 512


def cid_digit(path: Path) -> int:
    return path.read_bytes().index(b"CID=") + 4


def other_digit(path: Path) -> bytes:
    return b"1" if path.read_bytes()[cid_digit(path)] == ord("0") else b"0"


VMDK_ROWS = table(
    "vmdk", "vmdk",
    row("gd-beyond-eof", VMDK_SPARSE, poke(0x38, "<Q", 0xFFFFFFF0),
        OPENING + "grain directory of 'v.vmdk' at offset 2199023247360 lies beyond the end of "
        "the file", False),
    row("gt-beyond-eof", VMDK_SPARSE, poke(gd_offset, "<I", 0x7FFFFFFF),
        OPENING + "grain table at sector 2147483647 of 'v.vmdk' lies beyond the end of the file",
        False),
    row("grain-beyond-eof", VMDK_SPARSE, poke(grain_table_entry(5), "<I", 0x7FFFFF00),
        IN_IMAGE + "grain at sector 2147483392 of 'v.vmdk' lies beyond the end of the file", False,
        fails_at="status"),
    row("truncated-text-descriptor", VMDK_FLAT, Cut(lambda p: p.read_bytes().index(b"FLAT") + 7),
        OPENING + "invalid VMDK image descriptor: invalid line 8 in VMDK descriptor: "
        "'RW 4099 FLAT \"v'", True),
    row("truncated-sparse-file", VMDK_SPARSE, Cut(3000),
        OPENING + "File truncated, expecting at least 65536 bytes", True, same_as_qemu=True),
    row("huge-capacity", VMDK_SPARSE, poke(12, "<Q", 1 << 62), OPENING + "L1 size too big", True),
    row("huge-num-gtes-per-gt", VMDK_SPARSE, poke(0x2C, "<I", 0x10000000),
        OPENING + "L2 table size too big", True, same_as_qemu=True),
    row("huge-grain", VMDK_SPARSE, poke(20, "<Q", 1 << 40),
        OPENING + "Invalid granularity, image may be corrupt", True),
    row("extent-outside-the-allowed-directory",
        descriptor("vmdk-escape", "monolithicFlat", ['RW 8 FLAT "../outside.bin" 0'],
                   {"outside.bin": b"secret" * 1000}, image="inner/escape.vmdk"),
        NOTHING, r"extent 'inner/\.\./outside\.bin' is outside the allowed directories "
        r"\(/\S+/work/inner\); use --allow DIR to permit it", False),
    row("absolute-extent-path",
        descriptor("vmdk-absolute", "monolithicFlat", ['RW 1 FLAT "{dir}/secret.bin" 0'],
                   {"secret.bin": b"secret" * 1000}),
        NOTHING, r"extent '/\S+/vmdk-absolute/secret\.bin' is outside the allowed directories "
        r"\(/\S+/work\); use --allow DIR to permit it", False),
    row("bad-footer", VMDK_STREAM_FOOTER, poke(lambda p: file_end(p) - 512, "<I", 7),
        OPENING + "Invalid footer", True, same_as_qemu=True),
    row("corrupt-compressed-grain", VMDK_STREAM,
        poke(lambda p: first_grain_marker(p) + 12, "<Q", 0x0123456789ABCDEF),
        IN_IMAGE + "compressed grain at sector 128 of 'v.vmdk' does not decompress: "
        "Error -3 while decompressing data: incorrect header check", True, fails_at="read"),
    row("oversized-compressed-grain", VMDK_STREAM,
        poke(lambda p: first_grain_marker(p) + 8, "<I", 0x7FFFFFFF),
        IN_IMAGE + "compressed grain at sector 128 of 'v.vmdk' has an invalid size 2147483647",
        True, fails_at="read"),
    row("version-4", VMDK_SPARSE, poke(4, "<I", 4), OPENING + "Unsupported VMDK version 4", True,
        same_as_qemu=True),
    row("COWD", Base("vmdk-cowd", lambda d: (d / "v.vmdk").write_bytes(b"COWD" + bytes(2044)),
                     "v.vmdk"), NOTHING,
        OPENING + r"VMFS sparse \(COWD\) vmdk extents are not supported", True),
    row("vmfsSparse", descriptor("vmdk-vmfssparse", "vmfsSparse", ['RW 8 VMFSSPARSE "x.vmdk"']),
        NOTHING, OPENING + "vmdk images of type 'vmfsSparse' are not supported", True),
    row("SESPARSE-extent",
        descriptor("vmdk-sesparse", "twoGbMaxExtentSparse", ['RW 8 SESPARSE "x.vmdk"']),
        NOTHING, OPENING + "vmdk extents of type 'SESPARSE' are not supported", True),
    row("garbage-line",
        descriptor("vmdk-garbage", "monolithicFlat", ['RW 8 FLAT "x.bin" 0', "rm -rf /"], X_BIN),
        NOTHING, OPENING + "invalid VMDK image descriptor: invalid line 9 in VMDK descriptor: "
        "'rm -rf /'", False),
    row("descriptor-over-1-MiB",
        descriptor("vmdk-huge", "monolithicFlat", ['RW 8 FLAT "x.bin" 0'] + ["#" * 1000] * 1100,
                   X_BIN),
        NOTHING, OPENING + "invalid VMDK image descriptor: larger than 1048576 bytes", False),
    row("missing-extent",
        descriptor("vmdk-missing", "monolithicFlat", ['RW 8 FLAT "nowhere.bin" 0']),
        NOTHING, OPENING + "Could not open extent 'nowhere.bin': No such file or directory", True),
    row("extent-size-mismatch", VMDK_PART, NOTHING,
        OPENING + "sparse extent 'part1.vmdk' holds 2048 sectors, the descriptor says 4096", False),
    row("parent-CID-mismatch", VMDK_CHILD, poke(cid_digit, "1s", other_digit, file="base.vmdk"),
        r"'child\.vmdk': parent CID 0x[0-9a-f]{1,8} does not match the CID of its parent "
        r"'base\.vmdk'", True, fails_at="read"),
    row("no-extents", descriptor("vmdk-empty", "monolithicFlat", []), NOTHING,
        OPENING + "invalid VMDK image descriptor: it names no extents", True),  # qemu aborts
    row("RDONLY-extent",
        descriptor("vmdk-rdonly", "monolithicFlat", ['RDONLY 8 FLAT "x.bin" 0'], X_BIN),
        NOTHING, OPENING + "vmdk extents with access 'RDONLY' are not supported",
        True),  # qemu aborts
    row("flat-extent-without-offset",
        descriptor("vmdk-nooffset", "monolithicFlat", ['RW 8 FLAT "x.bin"'], X_BIN),
        NOTHING, OPENING + "Invalid extent line: flat extent 'x.bin' has no offset", True),
    row("capacity-0-with-a-descriptor-offset", VMDK_SPARSE, poke(12, "<Q", 0),
        OPENING + r"sparse vmdk header with capacity 0 and a descriptor offset "
        r"\(qemu treats it as a descriptor file\)", True),
    row("raw-file-as-vmdk", VMDK_RAW, NOTHING, OPENING + "invalid VMDK image descriptor", True,
        same_as_qemu=True, probes=False),
    row("embedded-type-in-a-descriptor-file",
        descriptor("vmdk-embedded", "monolithicSparse", ['RW 8 SPARSE "x.bin"'], X_BIN),
        NOTHING, OPENING + "Unsupported image type 'monolithicSparse'", True, same_as_qemu=True),
    # New rows.
    row("extent-of-0-sectors",
        descriptor("vmdk-zero-sectors", "monolithicFlat", ['RW 0 FLAT "x.bin" 0'], X_BIN),
        NOTHING, OPENING + "invalid VMDK image descriptor: an extent has 0 sectors",
        True),  # qemu aborts
    row("zero-extent-line", descriptor("vmdk-zero", "monolithicFlat", ["RW 2048 ZERO"]), NOTHING,
        OPENING + "invalid VMDK image descriptor: invalid line 8 in VMDK descriptor: "
        "'RW 2048 ZERO'", True),  # qemu aborts
    row("unknown-create-type",
        descriptor("vmdk-bogus-type", "bogus", ['RW 8 FLAT "x.bin" 0'], X_BIN),
        NOTHING, OPENING + "Unsupported image type 'bogus'", True, same_as_qemu=True),
    row("sparse-extent-that-is-raw",
        descriptor("vmdk-raw-extent", "twoGbMaxExtentSparse", ['RW 8 SPARSE "x.bin"'], X_BIN),
        NOTHING, OPENING + "Image not in VMDK format", True, same_as_qemu=True),
    row("num-gtes-per-gt-0", VMDK_SPARSE, poke(0x2C, "<I", 0),
        OPENING + "L1 entry size is invalid", True, same_as_qemu=True),
    row("grain-0", VMDK_SPARSE, poke(20, "<Q", 0), OPENING + "L1 entry size is invalid", True,
        same_as_qemu=True),
    row("missing-parent", VMDK_CHILD, Edit(os.unlink, file="base.vmdk"),
        OPENING + "Could not open backing file: Could not open 'base.vmdk': "
        "No such file or directory", True, fails_at="backing", same_as_qemu=True),
    row("stream-footer-cut", VMDK_STREAM_FOOTER, Cut(lambda p: file_end(p) - 1024),
        OPENING + "Invalid footer", True, same_as_qemu=True),
    row("flat-extent-past-its-file",
        descriptor("vmdk-short", "monolithicFlat", ['RW 100 FLAT "short.bin" 0'],
                   {"short.bin": pattern(10000, seed=5)}), NOTHING, None, False),
)  # fmt: skip


# --- vpc --------------------------------------------------------------------------------------


def build_vpc(directory: Path) -> None:
    """A dynamic 5 MiB disk (three 2 MiB blocks): data, zeros written, a block never written."""
    qemu_img_ok("create", "-q", "-f", "vpc", str(directory / "v.vhd"), "5M")
    for command in ("write -P 0x42 0 3M", "write -z 1M 512k", "write -P 0x43 2M 4k"):
        qemu_io(directory / "v.vhd", command, "vpc")


def build_vpc_fixed(directory: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(directory / "v.vhd"),
                "3M")
    qemu_io(directory / "v.vhd", "write -P 0x44 1M 5k", "vpc")


def vpc_child(key: str, locator: str, *, parent_name: str = "", blocks: bool = True,
              image: str = "child.vhd") -> Base:
    """A differencing disk over a qemu-made parent (qemu-img cannot make one),
    built by the vpc reader tests' builder; ``locator``: a W2ru parent locator."""

    def build(directory: Path) -> None:
        qemu_img_ok("create", "-q", "-f", "vpc", str(directory / "base.vhd"), "5M")
        qemu_io(directory / "base.vhd", "write -P 0x5a 0 5M", "vpc")
        children = vpc_tests._child_blocks()[0] if blocks else {}
        vpc_tests.make_child(directory / image, directory / "base.vhd", children,
                             [(b"W2ru", vpc_tests._utf16le(locator))], parent_name)

    return Base(key, build, image)


def vhd_checksum(start: int, length: int, checksum_at: int) -> Edit:
    """Recompute the VHD checksum (one's complement of the byte sum) of a structure."""

    def fix(path: Path) -> None:
        data = bytearray(path.read_bytes()[start : start + length])
        data[checksum_at : checksum_at + 4] = bytes(4)
        with path.open("r+b") as handle:
            handle.seek(start + checksum_at)
            handle.write(struct.pack(">I", ~sum(data) & 0xFFFFFFFF))

    return Edit(fix)


VPC = Base("vpc", build_vpc, "v.vhd")
VPC_FIXED = Base("vpc-fixed", build_vpc_fixed, "v.vhd")
DYNAMIC_HEADER = 512
FIX_HEADER = vhd_checksum(DYNAMIC_HEADER, 1024, 36)
FIX_FOOTER = vhd_checksum(0, 512, 64)


def bat_entry(index: int) -> Callable[[Path], int]:
    def at(path: Path) -> int:
        return field_at(path, DYNAMIC_HEADER + 16, ">Q") + 4 * index

    return at


def last_footer(path: Path) -> int:
    return file_end(path) - 512


VPC_BEYOND = r"points beyond the end of the file \(the image is truncated or corrupt\)"
VPC_ROWS = table(
    "vpc", "vpc",
    row("bad-footer-checksum", VPC, poke(28, "4s", b"qemX"), OPENING + "Incorrect header checksum",
        True, same_as_qemu=True),
    row("BAT-entry-beyond-EOF", VPC, poke(bat_entry(0), ">I", 0x00FFFFFF),
        OPENING + "block allocation table entry 0 " + VPC_BEYOND, True),
    row("absurd-block-size", VPC, (poke(DYNAMIC_HEADER + 32, ">I", 3), FIX_HEADER),
        OPENING + r"Invalid block size 3", True, same_as_qemu=True),
    row("huge-block-size", VPC, (poke(DYNAMIC_HEADER + 32, ">I", 1 << 31), FIX_HEADER),
        OPENING + r"Invalid block size 2147483648 "
        r"\(instar reads blocks of up to 268435456\)", True),
    row("bad-header-checksum", VPC, poke(DYNAMIC_HEADER + 40, "B", 1),
        OPENING + "Incorrect dynamic disk header checksum", False),
    row("BAT-beyond-EOF", VPC, (poke(DYNAMIC_HEADER + 16, ">Q", 1 << 40), FIX_HEADER),
        OPENING + "block allocation table at offset 1099511627776 lies beyond the end of the file",
        True),
    row("truncated", VPC, Cut(lambda p: file_end(p) - 4096),
        OPENING + "block allocation table entry 1 " + VPC_BEYOND, True),
    row("header-beyond-EOF", VPC, (poke(16, ">Q", 1 << 50), FIX_FOOTER),
        OPENING + "dynamic disk header at offset 1125899906842624 lies beyond the end of the file",
        True),
    row("table-too-small", VPC, (poke(DYNAMIC_HEADER + 28, ">I", 1), FIX_HEADER),
        OPENING + "Page table too small", True, same_as_qemu=True),
    row("parent-is-itself", vpc_child("vpc-loop", "loop.vhd", blocks=False, image="loop.vhd"),
        NOTHING, OPENING + "backing chain is deeper than 16 images", False,
        fails_at="backing"),
    row("parent-locator-too-long", vpc_child("vpc-long-locator", "x" * 5000, blocks=False),
        NOTHING, OPENING + "parent locator of 10000 bytes is too long", False),
    row("missing-parent", vpc_child("vpc-orphan", "gone.vhd", parent_name="also-gone.vhd"),
        NOTHING, OPENING + "cannot open the parent disk: Could not open backing file: "
        "Could not open 'gone.vhd': No such file or directory", False,
        fails_at="backing"),
    # New rows.
    row("unknown-disk-type", VPC, (poke(60, ">I", 5), FIX_FOOTER),
        OPENING + "unsupported VHD disk type 5", False),
    row("dynamic-header-cookie", VPC, (poke(DYNAMIC_HEADER, "8s", b"cxsparsX"), FIX_HEADER),
        OPENING + "Invalid header magic", True, same_as_qemu=True),
    row("huge-max-table-entries", VPC,
        (poke(DYNAMIC_HEADER + 28, ">I", 0x7FFFFFFF), FIX_HEADER),
        OPENING + r"Max Table Entries too large \(2147483647\)", True, same_as_qemu=True),
    row("huge-current-size", VPC, (poke(48, ">Q", 1 << 60), FIX_FOOTER), None, False),
    row("first-footer-cookie", VPC, poke(0, "8s", b"conectiX"),
        OPENING + "the footer copy at offset 0 of this type 3 disk is missing", True,
        probes=False),
    # qemu reads it; instar refuses a block over the image's own metadata
    # (docs/formats/vpc.md), when it maps the disk: info still describes it.
    row("BAT-entry-into-the-header", VPC, poke(bat_entry(0), ">I", 1),
        IN_IMAGE + r"host offset 0x200, mapped at guest offset 0x0, is also the dynamic disk "
        r"header \(a host unit mapped twice: the image is corrupt\)", False, fails_at="status"),
    row("fixed-footer-checksum", VPC_FIXED, poke(last_footer, "4s", b"qemX"),
        OPENING + "invalid VPC image", True, same_as_qemu=True, probes=False),
    row("fixed-footer-cut", VPC_FIXED, Cut(last_footer), OPENING + "invalid VPC image", True,
        same_as_qemu=True, probes=False),
)  # fmt: skip


# --- vhdx -------------------------------------------------------------------------------------


def build_vhdx(directory: Path) -> None:
    """1 MiB blocks, 2 MiB + 512: data in block 0, data across its end, zeros, a last sector."""
    image, size = directory / "bs1.vhdx", 2 * MiB + 512
    qemu_img_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), str(size))
    vhdx_tests.qemu_io_cmds(
        image, "write -P 0x41 0 128k", f"write -P 0x42 {MiB - 4096} 8192",
        f"write -z {MiB + 8192} 4096", f"write -P 0x43 {size - 512} 512",
    )


def build_vhdx_dirty(directory: Path) -> None:
    """bs1.vhdx with a pending log (the vhdx reader tests' builder)."""
    build_vhdx(directory)
    vhdx_tests.dirty_image(directory, directory)
    (directory / "bs1.vhdx").unlink()


def vhdx_child(key: str, **options: object) -> Base:
    """A differencing VHDX over a parent qemu made (qemu cannot make one), by the
    vhdx reader tests' builder; ``options`` change the child's parent locator."""

    def build(directory: Path) -> None:
        size = 6 * MiB + 512
        (directory / "parent.raw").write_bytes(pattern(size, seed=11))
        qemu_img_ok("convert", "-O", "vhdx", "-o", "block_size=1M", "parent.raw", "parent.vhdx",
                    cwd=directory)
        (directory / "parent.raw").unlink()
        parent = directory / "parent.vhdx"
        locator = options.get("locator")
        if callable(locator):
            options["locator"] = locator(parent)
        blocks = {1: ("full", pattern(MiB, seed=21), None), 3: ("zero", b"", None),
                  2: ("partial", pattern(MiB, seed=22), [i % 3 == 0 for i in range(2048)])}
        vhdx_tests.make_child(directory / "child.vhdx", parent, blocks, virtual_size=size,
                              **options)  # type: ignore[arg-type]

    return Base(key, build, "child.vhdx")


VHDX = Base("vhdx", build_vhdx, "bs1.vhdx")
VHDX_DIRTY = Base("vhdx-dirty", build_vhdx_dirty, "dirty.vhdx")
VHDX_CHILD = vhdx_child("vhdx-child")


def regions(path: Path) -> dict[bytes, tuple[int, int]]:
    """GUID -> (file offset, length) of the first region table (instar's decoder finds them)."""
    data = path.read_bytes()[vhdx_layout.REGION_TABLE_OFFSETS[0] :]
    return {e.guid: (e.file_offset, e.length) for e in vhdx_layout.decode_region_table(data)}


def rewrite_regions(change: Callable[[Path], dict[bytes, tuple[int, int]]]) -> Edit:
    """Both region tables rewritten (CRCs correct) with some regions moved."""

    def fix(path: Path) -> None:
        moved = change(path)
        entries = [vhdx_layout.RegionEntry(guid, *moved.get(guid, place))
                   for guid, place in regions(path).items()]
        for offset in vhdx_layout.REGION_TABLE_OFFSETS:
            poke(offset, f"{vhdx_layout.REGION_TABLE_SIZE}s",
                 vhdx_layout.encode_region_table(entries)).apply(path)

    return Edit(fix)


def vhdx_bat(index: int) -> Callable[[Path], int]:
    def at(path: Path) -> int:
        return regions(path)[vhdx_layout.BAT_REGION][0] + 8 * index

    return at


def metadata_item(item: bytes) -> Callable[[Path], int]:
    def at(path: Path) -> int:
        return vhdx_tests._metadata_item_offset(path, item)

    return at


def metadata_region(path: Path) -> int:
    return regions(path)[vhdx_layout.METADATA_REGION][0]


def first_block(path: Path) -> int:
    return field_at(path, vhdx_bat(0)(path), "<Q") & vhdx_layout.OFFSET_MASK


def set_header_log_guid(path: Path) -> None:
    """Both headers name a log (CRCs recomputed) that the log region does not hold."""
    vhdx_tests._set_log_guid(path, b"\x07" * 16)


def linkage(parent: Path) -> str:
    return vhdx_tests._guid_string(vhdx_tests._current_header(parent).data_write_guid)


FULLY_PRESENT = 6
VHDX_INVALID = OPENING + "Could not open '{image}': Invalid argument"
VHDX_ROWS = table(
    "vhdx", "vhdx",
    row("header-CRCs", VHDX, (poke(vhdx_layout.HEADER_OFFSETS[0] + 40, "B", 0xFF),
                              poke(vhdx_layout.HEADER_OFFSETS[1] + 40, "B", 0xFF)),
        OPENING + "No valid VHDX header found", True, same_as_qemu=True),
    row("BAT-entry-beyond-EOF", VHDX, poke(vhdx_bat(0), "<Q", 1 << 40 | FULLY_PRESENT),
        OPENING + r"BAT entry 0 points to \[1099511627776, 1099512676352\), beyond the end of the "
        r"file \(11534336 bytes\); the image has probably been truncated", True),
    row("BAT-region-beyond-EOF", VHDX,
        rewrite_regions(lambda p: {vhdx_layout.BAT_REGION: (1 << 40, MiB)}),
        OPENING + r"BAT region at \[1099511627776, 1099512676352\) lies beyond the end of the "
        r"file \(11534336 bytes\)", False),
    row("region-overlap", VHDX,
        rewrite_regions(lambda p: {vhdx_layout.BAT_REGION: (metadata_region(p), MiB)}),
        OPENING + "BAT region and metadata region overlap", True),
    row("block-size-3-MiB", VHDX, poke(metadata_item(vhdx_layout.FILE_PARAMETERS), "<I", 3 * MiB),
        OPENING + "block size 3145728 is not a power of two between 1 MiB and 256 MiB", True),
    row("block-size-2-GiB", VHDX, poke(metadata_item(vhdx_layout.FILE_PARAMETERS), "<I", 1 << 31),
        OPENING + "block size 2147483648 is not a power of two between 1 MiB and 256 MiB", True),
    row("logical-sector-1024", VHDX,
        poke(metadata_item(vhdx_layout.LOGICAL_SECTOR_SIZE), "<I", 1024),
        OPENING + "logical sector size 1024 is not 512 or 4096", True),
    row("virtual-size-beyond-the-BAT", VHDX,
        poke(metadata_item(vhdx_layout.VIRTUAL_DISK_SIZE), "<Q", 1 << 44),
        OPENING + r"the BAT region \(1048576 bytes\) is too small for the 16781311 entries a "
        "17592186044416-byte disk in 1048576-byte blocks needs", True),
    row("metadata-item-outside-its-region", VHDX,
        poke(lambda p: metadata_region(p) + 32 + 16, "<I", MiB - 4),
        OPENING + r"metadata item caa16737-fa36-4d43-b3b6-33f0aa44e76b at \[1048572, 1048580\) "
        "lies outside the metadata region of 1048576 bytes", True),
    row("partial-block-in-a-dynamic-disk", VHDX,
        poke(vhdx_bat(1), "<Q", lambda p: first_block(p) | 7),
        OPENING + "BAT entry 1 has an invalid block state 7", True),
    row("block-inside-the-metadata-region", VHDX,
        poke(vhdx_bat(0), "<Q", lambda p: metadata_region(p) | FULLY_PRESENT),
        OPENING + r"BAT entry 0 points to \[3145728, 4194304\), inside the VHDX metadata at "
        r"\[3145728, 4194304\)", True),
    row("signature-and-zeros",
        Base("vhdx-fake", lambda d: (d / "fake.vhdx").write_bytes(b"vhdxfile" + bytes(300 * KiB)),
             "fake.vhdx"), NOTHING, OPENING + "No valid VHDX header found", True,
        same_as_qemu=True),
    row("signature-only",
        Base("vhdx-short", lambda d: (d / "short.vhdx").write_bytes(b"vhdxfile"), "short.vhdx"),
        NOTHING, OPENING + "No valid VHDX header found", True, same_as_qemu=True),
    row("log-of-a-truncated-file", VHDX_DIRTY, Cut(lambda p: file_end(p) - MiB),
        OPENING + "log entry 1 says the file was 12582912 bytes, but it is 11534336: "
        "the image has been truncated", True),
    # Differencing images: qemu 7.2 opens none ("Operation not supported").
    row("child-bitmap-not-present", VHDX_CHILD, poke(vhdx_bat(4096), "<Q", 0),
        OPENING + "BAT entry 2 is partially present but its sector bitmap is not", True),
    row("child-without-parent-linkage",
        vhdx_child("vhdx-no-linkage", locator={"relative_path": "parent.vhdx"}), NOTHING,
        OPENING + "the parent locator has no parent_linkage", True),
    row("child-with-windows-paths-only",
        vhdx_child("vhdx-windows-paths", locator=lambda parent: {
            "parent_linkage": linkage(parent),
            "absolute_win32_path": "C:\\images\\parent.vhdx",
            "volume_path": "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\p.vhdx"}),
        NOTHING, OPENING + "the parent locator names no parent file usable here", True),
    # instar info opens no parent, and then takes the absent parent for one of
    # another format: its reason is not the real one (the other commands give it).
    row("child-of-a-changed-parent", vhdx_child("vhdx-changed", linkage=bytes(range(16))),
        NOTHING, OPENING + r"parent 'parent\.vhdx' has data write GUID \{[0-9a-f-]{36}\}, not "
        r"the \{03020100-0504-0706-0809-0a0b0c0d0e0f\} this image was made from: "
        "it has changed since", True, fails_at="backing"),
    row("child-with-missing-parent", VHDX_CHILD, Edit(os.unlink, file="parent.vhdx"),
        OPENING + "Could not open backing file: Could not open 'parent.vhdx': "
        "No such file or directory", True, fails_at="backing"),
    # New rows.
    row("region-table-CRCs", VHDX, (poke(vhdx_layout.REGION_TABLE_OFFSETS[0] + 40, "B", 0xFF),
                                    poke(vhdx_layout.REGION_TABLE_OFFSETS[1] + 40, "B", 0xFF)),
        OPENING + "region table checksum is wrong", True),
    row("first-region-table-CRC", VHDX, poke(vhdx_layout.REGION_TABLE_OFFSETS[0] + 40, "B", 0xFF),
        None, True),
    row("first-header-CRC", VHDX, poke(vhdx_layout.HEADER_OFFSETS[0] + 40, "B", 0xFF), None,
        False),
    row("file-identifier", VHDX, poke(0, "8s", b"vhdxfil\0"), VHDX_INVALID, True,
        same_as_qemu=True, probes=False),
    row("metadata-table-signature", VHDX, poke(metadata_region, "8s", b"metadatX"),
        OPENING + "metadata table signature is wrong", True),
    row("unknown-required-metadata-item", VHDX,
        poke(lambda p: metadata_region(p) + 32, "16s", b"\x99" * 16),
        OPENING + "required metadata item 99999999-9999-9999-9999-999999999999 is not supported",
        True),
    row("log-named-but-absent", VHDX, Edit(set_header_log_guid), None, False),
    row("BAT-entry-into-the-BAT", VHDX,
        poke(vhdx_bat(0), "<Q", lambda p: regions(p)[vhdx_layout.BAT_REGION][0] | FULLY_PRESENT),
        OPENING + r"BAT entry 0 points to \[2097152, 3145728\), inside the VHDX metadata at "
        r"\[2097152, 3145728\)", True),
)  # fmt: skip


# --- vdi --------------------------------------------------------------------------------------


def build_vdi(directory: Path) -> None:
    """A dynamic 5 MiB image: blocks 0-2 of data (zeros written in block 1), block 3
    never written, 4 KiB in block 4."""
    qemu_img_ok("create", "-q", "-f", "vdi", str(directory / "v.vdi"), "5M")
    for command in ("write -P 0x42 0 3M", "write -z 1M 512k", "write -P 0x43 4M 4k"):
        qemu_io(directory / "v.vdi", command, "vdi")


def build_vdi_static(directory: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "vdi", "-o", "static=on", str(directory / "v.vdi"), "3M")
    qemu_io(directory / "v.vdi", "write -P 0x44 1M 5k", "vdi")


VDI = Base("vdi", build_vdi, "v.vdi")
VDI_STATIC = Base("vdi-static", build_vdi_static, "v.vdi")
# Header fields (little-endian): signature, version, header size, image type, block
# map and data offsets, sector size, disk size, block size, blocks, link and parent UUIDs.
(VDI_SIGNATURE, VDI_VERSION, VDI_HEADER_SIZE, VDI_TYPE, VDI_BMAP, VDI_DATA, VDI_SECTOR,
 VDI_DISK_SIZE, VDI_BLOCK_SIZE, VDI_BLOCKS, VDI_LINK, VDI_PARENT) = (
    64, 68, 72, 76, 0x154, 0x158, 0x168, 0x170, 0x178, 0x180, 0x1A8, 0x1B8)
VDI_BEYOND = r"points beyond the end of the file \(the image is truncated or corrupt\)"
VDI_TWICE = r"\(a host unit mapped twice: the image is corrupt\)"
UNSUPPORTED_VDI = OPENING + r"unsupported VDI image \("


def vdi_entry(index: int) -> int:
    return 0x200 + 4 * index  # where qemu puts the block map


VDI_ROWS = table(
    "vdi", "vdi",
    # qemu's checks, in its order and words.
    row("bad-signature", VDI, poke(VDI_SIGNATURE, "<I", 0xDEADBEEF),
        OPENING + r"Image not in VDI format \(bad signature deadbeef\)", True, same_as_qemu=True,
        probes=False),
    row("version-1.2", VDI, poke(VDI_VERSION, "<I", 0x00010002),
        UNSUPPORTED_VDI + r"version 1\.2\)", True, same_as_qemu=True),
    row("unaligned-block-map", VDI, poke(VDI_BMAP, "<I", 0x201),
        UNSUPPORTED_VDI + r"unaligned block map offset 0x201\)", True, same_as_qemu=True),
    row("unaligned-data", VDI, poke(VDI_DATA, "<I", 0x401),
        UNSUPPORTED_VDI + r"unaligned data offset 0x401\)", True, same_as_qemu=True),
    row("sector-size-4096", VDI, poke(VDI_SECTOR, "<I", 4096),
        UNSUPPORTED_VDI + r"sector size 4096 is not 512\)", True, same_as_qemu=True),
    row("block-size-2M", VDI, poke(VDI_BLOCK_SIZE, "<I", 2 * MiB),
        UNSUPPORTED_VDI + r"block size 2097152 is not 1048576\)", True, same_as_qemu=True),
    row("disk-larger-than-its-blocks", VDI, poke(VDI_DISK_SIZE, "<Q", 6 * MiB),
        UNSUPPORTED_VDI + r"disk size 6291456, image bitmap has room for 5242880\)", True,
        same_as_qemu=True),
    row("huge-disk-size", VDI, poke(VDI_DISK_SIZE, "<Q", 1 << 60),
        OPENING + r"Unsupported VDI image size \(size is 0x1000000000000000, max supported is "
        r"0x1fffff8000000\)", True, same_as_qemu=True),
    row("link-UUID", VDI, poke(VDI_LINK, "<I", 1), UNSUPPORTED_VDI + r"non-NULL link UUID\)",
        True, same_as_qemu=True),
    row("parent-UUID", VDI, poke(VDI_PARENT + 15, "B", 1),
        UNSUPPORTED_VDI + r"non-NULL parent UUID\)", True, same_as_qemu=True),
    row("too-many-blocks", VDI, poke(VDI_BLOCKS, "<I", 0x20000000),
        UNSUPPORTED_VDI + r"too many blocks 536870912, max is 536870784\)", True,
        same_as_qemu=True),
    row("header-cut-short", VDI, Cut(300), UNSUPPORTED_VDI + r"sector size 0 is not 512\)", True,
        same_as_qemu=True),
    # Read as qemu reads them: a size rounded up to a sector, discarded blocks.
    row("odd-disk-size", VDI, poke(VDI_DISK_SIZE, "<Q", 5 * MiB - 100), None, False),
    row("discarded-blocks", VDI, (poke(vdi_entry(0), "<I", 0xFFFFFFFE),
                                  poke(vdi_entry(4), "<I", 0xFFFFFFFE)), None, False),
    row("static-block-unallocated", VDI_STATIC, poke(vdi_entry(1), "<I", 0xFFFFFFFF), None, False),
    # qemu reads these; instar refuses them (docs/formats/vdi.md).
    row("header-size-0x100", VDI, poke(VDI_HEADER_SIZE, "<I", 0x100),
        UNSUPPORTED_VDI + r"header size 0x100 is smaller than a version 1\.1 header, 0x180\)",
        False),
    row("differencing-image", VDI, poke(VDI_TYPE, "<I", 4),
        UNSUPPORTED_VDI + r"image type 4: a differencing image, which needs its parent\)", False),
    row("image-type-0", VDI, poke(VDI_TYPE, "<I", 0),
        UNSUPPORTED_VDI + r"unknown image type 0\)", False),
    row("block-map-beyond-EOF", VDI, poke(VDI_BMAP, "<I", 1 << 30),
        OPENING + r"the block map \(5 entries at offset 1073741824\) extends beyond the end of "
        r"the file \(the image is truncated or corrupt\)", False),
    # ... when it maps the disk: info still describes it.
    row("entry-beyond-EOF", VDI, poke(vdi_entry(0), "<I", 0x00FFFFFF),
        IN_IMAGE + "block map entry 0 " + VDI_BEYOND, False, fails_at="status"),
    row("truncated", VDI, Cut(lambda p: file_end(p) - 4096),
        IN_IMAGE + "block map entry 4 " + VDI_BEYOND, False, fails_at="status"),
    row("static-truncated", VDI_STATIC, Cut(lambda p: file_end(p) - 4096),
        IN_IMAGE + "block map entry 2 " + VDI_BEYOND, False, fails_at="status"),
    row("two-entries-one-block", VDI, poke(vdi_entry(1), "<I", 0),
        IN_IMAGE + r"host offset 0x400 is mapped by two guest ranges, at guest offsets 0x0 and "
        r"0x100000 " + VDI_TWICE, False, fails_at="status"),
    row("static-two-entries-one-block", VDI_STATIC, poke(vdi_entry(2), "<I", 1),
        IN_IMAGE + r"host offset 0x100400 is mapped by two guest ranges, at guest offsets "
        r"0x100000 and 0x200000 " + VDI_TWICE, False, fails_at="status"),
    row("data-over-the-header", VDI, poke(VDI_DATA, "<I", 0),
        IN_IMAGE + r"host offset 0x0, mapped at guest offset 0x0, is also the header " + VDI_TWICE,
        False, fails_at="status"),
    row("data-over-the-block-map", VDI, poke(VDI_DATA, "<I", 0x200),
        IN_IMAGE + r"host offset 0x200, mapped at guest offset 0x0, is also the block map "
        + VDI_TWICE, False, fails_at="status"),
)  # fmt: skip


# --- parallels ---------------------------------------------------------------------------------


def build_parallels(directory: Path, version_1: bool = False, bitmap: bool = False) -> None:
    """1 MiB in 64 KiB clusters (16): data in clusters 0-3, 8 and 15, allocated
    in that order; version 1 rewritten from it; or a dirty bitmap appended."""
    image = directory / "v.hds"
    qemu_img_ok("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(image), "1M")
    for command in ("write -P 0x42 0 200k", "write -P 0x43 512k 64k", "write -P 0x44 960k 4k"):
        qemu_io(image, command, "parallels")
    if version_1:
        parallels_tests.to_version_1(image)
    if bitmap:
        parallels_tests.add_extension(image)


PARALLELS = Base("parallels", build_parallels, "v.hds")
PARALLELS_V1 = Base("parallels-v1", lambda d: build_parallels(d, version_1=True), "v.hds")
PARALLELS_BITMAP = Base("parallels-bitmap", lambda d: build_parallels(d, bitmap=True), "v.hds")
SECTORS_1M = 2048
BITMAP_ID = "10101010-1010-1010-1010-101010101010"


def catalog_entry(index: int) -> int:
    return 64 + 4 * index


def entry_value(index: int) -> Callable[[Path], int]:
    return lambda path: field_at(path, catalog_entry(index), "<I")


def extension_at(path: Path) -> int:
    return field_at(path, 56, "<Q") * 512


def features(*items: bytes, end: bytes | None = None) -> Edit:
    """Replace the extension cluster by one holding ``items`` (MD5 right)."""

    def rewrite(path: Path) -> None:
        cluster = parallels_tests.extension_cluster(list(items), 64 * KiB, end)
        with path.open("r+b") as handle:
            handle.seek(extension_at(path))
            handle.write(cluster)

    return Edit(rewrite)


def bitmap(uuid: bytes = b"\x10" * 16, sectors: int = SECTORS_1M, granularity: int = 128,
           table: tuple[int, ...] = (0,)) -> bytes:
    return parallels_tests.bitmap_feature(uuid, sectors, granularity, list(table))


def feature(magic: int, flags: int, data: bytes, size: int | None = None) -> bytes:
    """A raw feature header and data (``size``: the data size it claims)."""
    return struct.pack("<QQI4x", magic, flags, len(data) if size is None else size) + data


DIRTY = parallels_tests.DIRTY_BITMAP
P_BEYOND = r"points beyond the end of the file \(the image is truncated or corrupt\)"
P_TWICE = r"\(a host unit mapped twice: the image is corrupt\)"
PARALLELS_ROWS = table(
    "parallels", "parallels",
    row("version-3", PARALLELS, poke(16, "<I", 3), OPENING + "Image not in Parallels format",
        True, same_as_qemu=True, probes=False),
    row("bad-magic", PARALLELS, poke(0, "16s", b"WithouFreSpacExX"),
        OPENING + "Image not in Parallels format", True, same_as_qemu=True, probes=False),
    row("zero-sectors-per-track", PARALLELS, poke(28, "<I", 0),
        OPENING + "Invalid image: Zero sectors per track", True, same_as_qemu=True),
    row("too-big-cluster", PARALLELS, poke(28, "<I", 0x7FFFFFFF // 513 + 1),
        OPENING + "Invalid image: Too big cluster", True, same_as_qemu=True),
    # qemu reads it (its clusters lie past the end of the file: zeros); instar does not.
    row("largest-cluster", PARALLELS, poke(28, "<I", 0x7FFFFFFF // 513),
        IN_IMAGE + "catalog entry 0 " + P_BEYOND, False, fails_at="status"),
    row("catalog-too-large", PARALLELS, poke(32, "<I", 0x7FFFFFFF // 4 + 1),
        OPENING + "Catalog too large", True, same_as_qemu=True),
    row("cut-inside-the-version", PARALLELS, Cut(17),
        OPENING + "Invalid image: Zero sectors per track", True, same_as_qemu=True),
    row("cut-after-the-sector-count", PARALLELS, Cut(40), None, False),
    row("size-past-qemus-limit", PARALLELS, poke(36, "<Q", 1 << 54),
        OPENING + "Could not refresh total sector count: File too large", True,
        same_as_qemu=True),
    # qemu opens it (its size check wraps) and then cannot size it.
    row("size-of-2^69-bytes", PARALLELS, poke(36, "<Q", 1 << 60),
        OPENING + "Could not refresh total sector count: File too large", True),
    row("sectors-past-the-catalog", PARALLELS, poke(36, "<Q", 3 * SECTORS_1M), None, False),
    row("sectors-short-of-the-catalog", PARALLELS, poke(36, "<Q", 1001), None, False),
    row("inuse", PARALLELS, poke(44, "<I", 0x746F6E59), None, False),
    row("data-offset-garbage", PARALLELS, poke(48, "<I", 0xFFFFFFFF), None, False),
    row("catalog-longer-than-the-disk", PARALLELS, poke(32, "<I", 1000), None, False),
    row("version-1", PARALLELS_V1, NOTHING, None, False),
    row("version-1-high-sector-bits", PARALLELS_V1, poke(40, "<I", 7), None, False),
    # qemu reads past the end of the file as zeros; instar refuses a cluster
    # that starts there (what qemu-img check calls a cluster outside the image).
    row("entry-beyond-EOF", PARALLELS, poke(catalog_entry(0), "<I", 0x00FFFFFF),
        IN_IMAGE + "catalog entry 0 " + P_BEYOND, False, fails_at="status"),
    row("truncated", PARALLELS, Cut(lambda p: file_end(p) - 128 * KiB),
        IN_IMAGE + "catalog entry 15 " + P_BEYOND, False, fails_at="status"),
    row("last-cluster-cut-short", PARALLELS, Cut(lambda p: file_end(p) - 60 * KiB), None, False),
    row("entry-at-EOF", PARALLELS,
        poke(catalog_entry(15), "<I", lambda p: file_end(p) // (64 * KiB)), None, False),
    row("version-1-cluster-off-by-a-sector", PARALLELS_V1,
        poke(catalog_entry(15), "<I", lambda p: field_at(p, catalog_entry(15), "<I") + 1),
        None, False),
    row("two-entries-one-cluster", PARALLELS, poke(catalog_entry(8), "<I", entry_value(1)),
        IN_IMAGE + r"host offset 0x20000 is mapped by two guest ranges, at guest offsets 0x10000 "
        r"and 0x80000 " + P_TWICE, False, fails_at="status"),
    row("catalog-over-the-first-cluster", PARALLELS, poke(32, "<I", 20000),
        IN_IMAGE + r"host offset 0x10000, mapped at guest offset 0x0, is also the header and "
        r"catalog " + P_TWICE, False, fails_at="status"),
    row("version-1-cluster-over-two", PARALLELS_V1, poke(catalog_entry(3), "<I", 1),
        IN_IMAGE + r"host offset 0x10000 is mapped by two guest ranges, at guest offsets 0x0 "
        r"and 0x30000 " + P_TWICE, False, fails_at="status"),
    row("version-1-entry-into-the-catalog", PARALLELS_V1,
        (poke(32, "<I", 200), poke(catalog_entry(3), "<I", 1)),
        IN_IMAGE + r"host offset 0x200, mapped at guest offset 0x30000, is also the header and "
        r"catalog " + P_TWICE, False, fails_at="status"),
    row("version-1-clusters-overlapping", PARALLELS_V1,
        poke(catalog_entry(8), "<I", lambda p: field_at(p, catalog_entry(1), "<I") + 8),
        IN_IMAGE + r"host offset 0x21000 is mapped by two guest ranges, at guest offsets 0x10000 "
        r"and 0x80000 " + P_TWICE, False, fails_at="status"),
    # The format extension.
    row("bitmap", PARALLELS_BITMAP, NOTHING, None, False),
    row("extension-magic", PARALLELS_BITMAP, poke(extension_at, "<Q", 0x1234),
        OPENING + "Wrong parallels Format Extension magic: 0x1234, expected: 0xab234cef23dcea87",
        True, same_as_qemu=True),
    row("extension-checksum", PARALLELS_BITMAP, poke(lambda p: extension_at(p) + 8, "B", 0),
        OPENING + r"Wrong checksum in Format Extension header\. Format extension is corrupted\.",
        True, same_as_qemu=True),
    row("extension-beyond-EOF", PARALLELS_BITMAP, poke(56, "<Q", 1 << 30),
        OPENING + "Wrong parallels Format Extension magic: 0x0, expected: 0xab234cef23dcea87",
        True, same_as_qemu=True),
    row("extension-beyond-qemus-reach", PARALLELS_BITMAP, poke(56, "<Q", (1 << 54) - 1),
        OPENING + "Failed to read Format Extension cluster: Input/output error", True,
        same_as_qemu=True),
    row("no-features", PARALLELS_BITMAP, features(), None, False),
    row("feature-flags", PARALLELS_BITMAP, features(feature(DIRTY, 1, bytes(48))),
        OPENING + "Flags for extension feature are unsupported", True, same_as_qemu=True),
    row("unknown-feature", PARALLELS_BITMAP, features(feature(0x1234, 0, bytes(8))),
        OPENING + "Unknown feature: 0x1234", True, same_as_qemu=True),
    row("feature-larger-than-the-cluster", PARALLELS_BITMAP,
        features(feature(DIRTY, 0, b"", size=64 * KiB)),
        OPENING + "Feature data_size exceedes Format Extension cluster", True, same_as_qemu=True),
    row("bitmap-feature-too-small", PARALLELS_BITMAP, features(feature(DIRTY, 0, bytes(8))),
        OPENING + "Too small Bitmap Feature area in Parallels Format Extension: 8 bytes, "
        "expected at least 32 bytes", True, same_as_qemu=True),
    row("bitmap-of-another-size", PARALLELS_BITMAP, features(bitmap(sectors=4096)),
        OPENING + r"Bitmap size \(in sectors\) 4096 differs from disk size in sectors 2048",
        True, same_as_qemu=True),
    row("bitmap-table-past-its-feature", PARALLELS_BITMAP,
        features(feature(DIRTY, 0, struct.pack("<Q16sII", SECTORS_1M, b"\x10" * 16, 128, 1))),
        OPENING + "Bitmaps feature corrupted: l1 table exceeds extension data_size", True,
        same_as_qemu=True),
    row("bitmap-table-of-the-wrong-size", PARALLELS_BITMAP, features(bitmap(table=(0, 0, 0))),
        OPENING + "Bitmap table size 3 does not correspond to bitmap size and cluster size. "
        "Expected 1", True, same_as_qemu=True),
    row("bitmaps-of-one-name", PARALLELS_BITMAP, features(bitmap(), bitmap(table=(1,))),
        OPENING + f"Bitmap already exists: {BITMAP_ID}", True, same_as_qemu=True),
    row("bitmaps-of-two-names", PARALLELS_BITMAP,
        features(bitmap(), bitmap(uuid=b"\x11" * 16, table=(1,))), None, False),
    row("bitmap-data-beyond-qemus-reach", PARALLELS_BITMAP,
        features(bitmap(table=((1 << 54) - 1,))),
        OPENING + "Failed to read bitmap data cluster: Input/output error", True,
        same_as_qemu=True),
    row("bitmap-data-beyond-EOF", PARALLELS_BITMAP, features(bitmap(table=(1 << 30,))),
        None, False),
    # qemu reads it (the bitmap and cluster 0 share their bytes): instar refuses.
    row("bitmap-data-over-a-cluster", PARALLELS_BITMAP,
        features(bitmap(table=(128,))),
        IN_IMAGE + r"host offset 0x10000, mapped at guest offset 0x0, is also data of dirty "
        rf"bitmap {BITMAP_ID} " + P_TWICE, False, fails_at="status"),
    # qemu 7.2 aborts on it (an assertion in bdrv_create_dirty_bitmap).
    row("bitmap-granularity-3", PARALLELS_BITMAP, features(bitmap(granularity=3)),
        OPENING + rf"dirty bitmap {BITMAP_ID} has a granularity of 3 sectors: not a power of "
        r"two of at least 512 bytes \(qemu 7\.2 aborts on it\)", True),
)  # fmt: skip


# --- dmg, bochs, cloop: qemu cannot make them; built by their reader tests' builders ----------


def dmg_base(key: str, image: dmg_tests.Dmg, name: str = "v.dmg") -> Base:
    return Base(key, lambda d: (d / name).write_bytes(image.build()), name)


def dmg_entry(partition: int, chunk: int, kind: str, sector: int, count: int, offset: int,
              length: int) -> dmg_tests.Dmg:
    """The standard dmg with one chunk entry rewritten."""
    entry = (dmg_tests.TYPES[kind], 0, sector, count, offset, length)
    return dmg_tests.Dmg(dmg_tests.every_kind("zlib"), entries=[(partition, chunk, entry)])


def two_raw(*entries: tuple[int, int, int, int, int], sectors: int | None = None
            ) -> dmg_tests.Dmg:
    """Two raw chunks of 4 KiB; ``entries`` rewrite them: (chunk, sector, count,
    offset, length); ``sectors``: the disk's (None: both chunks')."""
    chunks = [dmg_tests.Chunk("raw", pattern(4096, seed=1)),
              dmg_tests.Chunk("raw", pattern(4096, seed=2))]
    return dmg_tests.Dmg([chunks], entries=[(0, c, (1, 0, *rest)) for c, *rest in entries],
                         sectors=sectors)


def koly(path: Path) -> int:
    return path.read_bytes().rfind(b"koly")


def koly_field(at: int) -> Callable[[Path], int]:
    return lambda path: koly(path) + at


def swap_partitions(path: Path) -> None:
    """The plist's first two mish blocks (their <dict>s) swapped: the table out
    of guest order, every offset in the file unchanged."""
    data = path.read_bytes()
    start = data.index(b"\t\t\t<dict>")
    middle = data.index(b"\t\t\t<dict>", start + 1)
    end = data.index(b"\t\t\t<dict>", middle + 1)
    path.write_bytes(data[:start] + data[middle:end] + data[start:middle] + data[end:])


DMG = dmg_base("dmg", dmg_tests.Dmg(dmg_tests.every_kind("zlib")))
DMG_RSRC = dmg_base("dmg-rsrc", dmg_tests.Dmg(dmg_tests.every_kind("raw"), form="rsrc"))
DMG_INVALID = OPENING + "Could not open '{image}': Invalid argument"
DMG_ROWS = table(
    "dmg", "dmg",
    row("no-trailer", DMG, poke(koly, "4s", b"kolx"),
        OPENING + "Could not locate UDIF trailer in dmg file", True, same_as_qemu=True),
    row("file-of-100-bytes", DMG, Cut(100),
        OPENING + "Could not locate UDIF trailer in dmg file", True, same_as_qemu=True),
    row("data-fork-past-the-trailer", DMG, poke(koly_field(0x18), ">Q", 1 << 40), DMG_INVALID,
        True, same_as_qemu=True),
    row("plist-past-the-trailer", DMG, poke(koly_field(0xE0), ">Q", 1 << 40), DMG_INVALID, True,
        same_as_qemu=True),
    row("negative-sector-count", DMG, poke(koly_field(0x1EC), ">Q", (1 << 63) + 5), DMG_INVALID,
        True, same_as_qemu=True),
    row("no-chunk-table", DMG, poke(koly_field(0xE0), ">Q", 0), DMG_INVALID, True,
        same_as_qemu=True),
    row("data-element-never-closed", DMG, Edit(lambda p: p.write_bytes(
        p.read_bytes().replace(b"</data>", b"</dat>!"))), DMG_INVALID, True, same_as_qemu=True),
    row("resource-data-past-the-fork", DMG_RSRC,
        poke(lambda p: field_at(p, koly(p) + 0x28, ">Q"), ">I", 1 << 30), DMG_INVALID, True,
        same_as_qemu=True),
    row("resource-of-no-bytes", DMG_RSRC,
        poke(lambda p: field_at(p, koly(p) + 0x28, ">Q") + 256, ">I", 0), DMG_INVALID, True,
        same_as_qemu=True),
    row("sector-count-over-qemu's-max",
        dmg_base("dmg-sectors", dmg_entry(1, 2, "zlib", 72, 200000, 0, 100)),
        NOTHING, OPENING + r"sector count 200000 for chunk 3 is larger than max \(131072\)",
        True),
    row("length-over-qemu's-max",
        dmg_base("dmg-length", dmg_entry(1, 2, "raw", 72, 100, 0, (64 << 20) + 1)),
        NOTHING, OPENING + r"length 67108865 for chunk 3 is larger than max \(67108864\)", True),
    row("sector-count-huge", DMG, poke(koly_field(0x1EC), ">Q", 1 << 62),
        OPENING + "Could not refresh total sector count: File too large", True),
    row("sectors-in-no-chunk",
        dmg_base("dmg-gap", two_raw((1, 16, 8, 4096, 4096))), NOTHING,
        IN_IMAGE + "no chunk of the image holds guest offset 0x1000", True, fails_at="read"),
    row("chunks-overlap-in-the-guest",
        dmg_base("dmg-overlap", two_raw((1, 4, 8, 4096, 4096))), NOTHING,
        IN_IMAGE + r"chunks at guest offsets 0x0 and 0x800 overlap \(guest sectors mapped "
        r"twice: the image is corrupt\)", True, fails_at="read"),
    # qemu reads these three; instar refuses a chunk aliasing another, or past the end of the
    # file, or a raw chunk shorter than its sectors (docs/formats/dmg.md).
    row("chunks-share-file-bytes",
        dmg_base("dmg-alias", two_raw((1, 8, 8, 0, 4096))), NOTHING,
        IN_IMAGE + r"host offset 0x0 is mapped by two guest ranges, at guest offsets 0x0 and "
        r"0x1000 \(a host unit mapped twice: the image is corrupt\)", False, fails_at="read"),
    row("chunk-past-EOF", dmg_base("dmg-past-eof", two_raw((0, 0, 8, 1 << 30, 4096))), NOTHING,
        IN_IMAGE + r"raw chunk at guest offset 0x0 lies beyond the end of the file \(the image "
        r"is truncated or corrupt\)", False, fails_at="read"),
    row("chunk-over-the-plist",
        dmg_base("dmg-over-plist", two_raw((1, 8, 1, 8192, 512), sectors=9)), NOTHING,
        IN_IMAGE + r"host offset 0x2000, mapped at guest offset 0x1000, is also the property "
        r"list \(a host unit mapped twice: the image is corrupt\)", False, fails_at="read"),
    row("raw-chunk-short", dmg_base("dmg-raw-short", two_raw((1, 8, 16, 4096, 4096))), NOTHING,
        IN_IMAGE + "raw chunk at guest offset 0x1000 holds 4096 bytes, fewer than its 16 "
        "sectors", False, fails_at="read"),
    row("zlib-bomb", dmg_base("dmg-bomb", dmg_tests.Dmg([[dmg_tests.Chunk(
        "zlib", bytes(4096), stored=zlib.compress(bytes(1 << 20)))]])), NOTHING,
        IN_IMAGE + r"zlib chunk at guest offset 0x0 inflates to more than 4096 bytes \(a "
        r"compression bomb\)", True, fails_at="read"),
    row("bzip2-bomb", dmg_base("dmg-bz2-bomb", dmg_tests.Dmg([[dmg_tests.Chunk(
        "bzip2", bytes(4096), stored=bz2.compress(bytes(1 << 20)))]])), NOTHING,
        IN_IMAGE + r"bzip2 chunk at guest offset 0x0 inflates to more than 4096 bytes \(a "
        r"compression bomb\)", True, fails_at="read"),
    row("zlib-chunk-short", dmg_base("dmg-zlib-short", dmg_tests.Dmg([[dmg_tests.Chunk(
        "zlib", bytes(4096), stored=zlib.compress(bytes(1000)))]])), NOTHING,
        IN_IMAGE + "zlib chunk at guest offset 0x0 inflates to 1000 bytes, not its 4096", True,
        fails_at="read"),
    row("lzfse-chunk", dmg_base("dmg-lzfse", dmg_tests.Dmg(dmg_tests.every_kind("lzfse"))),
        NOTHING, IN_IMAGE + r"the chunk at guest offset 0x0 is lzfse-compressed, which instar "
        r"cannot read \(qemu reads it only when built with its dmg-lzfse module\)", True,
        fails_at="read"),
    row("unknown-chunk-type", dmg_base("dmg-unknown", dmg_tests.Dmg(
        dmg_tests.every_kind("zlib"), entries=[(2, 1, (0x1234, 0, 200, 5, 0, 100))])), NOTHING,
        IN_IMAGE + r"the chunk at guest offset 0x137800 is of unknown type 0x1234, which instar "
        r"cannot read \(nor can qemu\)", True, fails_at="read"),
    # Read by both.
    row("trailer-cut-short", DMG, Cut(lambda p: file_end(p) - 100), None, False),
    row("zero-chunk-of-2^40-sectors", dmg_base("dmg-zeros", dmg_tests.Dmg(
        [[dmg_tests.Chunk("zero", bytes(4096), sectors=1 << 40)]], sectors=100)), NOTHING, None,
        False),
    row("resource-fork", DMG_RSRC, NOTHING, None, False),
    # qemu's search of a table out of guest order fails; instar sorts it.
    row("mish-blocks-out-of-order", DMG, Edit(swap_partitions), None, True),
)  # fmt: skip


def bochs_base(key: str, image: bochs_tests.Bochs) -> Base:
    return Base(key, lambda d: (d / "v.bochs").write_bytes(image.build()), "v.bochs")


BOCHS_IMAGE = bochs_tests.IMAGES["mixed.bochs"]
BOCHS = bochs_base("bochs", BOCHS_IMAGE)
BOCHS_READ = r"the image is truncated or corrupt\)"
BOCHS_ROWS = table(
    "bochs", "bochs",
    row("version-3", BOCHS, poke(64, "<I", 3 << 16), OPENING + "Image not in Bochs format", True,
        same_as_qemu=True, probes=False),
    row("catalog-too-large", BOCHS, poke(72, "<I", 0x100001),
        OPENING + "Catalog size is too large", True, same_as_qemu=True),
    row("extent-256", BOCHS, poke(80, "<I", 256), OPENING + "Extent size must be at least 512",
        True, same_as_qemu=True),
    row("extent-not-a-power-of-two", BOCHS, poke(80, "<I", 3072),
        OPENING + "Extent size 3072 is not a power of two", True, same_as_qemu=True),
    row("extent-16M", BOCHS, poke(80, "<I", 16 << 20),
        OPENING + "Extent size 16777216 is too large", True, same_as_qemu=True),
    row("catalog-too-small", BOCHS, poke(72, "<I", 10),
        OPENING + "Catalog size is too small for this disk size", True, same_as_qemu=True),
    # qemu reads what lies past the end of the file as zeros; instar refuses to read.
    row("catalog-past-EOF", BOCHS, Cut(600), IN_IMAGE + r"the catalog \(256 entries at offset "
        r"512\) lies beyond the end of the file \(" + BOCHS_READ, False, fails_at="read"),
    row("extent-past-EOF", BOCHS, poke(512, "<I", 5000),
        IN_IMAGE + r"catalog entry 0 points beyond the end of the file \(" + BOCHS_READ, False,
        fails_at="read"),
    row("extent-named-twice", BOCHS, poke(516, "<I", 0),
        IN_IMAGE + r"host offset 0x600 is mapped by two guest ranges, at guest offsets 0x1000 "
        r"and 0x96000 \(a host unit mapped twice: the image is corrupt\)", False,
        fails_at="read"),
    row("version-1", bochs_base("bochs-v1", bochs_tests.IMAGES["version-1.bochs"]), NOTHING,
        None, False),
    row("disk-size-not-a-sector-multiple", BOCHS, poke(88, "<Q", (1 << 20) - 100), None, False),
)  # fmt: skip


def cloop_base(key: str, image: bytes) -> Base:
    return Base(key, lambda d: (d / "v.cloop").write_bytes(image), "v.cloop")


CLOOP = cloop_base("cloop", cloop_tests.damaged())
CLOOP_ROWS = table(
    "cloop", "cloop",
    row("block-size-odd", CLOOP, poke(128, ">I", 1000),
        OPENING + "block_size 1000 must be a multiple of 512", True, same_as_qemu=True),
    row("block-size-zero", CLOOP, poke(128, ">I", 0), OPENING + "block_size cannot be zero",
        True, same_as_qemu=True),
    row("block-size-128M", CLOOP, poke(128, ">I", 128 << 20),
        OPENING + "block_size 134217728 must be 64 MB or less", True, same_as_qemu=True),
    row("too-many-blocks", CLOOP, poke(132, ">I", 0x20000000),
        OPENING + "n_blocks 536870912 must be 536870911 or less", True, same_as_qemu=True),
    row("offsets-size-wraps", CLOOP, poke(132, ">I", 536870911),
        OPENING + "Could not allocate offsets table", True, same_as_qemu=True),
    row("too-many-offsets", CLOOP, poke(132, ">I", 0x4000000),
        OPENING + "image requires too many offsets, try increasing block size", True,
        same_as_qemu=True),
    row("offsets-decrease", CLOOP, poke(152, ">Q", 1),
        OPENING + "offsets not monotonically increasing at index 2, image file is corrupt", True,
        same_as_qemu=True),
    row("block-over-128M", CLOOP, poke(152, ">Q", 1 << 30),
        OPENING + "invalid compressed block size at index 2, image file is corrupt", True,
        same_as_qemu=True),
    row("table-cut", CLOOP, Cut(150),
        OPENING + "offsets not monotonically increasing at index 1, image file is corrupt", True,
        same_as_qemu=True),
    row("table-past-EOF", CLOOP, Cut(136), IN_IMAGE + r"the offsets table \(5 entries at offset "
        r"136\) lies beyond the end of the file \(the image is truncated or corrupt\)", True,
        fails_at="read"),
    row("block-cut", CLOOP, Cut(lambda p: file_end(p) - 100),
        IN_IMAGE + r"compressed block 3 \(guest offset 0x30000\) ends inside its zlib stream "
        r"\(cut short or corrupt\)", True, fails_at="read"),
    row("block-is-the-table", CLOOP, poke(136, ">Q", 136),
        IN_IMAGE + r"host offset 0x88, mapped at guest offset 0x0, is also the offsets table "
        r"\(a host unit mapped twice: the image is corrupt\)", True, fails_at="read"),
    row("bomb", cloop_base("cloop-bomb", cloop_tests.damaged(
        streams=[zlib.compress(bytes(1 << 20))] * 4)), NOTHING,
        IN_IMAGE + r"compressed block 0 \(guest offset 0x0\) inflates to more than 65536 bytes "
        r"\(a compression bomb\)", True, fails_at="read"),
    row("ragged-end", cloop_base("cloop-ragged", cloop_tests.cloop_bytes(
        pattern(100000, seed=3), 4096)), NOTHING, None, False),
)  # fmt: skip


# --- qed --------------------------------------------------------------------------------------


def build_qed(directory: Path) -> None:
    """1 MiB, 64 KiB clusters: data in cluster 0, a zero cluster (1), more
    data, unallocated clusters, data at the end."""
    patterned_raw(directory / "v.raw", MiB, [(320 * KiB, 768 * KiB)], seed=8)
    qemu_img_ok("convert", "-f", "raw", "-O", "qed", "v.raw", "v.qed", cwd=directory)
    qemu_io(directory / "v.qed", "write -z 64k 64k", "qed")
    (directory / "v.raw").unlink()


def build_qed_child(directory: Path) -> None:
    """A qed over a qcow2 whose name takes 10 bytes ("base.qcow2")."""
    patterned_raw(directory / "base.raw", MiB, [], seed=9)
    qemu_img_ok("convert", "-O", "qcow2", "base.raw", "base.qcow2", cwd=directory)
    (directory / "base.raw").unlink()
    qemu_img_ok("create", "-q", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", "child.qed",
                cwd=directory)
    qemu_io(directory / "child.qed", "write -P 0x66 64k 64k", "qed")


QED = Base("qed", build_qed, "v.qed")
QED_CHILD = Base("qed-child", build_qed_child, "child.qed")
QED_FEATURES, QED_L1 = 16, 40


def qed_l1(path: Path) -> int:
    return field_at(path, QED_L1, "<Q")


def qed_l2_entry(index: int) -> Callable[[Path], int]:
    """Where entry ``index`` of the first L2 table lies."""
    return lambda path: field_at(path, qed_l1(path), "<Q") + 8 * index


def qed_cluster_0(path: Path) -> int:
    return field_at(path, qed_l2_entry(0)(path), "<Q")


QED_WHERE = ": unaligned, inside the header or beyond the end of the file"
QED_ROWS = table(
    "qed", "qed",
    row("bad-magic", QED, poke(0, "4s", b"QEE\0"), OPENING + "Image not in QED format", True,
        same_as_qemu=True, probes=False),
    row("unknown-feature", QED, poke(QED_FEATURES, "<Q", 8),
        OPENING + "Unsupported QED features: 8", True, same_as_qemu=True),
    row("unknown-features-high", QED, poke(QED_FEATURES, "<Q", 1 << 63 | 0x13),
        OPENING + "Unsupported QED features: 8000000000000010", True, same_as_qemu=True),
    row("cluster-size-2k", QED, poke(4, "<I", 2048), OPENING + "QED cluster size is invalid",
        True, same_as_qemu=True),
    row("cluster-size-not-a-power-of-two", QED, poke(4, "<I", 3 * 4096),
        OPENING + "QED cluster size is invalid", True, same_as_qemu=True),
    row("cluster-size-128M", QED, poke(4, "<I", 128 << 20),
        OPENING + "QED cluster size is invalid", True, same_as_qemu=True),
    row("table-size-3", QED, poke(8, "<I", 3), OPENING + "QED table size is invalid", True,
        same_as_qemu=True),
    row("table-size-1", QED, poke(8, "<I", 1), OPENING + "QED table offset is invalid", True,
        same_as_qemu=True),
    row("image-size-odd", QED, poke(48, "<Q", 1000), OPENING + "QED image size is invalid",
        True, same_as_qemu=True),
    row("image-size-past-its-tables", QED, poke(48, "<Q", (1 << 46) + 512),
        OPENING + "QED image size is invalid", True, same_as_qemu=True),
    row("image-size-2^64-512", QED, poke(48, "<Q", (1 << 64) - 512),
        OPENING + "QED image size is invalid", True, same_as_qemu=True),
    row("l1-past-eof", QED, poke(QED_L1, "<Q", 1 << 40), OPENING + "QED table offset is invalid",
        True, same_as_qemu=True),
    row("l1-unaligned", QED, poke(QED_L1, "<Q", 0x10200), OPENING + "QED table offset is invalid",
        True, same_as_qemu=True),
    row("l1-in-the-header", QED, poke(QED_L1, "<Q", 0), OPENING + "QED table offset is invalid",
        True, same_as_qemu=True),
    row("l1-wraps-round", QED, poke(QED_L1, "<Q", (1 << 64) - 0x10000),
        OPENING + "QED table offset is invalid", True, same_as_qemu=True),
    row("truncated-in-the-l1", QED, Cut(0x30000), OPENING + "QED table offset is invalid", True,
        same_as_qemu=True),
    # qemu sees the file in whole sectors: the last byte, cut, reads as a zero.
    row("file-ends-inside-a-sector", QED, Cut(lambda p: file_end(p) - 1), None, False),
    row("truncated-in-the-header", QED, Cut(40), OPENING + "QED table offset is invalid", True,
        same_as_qemu=True),
    # A header of 2^16 clusters of 64 KiB: 4 GiB, past qemu's 32 bits (the L1 table beyond it).
    row("header-size-too-large", QED, (poke(12, "<I", 1 << 16), poke(QED_L1, "<Q", 1 << 32),
                                       Cut((1 << 32) + 0x50000)),
        OPENING + "QED header size is too large", True, same_as_qemu=True),
    # The flag, but offset and size 0: an empty name, so no backing file.
    row("backing-flag-without-a-name", QED, poke(QED_FEATURES, "<Q", 1), None, False),
    row("backing-name-offset-invalid", QED, (poke(QED_FEATURES, "<Q", 1),
                                             poke(56, "<II", 0x10000 - 4, 8)),
        OPENING + "QED backing filename offset is invalid", True, same_as_qemu=True),
    row("backing-name-of-4096-bytes", QED, (poke(QED_FEATURES, "<Q", 1),
                                            poke(56, "<II", 64, 4096)),
        OPENING + "Failed to read backing filename", True, same_as_qemu=True),
    row("backing-name-of-4095-zeros", QED, (poke(QED_FEATURES, "<Q", 1),
                                            poke(56, "<II", 64, 4095)), None, False),
    row("missing-backing-file", QED_CHILD, Edit(os.unlink, file="base.qcow2"),
        OPENING + "Could not open backing file: Could not open 'base.qcow2': "
        "No such file or directory", True, fails_at="backing", same_as_qemu=True),
    # The raw-backing flag over a qcow2 base: its bytes, header and all, as qemu reads them.
    row("backing-format-raw-over-qcow2", QED_CHILD, poke(QED_FEATURES, "<Q", 0b101), None,
        False),
    row("need-check", QED, poke(QED_FEATURES, "<Q", 0b10), None, False),
    row("unknown-compat-and-autoclear-bits", QED, poke(24, "<QQ", 1 << 40, 1 << 50), None,
        False),
    row("l2-table-past-eof", QED, poke(qed_l1, "<Q", 1 << 40),
        IN_IMAGE + "L2 table offset 0x10000000000 is invalid \\(L1 index 0x0\\)" + QED_WHERE,
        True, fails_at="status"),
    row("l2-table-unaligned", QED, poke(qed_l1, "<Q", 0x10008),
        IN_IMAGE + "L2 table offset 0x10008 is invalid \\(L1 index 0x0\\)" + QED_WHERE,
        True, fails_at="status"),
    row("l2-table-is-the-l1-table", QED, poke(qed_l1, "<Q", 0x10000),
        IN_IMAGE + "the L2 table of guest offset 0x0 at host offset 0x10000 overlaps the L1 "
        "table \\(a host unit mapped twice: the image is corrupt\\)", False, fails_at="status"),
    row("cluster-past-eof", QED, poke(qed_l2_entry(0), "<Q", 1 << 40),
        IN_IMAGE + "cluster at guest offset 0x0 points to 0x10000000000" + QED_WHERE, True,
        fails_at="status"),
    row("cluster-unaligned", QED, poke(qed_l2_entry(0), "<Q", 0x50200),
        IN_IMAGE + "cluster at guest offset 0x0 points to 0x50200" + QED_WHERE, True,
        fails_at="status"),
    row("cluster-in-the-header", QED, poke(qed_l2_entry(0), "<Q", 0x8000),
        IN_IMAGE + "cluster at guest offset 0x0 points to 0x8000" + QED_WHERE, True,
        fails_at="status"),
    row("cluster-is-the-l1-table", QED, poke(qed_l2_entry(0), "<Q", 0x10000),
        IN_IMAGE + "host offset 0x10000, mapped at guest offset 0x0, is also the L1 table "
        "\\(a host unit mapped twice: the image is corrupt\\)", False, fails_at="status"),
    row("two-entries-one-cluster", QED, poke(qed_l2_entry(3), "<Q", qed_cluster_0),
        IN_IMAGE + "host offset 0x[0-9a-f]+ is mapped by two guest ranges, at guest offsets "
        "0x0 and 0x30000 \\(a host unit mapped twice: the image is corrupt\\)", False,
        fails_at="status"),
    row("zero-entry", QED, poke(qed_l2_entry(2), "<Q", 1), None, False),
)  # fmt: skip


# --- qcow -------------------------------------------------------------------------------------


def build_qcow(directory: Path, *options: str) -> None:
    """1 MiB in 4 KiB clusters: patterned data, a hole, data at the end;
    ``-c``: every data cluster compressed (qemu-img then exits 1, silently,
    with the image written: tests/test_qcow.py)."""
    patterned_raw(directory / "v.raw", MiB, [(320 * KiB, 768 * KiB)], seed=10)
    result = run_qemu_img("convert", *options, "-f", "raw", "-O", "qcow", "v.raw", "v.qcow",
                          cwd=directory)
    assert result.rc == (1 if options else 0) and result.stderr == "", result.stderr
    (directory / "v.raw").unlink()


def build_qcow_child(directory: Path) -> None:
    """A qcow over a qcow (qemu makes it with 512-byte clusters)."""
    patterned_raw(directory / "base.raw", MiB, [], seed=11)
    qemu_img_ok("convert", "-O", "qcow", "base.raw", "base.qcow", cwd=directory)
    (directory / "base.raw").unlink()
    qemu_img_ok("create", "-q", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", "child.qcow",
                cwd=directory)
    qemu_io(directory / "child.qcow", "write -P 0x66 64k 4k", "qcow")


QCOW = Base("qcow", build_qcow, "v.qcow")
QCOW_COMPRESSED = Base("qcow-compressed", lambda d: build_qcow(d, "-c"), "v.qcow")
QCOW_CHILD = Base("qcow-child", build_qcow_child, "child.qcow")
QCOW_SIZE, QCOW_CLUSTER_BITS, QCOW_L2_BITS, QCOW_CRYPT, QCOW_L1 = 24, 32, 33, 36, 40
QCOW_COMPRESSED_BIT = 1 << 63


def qcow_l2_entry(index: int) -> Callable[[Path], int]:
    """Where entry ``index`` of the first L2 table lies."""
    return lambda path: field_at(path, field_at(path, QCOW_L1, ">Q"), ">Q") + 8 * index


def qcow_entry_0(path: Path) -> int:
    return field_at(path, qcow_l2_entry(0)(path), ">Q")


def qcow_compressed(host: int | Callable[[Path], int], size: int) -> Callable[[Path], int]:
    """A compressed L2 entry (4 KiB clusters: the size in bits 51 to 62)."""
    return lambda path: QCOW_COMPRESSED_BIT | size << 51 | (host(path) if callable(host)
                                                            else host)


def qcow_shortened(path: Path) -> int:
    """Cluster 0's compressed entry, 10 bytes short of its stream."""
    entry = qcow_entry_0(path)
    size = (entry >> 51) & 0xFFF
    return entry & ~(0xFFF << 51) | (size - 10) << 51


QCOW_ROWS = table(
    "qcow", "qcow",
    row("bad-magic", QCOW, poke(0, "4s", b"QFI\xfa"), OPENING + "Image not in qcow format", True,
        same_as_qemu=True, probes=False),
    # qemu probes version 0 as raw, instar as a qcow2 it refuses (docs/formats/qcow2.md).
    row("version-0", QCOW, poke(4, ">I", 0),
        OPENING + "qcow \\(v1\\) does not support qcow version 0", True, same_as_qemu=True,
        probes=False),
    row("size-0", QCOW, poke(QCOW_SIZE, ">Q", 0),
        OPENING + "Image size is too small \\(must be at least 2 bytes\\)", True,
        same_as_qemu=True),
    row("size-1", QCOW, poke(QCOW_SIZE, ">Q", 1),
        OPENING + "Image size is too small \\(must be at least 2 bytes\\)", True,
        same_as_qemu=True),
    row("size-2", QCOW, poke(QCOW_SIZE, ">Q", 2), None, False),  # 0 sectors: an empty disk
    row("size-not-a-sector-multiple", QCOW, poke(QCOW_SIZE, ">Q", MiB - 100), None, False),
    row("size-2^62", QCOW, poke(QCOW_SIZE, ">Q", 1 << 62), OPENING + "Image too large", True,
        same_as_qemu=True),
    row("size-2^64-1", QCOW, poke(QCOW_SIZE, ">Q", (1 << 64) - 1), OPENING + "Image too large",
        True, same_as_qemu=True),
    row("cluster-bits-8", QCOW, poke(QCOW_CLUSTER_BITS, "B", 8),
        OPENING + "Cluster size must be between 512 and 64k", True, same_as_qemu=True),
    row("cluster-bits-17", QCOW, poke(QCOW_CLUSTER_BITS, "B", 17),
        OPENING + "Cluster size must be between 512 and 64k", True, same_as_qemu=True),
    row("l2-bits-5", QCOW, poke(QCOW_L2_BITS, "B", 5),
        OPENING + "L2 table size must be between 512 and 64k", True, same_as_qemu=True),
    row("l2-bits-14", QCOW, poke(QCOW_L2_BITS, "B", 14),
        OPENING + "L2 table size must be between 512 and 64k", True, same_as_qemu=True),
    row("crypt-method-2", QCOW, poke(QCOW_CRYPT, ">I", 2),
        OPENING + "invalid encryption method in qcow header", True, same_as_qemu=True),
    # AES: qemu-img info describes it without a key (as "backing" rows, info works and
    # compare exits 2); reading needs the key.
    row("crypt-method-aes", QCOW, poke(QCOW_CRYPT, ">I", 1),
        OPENING + "Parameter 'encrypt.key-secret' is required for cipher", True,
        fails_at="backing", same_as_qemu=True),
    row("l1-past-eof", QCOW, poke(QCOW_L1, ">Q", 1 << 40),
        OPENING + "L1 table at offset 1099511627776 lies beyond the end of the file", False),
    row("backing-name-too-long", QCOW, poke(8, ">QI", 48, 1024),
        OPENING + "Backing file name too long", True, same_as_qemu=True),
    row("backing-name-past-eof", QCOW, poke(8, ">QI", 1 << 40, 10), None, False),
    row("backing-name-empty", QCOW, poke(8, ">QI", 48, 0), None, False),
    row("missing-backing-file", QCOW_CHILD, Edit(os.unlink, file="base.qcow"),
        OPENING + "Could not open backing file: Could not open 'base.qcow': "
        "No such file or directory", True, fails_at="backing", same_as_qemu=True),
    row("l2-table-past-eof", QCOW, poke(lambda p: field_at(p, QCOW_L1, ">Q"), ">Q", 1 << 40),
        IN_IMAGE + "L2 table at offset 1099511627776 lies beyond the end of the file", False,
        fails_at="status"),
    row("l2-table-unaligned", QCOW, poke(lambda p: field_at(p, QCOW_L1, ">Q"), ">Q", 0x1008),
        IN_IMAGE + "L2 table offset 0x1008 unaligned \\(L1 index 0x0\\)", False,
        fails_at="status"),
    row("cluster-past-eof", QCOW, poke(qcow_l2_entry(0), ">Q", 1 << 40),
        IN_IMAGE + "cluster at guest offset 0x0 points to 0x10000000000, beyond the end of the "
        "file", False, fails_at="status"),
    row("cluster-unaligned", QCOW, poke(qcow_l2_entry(0), ">Q", lambda p: qcow_entry_0(p) + 512),
        IN_IMAGE + "cluster allocation offset 0x[0-9a-f]+ unaligned \\(guest offset 0x0\\)",
        False, fails_at="status"),
    row("cluster-is-the-l2-table", QCOW,
        poke(qcow_l2_entry(1), ">Q", lambda p: field_at(p, field_at(p, QCOW_L1, ">Q"), ">Q")),
        IN_IMAGE + "host offset 0x[0-9a-f]+, mapped at guest offset 0x1000, is also the L2 table "
        "of guest offset 0x0 \\(a host unit mapped twice: the image is corrupt\\)", False,
        fails_at="status"),
    row("two-entries-one-cluster", QCOW, poke(qcow_l2_entry(3), ">Q", qcow_entry_0),
        IN_IMAGE + "host offset 0x[0-9a-f]+ is mapped by two guest ranges, at guest offsets "
        "0x0 and 0x3000 \\(a host unit mapped twice: the image is corrupt\\)", False,
        fails_at="status"),
    row("compressed-garbage", QCOW, poke(qcow_l2_entry(0), ">Q",
                                         qcow_compressed(qcow_entry_0, 100)),
        IN_IMAGE + "compressed cluster at guest offset 0x0 does not decompress: .*", True,
        fails_at="read"),
    row("compressed-past-eof", QCOW, poke(qcow_l2_entry(0), ">Q",
                                          qcow_compressed(1 << 40, 100)),
        IN_IMAGE + "compressed cluster at guest offset 0x0 points to 0x10000000000, beyond the "
        "end of the file", True, fails_at="read"),
    row("compressed-of-0-bytes", QCOW, poke(qcow_l2_entry(0), ">Q",
                                            qcow_compressed(qcow_entry_0, 0)),
        IN_IMAGE + "compressed cluster at guest offset 0x0 decompresses to 0 bytes, not a whole "
        "cluster", True, fails_at="read"),
    row("compressed-cut-short", QCOW_COMPRESSED, poke(qcow_l2_entry(0), ">Q", qcow_shortened),
        IN_IMAGE + "compressed cluster at guest offset 0x0 decompresses to \\d+ bytes, not a "
        "whole cluster", True, fails_at="read"),
    row("compressed-read", QCOW_COMPRESSED, NOTHING, None, False),
)  # fmt: skip


# --- raw --------------------------------------------------------------------------------------


def build_raw_sparse(directory: Path) -> None:
    write_pieces(directory / "v.raw", [(0, pattern(100 * KiB)), (MiB, bytes(64 * KiB)),
                                       (2 * MiB, pattern(5000, seed=6))], size=3 * MiB + 77)


RAW_VDI = Base("raw-vdi", lambda d: (d / "v.raw").write_bytes(
    bytes(64) + b"\x7f\x10\xda\xbe" + pattern(8000)), "v.raw")  # vdi's magic, at 64
RAW_ROWS = table(
    "raw", "raw",
    row("holes-zeros-and-a-ragged-end", Base("raw-sparse", build_raw_sparse, "v.raw"), NOTHING,
        None, False),
    row("empty", Base("raw-empty", lambda d: (d / "v.raw").write_bytes(b""), "v.raw"), NOTHING,
        None, False),
    # Another format's magic: bytes with -f raw; probed, that format's refusal (qemu's
    # words for vdi, which reads the disk size before the rest), or instar's for a
    # format it does not read.
    row("vdi-magic-read-as-raw", RAW_VDI, NOTHING, None, False, probes=False),
    row("vdi-magic-probed", RAW_VDI, NOTHING,
        r"Could not open 'v\.raw': Unsupported VDI image size \(size is 0x3837363534333231, "
        r"max supported is 0x1fffff8000000\)", True, fmt="", same_as_qemu=True),
    row("qed-magic-probed",  # read as qed now: its features field is garbage
        Base("raw-qed", lambda d: (d / "v.img").write_bytes(b"QED\x00" + pattern(8000)), "v.img"),
        NOTHING, r"Could not open 'v\.img': Unsupported QED features: 131211100f0e0d08", True,
        fmt="", same_as_qemu=True),
)  # fmt: skip


# --- the test body ------------------------------------------------------------------------------

ROWS = [*QCOW2_ROWS, *VMDK_ROWS, *VPC_ROWS, *VHDX_ROWS, *VDI_ROWS, *PARALLELS_ROWS,
        *DMG_ROWS, *BOCHS_ROWS, *CLOOP_ROWS, *QED_ROWS, *QCOW_ROWS, *RAW_ROWS]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Base], Path]:
    """Each base directory, built on first use and kept for the module."""
    root = tmp_path_factory.mktemp("bases")
    built: dict[str, Path] = {}

    def get(base: Base) -> Path:
        if base.key not in built:
            directory = root / base.key
            directory.mkdir()
            base.build(directory)
            built[base.key] = directory
        return built[base.key]

    return get


def damaged(case: Case, bases: Callable[[Base], Path], work: Path) -> Path:
    """A copy of the row's base in ``work``, with the row's damage done."""
    shutil.copytree(bases(case.base), work, symlinks=True)
    for step in case.patch:
        step.apply(work / (step.file or case.base.image))
    return work


def listing(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def f_option(case: Case, flag: str = "-f") -> list[str]:
    return [flag, case.fmt] if case.fmt else []


@dataclass
class Outcome:
    """What instar and qemu-img did with one damaged image."""

    info: Result
    dd: list[Result]  # with -f, then probing (when the row probes)
    convert: Result
    compare: Result
    qemu_convert: Result
    qemu_info: Result
    outputs: dict[str, bytes] = field(default_factory=dict)  # readable rows: what was read
    left_behind: dict[str, list[str]] = field(default_factory=dict)  # failed runs: new files


def run_row(case: Case, work: Path, elsewhere: Path, undamaged: Path) -> Outcome:
    """Every command on the damaged image, instar in-process and qemu-img as a
    subprocess, both in ``work`` so names in messages are the row's."""
    image = case.base.image
    f = f_option(case)
    qemu_raw = elsewhere / "qemu.raw"
    qemu_convert = run_qemu_img("convert", *f, "-O", "raw", image, str(qemu_raw), cwd=work)
    qemu_info = run_qemu_img("info", *f, image, cwd=work)
    outputs: dict[str, bytes] = {}
    left: dict[str, list[str]] = {}
    if case.says is None:  # a readable row: what qemu reads, and its dd
        if qemu_convert.rc != 0:  # qemu refuses it: what qemu reads of the undamaged base
            qemu_img_ok("convert", *f, "-O", "raw", image, str(qemu_raw), cwd=undamaged)
        outputs["qemu convert"] = qemu_raw.read_bytes()
        qemu_dd = run_qemu_img("dd", *f, f"if={image}", f"of={elsewhere / 'qemu-dd.raw'}",
                               cwd=work if qemu_convert.rc == 0 else undamaged)
        assert qemu_dd.rc == 0, qemu_dd.stderr
        outputs["qemu dd"] = (elsewhere / "qemu-dd.raw").read_bytes()
    before = listing(work)

    def produced(label: str, result: Result, output: str) -> None:
        target = work / output
        if result.rc == 0 and target.exists():
            outputs[label] = target.read_bytes()
            target.unlink()
        now = listing(work)
        if now != before:
            left[label] = sorted(set(now) - set(before))

    info = run_instar("info", *f, image, cwd=work)
    produced("info", info, "none")
    dd = [run_instar("dd", *f, f"if={image}", "of=out.raw", cwd=work)]
    produced("dd", dd[0], "out.raw")
    if case.probes and case.fmt:
        dd.append(run_instar("dd", f"if={image}", "of=out.raw", cwd=work))
        produced("dd probed", dd[1], "out.raw")
    convert = run_instar("convert", *f, "-O", "raw", image, "out.raw", cwd=work)
    produced("convert", convert, "out.raw")
    if case.says is None:  # against what qemu read
        compare = run_instar("compare", *f, "-F", "raw", image, str(qemu_raw), cwd=work)
    else:  # against itself: the first image is the one refused
        compare = run_instar("compare", *f, *f_option(case, "-F"), image, image, cwd=work)
    produced("compare", compare, "none")
    return Outcome(info, dd, convert, compare, qemu_convert, qemu_info, outputs, left)


COMPARE_EXIT = {"open": 2, "backing": 2, "status": 3, "read": 4}


def check_refusal(case: Case, command: str, result: Result, rc: int, says: str) -> None:
    """Exit ``rc``, no traceback, one line of stderr: ``instar: `` and what the row says."""
    assert result.rc == rc, (command, result)
    assert "Traceback" not in result.stderr, (command, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, (command, lines)
    image = re.escape(case.base.image)
    reason = says.replace("{image}", image)
    expected = "instar: " + reason
    if command == "compare" and rc == 3:  # qemu's words, which give no reason
        expected = f"instar: Sector allocation test failed for {image}"
    elif command == "compare" and rc == 4:  # the image is named before the reason
        reason = says.removeprefix(IN_IMAGE).replace("{image}", image)
        expected = rf"instar: Error while reading offset \d+ of {image}: " + reason
    assert re.fullmatch(expected, lines[0]), (command, expected, lines[0])


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("case", ROWS, ids=lambda case: f"{case.family}-{case.name}")
def test_damaged_image(case: Case, bases: Callable[[Base], Path], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    work = damaged(case, bases, tmp_path / "work")
    # The image's own directory is where its rows expect named files to come
    # from (instar's policy allows none by default; INSTAR_ALLOW is instar's alone).
    monkeypatch.setenv("INSTAR_ALLOW", str((work / case.base.image).parent))
    elsewhere = tmp_path / "qemu"
    elsewhere.mkdir()
    outcome = run_row(case, work, elsewhere, bases(case.base))
    # The qemu column: qemu-img refuses the image, or reads it.
    if case.qemu_refuses:
        assert outcome.qemu_convert.rc != 0, outcome.qemu_convert
    else:
        assert outcome.qemu_convert.rc == 0, outcome.qemu_convert.stderr
        assert outcome.qemu_info.rc == 0, outcome.qemu_info.stderr
    assert outcome.left_behind == {}  # no output file, no temporary file
    if case.says is None:
        check_read_as_qemu(outcome)
        return
    if case.fails_at == "open":
        check_refusal(case, "info", outcome.info, 1, case.info_says or case.says)
    else:
        # The image itself opens: info shows it, as qemu-img info does (where
        # qemu opens it at all: not a differencing VHDX).
        assert (outcome.info.rc, outcome.info.stderr) == (0, ""), outcome.info
        if outcome.qemu_info.rc == 0:
            assert outcome.info.stdout == outcome.qemu_info.stdout
    for dd in outcome.dd:
        check_refusal(case, "dd", dd, 1, case.says)
    check_refusal(case, "convert", outcome.convert, 1, case.says)
    check_refusal(case, "compare", outcome.compare, COMPARE_EXIT[case.fails_at], case.says)
    if case.same_as_qemu:
        assert outcome.convert.normalised_stderr() == outcome.qemu_convert.normalised_stderr()


def check_read_as_qemu(outcome: Outcome) -> None:
    """A readable row: instar reads what qemu-img reads, with every command."""
    for result in (outcome.info, *outcome.dd, outcome.convert, outcome.compare):
        assert (result.rc, result.stderr) == (0, ""), result
    if outcome.qemu_info.rc == 0:
        assert outcome.info.stdout == outcome.qemu_info.stdout
    assert outcome.outputs["convert"] == outcome.outputs["qemu convert"]
    assert outcome.outputs["dd"] == outcome.outputs["qemu dd"]
    if len(outcome.dd) > 1:
        assert outcome.outputs["dd probed"] == outcome.outputs["qemu dd"]
    assert outcome.compare.stdout == "Images are identical.\n"
