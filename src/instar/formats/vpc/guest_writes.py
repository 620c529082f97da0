"""Guest data written into an existing VHD (qemu's "vpc") in place, crash safe.

``commit`` writes its base through `guest_writer` (the format's ``updater``),
whole units at a time: a dynamic disk's blocks (2 MiB parts of larger ones),
or 64 KiB of a fixed disk's data (the granularity qemu's commit job copies in:
the block size of a dynamic disk, which qemu reports as its cluster size, else
64 KiB).

A dynamic disk, through one `ImageUpdate` (see `instar.mutate`):

1. ``data``: a block the BAT does not map is appended where qemu puts it
   (after the BAT and every block any entry names: qemu's
   ``free_data_block_offset``), its sector bitmap all ones then its data (in
   one write, unless the block is larger than a unit); the footer copy that
   ends the file is first written after the new block, so the file always
   ends in a footer. A block the BAT maps is
   rewritten in place, a unit a write. A crash here leaves every block old
   (the BAT unchanged) or, for a rewritten unit, new.
2. ``pointers``: the new blocks' BAT entries, then the sector bitmaps of the
   rewritten blocks set to all ones where they were not (qemu sets the whole
   bitmap of every block it writes; it reads no bitmap itself).

qemu writes the same bytes (bitmap, data, footer, BAT entry) per block, the
BAT entry after the footer. A fixed disk's data is written in place.

Refused before anything is written: a differencing disk (not supported yet),
a disk whose blocks overlap (reading it fails already), a BAT entry past the
end of the file, a fixed disk shorter than its size.
"""

from __future__ import annotations

import sys
from array import array

from instar.errors import FormatError, UnsupportedError
from instar.formats.base import GuestUpdater
from instar.formats.vpc.layout import (
    DYNAMIC_HEADER_SIZE,
    FOOTER_SIZE,
    SECTOR,
    UNALLOCATED,
    DynamicHeader,
    bitmap_size,
)
from instar.formats.vpc.reader import DynamicVpcDriver, FixedVpcDriver
from instar.image import Driver
from instar.mutate import ImageUpdate, SequentialWrites

FIXED_UNIT = 64 << 10  # qemu's default dirty-bitmap granularity, for a disk without clusters
# A larger block is written in parts of this size, so that memory stays bounded
# (blocks may be 256 MiB); a new block's parts not written read as zeros (a hole).
MAX_UNIT = 2 << 20
CHUNK = 1 << 20  # BAT bytes read at once


def guest_writer(driver: Driver, update: ImageUpdate, what: str) -> GuestUpdater:
    """The in-place writer of a VHD's guest data (`GuestUpdater`)."""
    if isinstance(driver, FixedVpcDriver):
        return FixedWriter(driver, update)
    assert isinstance(driver, DynamicVpcDriver)
    if driver.parent is not None:
        raise UnsupportedError(f"{what}: writing into a differencing VHD is not supported yet")
    return DynamicWriter(driver, update)


class FixedWriter:
    """A fixed disk: the guest's bytes are the file's, before the footer."""

    def __init__(self, driver: FixedVpcDriver, update: ImageUpdate) -> None:
        if driver.file.size - FOOTER_SIZE < driver.virtual_size:
            raise UnsupportedError("writing into a fixed VHD shorter than its disk size is "
                                   "not supported yet")
        self.unit = FIXED_UNIT
        self.size = driver.virtual_size
        self.update = update
        self._writes = SequentialWrites(update)

    def overwrite(self, number: int, data: bytes | None) -> None:
        at = number * self.unit
        length = min(self.unit, self.size - at)
        if length <= 0:
            raise AssertionError("a unit past the end of the disk")
        self.update.phase("data")
        self._writes.write(at, bytes(length) if data is None else data[:length])

    def finish(self) -> None:
        self._writes.flush()

    def write_header(self) -> None:
        """Nothing: the footer does not change."""

    def release(self) -> None:
        """Nothing: no block is freed."""

    def abandon(self) -> None:
        self._writes = SequentialWrites(self.update)  # what waits is dropped


class DynamicWriter:
    """A dynamic disk's blocks: appended, or rewritten in place (see the module)."""

    def __init__(self, driver: DynamicVpcDriver, update: ImageUpdate) -> None:
        if driver.corruption is not None:
            raise FormatError(driver.corruption)
        file = driver.file
        self.driver = driver
        self.update = update
        self.unit = min(driver.block_size, MAX_UNIT)
        self.parts = driver.block_size // self.unit  # units a block
        self.bitmap = bitmap_size(driver.block_size)
        self.span = self.bitmap + driver.block_size
        self.footer = file.pread_exact(0, FOOTER_SIZE, "VHD footer")  # the reader checked it
        data_offset = int.from_bytes(self.footer[16:24], "big")
        header = DynamicHeader.parse(file.pread_exact(data_offset, DYNAMIC_HEADER_SIZE,
                                                      "dynamic disk header"))
        self.table = header.table_offset
        self.file_size = file.size
        self.free = self._first_free(header)
        self._first = self.free
        # The file's last sector, if the new blocks may cover it (`abandon` puts it back).
        self._end = (file.pread(self.file_size - FOOTER_SIZE, FOOTER_SIZE)
                     if self.file_size - FOOTER_SIZE >= self.free else b"")
        self._new: dict[int, int] = {}  # block -> its new BAT entry
        self._rewritten: list[int] = []  # blocks whose bitmap must become all ones
        self._bitmaps: set[int] = set()  # blocks rewritten in place (host offsets)

    def _first_free(self, header: DynamicHeader) -> int:
        """Where qemu appends a block: past the BAT (all ``max_table_entries``
        of it) and past every block any entry names; a block past the end of
        the file is refused, as qemu refuses the disk."""
        count = header.max_table_entries  # qemu reads them all: entries past the file are 0
        free = -(-(self.table + count * 4) // SECTOR) * SECTOR
        end = min(self.table + count * 4, self.file_size)
        for at in range(self.table, end, CHUNK):  # a piece at a time: memory stays bounded
            raw = self.driver.file.pread(at, min(CHUNK, end - at))
            entries = array("I", raw[: len(raw) // 4 * 4])
            if sys.byteorder == "little":
                entries.byteswap()
            ends = [entry for entry in entries if entry != UNALLOCATED]
            if ends:
                free = max(free, max(ends) * SECTOR + self.span)
        if count and self.table + count * 4 > self.file_size:
            free = max(free, self.span)  # qemu reads zeros there: blocks at sector 0
        if free > self.file_size:
            raise FormatError("a block allocation table entry points after the end of the "
                              "file; the image has been truncated")
        return free

    def overwrite(self, number: int, data: bytes | None) -> None:
        block, part = divmod(number, self.parts)
        bat = self.driver.bat
        if block >= len(bat):
            raise AssertionError("a unit past the disk")
        self.update.phase("data")
        content = bytes(self.unit) if data is None else data
        entry = bat[block]
        if entry == UNALLOCATED:
            host = self._new.get(block, UNALLOCATED) * SECTOR
            if block not in self._new:
                host = self.free
                self.free += self.span
                self.update.write(self.free, self.footer)  # the file keeps ending in a footer
                self._new[block] = host // SECTOR
                if self.parts > 1:
                    self.update.write(host, b"\xff" * self.bitmap)
                    stale = min(self.file_size, self.free) - (host + self.bitmap)
                    if stale > 0:  # old bytes past the footer: the parts not written read zeros
                        self.update.zeros(host + self.bitmap, stale)
                else:  # the bitmap and the block in one write
                    self.update.write(host, b"\xff" * self.bitmap + content)
                    return
            self.update.write(host + self.bitmap + part * self.unit, content)
            return
        host = entry * SECTOR  # inside the file, apart from the others: the reader checked
        self.update.write(host + self.bitmap + part * self.unit, content)
        if host not in self._bitmaps:
            self._bitmaps.add(host)
            if self.driver.file.pread(host, self.bitmap) != b"\xff" * self.bitmap:
                self._rewritten.append(host)

    def finish(self) -> None:
        """The new blocks' BAT entries (in runs of neighbours), then the
        rewritten blocks' bitmaps (phase pointers)."""
        if not self._new and not self._rewritten:
            return
        self.update.phase("pointers")
        entries = SequentialWrites(self.update)  # neighbours in one write
        for number in sorted(self._new):
            entries.write(self.table + 4 * number, self._new[number].to_bytes(4, "big"))
        entries.flush()
        for host in self._rewritten:
            self.update.write(host, b"\xff" * self.bitmap)

    def write_header(self) -> None:
        """Nothing: the footer and the dynamic header do not change."""

    def release(self) -> None:
        """Nothing: no block is freed."""

    def abandon(self) -> None:
        """After a failure before `finish`: the footer back where it was and
        the file its old length (nothing points at the new blocks)."""
        if self._new:
            self._new.clear()
            if self._end:
                self.update.write(self.file_size - FOOTER_SIZE, self._end)
            self.update.truncate(self.file_size)
