"""Guest data written into an existing QED image, in place and crash safe.

The QED counterpart of `instar.formats.qcow2.guest_writes.GuestWriter` (the
same interface, so ``rebase`` and, later, ``commit`` take either): whole guest
clusters the image does not hold (L2 entry 0, or no L2 table) get new
content, a data cluster appended to the file or, where the content is zeros
the caller does not need stored, a zero cluster (entry 1, no data), as qemu
writes zeros into QED.

QED has no refcounts: a cluster is in use when a table points at it. So the
order, through one `ImageUpdate`, is: ``data`` (each cluster's bytes past
the end of the file, as they come, then the new L2 tables after them),
``pointers`` (the L2 tables changed in place, then the L1 entries of the new
ones). A crash before the pointers leaves the image as it was with unused
bytes at its end (``qemu-img check`` calls them leaks); after some of them,
each cluster either not written (old content through the backing file) or
written (the same content here). qemu marks the image "needs check" while
it allocates; this order needs no check, so instar does not set the bit.
"""

from __future__ import annotations

from array import array

from instar.errors import FormatError, UnsupportedError
from instar.formats.common import unpack_table
from instar.formats.qed import layout as L
from instar.formats.qed.reader import QedDriver, read_padded
from instar.mutate import ImageUpdate, SequentialWrites


class GuestWriter:
    """Whole guest clusters written into ``driver``'s image through ``update``."""

    def __init__(self, driver: QedDriver, update: ImageUpdate, what: str) -> None:
        header = driver.header
        if header.features & L.FEATURE_NEED_CHECK:
            raise UnsupportedError(f"{what} of a QED image that was not closed cleanly is not "
                                   "supported yet")
        self.driver = driver
        self.update = update
        self.header = header
        self.cluster = header.cluster_size
        self.entries = header.table_entries
        self.table_bytes = self.entries * 8
        self.length = L.qemu_length(driver.file.size)
        needed = -(-header.image_size // (self.entries * self.cluster))
        self.l1: array[int] = unpack_table(
            read_padded(driver.file, header.l1_table_offset, needed * 8), 8, "little")
        # Data from the first whole cluster past the end of the file on.
        self._first = -(-self.length // self.cluster)
        self._written = 0
        self._data = SequentialWrites(update)  # the clusters, appended in order
        self._entries: dict[int, dict[int, int]] = {}  # L1 index -> {slot: L2 entry}
        self._pointed = False

    @property
    def changed(self) -> bool:
        return bool(self._entries)

    def write(self, guest_cluster: int, data: bytes | None) -> None:
        """Give guest cluster ``guest_cluster`` (one the image does not hold)
        the bytes ``data`` (a whole cluster), or zeros when None. Its L2 table
        is checked before anything is written for it."""
        index, slot = divmod(guest_cluster, self.entries)
        if index >= len(self.l1):
            raise FormatError(f"QED guest cluster {guest_cluster} lies past the L1 table")
        if index not in self._entries:
            offset = self.l1[index]
            if offset and not L.table_offset_valid(offset, self.header, self.length):
                raise FormatError(f"L2 table offset {offset:#x} is invalid (L1 index "
                                  f"{index:#x})")
        self.update.phase("data")
        if data is None:
            entry = L.ZERO_CLUSTER
        else:
            entry = (self._first + self._written) * self.cluster
            self._data.write(entry, data)
            self._written += 1
        self._entries.setdefault(index, {})[slot] = entry

    def finish(self) -> None:
        """The new L2 tables, then the pointers (phases data and pointers)."""
        self._data.flush()
        if not self._entries:
            return
        update = self.update
        in_place: list[tuple[int, bytes]] = []
        placed: list[tuple[int, bytes]] = []
        for index in sorted(self._entries):
            offset = self.l1[index]
            table = bytearray(read_padded(self.driver.file, offset, self.table_bytes)
                              if offset else self.table_bytes)
            for slot, entry in self._entries[index].items():
                table[slot * 8 : slot * 8 + 8] = entry.to_bytes(8, "little")
            (in_place if offset else placed).append((offset or index, bytes(table)))
        tables = (self._first + self._written) * self.cluster
        update.phase("data")
        for number, (_, content) in enumerate(placed):
            update.write(tables + number * self.table_bytes, content)
        update.phase("pointers")
        self._pointed = True
        for offset, content in in_place:
            update.write(offset, content)
        for number, (index, _) in enumerate(placed):
            where = self.header.l1_table_offset + 8 * index
            update.write(where, (tables + number * self.table_bytes).to_bytes(8, "little"))

    def abandon(self) -> None:
        """After a failure before `finish` pointed at anything: the file cut
        back to its old length."""
        self._data = SequentialWrites(self.update)  # what waits is dropped
        if self._written and not self._pointed:
            self.update.truncate(self.driver.file.size)
            self._written = 0

    def refcount_table(self) -> tuple[int, int] | None:
        return None  # QED has none

    def release(self) -> None:
        """Nothing to release: QED frees nothing here."""
