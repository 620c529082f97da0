"""Reading VHDX: instar dd from images qemu-img and qemu-io made, against qemu-img dd;
every block state; differencing images (which qemu cannot create or read) against
libvhdi and dissect.hypervisor; log replay against ``qemu-img check -r all``.
Damaged images are rows of tests/test_conformance.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_io_path,
    require_qemu,
    run_instar,
    run_qemu_img,
)
from instar.errors import FormatError, PolicyError
from instar.files import InputFile
from instar.formats.vhdx import layout, log
from instar.formats.vhdx.layout import Geometry
from instar.formats.vhdx.reader import open_vhdx
from instar.image import BlockImage, Extent, ExtentKind, Image
from instar.opener import ImageOpener, open_input_file
from instar.safety import PathPolicy

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

KiB = 1 << 10
MiB = 1 << 20

WINDOWS: list[list[str]] = [
    ["bs=1M"],  # the whole image
    ["bs=65536", "skip=2", "count=4"],
    ["bs=1000", "count=3"],
    ["bs=513", "skip=1", "count=3"],
]
BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def qemu_io_cmds(image: Path, *commands: str) -> None:
    args = [qemu_io_path(), "-f", "vhdx"]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run([*args, str(image)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def same_files(first: Path, second: Path) -> bool:
    """Compare two possibly large files chunk by chunk."""
    if first.stat().st_size != second.stat().st_size:
        return False
    with open(first, "rb") as a, open(second, "rb") as b:
        while True:
            x, y = a.read(4 * MiB), b.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images made by qemu-img and qemu-io: dynamic, fixed, every block size."""
    require_qemu()
    d = tmp_path_factory.mktemp("vhdx-corpus")
    source = d / "source.raw"
    source.write_bytes(pattern(5 * MiB, seed=3) + bytes(4 * MiB) + pattern(3 * MiB + 3584, seed=9))
    qemu_img_ok("convert", "-O", "vhdx", str(source), str(d / "dynamic.vhdx"))
    qemu_io_cmds(
        d / "dynamic.vhdx",
        "write -P 0x5a 8388000 4096",  # across the first block boundary
        "write -z 4M 64k",
        "discard 64k 64k",  # vhdx ignores discards; still reads as before
    )
    qemu_img_ok(
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed,block_state_zero=off",
        str(d / "fixed.vhdx"),
        "10M",
    )
    qemu_io_cmds(d / "fixed.vhdx", "write -P 0x11 1M 300k", "write -P 0x22 9M 1M")
    qemu_img_ok(
        "create", "-q", "-f", "vhdx", "-o", "subformat=fixed", str(d / "fixedz.vhdx"), "10M"
    )
    qemu_io_cmds(d / "fixedz.vhdx", "write -P 0x33 0 100k", "write -z 5M 1M")
    for n in BLOCK_SIZES:
        image = d / f"bs{n}.vhdx"
        size = (n + 1) * MiB + 512
        qemu_img_ok("create", "-q", "-f", "vhdx", "-o", f"block_size={n}M", str(image), str(size))
        qemu_io_cmds(
            image,
            "write -P 0x41 0 128k",
            f"write -P 0x42 {n * MiB - 4096} 8192",
            f"write -z {n * MiB + 8192} 4096",
            f"write -P 0x43 {size - 512} 512",
        )
    return d


CORPUS = ["dynamic.vhdx", "fixed.vhdx", "fixedz.vhdx", *(f"bs{n}.vhdx" for n in BLOCK_SIZES)]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", CORPUS)
@pytest.mark.parametrize("operands", WINDOWS, ids=lambda w: " ".join(w))
def test_windows_match_qemu(name: str, operands: list[str], corpus: Path, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "instar.raw", tmp_path / "qemu.raw"
    qemu_img_ok("dd", "-f", "vhdx", *operands, f"if={corpus / name}", f"of={theirs}")
    result = run_instar("dd", *operands, f"if={corpus / name}", f"of={ours}")
    assert result.rc == 0, result.stderr
    assert same_files(ours, theirs)


# ------------------------------------------------------------------ block states


def _bat_offset(image: Path) -> int:
    data = image.read_bytes()[layout.REGION_TABLE_OFFSETS[0] :][: layout.REGION_TABLE_SIZE]
    entries = layout.decode_region_table(data)
    return next(e.file_offset for e in entries if e.guid == layout.BAT_REGION)


def _set_bat_entry(image: Path, index: int, value: int) -> None:
    with open(image, "r+b") as file:
        file.seek(_bat_offset(image) + 8 * index)
        file.write(struct.pack("<Q", value))


def _bat_entry(image: Path, index: int) -> int:
    with open(image, "rb") as file:
        file.seek(_bat_offset(image) + 8 * index)
        value: int = struct.unpack("<Q", file.read(8))[0]
        return value


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(
    "state",
    [
        layout.PAYLOAD_NOT_PRESENT,
        layout.PAYLOAD_UNDEFINED,
        layout.PAYLOAD_ZERO,
        layout.PAYLOAD_UNMAPPED,
        layout.PAYLOAD_UNMAPPED_V095,
    ],
)
def test_block_states_read_as_qemu(state: int, corpus: Path, tmp_path: Path) -> None:
    """A present block switched to another state (keeping its offset, which these
    states leave reserved) reads as zeros in instar and in qemu."""
    image = tmp_path / "states.vhdx"
    shutil.copy(corpus / "bs1.vhdx", image)
    entry = _bat_entry(image, 0)
    assert entry & 7 == layout.PAYLOAD_FULLY_PRESENT
    _set_bat_entry(image, 0, (entry & layout.OFFSET_MASK) | state)
    ours, theirs = tmp_path / "instar.raw", tmp_path / "qemu.raw"
    qemu_img_ok("dd", "-f", "vhdx", "bs=1M", f"if={image}", f"of={theirs}")
    assert run_instar("dd", "bs=1M", f"if={image}", f"of={ours}").rc == 0
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_bytes()[: 128 * KiB] == bytes(128 * KiB)


class NoResolver:
    """A Resolver for images without parents."""

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        raise AssertionError("no parent expected")

    def open_file(self, name: str, child: InputFile, what: str) -> InputFile:
        raise AssertionError("no file expected")


class CountingFile(InputFile):
    """An InputFile that records every read, to see what a reader asks for."""

    reads: list[tuple[int, int]]

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().pread(offset, length)


def _open_counting(path: Path) -> tuple[BlockImage, CountingFile]:
    file = CountingFile(os.open(path, os.O_RDONLY), str(path))
    file.reads = []
    return BlockImage(open_vhdx(file, NoResolver())), file


def test_extents_never_read_data(corpus: Path, tmp_path: Path) -> None:
    image_path = tmp_path / "kinds.vhdx"
    shutil.copy(corpus / "bs1.vhdx", image_path)
    # Block 0 present (data); block 1: ZERO; block 2 (the last, 512 bytes): NOT_PRESENT.
    _set_bat_entry(image_path, 1, layout.PAYLOAD_ZERO)
    _set_bat_entry(image_path, 2, layout.PAYLOAD_NOT_PRESENT)
    image, file = _open_counting(image_path)
    file.reads.clear()
    extents = list(image.extents(0, image.virtual_size))
    assert file.reads == []
    assert extents == [
        Extent(0, MiB, ExtentKind.DATA),
        Extent(MiB, MiB, ExtentKind.ZERO),
        Extent(2 * MiB, 512, ExtentKind.UNALLOCATED),
    ]
    assert list(image.extents(MiB - 10, 20)) == [
        Extent(MiB - 10, 10, ExtentKind.DATA),
        Extent(MiB, 10, ExtentKind.ZERO),
    ]
    image.close()


@pytest.mark.usefixtures("qemu_img")
def test_adjacent_blocks_read_at_once(tmp_path: Path) -> None:
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(6 * MiB))
    image_path = tmp_path / "six.vhdx"
    qemu_img_ok("convert", "-O", "vhdx", "-o", "block_size=1M", str(source), str(image_path))
    image, file = _open_counting(image_path)
    file.reads.clear()
    data = image.read(512, 5 * MiB)
    assert data == source.read_bytes()[512 : 512 + 5 * MiB]
    assert len(file.reads) == 1  # six blocks laid out in order: one read
    image.close()


# ------------------------------------------------------------------ differencing


def _guid_string(guid: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=guid)) + "}"


def make_child(
    path: Path,
    parent: Path,
    blocks: dict[int, tuple[str, bytes, list[bool] | None]],
    *,
    virtual_size: int,
    block_size: int = MiB,
    linkage: bytes | None = None,
    locator: dict[str, str] | None = None,
) -> None:
    """A differencing VHDX over ``parent`` (qemu-img cannot make one), from the spec.

    ``blocks`` maps a payload block to ("full", data, None), ("partial", data,
    sectors present) or ("zero", b"", None); other blocks are NOT_PRESENT.
    """
    parent_header = _current_header(parent)
    geometry = Geometry(virtual_size, block_size, 512)
    entries = geometry.bat_entries(differencing=True)
    bat_offset = 2 * MiB
    bat_length = -(-entries * 8 // MiB) * MiB
    metadata_offset = bat_offset + bat_length
    next_free = metadata_offset + MiB
    bat = [0] * entries
    body: list[tuple[int, bytes]] = []
    bitmaps: dict[int, bytearray] = {}
    sectors = block_size // 512
    for block, (kind, data, present) in sorted(blocks.items()):
        index = geometry.payload_index(block)
        if kind == "zero":
            bat[index] = layout.PAYLOAD_ZERO
            continue
        bat[index] = next_free | (
            layout.PAYLOAD_FULLY_PRESENT if kind == "full" else layout.PAYLOAD_PARTIALLY_PRESENT
        )
        body.append((next_free, data))
        next_free += block_size
        if kind == "partial":
            assert present is not None
            chunk = block // geometry.chunk_ratio
            bitmap = bitmaps.setdefault(chunk, bytearray(MiB))
            base = (block % geometry.chunk_ratio) * sectors
            for i, here in enumerate(present):
                if here:
                    bitmap[(base + i) // 8] |= 1 << ((base + i) % 8)
    for chunk, bitmap in bitmaps.items():
        index = chunk * (geometry.chunk_ratio + 1) + geometry.chunk_ratio
        bat[index] = next_free | layout.SB_PRESENT
        body.append((next_free, bytes(bitmap)))
        next_free += MiB
    entries_text = locator or {
        "parent_linkage": _guid_string(linkage or parent_header.data_write_guid),
        "relative_path": os.path.relpath(parent, path.parent).replace("/", "\\"),
        "absolute_win32_path": "C:\\images\\" + parent.name,
    }
    params = layout.FileParameters(block_size, leave_blocks_allocated=False, has_parent=True)
    required, disk = layout.META_IS_REQUIRED, layout.META_IS_REQUIRED | layout.META_IS_VIRTUAL_DISK
    table, items = layout.encode_metadata(
        [
            (layout.FILE_PARAMETERS, required, layout.encode_file_parameters(params)),
            (layout.VIRTUAL_DISK_SIZE, disk, struct.pack("<Q", virtual_size)),
            (layout.PAGE83_DATA, disk, os.urandom(16)),
            (layout.LOGICAL_SECTOR_SIZE, disk, struct.pack("<I", 512)),
            (layout.PHYSICAL_SECTOR_SIZE, disk, struct.pack("<I", 4096)),
            (layout.PARENT_LOCATOR, required, layout.encode_parent_locator(entries_text)),
        ]
    )
    header = layout.Header(1, os.urandom(16), os.urandom(16))
    regions = layout.encode_region_table(
        [
            layout.RegionEntry(layout.BAT_REGION, bat_offset, bat_length),
            layout.RegionEntry(layout.METADATA_REGION, metadata_offset, MiB),
        ]
    )
    with open(path, "wb") as file:
        pieces = [
            (0, layout.encode_file_identifier("instar tests")),
            (layout.HEADER_OFFSETS[0], header.encode()),
            (layout.HEADER_OFFSETS[1], header._replace(sequence_number=2).encode()),
            (layout.REGION_TABLE_OFFSETS[0], regions),
            (layout.REGION_TABLE_OFFSETS[1], regions),
            (bat_offset, struct.pack(f"<{entries}Q", *bat)),
            (metadata_offset, table),
            (metadata_offset + layout.METADATA_TABLE_SIZE, items),
            *body,
        ]
        for offset, data in pieces:
            file.seek(offset)
            file.write(data)
        file.truncate(next_free)


def _current_header(image: Path) -> layout.Header:
    data = image.read_bytes()[: 3 * 64 * KiB]
    headers = [
        layout.decode_header(data[o : o + layout.HEADER_SIZE]) for o in layout.HEADER_OFFSETS
    ]
    return layout.choose_header(headers[0], headers[1])


@pytest.fixture
def family(tmp_path: Path) -> Iterator[tuple[Path, Path, bytes]]:
    """A parent made by qemu (1 MiB blocks, 6 MiB + 512) and a child over it.

    Child blocks: 0 NOT_PRESENT, 1 FULLY_PRESENT, 2 PARTIALLY_PRESENT (sectors
    here and there, bits across byte edges), 3 ZERO, 4 partial with no sector
    present, 5 NOT_PRESENT, 6 (the last, 512 bytes) partial with its sector.
    """
    size = 6 * MiB + 512
    parent_raw = pattern(size, seed=11)
    source = tmp_path / "parent.raw"
    source.write_bytes(parent_raw)
    parent = tmp_path / "parent.vhdx"
    qemu_img_ok("convert", "-O", "vhdx", "-o", "block_size=1M", str(source), str(parent))
    sectors = MiB // 512
    present = [i % 7 in (0, 1, 2) or 500 <= i < 1200 for i in range(sectors)]
    child_data = {
        1: pattern(MiB, seed=21),
        2: pattern(MiB, seed=22),
        4: b"\xee" * MiB,
        6: pattern(MiB, seed=26),
    }
    blocks = {
        1: ("full", child_data[1], None),
        2: ("partial", child_data[2], present),
        3: ("zero", b"", None),
        4: ("partial", child_data[4], [False] * sectors),
        6: ("partial", child_data[6], [True] + [False] * (sectors - 1)),
    }
    child = tmp_path / "child.vhdx"
    make_child(child, parent, blocks, virtual_size=size)
    expected = bytearray(parent_raw)
    expected[MiB : 2 * MiB] = child_data[1]
    for i, here in enumerate(present):
        if here:
            expected[2 * MiB + i * 512 : 2 * MiB + (i + 1) * 512] = child_data[2][
                i * 512 : (i + 1) * 512
            ]
    expected[3 * MiB : 4 * MiB] = bytes(MiB)
    expected[6 * MiB :] = child_data[6][:512]
    yield parent, child, bytes(expected)


def test_differencing_reads_through_to_parent(
    family: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    _, child, expected = family
    out = tmp_path / "out.raw"
    result = run_instar("dd", "bs=1M", f"if={child}", f"of={out}")
    assert result.rc == 0, result.stderr
    assert out.read_bytes() == expected
    for operands in WINDOWS[1:]:
        result = run_instar("dd", *operands, f"if={child}", f"of={out}")
        assert result.rc == 0, result.stderr
        start, end = {
            "bs=65536 skip=2 count=4": (131072, 262144),
            "bs=1000 count=3": (0, 3000),
            "bs=513 skip=1 count=3": (513, 1539),
        }[" ".join(operands)]
        want = expected[start:end]
        assert out.read_bytes() == want + bytes(-len(want) % 512)


def test_differencing_matches_libvhdi_and_dissect(family: tuple[Path, Path, bytes]) -> None:
    """Two independent readers agree with the expected bytes (and so with instar).

    One difference: libvhdi reads a ZERO block of a differencing image from the
    parent; dissect and instar read zeros (the state says the block is zero).
    """
    import pyvhdi
    from dissect.hypervisor.disk import vhdx as dissect_vhdx

    parent, child, expected = family
    parent_handle, child_handle = pyvhdi.file(), pyvhdi.file()
    parent_handle.open(str(parent))
    child_handle.open(str(child))
    child_handle.set_parent(parent_handle)
    theirs = child_handle.read_buffer_at_offset(len(expected), 0)
    child_handle.close()
    parent_handle.close()
    assert theirs[: 3 * MiB] == expected[: 3 * MiB]
    assert theirs[3 * MiB : 4 * MiB] == pattern(6 * MiB + 512, seed=11)[3 * MiB : 4 * MiB]
    assert theirs[4 * MiB :] == expected[4 * MiB :]
    with open(child, "rb") as stream:
        assert dissect_vhdx.VHDX(stream).read() == expected


def test_differencing_extents(family: tuple[Path, Path, bytes]) -> None:
    _, child, _ = family
    opener = ImageOpener(PathPolicy([os.path.dirname(str(child))]))
    try:
        image = opener.open(str(child))
        extents = list(image.extents(0, image.virtual_size))
    finally:
        opener.close()
    # The parent was written by qemu-img convert: every block present, DATA.
    assert extents[0] == Extent(0, 3 * MiB, ExtentKind.DATA)
    assert extents[1] == Extent(3 * MiB, MiB, ExtentKind.ZERO)
    assert extents[2] == Extent(4 * MiB, 2 * MiB + 512, ExtentKind.DATA)


def test_differencing_falls_back_to_absolute_path(family: tuple[Path, Path, bytes]) -> None:
    """relative_path first; a missing one gives way to a usable absolute path."""
    parent, child, _ = family
    locator = {
        "parent_linkage": _guid_string(_current_header(parent).data_write_guid),
        "relative_path": "missing\\parent.vhdx",
        "volume_path": "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\parent.vhdx",
        "absolute_win32_path": str(parent),
    }
    make_child(child, parent, {}, virtual_size=6 * MiB + 512, locator=locator)
    out = child.parent / "out.raw"
    assert run_instar("dd", "bs=1M", f"if={child}", f"of={out}").rc == 0
    assert out.read_bytes() == pattern(6 * MiB + 512, seed=11)


# ------------------------------------------------------------------ the log

LOG_ENTRY = struct.Struct("<4sIIIQII16sQQ")
LOG_DESCRIPTOR = struct.Struct("<4sIQQQ")


def make_log_entry(
    sequence: int,
    log_guid: bytes,
    tail: int,
    file_size: int,
    data_writes: list[tuple[int, bytes]],
    zero_writes: list[tuple[int, int]] = [],  # noqa: B006 - read only
) -> bytes:
    """One log entry (MS-VHDX 2.3.1), written from the specification."""
    count = len(data_writes) + len(zero_writes)
    descriptor_sectors = -(-(count + 2) // 128)
    length = (descriptor_sectors + len(data_writes)) * 4096
    entry = bytearray(length)
    LOG_ENTRY.pack_into(
        entry, 0, b"loge", 0, length, tail, sequence, count, 0, log_guid, file_size, file_size
    )
    slot = 64
    for offset, zeros in zero_writes:
        LOG_DESCRIPTOR.pack_into(entry, slot, b"zero", 0, zeros, offset, sequence)
        slot += 32
    for i, (offset, data) in enumerate(data_writes):
        assert len(data) == 4096
        leading = struct.unpack_from("<Q", data)[0]
        trailing = struct.unpack_from("<I", data, 4092)[0]
        LOG_DESCRIPTOR.pack_into(entry, slot, b"desc", trailing, leading, offset, sequence)
        slot += 32
        sector = (descriptor_sectors + i) * 4096
        entry[sector : sector + 4096] = (
            b"data"
            + struct.pack("<I", sequence >> 32)
            + data[8:4092]
            + struct.pack("<I", sequence & 0xFFFFFFFF)
        )
    struct.pack_into("<I", entry, 4, layout.crc32c(entry))
    return bytes(entry)


def _set_log_guid(image: Path, log_guid: bytes) -> None:
    """Make both headers name ``log_guid`` (CRCs recomputed), as a crashed writer leaves them."""
    with open(image, "r+b") as file:
        for offset in layout.HEADER_OFFSETS:
            file.seek(offset)
            header = layout.decode_header(file.read(layout.HEADER_SIZE))
            assert header is not None
            file.seek(offset)
            file.write(header._replace(log_guid=log_guid).encode())


def dirty_image(corpus: Path, tmp_path: Path, corrupt_crc: bool = False) -> tuple[Path, bytes]:
    """bs1.vhdx with a pending log: block 1 remapped to new data appended to the file,
    and the first 8 KiB of block 0 zeroed. Returns the image and its log GUID."""
    image = tmp_path / "dirty.vhdx"
    shutil.copy(corpus / "bs1.vhdx", image)
    bat_offset = _bat_offset(image)
    block0 = _bat_entry(image, 0) & layout.OFFSET_MASK
    size = image.stat().st_size
    new_block = -(-size // MiB) * MiB
    with open(image, "r+b") as file:
        file.seek(new_block)
        file.write(pattern(MiB, seed=77))
        file.seek(bat_offset)
        page = bytearray(file.read(4096))
    size = new_block + MiB
    struct.pack_into("<Q", page, 8, new_block | layout.PAYLOAD_FULLY_PRESENT)
    log_guid = os.urandom(16)
    first = make_log_entry(1, log_guid, 0, size, [(bat_offset, bytes(page))])
    second = make_log_entry(2, log_guid, 0, size, [], [(block0, 8192)])
    if corrupt_crc:
        second = second[:100] + bytes([second[100] ^ 1]) + second[101:]
    header = _current_header(image)
    with open(image, "r+b") as file:
        file.seek(header.log_offset)
        file.write(first + second)
    _set_log_guid(image, log_guid)
    return image, log_guid


@pytest.mark.usefixtures("qemu_img")
def test_log_is_replayed_in_memory(corpus: Path, tmp_path: Path) -> None:
    image, _ = dirty_image(corpus, tmp_path)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    # qemu refuses to read it without replaying the log into the file first.
    refused = run_qemu_img("dd", "-f", "vhdx", f"if={image}", f"of={tmp_path / 'q0.raw'}")
    assert refused.rc == 1 and "contains a log that needs to be replayed" in refused.stderr
    replayed = tmp_path / "replayed.vhdx"
    shutil.copy(image, replayed)
    check = run_qemu_img("check", "-r", "all", "-f", "vhdx", str(replayed))
    assert check.rc == 0, check.stderr
    theirs, ours = tmp_path / "qemu.raw", tmp_path / "instar.raw"
    qemu_img_ok("dd", "-f", "vhdx", "bs=1M", f"if={replayed}", f"of={theirs}")
    assert run_instar("dd", "bs=1M", f"if={image}", f"of={ours}").rc == 0
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_bytes()[MiB : 2 * MiB] == pattern(MiB, seed=77)
    assert ours.read_bytes()[:8192] == bytes(8192)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before  # never written


@pytest.mark.usefixtures("qemu_img")
def test_log_sequence_stops_at_a_bad_entry(corpus: Path, tmp_path: Path) -> None:
    """An entry with a wrong CRC ends the sequence: only the first entry replays."""
    image, _ = dirty_image(corpus, tmp_path, corrupt_crc=True)
    replayed = tmp_path / "replayed.vhdx"
    shutil.copy(image, replayed)
    assert run_qemu_img("check", "-r", "all", "-f", "vhdx", str(replayed)).rc == 0
    theirs, ours = tmp_path / "qemu.raw", tmp_path / "instar.raw"
    qemu_img_ok("dd", "-f", "vhdx", "bs=1M", f"if={replayed}", f"of={theirs}")
    assert run_instar("dd", "bs=1M", f"if={image}", f"of={ours}").rc == 0
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_bytes()[:8192] != bytes(8192)  # the zeroing entry was not replayed


def test_log_overlay_layers_writes() -> None:
    """Later writes win, zero writes cut data writes, reads past the old end are zeros."""

    class Base:
        name = "base"
        size = 16

        def pread(self, offset: int, length: int) -> bytes:
            return bytes(range(16))[offset : offset + length]

        def close(self) -> None:
            pass

    entry = log.LogEntry(
        0,
        4096,
        1,
        0,
        16,
        24,
        (
            log.Write(2, 4, b"AAAA"),
            log.Write(4, 4, None),
            log.Write(18, 2, b"ZZ"),
        ),
    )
    overlay = log.LogOverlay(Base(), [entry])  # type: ignore[arg-type]
    assert overlay.size == MiB
    assert overlay.pread(0, 24) == bytes([0, 1]) + b"AA" + bytes(4) + bytes(range(8, 16)) + (
        b"\0\0ZZ\0\0\0\0"
    )
    assert overlay.pread(5, 2) == bytes(2)
    assert overlay.pread(10, 3) == bytes([10, 11, 12])


# ------------------------------------------------------------------ structures, parents, probe


def _metadata_item_offset(image: Path, item: bytes) -> int:
    data = image.read_bytes()
    regions = layout.decode_region_table(data[layout.REGION_TABLE_OFFSETS[0] :])
    region = next(r for r in regions if r.guid == layout.METADATA_REGION)
    table = data[region.file_offset : region.file_offset + layout.METADATA_TABLE_SIZE]
    entry = next(e for e in layout.decode_metadata_table(table, region.length) if e.item_id == item)
    return region.file_offset + entry.offset


def _patch(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as file:
        file.seek(offset)
        file.write(data)


def test_parent_outside_allowed_directory(family: tuple[Path, Path, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTAR_ALLOW")  # the default policy: nothing allowed
    parent, _, _ = family
    inner = tmp_path / "inner"
    inner.mkdir()
    child = inner / "child.vhdx"
    make_child(child, parent, {}, virtual_size=6 * MiB + 512)  # relative_path ..\parent.vhdx
    out = inner / "out.raw"
    result = run_instar("dd", f"if={child}", f"of={out}")
    assert result.rc == 1
    assert "outside the allowed directories" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()
    with pytest.raises(PolicyError):
        ImageOpener(PathPolicy([os.path.dirname(str(child))])).open(str(child))
    # Allowed explicitly, it opens.
    assert run_instar("dd", "--allow", str(tmp_path), f"if={child}", f"of={out}").rc == 0


def test_probe() -> None:
    from instar.formats.vhdx import FORMAT

    assert FORMAT.probe(b"vhdxfile" + bytes(100), "x") == 100
    assert FORMAT.probe(b"vhdxfilf", "x") == 0


# ------------------------------------------------------------------ headers and sizes


def test_header_with_higher_sequence_wins(corpus: Path, tmp_path: Path) -> None:
    image = tmp_path / "h.vhdx"
    shutil.copy(corpus / "bs1.vhdx", image)
    with open(image, "r+b") as file:
        headers = []
        for offset in layout.HEADER_OFFSETS:
            file.seek(offset)
            header = layout.decode_header(file.read(layout.HEADER_SIZE))
            assert header is not None
            headers.append(header)
        marked = headers[0]._replace(
            sequence_number=1 << 40, data_write_guid=b"\x01" * 16
        )
        file.seek(layout.HEADER_OFFSETS[0])
        file.write(marked.encode())
    file_handle = open_input_file(str(image))
    opened = open_vhdx(file_handle, NoResolver())
    assert opened.data_write_guid == b"\x01" * 16
    opened.close()
    # Break the winner's CRC: the other header is used.
    _patch(image, layout.HEADER_OFFSETS[0] + 100, b"\x01")
    opened = open_vhdx(open_input_file(str(image)), NoResolver())
    assert opened.data_write_guid == headers[1].data_write_guid
    opened.close()


def test_equal_sequence_numbers_must_be_identical(corpus: Path, tmp_path: Path) -> None:
    first = layout.Header(5, b"a" * 16, b"b" * 16)
    assert layout.choose_header(first, first) == first
    with pytest.raises(FormatError):
        layout.choose_header(first, layout.Header(5, b"a" * 16, b"c" * 16))


def test_logical_sector_4096_matches_libvhdi(tmp_path: Path) -> None:
    """qemu refuses 4096-byte logical sectors; libvhdi reads them, as instar does."""
    import pyvhdi

    source = tmp_path / "in.raw"
    source.write_bytes(pattern(3 * MiB))
    image = tmp_path / "s4k.vhdx"
    assert (
        run_instar(
            "dd", "-O", "vhdx", "-o", "block_size=1M", "bs=1M", f"if={source}", f"of={image}"
        ).rc
        == 0
    )
    _patch(image, _metadata_item_offset(image, layout.LOGICAL_SECTOR_SIZE), struct.pack("<I", 4096))
    handle = pyvhdi.file()
    handle.open(str(image))
    theirs = handle.read_buffer_at_offset(3 * MiB, 0)
    handle.close()
    out = tmp_path / "out.raw"
    assert run_instar("dd", "bs=1M", f"if={image}", f"of={out}").rc == 0
    assert out.read_bytes() == theirs == source.read_bytes()


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotests_159_vhdx_to_vhdx(bs: str, tmp_path: Path) -> None:
    """qemu-iotests 159 as written: a 1 MiB vhdx of 0x0a, dd -f vhdx -O vhdx, compare."""
    image = tmp_path / "img.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", str(image), "1M")
    qemu_io_cmds(image, "write -P 0x0a 0 1M")
    out = tmp_path / "out.vhdx"
    result = run_instar("dd", "-f", "vhdx", "-O", "vhdx", f"bs={bs}", f"if={image}", f"of={out}")
    assert result.rc == 0, result.stderr
    assert "No errors were found" in qemu_img_ok("check", "-f", "vhdx", str(out))
    compare = run_qemu_img("compare", "-f", "vhdx", "-F", "vhdx", str(image), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout
    assert qemu_info(out)["virtual-size"] == MiB


@pytest.mark.parametrize("seed", range(5))
def test_log_overlay_matches_a_naive_model(seed: int) -> None:
    """Many overlapping writes: the overlay reads what writing them in order would give."""
    import random

    rng = random.Random(seed)
    size = 64 * KiB
    base_bytes = bytes(rng.randrange(256) for _ in range(size))

    class Base:
        name = "base"

        def __init__(self) -> None:
            self.size = size

        def pread(self, offset: int, length: int) -> bytes:
            return base_bytes[offset : offset + length]

        def close(self) -> None:
            pass

    model = bytearray(base_bytes)
    writes = []
    for _ in range(300):
        offset = rng.randrange(size - 1)
        length = rng.randrange(1, min(5000, size - offset) + 1)
        data = None if rng.random() < 0.3 else bytes([rng.randrange(256)]) * length
        writes.append(log.Write(offset, length, data))
        model[offset : offset + length] = bytes(length) if data is None else data
    entry = log.LogEntry(0, 4096, 1, 0, size, size, tuple(writes))
    overlay = log.LogOverlay(Base(), [entry])  # type: ignore[arg-type]
    assert overlay.size == MiB  # last_file_offset rounds the file up to 1 MiB
    assert overlay.pread(0, size) == bytes(model)
    for _ in range(200):
        offset = rng.randrange(size)
        length = rng.randrange(1, 3000)
        want = bytes(model[offset : offset + length])
        want += bytes(min(length, MiB - offset) - len(want))
        assert overlay.pread(offset, length) == want


def test_crafted_log_is_refused_quickly() -> None:
    """Every sector a plausible header claiming the whole log: bounded work, then a refusal."""
    import time

    from instar.errors import UnsupportedError

    guid = b"\x07" * 16
    sector = bytearray(4096)
    LOG_ENTRY.pack_into(sector, 0, b"loge", 0, MiB, 0, 1, 0, 0, guid, 0, 0)
    started = time.monotonic()
    with pytest.raises(UnsupportedError, match="too many overlapping entries"):
        log.active_sequence(bytes(sector) * 256, guid)
    assert time.monotonic() - started < 2
