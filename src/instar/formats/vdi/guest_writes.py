"""Guest data written into an existing VDI image, in place and crash safe:
``commit`` writes its base through `GuestWriter` (`overwrite`).

VDI has no zero blocks and no backing file: a block is written whole (1 MiB),
where the image holds it already (a static image holds every block), or as
a new block appended after the last one, as qemu appends it, its entry in
the block map pointing at it, and the header's count of allocated blocks
raised. Zeros are stored as zero bytes (qemu's vdi has no other way).

The order, through one `ImageUpdate`: ``data`` (the new blocks past every
block in use, the blocks held rewritten in place, then the header's count:
qemu's allocator takes the next block from that count, so it goes up before
any entry names a new block), then ``pointers`` (the block map's entries).
A crash before the pointers leaves each block as it was, or rewritten in
place, and at worst a count ahead of the map (``qemu-img check`` reports
"allocated blocks mismatch"; the blocks past the map are unused and never
handed out twice); after some of them, each block old or new.

Every entry of the map is checked first (blocks inside the file, clear of
the metadata, none named twice), by mapping the whole image; new blocks go
past the highest block any entry names and past the header's count.
"""

from __future__ import annotations

from instar.formats.common import le32_table_pieces
from instar.formats.vdi.layout import BLOCK_SIZE, DISCARDED, blocks_for
from instar.formats.vdi.reader import VdiDriver
from instar.mutate import ImageUpdate, SequentialWrites

_COUNT_AT = 0x184  # the header's blocks_allocated field (after blocks_in_image at 0x180)
_READ_ENTRIES = 1 << 20


class GuestWriter:
    """Whole blocks written into ``driver``'s image through ``update``."""

    unit = BLOCK_SIZE

    def __init__(self, driver: VdiDriver, update: ImageUpdate, what: str) -> None:
        self.driver = driver
        self.update = update
        header = driver.header
        for _ in driver.map(0, driver.virtual_size):  # every entry checked, or FormatError
            pass
        self.entries = blocks_for(driver.virtual_size)
        highest = -1
        for _, _, chunk in le32_table_pieces(driver.file, header.offset_bmap, self.entries,
                                             _READ_ENTRIES):
            if chunk is not None:
                highest = max(highest, max((v for v in chunk if v < DISCARDED), default=-1))
        self.count = header.blocks_allocated
        self._first = max(self.count, highest + 1)  # the first new block's number
        self._written = 0
        self._data = SequentialWrites(update)  # the new blocks, appended in order
        self._in_place = SequentialWrites(update)
        self._entries: dict[int, int] = {}  # guest block -> its new entry
        self._pointed = False

    def _host(self, block: int) -> int:
        return self.driver.header.offset_data + block * BLOCK_SIZE

    def overwrite(self, number: int, data: bytes | None) -> None:
        """Give guest block ``number`` the bytes ``data`` (zeros when None):
        in place where the image holds the block, else in a new block."""
        if number in self._entries:
            raise AssertionError("a guest block overwritten twice")
        header = self.driver.header
        entry = int.from_bytes(self.driver.file.pread_exact(header.offset_bmap + 4 * number, 4,
                                                            "block map"), "little")
        content = bytes(BLOCK_SIZE) if data is None else data
        self.update.phase("data")
        if entry < DISCARDED:  # checked: inside the file, named once
            self._in_place.write(self._host(entry), content)
            return
        block = self._first + self._written
        self._data.write(self._host(block), content)
        self._written += 1
        self._entries[number] = block

    def finish(self) -> None:
        """The header's count (phase data), then the block map's entries (pointers)."""
        self._data.flush()
        self._in_place.flush()
        if not self._entries:
            return
        update = self.update
        count = self._first + self._written  # qemu's count + new blocks, for a sound image
        update.write(_COUNT_AT, count.to_bytes(4, "little"))
        update.phase("pointers")
        self._pointed = True
        bmap = self.driver.header.offset_bmap
        entries = SequentialWrites(update)  # neighbours in one write
        for number in sorted(self._entries):
            entries.write(bmap + 4 * number, self._entries[number].to_bytes(4, "little"))
        entries.flush()

    def abandon(self) -> None:
        """After a failure before `finish`: the file cut back to its old length."""
        self._data = SequentialWrites(self.update)
        self._in_place = SequentialWrites(self.update)
        if self._written and not self._pointed:
            self.update.truncate(self.driver.file.size)
            self._written = 0

    def write_header(self) -> None:
        """Nothing more: the count went with the data."""

    def release(self) -> None:
        """Nothing to release: blocks are never freed."""
