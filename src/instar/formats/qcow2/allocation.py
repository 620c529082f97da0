"""qcow2 refcounts changed in place: the allocator every command that changes
an existing qcow2 image shares (resize today; snapshot, rebase, commit and
repair build on it).

`Refcounts` reads refcount blocks on demand, keeps the ones it changes whole,
claims free clusters past the end of the file (with the refcount blocks that
cover them and, when the table cannot name those, a larger refcount table),
and writes its changes through an `ImageUpdate` in that update's order.
"""

from __future__ import annotations

import sys
from array import array

from instar.errors import FormatError, ResizeError
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import MAX_REFTABLE_BYTES, Qcow2Driver
from instar.formats.qcow2.refcounts import read_reftable
from instar.mutate import ImageUpdate


class Refcounts:
    """The refcounts on disk and the changes to make to them, block by block.

    Blocks are read on demand (each checked to lie in the file); changed and
    new blocks are kept whole and written by `changed_blocks`."""

    def __init__(self, driver: Qcow2Driver) -> None:
        header = driver.header
        self.file = driver.file
        self.cluster = header.cluster_size
        self.order = header.refcount_order
        self.width = 1 << self.order
        self.per_block = self.cluster * 8 // self.width
        self.table = read_reftable(self.file, header)
        self.table_offset = header.refcount_table_offset
        self.blocks: dict[int, bytearray] = {}
        self._by_offset: dict[int, bytearray] = {}
        self.changed: set[int] = set()
        self.new: dict[int, int] = {}  # block index -> its new cluster offset
        self.table_clusters = header.refcount_table_clusters
        self.new_table: tuple[int, int] | None = None  # (offset, clusters) of a larger one
        for index, entry in enumerate(self.table):
            offset = entry & L.REFTABLE_OFFSET_MASK
            if offset and (offset % self.cluster or offset + self.cluster > self.file.size):
                raise FormatError(f"qcow2 refcount block {index} lies outside the image")

    def _block(self, index: int) -> bytearray | None:
        if index not in self.blocks:
            offset = self._offset(index)
            if not offset:
                return None
            if offset not in self._by_offset:  # blocks named twice are one block
                self._by_offset[offset] = bytearray(self.file.pread(offset, self.cluster))
            self.blocks[index] = self._by_offset[offset]
        return self.blocks[index]

    def _offset(self, index: int) -> int:
        return self.table[index] & L.REFTABLE_OFFSET_MASK if index < len(self.table) else 0

    def _peek(self, index: int) -> bytes | bytearray | None:
        """Block ``index`` as it stands, without keeping it (a scan reads each
        block of the file at most once, and keeps none of them)."""
        if index in self.blocks:
            return self.blocks[index]
        offset = self._offset(index)
        return self.file.pread(offset, self.cluster) if offset else None

    def get(self, cluster: int) -> int:
        block = self._block(cluster // self.per_block)
        return 0 if block is None else self._value(block, cluster % self.per_block)

    def _value(self, block: bytearray, index: int) -> int:
        if self.width >= 8:
            size = self.width // 8
            return int.from_bytes(block[index * size : (index + 1) * size], "big")
        bit = index * self.width
        return (block[bit // 8] >> (bit % 8)) & ((1 << self.width) - 1)

    def set(self, cluster: int, value: int) -> None:
        """Set a refcount; the block must exist (see `cover`)."""
        index = cluster // self.per_block
        block = self._block(index)
        assert block is not None, "cover the cluster first"
        within = cluster % self.per_block
        if self.width >= 8:
            size = self.width // 8
            block[within * size : (within + 1) * size] = value.to_bytes(size, "big")
        else:
            bit = within * self.width
            mask = ((1 << self.width) - 1) << (bit % 8)
            block[bit // 8] = (block[bit // 8] & ~mask) | (value << (bit % 8))
        self.changed.add(index)

    def add(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to ``count`` clusters from ``first``; refuses a
        refcount that would drop below 0 or pass the width's maximum."""
        ceiling = (1 << self.width) - 1
        for cluster in range(first, first + count):
            value = self.get(cluster) + delta
            if not 0 <= value <= ceiling:
                raise FormatError(f"qcow2 refcount of cluster {cluster:#x} does not match "
                                  "the image's tables; run 'qemu-img check -r all' first")
            self.set(cluster, value)

    def capacity(self) -> int:
        """Refcount blocks the refcount table (the new one, if any) can name."""
        if self.new_table is not None:
            return self.new_table[1] * self.cluster // 8
        return len(self.table)

    def allocate_at_end(self, count: int) -> int:
        """``count`` free clusters past the end of the file and of every cluster
        in use, claimed (refcount 1), with refcount blocks for them and for
        themselves, and a larger refcount table after them if the table cannot
        name those blocks; returns the first one's offset."""
        # Past the file and past every cluster with a refcount (one the file
        # does not hold yet is never reused).
        first = max(-(-self.file.size // self.cluster), self.last_in_use() + 1)
        end = first + count
        while True:
            top = (end - 1) // self.per_block
            missing = [index for index in range(first // self.per_block, top + 1)
                       if self._block(index) is None]
            if not missing and top < self.capacity():
                break
            for index in missing:  # each new block goes right after
                self.new[index] = end * self.cluster
                self.blocks[index] = bytearray(self.cluster)
                self.changed.add(index)
                end += 1
            top = (end - 1) // self.per_block
            if top >= self.capacity():  # a new table, with room for its own blocks
                clusters = 2 * -(-(top + 2) * 8 // self.cluster)
                if clusters * self.cluster > MAX_REFTABLE_BYTES:
                    raise ResizeError("Failed to grow the L1 table: File too large")
                self.new_table = (end * self.cluster, clusters)
                end += clusters
        for cluster in range(first, end):
            self.set(cluster, 1)
        return first * self.cluster

    def write_blocks(self, update: ImageUpdate) -> None:
        """Write every changed block where it lives (new ones at their place)."""
        for index in sorted(self.changed):
            offset = self.new.get(index) or self.table[index] & L.REFTABLE_OFFSET_MASK
            update.write(offset, bytes(self.blocks[index]))
        self.changed.clear()

    def write_new_table(self, update: ImageUpdate) -> None:
        """The new refcount table, if one is needed: the old entries and the
        new blocks' (nothing points at it until the header does)."""
        if self.new_table is None:
            return
        offset, clusters = self.new_table
        entries = array("Q", self.table)
        entries.extend([0] * (clusters * self.cluster // 8 - len(entries)))
        for index, block in self.new.items():
            entries[index] = block
        if sys.byteorder == "little":
            entries.byteswap()
        update.write(offset, entries.tobytes())

    def write_table_entries(self, update: ImageUpdate) -> None:
        """Point the refcount table at the new blocks (a new table has them).
        Consecutive entries go in one write: new blocks count each other, so
        a crash between two of their entries would leave a block in use that
        no refcount counts."""
        if self.new_table is None:
            runs: list[tuple[int, bytearray]] = []
            for index, offset in sorted(self.new.items()):
                if runs and runs[-1][0] + len(runs[-1][1]) // 8 == index:
                    runs[-1][1].extend(offset.to_bytes(8, "big"))
                else:
                    runs.append((index, bytearray(offset.to_bytes(8, "big"))))
            for index, entries in runs:
                update.write(self.table_offset + 8 * index, bytes(entries))

    def release_old_table(self) -> None:
        """Free the old refcount table's clusters once the header names the new one."""
        if self.new_table is not None:
            self.add(self.table_offset // self.cluster, self.table_clusters, -1)

    def table_fields(self) -> tuple[int, int]:
        """The header's refcount table offset and clusters, after the update."""
        if self.new_table is not None:
            return self.new_table
        return self.table_offset, self.table_clusters

    def last_in_use(self) -> int:
        """The last cluster whose refcount is not 0 (-1 if none). Each distinct
        block is read once, from the last one back, until one is in use."""
        seen: set[int] = set()
        for index in range(max(len(self.table), max(self.new, default=-1) + 1) - 1, -1, -1):
            offset = self.new.get(index) or self._offset(index)
            if not offset or (offset in seen and index not in self.blocks):
                continue
            seen.add(offset)
            block = self._peek(index)
            if block is None:
                continue
            used = len(bytes(block).rstrip(b"\0"))
            if not used:
                continue
            if self.width >= 8:
                return index * self.per_block + (used - 1) // (self.width // 8)
            for within in range(min(self.per_block, used * 8 // self.width) - 1, -1, -1):
                if self._value(bytearray(block), within):
                    return index * self.per_block + within
        return -1

    def has_block(self, index: int) -> bool:
        """Whether refcount block ``index`` exists (on disk, or new)."""
        return index in self.new or self._block(index) is not None

    def add_block(self, index: int, offset: int) -> None:
        """A new, empty refcount block ``index`` at ``offset`` (a free cluster
        the caller chose), named by the table entry `write_table_entries`
        writes; the table must have room for it."""
        if index >= self.capacity():
            raise AssertionError("the refcount table has no room for the block")
        self.new[index] = offset
        self.blocks[index] = bytearray(self.cluster)
        self.changed.add(index)
