"""Writing VDI images sequentially, laid out as qemu-img 7.2 lays them out.

Header at 0 (qemu's text, version 1.1, a random image and last-snapshot
UUID), the block map at 512 (one entry per 1 MiB block, padded with zeros
to a sector), the data blocks after it.

- Dynamic (qemu's default): a block is allocated, at the end of the file,
  when data is first written into it, so blocks are numbered in guest
  order, as ``qemu-img convert`` numbers them; a block that only ever sees
  ``write_zeroes`` stays unallocated. Inside an allocated block, pieces
  never written are holes (qemu writes their zeros): the bytes read are the
  same, and the file ends where qemu's ends.
- Static (``-o static=on``): every block mapped in order from the start and
  the file given its full size at creation (sparse), as qemu does.

Data arrives in increasing offsets, so the block map is written a piece at
a time as the copy passes it: memory stays bounded for qemu's largest disk
(2^29 blocks, a 2 GiB map).
"""

from __future__ import annotations

import errno
import os
from array import array

from instar.errors import CreationError
from instar.files import pwrite_all, write_zeros
from instar.formats.base import Measurement, MeasureSource, OutputFile, ParsedOptions
from instar.formats.common import pack_table, unit_spans
from instar.formats.vdi.layout import (
    BLOCK_SIZE,
    BMAP_OFFSET,
    DISK_SIZE_MAX,
    SECTOR,
    TYPE_DYNAMIC,
    TYPE_STATIC,
    UNALLOCATED,
    Header,
    blocks_for,
    bmap_bytes,
    new_uuid,
)

CHUNK_ENTRIES = 1 << 16  # block map entries written at once (256 KiB)
_UNALLOCATED_CHUNK = pack_table([UNALLOCATED] * CHUNK_ENTRIES, 4, "little")


def disk_size(virtual_size: int) -> int:
    """The disk of a new VDI asked for ``virtual_size`` bytes: rounded up to a
    sector, as qemu, and refused past qemu's limit."""
    size = -(-virtual_size // SECTOR) * SECTOR
    if size > DISK_SIZE_MAX:
        raise CreationError(
            f"Unsupported VDI image size (size is {size:#x}, max supported is {DISK_SIZE_MAX:#x})")
    return size


def data_offset(blocks: int) -> int:
    """Where the first block goes: after the header and the block map (qemu's offset_data)."""
    return BMAP_OFFSET + bmap_bytes(blocks)


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """What ``measure -O vdi`` answers (qemu 7.2 has no figures for vdi), by the
    writer's layout: the header and block map, then 1 MiB for each block with
    data; a static image every block, allocated or not (as qemu counts raw)."""
    disk = disk_size(source.virtual_size if source is not None else size)
    blocks = blocks_for(disk)
    fully = data_offset(blocks) + blocks * BLOCK_SIZE
    if options.flag("static"):
        return Measurement(fully, fully)
    used = source.data_units(BLOCK_SIZE) if source is not None else 0
    return Measurement(data_offset(blocks) + used * BLOCK_SIZE, fully)


def create_writer(out: OutputFile, virtual_size: int, options: ParsedOptions) -> VdiWriter:
    """A writer for a new VDI of ``virtual_size`` bytes (rounded up to a sector, as qemu)."""
    return VdiWriter(out, disk_size(virtual_size), options.flag("static"))


class VdiWriter:
    """A dynamic or static VDI written front to back; the header last."""

    def __init__(self, out: OutputFile, size: int, static: bool) -> None:
        self._out = out
        self._fd = out.fd
        self._static = static
        self._blocks = blocks_for(size)
        self._bmap_size = bmap_bytes(self._blocks)
        self._data = data_offset(self._blocks)  # offset_data, as qemu puts it
        self._header = Header(
            disk_size=size,
            image_type=TYPE_STATIC if static else TYPE_DYNAMIC,
            blocks_in_image=self._blocks,
            offset_data=self._data,
            uuid_image=new_uuid(),
            uuid_last_snap=new_uuid(),
        )
        self._allocated = 0  # dynamic: blocks allocated so far
        self._block = -1  # dynamic: the block being written, -1 before the first
        self._host = 0  # its host offset
        self._chunk_first = 0  # dynamic: the first entry of the map piece held
        self._chunk = self._empty_chunk()
        if static and not out.in_place:
            self._allocate_file(self._data + self._blocks * BLOCK_SIZE)

    def _allocate_file(self, length: int) -> None:
        """The whole (sparse) file of a static image, as qemu truncates it at creation."""
        try:
            os.ftruncate(self._fd, length)
        except (OSError, OverflowError) as error:
            reason = os.strerror(errno.EFBIG) if isinstance(error, OverflowError) else (
                error.strerror)
            # qemu's words, without a separator between its two messages.
            raise CreationError(
                f"Failed to statically allocate fileCould not resize file: {reason}") from None

    # -- data --

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._static:
            pwrite_all(self._fd, data, self._data + offset)
            return
        view = memoryview(data)
        for index, within, start, step in unit_spans(offset, len(data), BLOCK_SIZE):
            if index != self._block:
                self._enter_block(index)
            pwrite_all(self._fd, view[start : start + step], self._host + within)

    def write_zeroes(self, offset: int, length: int) -> None:
        """A new image reads as zeros already; over old contents, a static
        image's zeros must be written (a dynamic block is zeroed when allocated)."""
        if self._static and self._out.in_place:
            write_zeros(self._fd, self._data + offset, length)

    def _enter_block(self, index: int) -> None:
        """Allocate block ``index`` after the last one, in the order qemu would."""
        if index < self._block or index >= self._blocks:
            raise ValueError(f"block {index} written out of order or past the end")
        entry = self._allocated
        self._allocated += 1
        self._block = index
        self._host = self._data + entry * BLOCK_SIZE
        if index >= self._chunk_first + CHUNK_ENTRIES:
            self._write_map(index - index % CHUNK_ENTRIES)
        self._chunk[index - self._chunk_first] = entry
        if self._out.in_place:  # old contents must not show through
            write_zeros(self._fd, self._host, BLOCK_SIZE)

    # -- the block map --

    def _empty_chunk(self) -> array[int]:
        return array("I", [UNALLOCATED]) * min(CHUNK_ENTRIES, self._blocks)

    def _write_map(self, until: int) -> None:
        """Write the piece of the map held, then unallocated entries up to
        entry ``until`` (a piece boundary, or the end); hold the piece there."""
        first = self._chunk_first
        count = min(CHUNK_ENTRIES, self._blocks - first)
        pwrite_all(self._fd, pack_table(self._chunk[:count], 4, "little"), BMAP_OFFSET + first * 4)
        for start in range(first + CHUNK_ENTRIES, until, CHUNK_ENTRIES):
            count = min(CHUNK_ENTRIES, self._blocks - start)
            pwrite_all(self._fd, memoryview(_UNALLOCATED_CHUNK)[: count * 4],
                       BMAP_OFFSET + start * 4)
        self._chunk_first = until
        self._chunk = self._empty_chunk()

    def _write_static_map(self) -> None:
        """Block ``i`` at data block ``i``, for every block."""
        for start in range(0, self._blocks, CHUNK_ENTRIES):
            count = min(CHUNK_ENTRIES, self._blocks - start)
            pwrite_all(self._fd, pack_table(range(start, start + count), 4, "little"),
                       BMAP_OFFSET + start * 4)

    def close(self) -> None:
        if self._blocks:
            if self._static:
                self._write_static_map()
            else:
                self._write_map(self._blocks)
            padding = self._bmap_size - self._blocks * 4
            if padding and self._out.in_place:
                write_zeros(self._fd, BMAP_OFFSET + self._blocks * 4, padding)
        allocated = self._blocks if self._static else self._allocated
        pwrite_all(self._fd, self._header._replace(blocks_allocated=allocated).pack(), 0)
        if not self._static and not self._out.in_place:
            os.ftruncate(self._fd, self._data + allocated * BLOCK_SIZE)

    def abort(self) -> None:
        pass
