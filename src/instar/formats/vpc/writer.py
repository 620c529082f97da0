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

from instar.errors import TooLargeError, UsageError
from instar.files import pwrite_all, write_zeros
from instar.formats.base import Measurement, MeasureSource, OutputFile, ParsedOptions
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
    declared_size,
    rounded_geometry,
)
from instar.runtime_types import NamedTuple

_TABLE_OFFSET = FOOTER_SIZE + DYNAMIC_HEADER_SIZE  # 1536, where qemu puts the BAT


class VpcPlan(NamedTuple):
    """A new image as the options make it: its subformat and CHS size."""

    fixed: bool
    choice: SizeChoice
    force_size: bool


def plan(virtual_size: int, options: ParsedOptions) -> VpcPlan:
    """Check the options and the size (qemu's messages), before anything is written."""
    subformat = options.text("subformat")
    if subformat not in ("dynamic", "fixed"):
        raise UsageError(f"Parameter 'subformat' does not accept value '{subformat}'")
    force_size = options.flag("force_size")
    choice = rounded_geometry(virtual_size, force_size)
    if choice.too_large:
        raise TooLargeError(TOO_LARGE_MESSAGE)
    return VpcPlan(subformat == "fixed", choice, force_size)


class DynamicLayout(NamedTuple):
    """A dynamic image's file: footer copy, dynamic header and BAT, then each
    block (sector bitmap, data) in the order first written, then the footer."""

    entries: int  # BAT entries: blocks of the disk
    bat_bytes: int
    block_size: int

    @classmethod
    def of(cls, choice: SizeChoice, block_size: int = DEFAULT_BLOCK_SIZE) -> DynamicLayout:
        entries = bat_entries(choice.total_sectors, block_size)
        return cls(entries, -(-entries * 4 // SECTOR) * SECTOR, block_size)

    @property
    def data_start(self) -> int:
        return _TABLE_OFFSET + self.bat_bytes

    @property
    def block_bytes(self) -> int:
        """File bytes one allocated block takes, its bitmap included."""
        return bitmap_size(self.block_size) + self.block_size

    def file_size(self, blocks: int) -> int:
        """The length of a file with ``blocks`` blocks allocated."""
        return self.data_start + blocks * self.block_bytes + FOOTER_SIZE


def fixed_footer_offset(choice: SizeChoice) -> int:
    """Where a fixed image's footer goes: after the disk, never at 0.

    A fixed disk of size 0 would be the footer alone, which qemu opens as a
    (broken) dynamic disk; one zero sector before it keeps it readable."""
    return max(choice.size, SECTOR)


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """What ``measure -O vpc`` answers (qemu 7.2 has no figures for vpc).

    The disk gets the size convert would give it; a fixed image is as long as
    its disk plus the footer, allocated or not (as qemu counts raw); a dynamic
    one holds its metadata and each block with data, by `DynamicLayout`, the
    writer's own layout."""
    length = source.virtual_size if source is not None else size
    new = plan(declared_size(length, options.flag("force_size")), options)
    if new.fixed:
        whole = fixed_footer_offset(new.choice) + FOOTER_SIZE
        return Measurement(whole, whole)
    layout = DynamicLayout.of(new.choice)
    used = source.data_units(layout.block_size) if source is not None else 0
    return Measurement(layout.file_size(used), layout.file_size(layout.entries))


def create_writer(
    out: OutputFile, virtual_size: int, options: ParsedOptions
) -> DynamicWriter | FixedWriter:
    """A writer for a new VHD holding ``virtual_size`` bytes (CHS rounded up unless forced)."""
    new = plan(virtual_size, options)
    choice = new.choice
    footer = Footer(
        disk_type=DISK_FIXED if new.fixed else DISK_DYNAMIC,
        current_size=choice.size,
        geometry=choice.geometry,
        data_offset=NO_OFFSET if new.fixed else FOOTER_SIZE,
        timestamp=int(time.time()) - TIMESTAMP_BASE,
        creator_app=b"qem2" if new.force_size else b"qemu",
        uuid=uuid.uuid4().bytes,
    )
    if new.fixed:
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

    def write(self, offset: int, data: bytes | memoryview) -> None:
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
        layout = DynamicLayout.of(choice)
        self._block_size = layout.block_size
        self._bitmap_size = bitmap_size(self._block_size)
        self._block_bytes = layout.block_bytes
        self._sectors_per_block = self._block_size // SECTOR
        self._bat = array("I", [UNALLOCATED]) * layout.entries
        assert self._bat.itemsize == 4
        self._bat_bytes = layout.bat_bytes
        self._next_free = layout.data_start  # where the next block goes
        self._block = -1  # index of the block being written, -1 before the first
        self._block_offset = 0  # its file offset (bitmap first)
        self._bits = 0  # its bitmap; bit (sectors_per_block - 1 - i) is sector i

    def write(self, offset: int, data: bytes | memoryview) -> None:
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
        self._next_free += self._block_bytes
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
