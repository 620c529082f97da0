"""VDI on-disk structures: the header, qemu 7.2's checks of it, the block map's entries.

A VDI image (all integers little-endian) is

    header (512 bytes: 64 bytes of text, signature, version, then the
    version 1.1 header) | block map (one 32-bit entry per block) | blocks

The block map entry of guest block ``i`` is the index ``k`` of a data block
at ``offset_data + k * block_size``, or UNALLOCATED (never written: reads as
zeros in qemu, which has no backing file for vdi) or DISCARDED (zeros). A
dynamic image allocates blocks as they are written; a static one maps block
``i`` to ``i`` from the start. The reader and the writer share this module.
"""

from __future__ import annotations

import os
import struct

from instar.errors import FormatError
from instar.formats.vdi import HEADER_SIZE, SIGNATURE, SIGNATURE_AT
from instar.runtime_types import NamedTuple

SECTOR = 512
BLOCK_SIZE = 1 << 20  # the only block size qemu reads or writes
SIGNATURE_VALUE = int.from_bytes(SIGNATURE, "little")  # 0xbeda107f
VERSION_1_1 = 0x00010001
HEADER_SIZE_1_1 = 0x180  # the version 1.1 header's own size field, as qemu writes it

TYPE_DYNAMIC = 1
TYPE_STATIC = 2
# VirtualBox's other types: undo (3) and differencing (4) images, whose
# unallocated blocks belong to a parent image.
TYPE_UNDO = 3
TYPE_DIFFERENCING = 4

UNALLOCATED = 0xFFFFFFFF  # a block never written
DISCARDED = 0xFFFFFFFE  # a block discarded: zeros
# qemu's limit: the block map, read in one piece, must fit an int once rounded to sectors.
BLOCKS_MAX = ((1 << 31) - SECTOR) // 4  # 0x1fffff80
DISK_SIZE_MAX = BLOCKS_MAX * BLOCK_SIZE

TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
BMAP_OFFSET = 0x200  # where qemu puts the block map: right after the header

# text, signature, version, header size, image type, image flags, description,
# block map offset, data offset, cylinders, heads, sectors, sector size, unused,
# disk size, block size, block extra, blocks in image, blocks allocated, then the
# image, last snapshot, link and parent UUIDs, and 56 unused bytes.
_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56x")
assert _HEADER.size == HEADER_SIZE and struct.calcsize("<64s") == SIGNATURE_AT


class Header(NamedTuple):
    """The 512 header bytes qemu reads, field by field (UUIDs as stored)."""

    disk_size: int
    image_type: int = TYPE_DYNAMIC
    blocks_in_image: int = 0
    blocks_allocated: int = 0
    offset_bmap: int = BMAP_OFFSET
    offset_data: int = BMAP_OFFSET
    block_size: int = BLOCK_SIZE
    sector_size: int = SECTOR
    header_size: int = HEADER_SIZE_1_1
    version: int = VERSION_1_1
    signature: int = SIGNATURE_VALUE
    uuid_image: bytes = bytes(16)
    uuid_last_snap: bytes = bytes(16)
    uuid_link: bytes = bytes(16)
    uuid_parent: bytes = bytes(16)
    text: bytes = TEXT
    image_flags: int = 0
    description: bytes = b""
    geometry: tuple[int, int, int] = (0, 0, 0)  # cylinders, heads, sectors: unused
    unused1: int = 0
    block_extra: int = 0

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """The header from its first 512 bytes (shorter: zeros follow, as qemu reads
        past the end of a file); no checks."""
        (text, signature, version, header_size, image_type, image_flags, description,
         offset_bmap, offset_data, cylinders, heads, sectors, sector_size, unused1,
         disk_size, block_size, block_extra, blocks_in_image, blocks_allocated,
         uuid_image, uuid_last_snap, uuid_link, uuid_parent,
         ) = _HEADER.unpack(data[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"))  # fmt: skip
        return cls(
            disk_size=disk_size, image_type=image_type, blocks_in_image=blocks_in_image,
            blocks_allocated=blocks_allocated, offset_bmap=offset_bmap,
            offset_data=offset_data, block_size=block_size, sector_size=sector_size,
            header_size=header_size, version=version, signature=signature,
            uuid_image=uuid_image, uuid_last_snap=uuid_last_snap, uuid_link=uuid_link,
            uuid_parent=uuid_parent, text=text, image_flags=image_flags,
            description=description, geometry=(cylinders, heads, sectors), unused1=unused1,
            block_extra=block_extra,
        )  # fmt: skip

    def pack(self) -> bytes:
        """The 512 header bytes."""
        return _HEADER.pack(
            self.text, self.signature, self.version, self.header_size, self.image_type,
            self.image_flags, self.description, self.offset_bmap, self.offset_data,
            *self.geometry, self.sector_size, self.unused1, self.disk_size, self.block_size,
            self.block_extra, self.blocks_in_image, self.blocks_allocated, self.uuid_image,
            self.uuid_last_snap, self.uuid_link, self.uuid_parent,
        )  # fmt: skip


def checked_disk_size(header: Header, strict: bool = True) -> int:
    """The virtual size of the image ``header`` describes, or FormatError.

    qemu 7.2's checks first, in its order and words (the size limit comes
    before the signature: ``-f vdi`` on another file may say either); a disk
    size that is no multiple of a sector is rounded up, as qemu does, before
    it is compared with the blocks. Then, if ``strict`` (always, but for
    ``check``, which reads no data), instar's own: the header must be a
    version 1.1 header (VirtualBox's check; qemu reads any header size), and
    the image dynamic or static (qemu reads undo and differencing images as
    dynamic, without their parent).
    """
    size = header.disk_size
    if size > DISK_SIZE_MAX:
        raise FormatError(
            f"Unsupported VDI image size (size is {size:#x}, max supported is {DISK_SIZE_MAX:#x})")
    size = -(-size // SECTOR) * SECTOR
    unsupported = "unsupported VDI image"
    room = header.blocks_in_image * header.block_size
    if header.signature != SIGNATURE_VALUE:
        raise FormatError(f"Image not in VDI format (bad signature {header.signature:08x})")
    if header.version != VERSION_1_1:
        version = f"{header.version >> 16}.{header.version & 0xFFFF}"
        raise FormatError(f"{unsupported} (version {version})")
    if header.offset_bmap % SECTOR:
        raise FormatError(f"{unsupported} (unaligned block map offset {header.offset_bmap:#x})")
    if header.offset_data % SECTOR:
        raise FormatError(f"{unsupported} (unaligned data offset {header.offset_data:#x})")
    if header.sector_size != SECTOR:
        raise FormatError(f"{unsupported} (sector size {header.sector_size} is not {SECTOR})")
    if header.block_size != BLOCK_SIZE:
        raise FormatError(
            f"{unsupported} (block size {header.block_size} is not {BLOCK_SIZE})")
    if size > room:
        raise FormatError(f"{unsupported} (disk size {size}, image bitmap has room for {room})")
    if header.uuid_link != bytes(16):
        raise FormatError(f"{unsupported} (non-NULL link UUID)")
    if header.uuid_parent != bytes(16):
        raise FormatError(f"{unsupported} (non-NULL parent UUID)")
    if header.blocks_in_image > BLOCKS_MAX:
        raise FormatError(
            f"{unsupported} (too many blocks {header.blocks_in_image}, max is {BLOCKS_MAX})")
    if not strict:
        return size
    # instar's own checks.
    if header.header_size < HEADER_SIZE_1_1:
        raise FormatError(
            f"{unsupported} (header size {header.header_size:#x} is smaller than a "
            f"version 1.1 header, {HEADER_SIZE_1_1:#x})")
    if header.image_type in (TYPE_UNDO, TYPE_DIFFERENCING):
        kind = "an undo" if header.image_type == TYPE_UNDO else "a differencing"
        raise FormatError(
            f"{unsupported} (image type {header.image_type}: {kind} image, which needs "
            "its parent)")
    if header.image_type not in (TYPE_DYNAMIC, TYPE_STATIC):
        raise FormatError(f"{unsupported} (unknown image type {header.image_type})")
    return size


def bmap_bytes(blocks: int) -> int:
    """The bytes of a block map of ``blocks`` entries, rounded up to a sector as
    qemu reads and writes it."""
    return -(-blocks * 4 // SECTOR) * SECTOR


def blocks_for(size: int) -> int:
    """The blocks a disk of ``size`` bytes needs."""
    return -(-size // BLOCK_SIZE)


def new_uuid() -> bytes:
    """A random (version 4) UUID as VDI stores it: the first three fields
    little-endian, as VirtualBox's IPRT lays out a UUID (qemu swaps them too).
    os.urandom, not the ``uuid`` module: nothing heavy to import."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return bytes(raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:])
