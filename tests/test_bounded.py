"""Work bounded by the file, not by what the header claims.

1. Aliasing is corruption: a host cluster, grain or block mapped by two guest
   ranges (or by a guest range and the image's own metadata) is refused, in
   one line naming the guest offsets and the host offset. qemu reads such
   images (qemu-img check calls them corrupt): an intended difference.
2. Compression bombs: a compressed unit that inflates past its unit is refused.
3. Empty tables at memory speed: huge empty disks are compared and copied
   without a Python loop per table entry (counted in executed lines).
4. Sizes past what Python or the output can hold: never an OverflowError,
   qemu's wording where qemu has one.

Every image is made by qemu-img (and qemu-io), then patched.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import struct
import sys
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import instar
from helpers import qemu_img_ok, qemu_io, qemu_read_raw, require_qemu, run_instar, run_qemu_img
from instar.errors import FormatError
from instar.files import InputFile
from instar.formats import common
from instar.formats.common import ZLIB, ZSTD, HostClaims, inflate, zstd_module
from instar.formats.vhdx import layout as vhdx_layout
from instar.formats.vmdk.layout import SparseHeader

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
QCOW2_OFFSET = 0x00FF_FFFF_FFFF_FE00
COPIED, COMPRESSED = 1 << 63, 1 << 62
CORRUPT = r" \(a host unit mapped twice: the image is corrupt\)"


# --- patching images ------------------------------------------------------------------------


def read_field(path: Path, offset: int, fmt: str) -> int:
    with path.open("rb") as handle:
        handle.seek(offset)
        value: int = struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]
    return value


def write_field(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, value))


def make_qcow2(path: Path, size: str, writes: list[str], *options: str) -> Path:
    qemu_img_ok("create", "-q", "-f", "qcow2", *options, str(path), size)
    for command in writes:
        qemu_io(path, command, "qcow2")
    return path


def qcow2_l1(path: Path) -> int:
    return read_field(path, 40, ">Q")


def qcow2_l2(path: Path, l1_index: int = 0) -> int:
    """The host offset of the L2 table of L1 entry ``l1_index``."""
    return read_field(path, qcow2_l1(path) + 8 * l1_index, ">Q") & QCOW2_OFFSET


def one_line_refusal(result: Any, pattern: str) -> None:
    """Exit 1, one line of stderr matching ``pattern`` (after ``instar: ``), no traceback."""
    assert result.rc == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch("instar: " + pattern, lines[0]), (pattern, lines[0])


def refused_everywhere(image: Path, pattern: str, tmp_path: Path, qemu_reads: bool = True) -> None:
    """dd and convert (run beside the image, named by its name) refuse with the
    line; info still describes the image (as qemu-img info does); qemu-img
    convert reads it (the intended difference) unless ``qemu_reads`` is False."""
    directory = image.parent
    for args in (["dd", f"if={image.name}", "of=out.raw"],
                 ["convert", "-O", "qcow2", image.name, "out.qcow2"]):
        one_line_refusal(run_instar(*args, cwd=directory), pattern)
        assert not (directory / "out.raw").exists() and not (directory / "out.qcow2").exists()
    assert run_instar("info", str(image)).rc == 0
    qemu = run_qemu_img("convert", "-O", "raw", str(image), str(tmp_path / "q.raw"))
    assert (qemu.rc == 0) == qemu_reads, qemu


# --- 1. aliasing: qcow2 -----------------------------------------------------------------------


@pytest.mark.parametrize("extended", [False, True])
def test_qcow2_two_l2_entries_on_one_cluster(tmp_path: Path, extended: bool) -> None:
    options = ["-o", "extended_l2=on"] if extended else []
    image = make_qcow2(tmp_path / "alias.qcow2", "4M",
                       ["write -P 0x11 0 64k", "write -P 0x33 1M 64k"], *options)
    width = 16 if extended else 8
    l2 = qcow2_l2(image)
    entry = read_field(image, l2, ">Q")
    host = entry & QCOW2_OFFSET
    write_field(image, l2 + width * 16, ">Q", entry)  # guest 1 MiB: guest 0's cluster
    if extended:
        write_field(image, l2 + width * 16 + 8, ">Q", read_field(image, l2 + 8, ">Q"))
    refused_everywhere(
        image,
        rf"alias\.qcow2: host offset {host:#x} is mapped by two guest ranges, at guest "
        rf"offsets 0x0 and 0x100000{CORRUPT}",
        tmp_path,
    )
    # Through the API: every read fails, not only the first (a table is claimed once).
    with instar.open_image(str(image)) as opened:
        for _ in range(2):
            with pytest.raises(FormatError, match="mapped by two guest ranges"):
                opened.read(0, 4096)


def test_qcow2_data_cluster_on_its_l2_table(tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "meta.qcow2", "4M", ["write -P 0x11 0 64k"])
    l2 = qcow2_l2(image)
    write_field(image, l2 + 8 * 17, ">Q", COPIED | l2)  # guest 0x110000 is the L2 table
    refused_everywhere(
        image,
        rf"meta\.qcow2: host offset {l2:#x}, mapped at guest offset 0x110000, is also the "
        rf"L2 table of guest offset 0x0{CORRUPT}",
        tmp_path,
    )


def test_qcow2_l2_table_shared_by_two_l1_entries(tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "shared.qcow2", "2G",
                       ["write -P 0x11 0 64k", "write -P 0x22 1G 64k"])
    l1 = qcow2_l1(image)
    write_field(image, l1 + 8, ">Q", read_field(image, l1, ">Q"))
    refused_everywhere(
        image,
        rf"shared\.qcow2: the L2 table of guest offset 0x20000000 at host offset "
        rf"{qcow2_l2(image):#x} overlaps the L2 table of guest offset 0x0{CORRUPT}",
        tmp_path,
    )


@pytest.mark.parametrize(("field", "value", "says"), [
    (40, lambda image: 0, r"the L1 table at host offset 0x0 overlaps the image header"),
    (48, qcow2_l1, r"the refcount table at host offset 0x30000 overlaps the L1 table"),
])
def test_qcow2_tables_overlapping_each_other(
    tmp_path: Path, field: int, value: Callable[[Path], int], says: str
) -> None:
    image = make_qcow2(tmp_path / "tables.qcow2", "4M", ["write -P 0x11 0 64k"])
    assert qcow2_l1(image) == 0x30000  # qemu's layout: header, reftable, refblock, L1
    write_field(image, field, ">Q", value(image))
    assert run_qemu_img("check", str(image)).rc != 0  # qemu-img check: corrupt too
    one_line_refusal(run_instar("dd", "if=tables.qcow2", "of=o.raw", cwd=tmp_path),
                     rf"tables\.qcow2: {says}{CORRUPT}")


def test_qcow2_compressed_cluster_on_a_data_cluster(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"instar compresses this well " * 40000)
    image = tmp_path / "mixed.qcow2"
    qemu_img_ok("convert", "-c", "-O", "qcow2", str(raw), str(image))
    qemu_io(image, "write -P 0x5a 512k 64k", "qcow2")  # a normal cluster among compressed ones
    l2 = qcow2_l2(image)
    data = read_field(image, l2 + 8 * 8, ">Q") & QCOW2_OFFSET
    assert not read_field(image, l2 + 8 * 8, ">Q") & COMPRESSED
    write_field(image, l2, ">Q", COMPRESSED | data)  # guest 0's compressed bytes: that cluster
    refused_everywhere(
        image,
        rf"mixed\.qcow2: host offset {data:#x} is mapped by two guest ranges, at guest "
        rf"offsets 0x0 and 0x80000{CORRUPT}",
        tmp_path,
        qemu_reads=False,  # qemu fails to inflate plain data: an I/O error
    )


@pytest.mark.parametrize("where", ["same table", "another table"])
def test_qcow2_compressed_cluster_named_twice(tmp_path: Path, where: str) -> None:
    """One compressed cluster named by two L2 entries: in one table (found by
    its start), or in two (by the sectors inside its range, its alone)."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(random.Random(5).randbytes(2 * MiB).hex().encode())  # halves when deflated
    image = tmp_path / "c.qcow2"
    qemu_img_ok("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", str(raw), str(image))
    l2 = qcow2_l2(image)
    entry = read_field(image, l2 + 8, ">Q")  # guest 0x1000
    assert entry & COMPRESSED and (entry >> 54) & 0xFF >= 3  # 4 sectors or more
    if where == "same table":
        write_field(image, l2 + 8 * 5, ">Q", entry)  # guest 0x5000
        host, other = entry & ((1 << 54) - 1), 0x5000
    else:
        write_field(image, qcow2_l2(image, 1), ">Q", entry)  # guest 0x200000: the next table
        host, other = ((entry & ((1 << 54) - 1)) // 512 + 1) * 512, 0x200000
    refused_everywhere(
        image,
        rf"c\.qcow2: host offset {host:#x} is mapped by two guest ranges, at guest offsets "
        rf"0x1000 and {other:#x}{CORRUPT}",
        tmp_path,
    )


def test_qcow2_external_data_file_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))  # the data file, beside the image
    image = tmp_path / "ext.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", "ext.qcow2", "4M",
                cwd=tmp_path)  # qemu resolves the data file name against its directory
    for command in ("write -P 0x11 0 64k", "write -P 0x22 2M 64k"):
        qemu_io(image, command, "qcow2", cwd=tmp_path)
    l2 = qcow2_l2(image)
    write_field(image, l2 + 8 * 32, ">Q", read_field(image, l2, ">Q"))
    result = run_instar("convert", "-O", "raw", "ext.qcow2", "o.raw", cwd=tmp_path)
    one_line_refusal(result, rf"ext\.qcow2: host offset 0x0 is mapped by two guest ranges, at "
                             rf"guest offsets 0x0 and 0x200000{CORRUPT}")


# --- 1. aliasing: vmdk, vpc, vhdx --------------------------------------------------------------


def vmdk_tables(image: Path) -> tuple[SparseHeader, int, int]:
    """(header, GD offset, first grain table offset) of a monolithic sparse VMDK."""
    with image.open("rb") as handle:
        header = SparseHeader.unpack(handle.read(512))
    gd = header.gd_offset * 512
    return header, gd, read_field(image, gd, "<I") * 512


def make_vmdk(path: Path, size: str, writes: list[str], *options: str) -> Path:
    qemu_img_ok("create", "-q", "-f", "vmdk", *options, str(path), size)
    for command in writes:
        qemu_io(path, command, "vmdk")
    return path


def test_vmdk_two_grain_table_entries_on_one_grain(tmp_path: Path) -> None:
    image = make_vmdk(tmp_path / "g.vmdk", "64M", ["write -P 0x11 0 64k", "write -P 0x22 1M 64k"])
    _, _, gt = vmdk_tables(image)
    sector = read_field(image, gt, "<I")
    write_field(image, gt + 4 * 16, "<I", sector)
    refused_everywhere(
        image,
        rf"g\.vmdk: host offset {sector * 512:#x} is mapped by two guest ranges, at guest "
        rf"offsets 0x0 and 0x100000{CORRUPT}",
        tmp_path,
    )


def test_vmdk_grain_table_shared_by_two_directory_entries(tmp_path: Path) -> None:
    image = make_vmdk(tmp_path / "d.vmdk", "64M",
                      ["write -P 0x11 0 64k", "write -P 0x22 32M 64k"])
    _, gd, gt = vmdk_tables(image)
    write_field(image, gd + 4, "<I", gt // 512)  # the second 32 MiB uses the first table
    refused_everywhere(
        image,
        rf"d\.vmdk: the grain table of guest offset 0x2000000 at host offset {gt:#x} of "
        rf"'d\.vmdk' overlaps the grain table of guest offset 0x0{CORRUPT}",
        tmp_path,
    )


def test_vmdk_grain_on_the_grain_directory(tmp_path: Path) -> None:
    image = make_vmdk(tmp_path / "m.vmdk", "64M", ["write -P 0x11 0 64k"])
    _, gd, gt = vmdk_tables(image)
    write_field(image, gt + 4 * 3, "<I", gd // 512)
    refused_everywhere(
        image,
        rf"m\.vmdk: host offset {gd:#x}, mapped at guest offset 0x30000, is also the grain "
        rf"directory{CORRUPT}",
        tmp_path,
    )


def test_vmdk_stream_two_entries_on_one_compressed_grain(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"grains of a stream " * 60000)
    image = tmp_path / "s.vmdk"
    qemu_img_ok("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(image))
    opened = instar.open_image(str(image))
    extent = opened._image.driver.disk_extents[0]  # type: ignore[attr-defined]
    table_at = extent._gd[0] * 512
    opened.close()
    sector = read_field(image, table_at, "<I")
    write_field(image, table_at + 4 * 5, "<I", sector)
    refused_everywhere(
        image,
        rf"s\.vmdk: host offset {sector * 512:#x} is mapped by two guest ranges, at guest "
        rf"offsets 0x0 and 0x50000{CORRUPT}",
        tmp_path,
    )


def vpc_bat(image: Path) -> int:
    dynamic = read_field(image, 16, ">Q")  # the footer copy's data offset
    return read_field(image, dynamic + 16, ">Q")


def test_vpc_two_bat_entries_on_one_block(tmp_path: Path) -> None:
    image = tmp_path / "b.vhd"
    qemu_img_ok("create", "-q", "-f", "vpc", str(image), "64M")
    for command in ("write -P 0x11 0 64k", "write -P 0x22 4M 64k"):
        qemu_io(image, command, "vpc")
    bat = vpc_bat(image)
    first = read_field(image, bat, ">I")
    write_field(image, bat + 4 * 3, ">I", first)  # guest 6 MiB: guest 0's block
    pattern = (rf"b\.vhd: host offset {first * 512:#x} is mapped by two guest ranges, at "
               rf"guest offsets 0x0 and 0x600000{CORRUPT}")
    refused_everywhere(image, pattern, tmp_path)
    compared = run_instar("compare", str(image), str(image))
    assert compared.rc == 3  # the mapping is wrong: qemu's "Sector allocation test failed"


def vhdx_bat(image: Path) -> int:
    with image.open("rb") as handle:
        handle.seek(192 * KiB)
        regions = vhdx_layout.decode_region_table(handle.read(64 * KiB))
    return next(r.file_offset for r in regions if r.guid == vhdx_layout.BAT_REGION)


def test_vhdx_two_bat_entries_on_one_block(tmp_path: Path) -> None:
    image = tmp_path / "x.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image), "64M")
    for command in ("write -P 0x11 0 64k", "write -P 0x22 4M 64k"):
        qemu_io(image, command, "vhdx")
    bat = vhdx_bat(image)
    entry = read_field(image, bat, "<Q")
    write_field(image, bat + 8 * 2, "<Q", entry)  # guest 2 MiB: guest 0's block
    host = entry & vhdx_layout.OFFSET_MASK
    refused_everywhere(
        image,
        rf"x\.vhdx: host offset {host:#x} is mapped by two guest ranges, at guest offsets "
        rf"0x0 and 0x200000{CORRUPT}",
        tmp_path,
    )


# --- 1. what is not aliasing ---------------------------------------------------------------


def test_reading_again_is_not_aliasing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables evicted from the cache and loaded again claim nothing twice: the
    same ranges read, walked and compared over and over read as qemu reads them."""
    from instar.formats import cluster_tables
    from instar.formats.vmdk import reader as vmdk_reader

    monkeypatch.setattr(cluster_tables, "MAX_METADATA_CACHE_BYTES", 1)  # one L2 table cached
    monkeypatch.setattr(vmdk_reader, "GT_CACHE_TABLES", 1)
    writes = ["write -P 0x11 0 64k", "write -P 0x22 600M 64k", "write -P 0x33 1200M 64k"]
    images = [make_qcow2(tmp_path / "r.qcow2", "1300M", writes),
              make_vmdk(tmp_path / "r.vmdk", "1300M", writes)]
    for image in images:
        # Kept on disk, not in memory: a sandboxed worker forked from a process
        # of more than its 1 GiB address space could not allocate anything.
        expected = tmp_path / "expected.raw"
        qemu_img_ok("convert", "-O", "raw", str(image), str(expected))
        with instar.open_image(str(image)) as opened, expected.open("rb") as reference:
            for _ in range(2):
                for start in (1200 * MiB, 0, 600 * MiB, 0, 1200 * MiB):
                    reference.seek(start)
                    assert opened.read(start, 128 * KiB) == reference.read(128 * KiB)
                    list(opened.extents(0, opened.virtual_size))
        compared = run_instar("compare", str(image), str(image))
        assert compared.stdout == "Images are identical.\n", (image, compared)
        out = tmp_path / "out.raw"
        assert run_instar("convert", "-O", "raw", str(image), str(out)).rc == 0
        assert run_qemu_img("compare", "-f", "raw", "-F", "raw", str(out), str(expected)).rc == 0
        out.unlink()
        expected.unlink()


def test_legitimate_sharing_is_not_aliasing(tmp_path: Path) -> None:
    """Layouts qemu makes that share or pack host clusters read as qemu reads them:
    internal snapshots (the active L1 shares L2 tables and clusters with a
    snapshot's), compressed clusters packed into one host cluster, preallocated
    zero clusters, metadata preallocation."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"packed compressed clusters " * 80000)
    compressed = tmp_path / "c.qcow2"
    qemu_img_ok("convert", "-c", "-O", "qcow2", str(raw), str(compressed))
    qemu_io(compressed, "write -P 0x5a 1M 64k", "qcow2")
    snapshot = make_qcow2(tmp_path / "s.qcow2", "8M", ["write -P 0x11 0 1M"])
    qemu_img_ok("snapshot", "-c", "one", str(snapshot))
    qemu_io(snapshot, "write -P 0x22 64k 64k", "qcow2")
    zeros = make_qcow2(tmp_path / "z.qcow2", "8M", ["write -P 0x11 0 1M", "write -z 64k 128k"])
    prealloc = make_qcow2(tmp_path / "p.qcow2", "8M", ["write -P 0x11 1M 64k"],
                          "-o", "preallocation=metadata")
    for image in (compressed, snapshot, zeros, prealloc):
        out = tmp_path / "out.raw"
        result = run_instar("convert", "-O", "raw", str(image), str(out))
        assert result.rc == 0, result
        assert out.read_bytes() == qemu_read_raw(image, tmp_path)
        out.unlink()


def test_host_claims_against_a_set() -> None:
    """The claim map says "claimed already" exactly when a reference set does."""
    rng = random.Random(7)
    for _ in range(100):
        size, unit = rng.randint(1, 1 << 16), 1 << rng.randint(0, 6)
        claims, claimed = HostClaims(size, unit), set()
        for _ in range(60):
            first, count = rng.randrange(0, size // unit + 2), rng.randint(1, 40)
            units = {u for u in range(first, first + count) if u < claims.units}
            assert claims.claim(first * unit, count * unit) == (not units & claimed)
            if not units & claimed:
                claimed |= units
            assert claims.claimed(first * unit, count * unit) == bool(units & claimed)
        claims.close()


def test_host_claims_one_by_one_against_a_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """``claim_each`` says, unit by unit in order, whether each is new, as a
    reference set does; a larger ``max_map_bytes`` keeps a map exact past
    the usual bound; a coarse map cannot claim one by one."""
    monkeypatch.setattr(common, "MAX_CLAIM_MAP_BYTES", 64)
    rng = random.Random(5)
    claims, claimed = HostClaims(5000, 1, max_map_bytes=1000), set()
    assert claims.exact
    for _ in range(50):
        units = [rng.randrange(5000) for _ in range(rng.randint(0, 200))]
        expected = bytearray()
        for unit in units:
            expected.append(unit not in claimed)
            claimed.add(unit)
        assert claims.claim_each(units) == expected
        run = rng.randrange(4990)
        fresh = not claimed & set(range(run, run + 10))
        assert claims.claim(run, 10) == fresh
        if fresh:
            claimed |= set(range(run, run + 10))
    claims.close()
    with pytest.raises(ValueError):
        HostClaims(5000, 1).claim_each([1])


def test_host_claims_coarse_bound_what_a_file_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the map's memory bound, claims are counted per cell of 2^k units: a
    claim is refused exactly when its cell would hold more units than it has."""
    monkeypatch.setattr(common, "MAX_CLAIM_MAP_BYTES", 64)
    rng = random.Random(11)
    for _ in range(100):
        size = rng.randint(600 * 8, 5000 * 32)
        claims = HostClaims(size, 1)
        assert not claims.exact
        bits, counts = claims._cell_bits, {}
        for _ in range(60):
            first, count = rng.randrange(0, size), rng.randint(1, 300)
            added: dict[int, int] = {}
            for unit in range(first, min(size, first + count)):
                added[unit >> bits] = added.get(unit >> bits, 0) + 1
            fits = all(counts.get(cell, 0) + n <= 1 << bits for cell, n in added.items())
            assert claims.claim(first, count) == fits
            if fits:
                for cell, n in added.items():
                    counts[cell] = counts.get(cell, 0) + n
        claims.close()


def test_coarse_claims_read_a_legitimate_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the map forced coarse (two clusters a cell), a qemu image still reads
    as qemu reads it, and an alias into a full cell is still refused."""
    monkeypatch.setattr(common, "MAX_CLAIM_MAP_BYTES", 8)
    image = make_qcow2(tmp_path / "c.qcow2", "8M", ["write -P 0x11 0 1M", "write -P 0x22 4M 1M"])
    out = tmp_path / "out.raw"
    assert run_instar("convert", "-O", "raw", str(image), str(out)).rc == 0
    assert out.read_bytes() == qemu_read_raw(image, tmp_path)
    l2 = qcow2_l2(image)
    write_field(image, l2 + 8 * 100, ">Q", read_field(image, l2 + 8 * 2, ">Q"))
    result = run_instar("convert", "-O", "raw", str(image), str(tmp_path / "o2.raw"))
    assert result.rc == 1 and "mapped by two guest ranges" in result.stderr, result


# --- 2. compression bombs ------------------------------------------------------------------------


def qcow2_bomb(tmp_path: Path, codec: str, units: int) -> Path:
    """A compressed qcow2 whose cluster 0 holds a stream of ``units`` clusters of zeros."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"instar compresses this cluster well " * 30000)
    image = tmp_path / f"{codec}-{units}.qcow2"
    options = ["-o", "compression_type=zstd"] if codec == "zstd" else []
    qemu_img_ok("convert", "-c", "-O", "qcow2", *options, str(raw), str(image))
    entry = read_field(image, qcow2_l2(image), ">Q")
    assert entry & COMPRESSED
    shift = 62 - (16 - 8)
    host = entry & ((1 << shift) - 1)
    room = (((entry >> shift) & 0xFF) + 1) * 512 - (host & 511)
    zeros = bytes(units * 64 * KiB)
    if codec == "zstd":
        stream = zstd_module().compress(zeros)
    else:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -12)
        stream = deflater.compress(zeros) + deflater.flush()
    assert len(stream) <= room
    with image.open("r+b") as handle:
        handle.seek(host)
        handle.write(stream)
    return image


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_qcow2_compression_bomb(tmp_path: Path, codec: str) -> None:
    bomb = qcow2_bomb(tmp_path, codec, 2)
    result = run_instar("convert", "-O", "raw", bomb.name, "o.raw", cwd=tmp_path)
    one_line_refusal(result, rf"{codec}-2\.qcow2: compressed cluster at guest offset 0x0 "
                             r"inflates to more than 65536 bytes \(a compression bomb\)")
    # qemu keeps the first cluster of a zlib bomb, and fails a zstd one.
    assert run_qemu_img("convert", "-O", "raw", str(bomb), str(tmp_path / "q.raw")).rc == (
        0 if codec == "zlib" else 1
    )
    exact = qcow2_bomb(tmp_path, codec, 1)  # a stream of exactly one cluster reads as qemu's
    out = tmp_path / "exact.raw"
    assert run_instar("convert", "-O", "raw", str(exact), str(out)).rc == 0
    assert out.read_bytes() == qemu_read_raw(exact, tmp_path)


@pytest.mark.parametrize("grains", [2, 1])
def test_vmdk_stream_grain_bomb(tmp_path: Path, grains: int) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"grains of a stream " * 60000)
    image = tmp_path / "s.vmdk"
    qemu_img_ok("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(image))
    with instar.open_image(str(image)) as opened:
        extent = opened._image.driver.disk_extents[0]  # type: ignore[attr-defined]
        sector = extent._read_table(0)[0]
    lba, size = struct.unpack("<QI", image.read_bytes()[sector * 512 : sector * 512 + 12])
    stream = zlib.compress(bytes(grains * 64 * KiB), 9)
    assert len(stream) <= size
    with image.open("r+b") as handle:
        handle.seek(sector * 512)
        handle.write(struct.pack("<QI", lba, len(stream)) + stream)
    out = tmp_path / "o.raw"
    result = run_instar("convert", "-O", "raw", "s.vmdk", "o.raw", cwd=tmp_path)
    if grains == 1:
        assert result.rc == 0 and out.read_bytes() == qemu_read_raw(image, tmp_path)
        return
    one_line_refusal(result, rf"s\.vmdk: compressed grain at sector {sector} of 's\.vmdk' "
                             r"inflates to more than 65536 bytes \(a compression bomb\)")
    assert run_qemu_img("convert", "-O", "raw", str(image), str(tmp_path / "q.raw")).rc == 1


@pytest.mark.parametrize("codec", [ZLIB, ZSTD, "deflate"])
def test_inflate_never_makes_more_than_its_unit(codec: str) -> None:
    """A gigabyte of zeros in a few kilobytes: refused after at most one byte more
    than the unit, with memory to match."""
    zeros = bytes(1 << 20)
    if codec == ZSTD:
        compressor = zstd_module().ZstdCompressor()
        stream = b"".join(compressor.compress(zeros) for _ in range(1024)) + compressor.flush()
    else:
        deflater = zlib.compressobj(9, zlib.DEFLATED, 15 if codec == ZLIB else -15)
        stream = b"".join(deflater.compress(zeros) for _ in range(1024)) + deflater.flush()
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="inflates to more than 65536 bytes"):
            inflate(stream, 64 * KiB, codec, "unit")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak


# --- 3. empty tables at memory speed --------------------------------------------------------------

INSTAR_DIR = os.path.dirname(instar.__file__)


@contextlib.contextmanager
def counted_lines() -> Iterator[list[int]]:
    """Count the lines of instar's own code executed, in every thread."""
    count = [0]

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            count[0] += 1
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename.startswith(INSTAR_DIR) else None

    old = sys.gettrace()
    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        yield count
    finally:
        sys.settrace(old)
        threading.settrace(old)  # type: ignore[arg-type]


def huge_empty(directory: Path, name: str) -> Path:
    path = directory / name
    if path.exists():
        return path
    fmt, size, *options = {
        "empty.qcow2": ("qcow2", "2P"),
        "empty.vmdk": ("vmdk", "64T"),  # every grain table preallocated, in holes
        "stream.vmdk": ("vmdk", "64T", "-o", "subformat=streamOptimized"),
        "flat-tables.vmdk": ("vmdk", "1T"),  # read with the holes hidden
        "empty.vhd": ("vpc", "2040G"),
        "empty.vhdx": ("vhdx", "64T"),
    }[name]
    qemu_img_ok("create", "-q", "-f", fmt, *options, str(path), size)
    return path


@pytest.fixture(scope="module")
def empties(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_qemu()
    return tmp_path_factory.mktemp("empties")


EMPTY_LINE_BUDGET = 60_000  # a Python loop per entry would run millions


@pytest.mark.parametrize("name", ["empty.qcow2", "empty.vmdk", "stream.vmdk", "empty.vhd",
                                  "empty.vhdx"])
def test_empty_disks_at_memory_speed(
    name: str, empties: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = huge_empty(empties, name)
    monkeypatch.setenv("INSTAR_SANDBOX", "off")  # in this process, where lines are counted
    with counted_lines() as compared:
        result = run_instar("compare", str(image), str(image))
    assert result.stdout == "Images are identical.\n", result
    out = tmp_path / "out.qcow2"
    with counted_lines() as copied:
        result = run_instar("dd", "-O", "qcow2", f"if={image}", f"of={out}")
    assert result.rc == 0, result
    assert compared[0] < EMPTY_LINE_BUDGET and copied[0] < EMPTY_LINE_BUDGET, (compared, copied)
    # The copy is as empty and as large (qemu's compare would read every byte of some).
    written = json.loads(qemu_img_ok("map", "--output=json", str(out)))
    assert [(e["start"], e["data"]) for e in written] == [(0, False)]
    assert written[0]["length"] == json.loads(
        qemu_img_ok("info", "--output=json", str(image)))["virtual-size"]


def test_empty_grain_tables_without_holes(
    empties: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the file system cannot show holes, empty grain tables laid end to
    end are read a megabyte at a time, not one table at a time."""
    from instar.formats.vmdk import reader as vmdk_reader

    image = huge_empty(empties, "flat-tables.vmdk")
    monkeypatch.setattr(vmdk_reader, "next_data", lambda file, offset, end: None)
    monkeypatch.setenv("INSTAR_SANDBOX", "off")
    with counted_lines() as lines:
        result = run_instar("compare", str(image), str(image))
    assert result.stdout == "Images are identical.\n", result
    assert lines[0] < EMPTY_LINE_BUDGET, lines


# --- 4. sizes past what Python or the output can hold --------------------------------------------


def commands(image: Path, tmp_path: Path) -> Iterator[list[str]]:
    yield ["info", str(image)]
    yield ["info", "--output", "json", str(image)]
    yield ["compare", str(image), str(image)]
    yield ["dd", f"if={image}", f"of={tmp_path / 'o.raw'}", "bs=1M", "count=1"]
    for fmt in ("qcow2", "vmdk", "vpc", "vhdx"):
        yield ["dd", "-O", fmt, f"if={image}", f"of={tmp_path / ('o.' + fmt)}"]
        yield ["convert", "-O", fmt, str(image), str(tmp_path / ("c." + fmt))]


def assert_no_overflow(image: Path, tmp_path: Path) -> None:
    for args in commands(image, tmp_path):
        result = run_instar(*args)
        assert "Traceback" not in result.stderr and "Overflow" not in result.stderr, (args, result)
        assert len(result.stderr.splitlines()) <= 1, (args, result.stderr)
        for leftover in tmp_path.glob("[oc].*"):
            leftover.unlink()


@pytest.mark.parametrize("size", [1 << 62, (1 << 63) - 512, 1 << 63, (1 << 64) - (1 << 29),
                                  (1 << 64) - 1])
def test_qcow2_sizes_as_qemu_refuses_them(tmp_path: Path, size: int) -> None:
    image = make_qcow2(tmp_path / "big.qcow2", "1M", ["write -P 0x11 0 64k"])
    write_field(image, 24, ">Q", size)
    ours, theirs = run_instar("info", str(image)), run_qemu_img("info", str(image))
    assert (ours.rc, ours.normalised_stderr()) == (theirs.rc, theirs.normalised_stderr())
    assert re.search("Image is too big|File too large", ours.stderr)
    assert_no_overflow(image, tmp_path)


def flat_descriptor(path: Path, sectors: list[int]) -> Path:
    (path.parent / "flat.raw").write_bytes(b"x" * 4096)
    lines = ["# Disk DescriptorFile", "version=1", "CID=fffffffe", "parentCID=ffffffff",
             'createType="monolithicFlat"', ""]
    lines += [f'RW {count} FLAT "flat.raw" 0' for count in sectors]
    path.write_text("\n".join(lines) + "\n")
    return path


LARGEST = (1 << 63) - (1 << 30)  # qemu's BDRV_MAX_LENGTH


@pytest.mark.parametrize("sectors", [[LARGEST // 512 + 1], [(1 << 63) // 512 - 1],
                                     [1 << 54], [1 << 55, 1 << 55], [10**30]])
def test_vmdk_extents_past_the_largest_disk(
    tmp_path: Path, sectors: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extents adding up past 2^63 - 2^30 bytes: qemu's "File too large" at open."""
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))  # the extent, beside the descriptor
    image = flat_descriptor(tmp_path / "d.vmdk", sectors)
    result = run_instar("info", str(image))
    one_line_refusal(result, r"Could not open '.*d\.vmdk': Could not refresh total sector "
                             r"count: File too large")
    theirs = run_qemu_img("info", str(image))
    assert theirs.rc == 1 and "File too large" in theirs.stderr
    assert_no_overflow(image, tmp_path)


@pytest.mark.parametrize("sectors", [[LARGEST // 512],
                                     [(1 << 62) // 512, LARGEST // 512 - (1 << 53)]])
def test_the_largest_disk_is_read(
    tmp_path: Path, sectors: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2^63 - 2^30 bytes opens; every command works or says why in one line."""
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))  # the extent, beside the descriptor
    image = flat_descriptor(tmp_path / "d.vmdk", sectors)
    info = run_instar("info", "--output", "json", str(image))
    assert info.rc == 0 and f'"virtual-size": {LARGEST},' in info.stdout
    assert run_instar("compare", str(image), str(image)).stdout == "Images are identical.\n"
    assert_no_overflow(image, tmp_path)


def test_vpc_size_past_2040_gib(tmp_path: Path) -> None:
    """qemu's vpc fails such a disk with EFBIG and no message of its own."""
    image = tmp_path / "big.vhd"
    qemu_img_ok("create", "-q", "-f", "vpc", str(image), "64M")
    data = bytearray(image.read_bytes())
    for base in (0, len(data) - 512):
        data[base + 28 : base + 32] = b"win "  # sized by the current size field
        struct.pack_into(">Q", data, base + 48, (1 << 64) - 512)
        struct.pack_into(">I", data, base + 64, 0)
        struct.pack_into(">I", data, base + 64, ~sum(data[base : base + 512]) & 0xFFFFFFFF)
    image.write_bytes(bytes(data))
    ours, theirs = run_instar("info", str(image)), run_qemu_img("info", str(image))
    assert (ours.rc, ours.normalised_stderr()) == (theirs.rc, theirs.normalised_stderr())
    assert ours.stderr.endswith(": File too large\n")
    assert_no_overflow(image, tmp_path)


@pytest.mark.parametrize("size", [64 * TiB + MiB, 1 << 63, (1 << 64) - 512])
def test_vhdx_size_past_64_tib(tmp_path: Path, size: int) -> None:
    """qemu's vhdx fails such a disk with EINVAL and no message of its own."""
    image = tmp_path / "big.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", str(image), "64M")
    with image.open("rb") as handle:
        handle.seek(192 * KiB)
        regions = vhdx_layout.decode_region_table(handle.read(64 * KiB))
        metadata = next(r for r in regions if r.guid == vhdx_layout.METADATA_REGION)
        handle.seek(metadata.file_offset)
        table = handle.read(vhdx_layout.METADATA_TABLE_SIZE)
    entries = vhdx_layout.decode_metadata_table(table, metadata.length)
    item = next(e for e in entries if e.item_id == vhdx_layout.VIRTUAL_DISK_SIZE)
    write_field(image, metadata.file_offset + item.offset, "<Q", size)
    ours, theirs = run_instar("info", str(image)), run_qemu_img("info", str(image))
    assert (ours.rc, ours.normalised_stderr()) == (theirs.rc, theirs.normalised_stderr())
    assert ours.stderr.endswith(": Invalid argument\n")
    assert_no_overflow(image, tmp_path)


def test_offsets_no_file_can_reach(tmp_path: Path) -> None:
    """A flat extent starting at sector 2^64 - 1: refused in one line, never an
    OverflowError (qemu wraps such an offset round and reads the file's start)."""
    image = tmp_path / "far.vmdk"
    (tmp_path / "flat.raw").write_bytes(b"x" * 4096)
    image.write_text("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
                     'createType="monolithicFlat"\n\n'
                     f'RW 2048 FLAT "flat.raw" {(1 << 64) - 1}\n')
    one_line_refusal(run_instar("info", "far.vmdk", cwd=tmp_path),
                     r"Could not open 'far\.vmdk': Invalid extent line: extent 'flat\.raw' ends "
                     r"\d+ bytes into its file, past the largest file offset")
    assert_no_overflow(image, tmp_path)
    fd = os.open(tmp_path / "flat.raw", os.O_RDONLY)
    file = InputFile(fd, "flat.raw")
    try:  # the last line of defence: an offset no file reaches reads nothing
        assert file.pread((1 << 64) - 512, 512) == b"" and file.pread(0, 1) == b"x"
    finally:
        file.close()
