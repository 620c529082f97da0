"""Writing qcow (version 1) images sequentially, as the copy engine feeds them.

The layout qemu-img create starts from: the 48-byte header, the L1 table
right after it, then, as the data arrives in guest order, 4 KiB data
clusters (cluster-aligned) with each L2 table (512 entries, one cluster)
right after the data of its range (the shared `ClusterTables`). Zero data is
never stored: unallocated clusters read as zeros. With ``-c`` every cluster
is compressed on a small thread pool (raw deflate, as qemu's) and written
sector-aligned after the previous one, as qemu places them; a cluster that
does not shrink is stored as it is.

qemu cannot make or open an image of size 0: such a window fails before
anything is written, in qemu's words. instar keeps the L1 table within its
table limit (32 MiB: 8 TiB of disk); qemu has no such limit.
"""

from __future__ import annotations

import os

from instar.errors import CreationError
from instar.files import pwrite_all
from instar.formats.base import Measurement, MeasureSource, OutputFile, ParsedOptions
from instar.formats.cluster_writer import Bump, ClusterImageWriter, ClusterTables, raw_deflate
from instar.formats.common import CompressionPool, UnitSequencer
from instar.formats.qcow import MAGIC, VERSION
from instar.formats.qcow import layout as L
from instar.safety import MAX_TABLE_BYTES

CLUSTER = 1 << L.CLUSTER_BITS
L2_RANGE = CLUSTER << L.L2_BITS  # the guest bytes one L2 table maps


def create_writer(out: OutputFile, virtual_size: int, options: ParsedOptions) -> QcowWriter:
    """Refuse what qemu cannot create (an empty image), then start writing ``out``."""
    return QcowWriter(out, virtual_size, l1_entries_for(virtual_size), options.compress)


def l1_entries_for(virtual_size: int) -> int:
    """The L1 table's entries for a new image, or why it cannot be made."""
    if virtual_size == 0:
        raise CreationError("Image size is too small, cannot be zero length")
    entries = L.l1_entries(virtual_size, L.CLUSTER_BITS, L.L2_BITS)
    if entries * 8 > MAX_TABLE_BYTES:
        raise CreationError(
            f"the L1 table of a qcow image of {virtual_size} bytes would be over instar's "
            f"limit of {MAX_TABLE_BYTES} bytes"
        )
    return entries


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """What ``measure -O qcow`` answers (qemu 7.2 has no figures for qcow), by
    the writer's layout: the header and L1 table, then from the next cluster
    on each cluster with data and one L2 table per range with data. ``-c``
    only shrinks the clusters, so the figures hold for it too."""
    size = -(-(source.virtual_size if source is not None else size) // L.SECTOR) * L.SECTOR
    tables_end = L.HEADER.size + l1_entries_for(size) * 8
    first = -(-tables_end // CLUSTER) * CLUSTER
    fully = first + (-(-size // CLUSTER) + -(-size // L2_RANGE)) * CLUSTER
    if source is None:
        return Measurement(tables_end, fully)
    used = source.data_units(CLUSTER) + source.data_units(L2_RANGE)
    return Measurement(first + used * CLUSTER if used else tables_end, fully)


class QcowWriter(ClusterImageWriter):
    """A `Writer` for qcow: data in increasing guest offsets, metadata at ``close``."""

    def __init__(self, out: OutputFile, virtual_size: int, l1_entries: int,
                 compress: bool) -> None:
        self._out = out
        self._size = virtual_size
        cluster = CLUSTER
        self._l1_offset = L.HEADER.size  # 8-byte aligned already
        self._l1_bytes = l1_entries * 8
        self._space = Bump(self._l1_offset + self._l1_bytes, cluster)
        self._tables = ClusterTables(
            out.fd, cluster_bits=L.CLUSTER_BITS, l1_entries=l1_entries, l2_entries=1 << L.L2_BITS,
            table_bytes=8 << L.L2_BITS, byteorder="big", allocate=self._space.allocate,
        )
        self._clusters = UnitSequencer(cluster, virtual_size, self._store)
        self._pool = None
        if compress:
            self._pool = CompressionPool(cluster, lambda: raw_deflate(cluster),
                                         self._store_compressed, name="qcow-compress")

    def _finish(self) -> None:
        header = L.Header(
            magic=MAGIC, version=VERSION, backing_file_offset=0, backing_file_size=0,
            mtime=0, size=self._size, cluster_bits=L.CLUSTER_BITS, l2_bits=L.L2_BITS,
            padding=0, crypt_method=L.CRYPT_NONE, l1_table_offset=self._l1_offset,
        )
        pwrite_all(self._out.fd, header.pack(), 0)
        if not self._out.in_place:
            os.ftruncate(self._out.fd, self._space.end)

    def _place_compressed(self, data: bytes) -> int:
        """Sector-aligned after the previous piece, as qemu places it."""
        host = self._space.allocate(len(data), L.SECTOR)
        pwrite_all(self._out.fd, data, host)
        return L.compressed_entry(host, len(data), L.CLUSTER_BITS)
