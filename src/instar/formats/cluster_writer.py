"""Writing cluster-table images sequentially (qcow2, qcow, QED): the table side.

Data arrives in guest order (`UnitSequencer` hands on whole, non-zero
clusters); each run of clusters is written where the format allocates it and
recorded in the L2 table of its range. Only the L1 table and the one L2 table
being filled are in memory: an L2 table is written into space allocated
right after the data it maps, as soon as the copy moves past its range, and
the L1 table at the end. Clusters never written stay unallocated (entry 0)
and read as zeros. The formats differ only in parameters: byte order, the
size of a table, flags on entries, and how host space is allocated (qcow2
counts references; qcow and QED simply grow the file, `Bump`).
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Callable

from instar.files import pwrite_all
from instar.formats.common import CompressionPool, UnitSequencer, pack_table
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Literal

L1_PIECE_ENTRIES = 1 << 16  # L1 entries packed and written at a time (512 KiB)
ZERO_CHECK_BELOW = 64 << 10  # the copy engine already skips zero pieces this large
RAW_DEFLATE_WBITS = -12  # raw deflate with a 4 KiB window: qcow2's zlib and qcow's


class Bump:
    """Host space handed out upwards from ``start``, each piece aligned:
    a new image that keeps no reference counts (qcow, QED)."""

    def __init__(self, start: int, cluster: int) -> None:
        self.end = start  # the end of what is allocated: the file's length
        self._cluster = cluster

    def allocate(self, length: int, align: int = 0) -> int:
        """``length`` bytes at the next multiple of ``align`` (default: a cluster)."""
        align = align or self._cluster
        start = -(-self.end // align) * align
        self.end = start + length
        return start


class ClusterTables:
    """The L1 table and the L2 table being filled of an image written in guest order.

    ``allocate(length)`` returns where ``length`` new bytes go (whole
    clusters). Data entries get ``entry_flags`` (qcow2's COPIED) and, with
    ``stride`` 2 (qcow2's extended L2 entries), ``bitmap`` after them; L1
    entries get ``table_flags``. ``table_at`` places every L2 table in advance,
    table ``i`` at ``table_at(i)`` (a preallocated qcow2, whose tables all
    exist): then nothing is allocated for tables and the L1 table is
    computed, not kept.
    """

    def __init__(
        self,
        fd: int,
        *,
        cluster_bits: int,
        l1_entries: int,
        l2_entries: int,
        table_bytes: int,
        byteorder: Literal["big", "little"],
        allocate: Callable[[int], int],
        entry_flags: int = 0,
        table_flags: int = 0,
        stride: int = 1,
        bitmap: int = 0,
        table_at: Callable[[int], int] | None = None,
    ) -> None:
        self.l1_entries = l1_entries
        # Only the entries set: an image's L1 table is mostly zeros (32 MiB
        # of them for 2 PiB of qcow2), and is written a piece at a time.
        self._l1: dict[int, int] = {}
        self._fd = fd
        self._bits = cluster_bits
        self._entries = l2_entries
        self._table_bytes = table_bytes
        self._byteorder: Literal["big", "little"] = byteorder
        self._allocate = allocate
        self._entry_flags = entry_flags
        self._table_flags = table_flags
        self._stride = stride
        self._bitmap = bitmap
        self._table_at = table_at
        self._empty = bytes(8 * l2_entries * stride)
        self._index = -1  # the L1 index of the L2 table being filled
        self._table = array("Q")

    def store(self, first: int, data: memoryview) -> None:
        """Allocate and write the whole guest clusters ``data`` from ``first`` on."""
        count = len(data) >> self._bits
        host = self._allocate(len(data))
        pwrite_all(self._fd, data, host)
        flags, bitmap = self._entry_flags, self._bitmap
        for i in range(count):
            self.set(first + i, (host + (i << self._bits)) | flags, bitmap)

    def set(self, index: int, entry: int, bitmap: int = 0) -> None:
        """Record guest cluster ``index`` in its L2 table, writing out the previous table."""
        slot = self._slot(index) * self._stride
        self._table[slot] = entry
        if self._stride == 2:
            self._table[slot + 1] = bitmap

    def map_run(self, first: int, host: int, count: int) -> None:
        """Point ``count`` guest clusters from ``first`` at the host clusters
        from ``host`` on, without writing them (preallocation: the space is
        the caller's to fill). Extended entries get an empty bitmap, as
        qemu's preallocation leaves them: every subcluster unallocated."""
        step = 1 << self._bits
        while count:
            slot = self._slot(first)
            n = min(count, self._entries - slot)
            start = host | self._entry_flags
            entries = array("Q", range(start, start + n * step, step))
            stride = self._stride
            self._table[slot * stride : (slot + n) * stride : stride] = entries
            first, host, count = first + n, host + n * step, count - n

    def add_bitmap(self, index: int, bits: int) -> None:
        """Set ``bits`` in guest cluster ``index``'s extended L2 bitmap."""
        self._table[self._slot(index) * 2 + 1] |= bits

    def _slot(self, index: int) -> int:
        """Guest cluster ``index``'s place in the table being filled, which
        becomes its L2 table (the previous one written out)."""
        l1_index = index // self._entries
        if l1_index != self._index:
            self.flush()
            self._index = l1_index
            self._table = array("Q", self._empty)
        return index - l1_index * self._entries

    def flush(self) -> None:
        """Write the L2 table being filled, if any, and point the L1 table at it."""
        if self._index < 0:
            return
        if self._table_at is not None:
            host = self._table_at(self._index)
        else:
            host = self._allocate(self._table_bytes)
            self._l1[self._index] = host | self._table_flags
        data = pack_table(self._table, 8, self._byteorder, size=self._table_bytes)
        pwrite_all(self._fd, data, host)
        self._index, self._table = -1, array("Q")

    def write_l1(self, offset: int, size: int) -> None:
        """Write the last L2 table, then the L1 table at ``offset``, padded
        with zeros to ``size`` bytes (a multiple of 8), a piece at a time."""
        self.flush()
        total = size // 8
        pointers = sorted(self._l1.items())  # set in guest order already: cheap
        next_pointer = 0
        for first in range(0, total, L1_PIECE_ENTRIES):
            count = min(L1_PIECE_ENTRIES, total - first)
            piece = array("Q", bytes(8)) * count
            if self._table_at is not None:  # every table, placed in advance
                table_at, flags = self._table_at, self._table_flags
                for i in range(first, min(first + count, self.l1_entries)):
                    piece[i - first] = table_at(i) | flags
            while next_pointer < len(pointers) and pointers[next_pointer][0] < first + count:
                index, entry = pointers[next_pointer]
                piece[index - first] = entry
                next_pointer += 1
            pwrite_all(self._fd, pack_table(piece, 8, self._byteorder), offset + first * 8)


class ClusterImageWriter:
    """The `Writer` side qcow2 and qcow share: whole guest clusters from a
    `UnitSequencer` go to a compression pool (``-c``) or straight into the
    `ClusterTables`; ``close`` finishes the data and the L1 table, then lets
    the format write the rest (`_finish`: its header). A subclass sets the
    attributes below in its ``__init__`` (its sequencer and pool call `_store`
    and `_store_compressed`) and says where compressed data goes
    (`_place_compressed`)."""

    _clusters: UnitSequencer
    _pool: CompressionPool[bytes | None] | None
    _tables: ClusterTables
    _l1_offset: int
    _l1_bytes: int

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._clusters.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to store: unallocated clusters read as zeros, on a device too."""
        self._clusters.write_zeroes(offset, length)

    def close(self) -> None:
        try:
            self._clusters.flush()
            if self._pool is not None:
                self._pool.finish()
            self._tables.write_l1(self._l1_offset, self._l1_bytes)
            self._finish()
        finally:
            if self._pool is not None:  # the threads end here, whatever happened
                self._pool.close()

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _store(self, first: int, data: memoryview) -> None:
        """Whole guest clusters from ``first`` on: to the pool, or stored as they are."""
        if self._pool is not None:
            self._pool.submit(first, data)
        else:
            self._tables.store(first, data)

    def _store_compressed(self, index: int, cluster: memoryview, compressed: bytes | None) -> None:
        """Place guest cluster ``index`` as the pool delivers it, in guest order."""
        if compressed is None:  # it did not shrink: store it as it is
            self._tables.store(index, cluster)
        else:
            self._tables.set(index, self._place_compressed(compressed))

    def _place_compressed(self, data: bytes) -> int:
        """Write one cluster's compressed ``data``; returns its L2 entry."""
        raise NotImplementedError

    def _finish(self) -> None:
        """After the data and the L1 table: the header, the file's length."""
        raise NotImplementedError


def raw_deflate(cluster_size: int) -> Callable[[memoryview], bytes | None]:
    """A function compressing one cluster as qemu's qcow2 and qcow do (raw
    deflate, 4 KiB window); None when the result would not be smaller."""

    def compress(data: memoryview) -> bytes | None:
        engine = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, RAW_DEFLATE_WBITS, 9)
        out = engine.compress(data) + engine.flush()
        return out if len(out) < cluster_size else None

    return compress
