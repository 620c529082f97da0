"""Writing VHD images sequentially: dynamic (qemu's default) and fixed.

A dynamic image is laid out as qemu-img lays it out: footer copy at 0,
dynamic header at 512, BAT at 1536, then 2 MiB blocks (each its 512-byte
sector bitmap, then the data) in the order they are first written, and the
footer after the last block. Because data arrives in increasing offsets, the
only state kept is the BAT (4 bytes per 2 MiB block) and the bitmap of the
block being written; headers are written by ``close``.

Zero data is never stored: a block that only ever sees ``write_zeroes`` stays
unallocated (BAT entry 0xFFFFFFFF); inside an allocated block, sectors that
were not written keep a 0 bitmap bit and read back as zeros (a hole in a
regular file; explicit zeros on a block device, which is filled when a block
is allocated).
"""

from __future__ import annotations

import time
import uuid
from array import array

from instar.errors import CreationError, UsageError
from instar.files import pwrite_all, write_zeros
from instar.formats.base import OutputFile, ParsedOptions
from instar.formats.common import pack_table, unit_spans
from instar.formats.vpc.layout import (
    DEFAULT_BLOCK_SIZE,
    DISK_DYNAMIC,
    DISK_FIXED,
    DYNAMIC_HEADER_SIZE,
    FOOTER_SIZE,
    NO_OFFSET,
    SECTOR,
    TIMESTAMP_BASE,
    TOO_LARGE_MESSAGE,
    UNALLOCATED,
    DynamicHeader,
    Footer,
    SizeChoice,
    bat_entries,
    bitmap_size,
    rounded_geometry,
)

_TABLE_OFFSET = FOOTER_SIZE + DYNAMIC_HEADER_SIZE  # 1536, where qemu puts the BAT


def create_writer(
    out: OutputFile, virtual_size: int, options: ParsedOptions
) -> DynamicWriter | FixedWriter:
    """A writer for a new VHD holding ``virtual_size`` bytes (CHS rounded up unless forced)."""
    subformat = options.text("subformat")
    if subformat not in ("dynamic", "fixed"):
        raise UsageError(f"Parameter 'subformat' does not accept value '{subformat}'")
    force_size = options.flag("force_size")
    choice = rounded_geometry(virtual_size, force_size)
    if choice.too_large:
        raise CreationError(TOO_LARGE_MESSAGE)
    footer = Footer(
        disk_type=DISK_FIXED if subformat == "fixed" else DISK_DYNAMIC,
        current_size=choice.size,
        geometry=choice.geometry,
        data_offset=NO_OFFSET if subformat == "fixed" else FOOTER_SIZE,
        timestamp=int(time.time()) - TIMESTAMP_BASE,
        creator_app=b"qem2" if force_size else b"qemu",
        uuid=uuid.uuid4().bytes,
    )
    if subformat == "fixed":
        return FixedWriter(out, choice, footer)
    return DynamicWriter(out, choice, footer)


class FixedWriter:
    """The raw disk followed by the footer; zero runs stay holes."""

    def __init__(self, out: OutputFile, choice: SizeChoice, footer: Footer) -> None:
        self._out = out
        self._footer = footer
        # A fixed disk of size 0 would be the footer alone, which qemu opens as
        # a (broken) dynamic disk; one zero sector before it keeps it readable.
        self._footer_offset = max(choice.size, SECTOR)

    def write(self, offset: int, data: bytes) -> None:
        pwrite_all(self._out.fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._out.in_place:
            write_zeros(self._out.fd, offset, length)

    def close(self) -> None:
        if self._out.in_place and self._footer_offset > self._footer.current_size:
            write_zeros(self._out.fd, 0, self._footer_offset)
        pwrite_all(self._out.fd, self._footer.pack(), self._footer_offset)

    def abort(self) -> None:
        pass


class DynamicWriter:
    """A dynamic VHD written front to back; metadata is written by ``close``."""

    def __init__(self, out: OutputFile, choice: SizeChoice, footer: Footer) -> None:
        self._out = out
        self._footer = footer
        self._block_size = DEFAULT_BLOCK_SIZE
        self._bitmap_size = bitmap_size(self._block_size)
        self._sectors_per_block = self._block_size // SECTOR
        entries = bat_entries(choice.total_sectors, self._block_size)
        self._bat = array("I", [UNALLOCATED]) * entries
        assert self._bat.itemsize == 4
        self._bat_bytes = -(-entries * 4 // SECTOR) * SECTOR
        self._next_free = _TABLE_OFFSET + self._bat_bytes  # where the next block goes
        self._block = -1  # index of the block being written, -1 before the first
        self._block_offset = 0  # its file offset (bitmap first)
        self._bits = 0  # its bitmap; bit (sectors_per_block - 1 - i) is sector i

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for index, within, start, step in unit_spans(offset, len(data), self._block_size):
            if index != self._block:
                self._enter_block(index)
            where = self._block_offset + self._bitmap_size + within
            pwrite_all(self._out.fd, view[start : start + step], where)
            self._mark(within, within + step)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to do: unwritten sectors already read as zeros (see module notes)."""

    def _enter_block(self, index: int) -> None:
        """Finish the current block and allocate ``index`` at the end of the file."""
        if index < self._block or index >= len(self._bat):
            raise ValueError(f"block {index} written out of order or past the end")
        self._flush_bitmap()
        self._block = index
        self._block_offset = self._next_free
        self._bat[index] = self._block_offset // SECTOR
        self._next_free += self._bitmap_size + self._block_size
        self._bits = 0
        if self._out.in_place:  # old device contents must not show through
            write_zeros(self._out.fd, self._block_offset, self._bitmap_size + self._block_size)

    def _mark(self, start: int, end: int) -> None:
        """Set the bitmap bits of the sectors ``[start, end)`` of the block touches."""
        first = start // SECTOR
        last = -(-end // SECTOR)
        run = (1 << (last - first)) - 1
        self._bits |= run << (self._sectors_per_block - last)

    def _flush_bitmap(self) -> None:
        if self._block < 0:
            return
        bitmap = self._bits.to_bytes(self._sectors_per_block // 8, "big")
        bitmap += bytes(self._bitmap_size - len(bitmap))
        pwrite_all(self._out.fd, bitmap, self._block_offset)

    def close(self) -> None:
        self._flush_bitmap()
        footer = self._footer.pack()
        header = DynamicHeader(
            table_offset=_TABLE_OFFSET,
            max_table_entries=len(self._bat),
            block_size=self._block_size,
        ).pack()
        table = pack_table(self._bat, 4, "big", size=self._bat_bytes, fill=0xFF)
        pwrite_all(self._out.fd, footer + header + table, 0)
        pwrite_all(self._out.fd, footer, self._next_free)

    def abort(self) -> None:
        pass
