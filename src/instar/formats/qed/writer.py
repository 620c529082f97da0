"""Writing QED images sequentially, as the copy engine feeds them.

The layout qemu-img starts from: the header cluster (a backing file's name,
``create -b``, right after the 64-byte header), then the L1 table
(``table_size`` clusters). Data clusters follow in guest order, each L2 table
written right after the data it maps (the shared `ClusterTables`); the file
ends with the last of them, so ``qemu-img check`` finds every cluster in use
and none leaked. Zero data is never stored: unallocated clusters read as
zeros. The header is written last, without the need-check feature: the
image is consistent once it is complete.

Options are checked as qemu 7.2 checks them, with its messages: ``table_size``
is read a second time as a QAPI integer (``table_size=2k`` passes qemu's
option parser, then fails), both sizes are cut to 32 bits as qemu stores
them, and a table of one cluster, which qemu creates but cannot open, fails
as qemu-img then fails.
"""

from __future__ import annotations

import os

from instar.errors import CreationError, ImageOpenError, UnsupportedError
from instar.files import pwrite_all
from instar.formats.base import Measurement, MeasureSource, OutputFile, ParsedOptions
from instar.formats.cluster_writer import ZERO_CHECK_BELOW, Bump, ClusterTables
from instar.formats.common import UnitSequencer
from instar.formats.options import BackingReference, qapi_int
from instar.formats.qed import MAGIC
from instar.formats.qed import layout as L

UINT32_MASK = (1 << 32) - 1


def create_writer(out: OutputFile, virtual_size: int, options: ParsedOptions) -> QedWriter:
    """Check the options (before any data), then start writing ``out``."""
    cluster, table_size = check_options(options, virtual_size)
    if table_size == 1:
        # qemu-img creates it, then fails to open what it created.
        raise ImageOpenError(out.name, "QED table offset is invalid")
    backing = options.backing
    if backing is not None and L.HEADER.size + len(_name(backing)) > cluster:
        raise UnsupportedError("a backing file name that does not fit in the QED header "
                               "cluster is not supported")
    # qemu puts the L1 table at the cluster size as given, before its cut to 32 bits.
    return QedWriter(out, virtual_size, cluster, table_size, options.number("cluster_size"),
                     backing)


def _name(backing: BackingReference) -> bytes:
    return backing.name.encode("utf-8", "surrogateescape")


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """What ``measure -O qed`` answers (qemu 7.2 has no figures for qed), by
    the writer's layout: the header up to the L1 table, the L1 table, then
    each cluster with data and one L2 table per range with data."""
    size = -(-(source.virtual_size if source is not None else size) // L.SECTOR) * L.SECTOR
    cluster, table_size = check_options(options, size)
    table_bytes = table_size * cluster
    first = options.number("cluster_size") + table_bytes  # where the writer's Bump starts
    l2_range = table_bytes // 8 * cluster  # the guest bytes one L2 table maps
    fully = first + -(-size // cluster) * cluster + -(-size // l2_range) * table_bytes
    if source is None:
        return Measurement(first, fully)
    used = source.data_units(cluster) * cluster + source.data_units(l2_range) * table_bytes
    return Measurement(first + used, fully)


def check_options(options: ParsedOptions, virtual_size: int) -> tuple[int, int]:
    """(cluster size, table size) for a new image, or qemu's refusal."""
    table_text = options.texts.get("table_size")
    table_size = (
        qapi_int("table-size", table_text) if table_text is not None
        else options.number("table_size")
    ) & UINT32_MASK
    cluster = options.number("cluster_size") & UINT32_MASK
    if not L.cluster_size_valid(cluster):
        raise CreationError(
            f"QED cluster size must be within range [{L.MIN_CLUSTER_SIZE}, "
            f"{L.MAX_CLUSTER_SIZE}] and power of 2"
        )
    if not L.table_size_valid(table_size):
        raise CreationError(
            f"QED table size must be within range [{L.MIN_TABLE_SIZE}, {L.MAX_TABLE_SIZE}] "
            "and power of 2"
        )
    if not L.image_size_valid(virtual_size, cluster, table_size):
        raise CreationError(
            "QED image size must be a non-zero multiple of cluster size and less than "
            f"{L.max_image_size(cluster, table_size)} bytes"
        )
    return cluster, table_size


class QedWriter:
    """A `Writer` for QED: data in increasing guest offsets, metadata at ``close``."""

    def __init__(self, out: OutputFile, virtual_size: int, cluster: int, table_size: int,
                 l1_offset: int, backing: BackingReference | None = None) -> None:
        self._out = out
        self._backing = backing
        self._size = virtual_size
        self._cluster = cluster
        self._table_size = table_size
        self._l1_offset = l1_offset
        bits = cluster.bit_length() - 1
        entries = cluster * table_size // 8
        table_bytes = table_size * cluster
        self._space = Bump(l1_offset + table_bytes, cluster)  # the header, then the L1 table
        self._tables = ClusterTables(
            out.fd, cluster_bits=bits, l1_entries=-(-virtual_size // (entries * cluster)),
            l2_entries=entries, table_bytes=table_bytes, byteorder="little",
            allocate=self._space.allocate,
        )
        # Clusters smaller than the copy engine's zero granularity may arrive
        # all zero; larger ones arrive already free of zero pieces.
        self._clusters = UnitSequencer(cluster, virtual_size, self._tables.store,
                                       check_whole=cluster < ZERO_CHECK_BELOW)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._clusters.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to store: unallocated clusters read as zeros, on a device too."""
        self._clusters.write_zeroes(offset, length)

    def close(self) -> None:
        cluster = self._cluster
        self._clusters.flush()
        self._tables.write_l1(self._l1_offset, self._table_size * cluster)
        name, features = b"", 0
        if self._backing is not None:  # the name right after the header, as qemu's
            name, features = _name(self._backing), L.FEATURE_BACKING_FILE
            if self._backing.format == "raw":
                features |= L.FEATURE_BACKING_FORMAT_NO_PROBE
        header = L.Header(
            magic=MAGIC, cluster_size=cluster, table_size=self._table_size, header_size=1,
            features=features, compat_features=0, autoclear_features=0,
            l1_table_offset=self._l1_offset, image_size=self._size,
            backing_filename_offset=L.HEADER.size if name else 0,
            backing_filename_size=len(name),
        ).pack() + name
        pwrite_all(self._out.fd, header + bytes(cluster - len(header)), 0)
        if not self._out.in_place:
            os.ftruncate(self._out.fd, self._space.end)

    def abort(self) -> None:
        pass
