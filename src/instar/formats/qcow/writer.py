"""Writing qcow (version 1) images sequentially, as the copy engine feeds them.

The layout qemu-img create starts from: the 48-byte header, a backing
file's name (``create -b``; then qemu's 512-byte clusters and 4096-entry L2
tables), the L1 table at the next multiple of 8, then, as the data arrives
in guest order, 4 KiB data clusters (cluster-aligned) with each L2 table (512 entries, one cluster)
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

from instar.errors import CreationError, UnsupportedError
from instar.files import pwrite_all
from instar.formats.base import Measurement, MeasureSource, OutputFile, ParsedOptions
from instar.formats.cluster_writer import Bump, ClusterImageWriter, ClusterTables, raw_deflate
from instar.formats.common import CompressionPool, UnitSequencer
from instar.formats.qcow import MAGIC, VERSION
from instar.formats.qcow import layout as L
from instar.safety import MAX_TABLE_BYTES

MAX_BACKING_NAME = 1023  # qemu's qcow driver opens no image naming a longer one
# qemu's geometry for an image with a backing file: 512-byte clusters (less to
# copy from the backing file on a write), 4096-entry L2 tables; the L2 range,
# and so the L1 table, is the same.
BACKING_CLUSTER_BITS, BACKING_L2_BITS = 9, 12
CLUSTER = 1 << L.CLUSTER_BITS
L2_RANGE = CLUSTER << L.L2_BITS  # the guest bytes one L2 table maps


def create_writer(out: OutputFile, virtual_size: int, options: ParsedOptions) -> QcowWriter:
    """Refuse what qemu cannot create (an empty image), then start writing ``out``."""
    name = None
    if options.backing is not None:
        name = options.backing.name.encode("utf-8", "surrogateescape")
        if len(name) > MAX_BACKING_NAME:  # qemu writes it, then cannot open the image
            raise UnsupportedError(f"a qcow backing file name over {MAX_BACKING_NAME} bytes "
                                   "is not supported")
    return QcowWriter(out, virtual_size, l1_entries_for(virtual_size), options.compress, name)


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
                 compress: bool, backing_name: bytes | None = None) -> None:
        self._out = out
        self._size = virtual_size
        self._bits, l2_bits = ((BACKING_CLUSTER_BITS, BACKING_L2_BITS) if backing_name
                               else (L.CLUSTER_BITS, L.L2_BITS))
        self._l2_bits = l2_bits
        cluster = 1 << self._bits
        # The backing file's name right after the header, then the L1 table
        # at the next multiple of 8, as qemu lays them out.
        self._backing_name = backing_name or b""
        self._l1_offset = -(-(L.HEADER.size + len(self._backing_name)) // 8) * 8
        self._l1_bytes = l1_entries * 8
        self._space = Bump(self._l1_offset + self._l1_bytes, cluster)
        self._tables = ClusterTables(
            out.fd, cluster_bits=self._bits, l1_entries=l1_entries, l2_entries=1 << l2_bits,
            table_bytes=8 << l2_bits, byteorder="big", allocate=self._space.allocate,
        )
        self._clusters = UnitSequencer(cluster, virtual_size, self._store)
        self._pool = None
        if compress:
            self._pool = CompressionPool(cluster, lambda: raw_deflate(cluster),
                                         self._store_compressed, name="qcow-compress")

    def _finish(self) -> None:
        name = self._backing_name
        header = L.Header(
            magic=MAGIC, version=VERSION, backing_file_offset=L.HEADER.size if name else 0,
            backing_file_size=len(name), mtime=0, size=self._size,
            cluster_bits=self._bits, l2_bits=self._l2_bits, padding=0,
            crypt_method=L.CRYPT_NONE, l1_table_offset=self._l1_offset,
        )
        data = header.pack() + name
        pwrite_all(self._out.fd, data + bytes(self._l1_offset - len(data)), 0)
        if not self._out.in_place:
            os.ftruncate(self._out.fd, self._space.end)

    def _place_compressed(self, data: bytes) -> int:
        """Sector-aligned after the previous piece, as qemu places it."""
        host = self._space.allocate(len(data), L.SECTOR)
        pwrite_all(self._out.fd, data, host)
        return L.compressed_entry(host, len(data), self._bits)
