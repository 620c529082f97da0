"""Guest data written in place into an image of two levels of cluster tables
and no refcounts (QED, qcow version 1), crash safe: the shared part of their
in-place writers (``rebase`` writes into a QED overlay, ``commit`` into a QED
or qcow base), as `instar.formats.cluster_tables` is of their readers.

Neither format counts references: a cluster is in use when a table points
at it. So the order, through one `ImageUpdate`, is:

1. ``data``: each new cluster's bytes past the end of the file, as they come
   (`write`), clusters the image holds rewritten where they are
   (`overwrite`), then (in `finish`) the new L2 tables after the new clusters;
2. ``pointers``: the L2 tables changed in place, then the L1 entries of the
   new ones.

A crash before the pointers leaves each cluster as it was (or, rewritten in
place, with its new content) and unused bytes at the end of the file; after
some of them, each cluster either not written (the old content) or written.
Nothing needs releasing: an old cluster that a new one replaced (a
compressed qcow cluster) is no longer named, and space in the file is never
reused, as qemu never reuses it either.
"""

from __future__ import annotations

from array import array

from instar.errors import FormatError
from instar.formats.cluster_tables import ClusterTableDriver
from instar.mutate import ImageUpdate, UnitWrites
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Literal


class ClusterTableWriter:
    """Whole guest clusters written into ``driver``'s image through ``update``.

    A format's subclass sets the class attributes and calls ``__init__`` with
    its geometry; it says where a table may lie (`table_valid`) and how it is
    read (`read_table`)."""

    BYTEORDER: Literal["big", "little"] = "big"
    ZERO_ENTRY: int | None = None  # the L2 entry of a zero cluster; None: none (zeros stored)
    COMPRESSED_FLAG = 0  # the bit of a compressed cluster's L2 entry; 0: none
    NAME = ""  # the format's name, in messages

    def __init__(self, driver: ClusterTableDriver, update: ImageUpdate, *, l1_offset: int,
                 l1: array[int], cluster: int, entries: int, table_bytes: int) -> None:
        self.driver = driver
        self.update = update
        self.unit = self.cluster = cluster
        self.entries = entries  # guest clusters one L2 table maps
        self.table_bytes = table_bytes  # one L2 table on disk
        self.l1_offset = l1_offset
        self.l1 = l1
        # New clusters from the first whole cluster past the end of the file on.
        self._units = UnitWrites(update, unit=cluster, first=-(-driver.file.size // cluster),
                                 size=driver.file.size)
        self._entries: dict[int, dict[int, int]] = {}  # L1 index -> {slot: L2 entry}
        self._verified = False
        self._last_table: tuple[int, bytes] = (0, b"")  # `overwrite` reads one at a time

    # --- what a format supplies --------------------------------------------------------------

    def table_valid(self, offset: int) -> bool:
        """Whether an L2 table at ``offset`` lies where the reader accepts one."""
        raise NotImplementedError

    def read_table(self, offset: int) -> bytes:
        """The ``table_bytes`` of the L2 table at ``offset`` (checked valid)."""
        raise NotImplementedError

    # --- writing -----------------------------------------------------------------------------

    @property
    def changed(self) -> bool:
        return bool(self._entries)

    def _slot(self, guest_cluster: int) -> tuple[int, int]:
        """(L1 index, slot) of a guest cluster, its L2 table checked first."""
        index, slot = divmod(guest_cluster, self.entries)
        if index >= len(self.l1):
            raise FormatError(f"{self.NAME} guest cluster {guest_cluster} lies past the "
                              "L1 table")
        if index not in self._entries:
            offset = self.l1[index]
            if offset and not self.table_valid(offset):
                raise FormatError(f"L2 table offset {offset:#x} is invalid (L1 index "
                                  f"{index:#x})")
        return index, slot

    def write(self, guest_cluster: int, data: bytes | None) -> None:
        """Give guest cluster ``guest_cluster`` (one the image does not hold)
        the bytes ``data`` (a whole cluster), or zeros when None: a zero
        cluster where the format has them, else a cluster of zero bytes. Its
        L2 table is checked before anything is written for it."""
        index, slot = self._slot(guest_cluster)
        self.update.phase("data")
        if data is None and self.ZERO_ENTRY is not None:
            entry = self.ZERO_ENTRY
        else:
            content = bytes(self.cluster) if data is None else data
            entry = self._units.host(self._units.append(content))
        self._entries.setdefault(index, {})[slot] = entry

    def overwrite(self, guest_cluster: int, data: bytes | None) -> None:
        """Like `write`, for a cluster the image may hold (commit's base): a
        data cluster is rewritten where it is (None: with zero bytes, as qemu
        writes zeros into an allocated cluster); a zero cluster stays one for
        None; a compressed one is replaced by a new cluster. Every table and
        cluster of the image is checked first (placement and aliasing, by
        mapping it all), so no write lands in a cluster two entries name."""
        if not self._verified:
            for _ in self.driver.map(0, self.driver.virtual_size):
                pass
            self._verified = True
        index, slot = self._slot(guest_cluster)
        if slot in self._entries.get(index, {}):
            raise AssertionError("a guest cluster overwritten twice")
        offset = self.l1[index]
        entry = 0
        if offset:
            if self._last_table[0] != offset:
                self._last_table = (offset, self.read_table(offset))
            entry = int.from_bytes(self._last_table[1][slot * 8 : slot * 8 + 8], self.BYTEORDER)
        if entry == 0 or entry & self.COMPRESSED_FLAG:
            self.write(guest_cluster, data)
        elif entry == self.ZERO_ENTRY:
            if data is not None:
                self.write(guest_cluster, data)
        else:
            self.update.phase("data")
            self._units.rewrite(entry, bytes(self.cluster) if data is None else data)

    def finish(self) -> None:
        """The new L2 tables, then the pointers (phases data and pointers)."""
        self._units.flush()
        if not self._entries:
            return
        update = self.update
        in_place: list[tuple[int, bytes]] = []
        placed: list[tuple[int, bytes]] = []  # (L1 index, table) for new tables
        for index in sorted(self._entries):
            offset = self.l1[index]
            table = bytearray(self.read_table(offset) if offset else self.table_bytes)
            for slot, entry in self._entries[index].items():
                table[slot * 8 : slot * 8 + 8] = entry.to_bytes(8, self.BYTEORDER)
            (in_place if offset else placed).append((offset or index, bytes(table)))
        tables = self._units.host(self._units.next_number)
        room = -(-self.table_bytes // self.cluster) * self.cluster  # whole clusters each
        update.phase("data")
        for number, (_, content) in enumerate(placed):
            update.write(tables + number * room, content)
        update.phase("pointers")
        self._units.pointing()
        for offset, content in in_place:
            update.write(offset, content)
        for number, (index, _) in enumerate(placed):
            where = self.l1_offset + 8 * index
            update.write(where, (tables + number * room).to_bytes(8, self.BYTEORDER))

    def abandon(self) -> None:
        """After a failure before `finish` pointed at anything: the file cut
        back to its old length."""
        self._units.abandon()

    def refcount_table(self) -> tuple[int, int] | None:
        return None  # no refcounts

    def write_header(self) -> None:
        """Nothing: the header names no table these writes change."""

    def release(self) -> None:
        """Nothing to release: nothing counts references."""
