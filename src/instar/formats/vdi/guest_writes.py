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
from instar.mutate import ImageUpdate, SequentialWrites, UnitWrites

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
        self._units = UnitWrites(update, unit=BLOCK_SIZE, first=max(self.count, highest + 1),
                                 size=driver.file.size, origin=header.offset_data)
        self._entries: dict[int, int] = {}  # guest block -> its new entry

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
            self._units.rewrite(self._units.host(entry), content)
            return
        self._entries[number] = self._units.append(content)

    def finish(self) -> None:
        """The header's count (phase data), then the block map's entries (pointers)."""
        self._units.flush()
        if not self._entries:
            return
        update = self.update
        count = self._units.next_number  # qemu's count + new blocks, for a sound image
        update.write(_COUNT_AT, count.to_bytes(4, "little"))
        update.phase("pointers")
        self._units.pointing()
        bmap = self.driver.header.offset_bmap
        entries = SequentialWrites(update)  # neighbours in one write
        for number in sorted(self._entries):
            entries.write(bmap + 4 * number, self._entries[number].to_bytes(4, "little"))
        entries.flush()

    def abandon(self) -> None:
        """After a failure before `finish`: the file cut back to its old length."""
        self._units.abandon()

    def write_header(self) -> None:
        """Nothing more: the count went with the data."""

    def release(self) -> None:
        """Nothing to release: blocks are never freed."""
