"""Guest data written into an existing VHDX image in place, crash safe.

``commit`` writes its base through `GuestWriter` (the format's ``updater``),
a whole payload block at a time (2 MiB parts of larger blocks, so that memory
stays bounded): the granularity qemu's commit job copies in (qemu reports the
block size as the cluster size, fixed images too).

The order, through one `ImageUpdate` (see `instar.mutate`):

0. Before the first write, as the VHDX specification requires, the headers:
   a new FileWriteGuid and DataWriteGuid, the sequence number one more, into
   the header slot not in use, flushed, then the same into the other slot
   (sequence number two more), flushed; the log GUID zero (the log holds
   nothing to replay: an image that has one is refused). qemu does the same
   on its first write (and again around each BAT change it logs).
1. ``data``: a block in the FULLY_PRESENT state is rewritten in place; any
   other block gets a new one, where qemu puts it: at the end of the file
   rounded up to 1 MiB, the file then grown by the block size (its parts
   not written are a hole: zeros, as the block read before). A crash here
   leaves every block old (nothing points at a new block), or, rewritten in
   place, a unit at a time new.
2. ``pointers``: the new blocks' BAT entries (FULLY_PRESENT, at their
   offset), in place, in runs of neighbours.

qemu writes its BAT changes through the metadata log (an entry written and
flushed, then replayed in place, then the log emptied: four header writes a
block). instar writes no log: each BAT entry is set after the data it names
is on disk, which needs none, and the log region keeps its old bytes (the
headers' log GUID of zero says it holds nothing).

Refused before anything is written: a differencing image and an image with
a log to replay (not supported yet), and an image whose blocks overlap
(reading it fails already); the reader refuses BAT entries past the end of
the file or into the metadata.
"""

from __future__ import annotations

import os

from instar.errors import FormatError, UnsupportedError
from instar.formats.vhdx import layout
from instar.formats.vhdx.layout import MiB
from instar.formats.vhdx.reader import VhdxDriver
from instar.image import Driver
from instar.mutate import ImageUpdate, SequentialWrites

# A larger block is written in parts of this size, so that memory stays bounded
# (blocks may be 256 MiB); a new block's parts not written read as zeros (a hole).
MAX_UNIT = 2 * MiB


def new_guid() -> bytes:
    """A random (version 4) GUID, in the little-endian layout VHDX stores."""
    guid = bytearray(os.urandom(16))
    guid[7] = (guid[7] & 0x0F) | 0x40  # the version nibble ends data3 (little endian)
    guid[8] = (guid[8] & 0x3F) | 0x80
    return bytes(guid)


class GuestWriter:
    """Guest blocks written into ``driver``'s image through ``update``."""

    def __init__(self, driver: Driver, update: ImageUpdate, what: str) -> None:
        assert isinstance(driver, VhdxDriver)
        if driver.differencing:
            raise UnsupportedError(f"{what}: writing into a differencing VHDX image is not "
                                   "supported yet")
        if driver.log_replayed:
            raise UnsupportedError(f"{what}: writing into a VHDX image with a log to replay "
                                   "is not supported yet (qemu-img check -r all replays it)")
        if driver.corruption is not None:
            raise FormatError(driver.corruption)
        self.driver = driver
        self.update = update
        self.file = driver.source
        self.geometry = driver.geometry
        self.unit = min(driver.block_size, MAX_UNIT)
        self.parts = driver.block_size // self.unit  # units a block
        self.file_size = self.file.size
        self.end = self.file_size  # where the next new block goes, rounded up to 1 MiB
        bat = next(r for r in driver.regions if r.guid == layout.BAT_REGION)
        self.bat_offset = bat.file_offset
        self._headers_written = False
        self._new: dict[int, int] = {}  # BAT index -> new entry

    def _write_headers(self) -> None:
        """Both headers with new GUIDs and sequence numbers, one after the
        other, each flushed: a crash leaves one valid header at least."""
        slots = [layout.decode_header(self.file.pread(offset, layout.HEADER_SIZE))
                 for offset in layout.HEADER_OFFSETS]
        current = layout.choose_header(slots[0], slots[1])
        first = 0 if slots[1] == current else 1  # the slot not in use is written first
        header = current._replace(file_write_guid=new_guid(), data_write_guid=new_guid(),
                                  log_guid=layout.ZERO_GUID)
        self.update.phase("data")
        for step, slot in enumerate((first, 1 - first), start=1):
            encoded = header._replace(sequence_number=current.sequence_number + step).encode()
            self.update.write(layout.HEADER_OFFSETS[slot], encoded)
            self.update.flush()
        self._headers_written = True

    def overwrite(self, number: int, data: bytes | None) -> None:
        block, part = divmod(number, self.parts)
        if block >= self.geometry.payload_blocks:
            raise AssertionError("a unit past the disk")
        if not self._headers_written:
            self._write_headers()
        index = self.geometry.payload_index(block)
        entry = self.driver.bat[index]
        within = part * self.unit
        length = min(self.unit, self.geometry.block_length(block) - within)
        content = bytes(length) if data is None else data[:length]
        if entry & layout.STATE_MASK == layout.PAYLOAD_FULLY_PRESENT:
            # In the file, clear of the metadata and of every other block: the reader checked.
            self.update.write((entry & layout.OFFSET_MASK) + within, content)
            return
        if index not in self._new:
            host = -(-self.end // MiB) * MiB
            self.end = host + self.geometry.block_size
            self._new[index] = layout.bat_entry(host, layout.PAYLOAD_FULLY_PRESENT)
        self.update.write((self._new[index] & layout.OFFSET_MASK) + within, content)

    def finish(self) -> None:
        """The file grown to its last new block's end, then the BAT entries."""
        if not self._new:
            return
        if os.fstat(self.update.fd).st_size < self.end:
            self.update.truncate(self.end)  # a last block shorter than the block size
        self.update.phase("pointers")
        entries = SequentialWrites(self.update)  # neighbours in one write
        for index in sorted(self._new):
            entries.write(self.bat_offset + 8 * index, self._new[index].to_bytes(8, "little"))
        entries.flush()

    def write_header(self) -> None:
        """Nothing: the headers were written before the data."""

    def release(self) -> None:
        """Nothing: no block is freed."""

    def abandon(self) -> None:
        """After a failure before `finish`: the file its old length (nothing
        points at the new blocks)."""
        if self._new:
            self._new.clear()
            self.update.truncate(self.file_size)
