"""Where a preallocated qcow2 image keeps its clusters (``preallocation=``).

Every guest cluster and every L2 table of a preallocated image is allocated
when the image is created, so where each one lives is fixed by arithmetic
before any data arrives: the writer (`writer.Qcow2Writer`) sends guest data
straight to its host offset, leaves what is never written as the mode left
it, and fills each L2 table as the copy passes its range.

Layouts, after the header and the L1 table (``base``, in clusters), as
qemu-img 7.2 lays out the data (``qemu-img map`` runs):

- ``metadata``: each L2 table right before the data clusters it maps, as
  qemu's ``preallocate_co`` allocates them (table, its range, next table...);
- ``falloc`` and ``full``: every L2 table first, then all data clusters in
  one run, as qemu's preallocating truncate places the data.

qemu also puts its refcount table and block before the L1 table; instar's
come after the data (`RefcountTracker`), so host offsets differ from qemu's
by a few clusters while the runs, their kinds and the file's length agree.
"""

from __future__ import annotations


class PreallocatedLayout:
    """Host cluster indexes of the tables and data of a preallocated image."""

    def __init__(self, mode: str, base: int, guest_clusters: int, l2_entries: int) -> None:
        self.mode = mode
        self.base = base
        self.guest_clusters = guest_clusters
        self.entries = l2_entries
        self.tables = -(-guest_clusters // l2_entries)
        self.interleaved = mode == "metadata"

    @property
    def total(self) -> int:
        """Clusters the tables and data take, from ``base`` on."""
        return self.tables + self.guest_clusters

    def table(self, index: int) -> int:
        """The host cluster of L2 table ``index``."""
        if self.interleaved:
            return self.base + index * (self.entries + 1)
        return self.base + index

    def data(self, cluster: int) -> int:
        """The host cluster of guest cluster ``cluster``."""
        if self.interleaved:
            index, within = divmod(cluster, self.entries)
            return self.table(index) + 1 + within
        return self.base + self.tables + cluster

    def range_clusters(self, index: int) -> int:
        """Guest clusters L2 table ``index`` maps (the last may map fewer)."""
        return min(self.entries, self.guest_clusters - index * self.entries)

    def filled(self) -> tuple[int, int]:
        """(first host cluster, count) of the data of a ``falloc`` or ``full``
        image: one run, which the mode fills when the image is created."""
        assert not self.interleaved
        return self.data(0), self.guest_clusters
