"""Writing Parallels images sequentially, laid out as qemu-img lays them out.

Version 2 (``WithouFreSpacExt``): the header and the catalog, padded to a
whole cluster (``data_off``), then the clusters in the order they are first
written, which is the order of the disk (the copy engine writes in
increasing offsets), so ``qemu-img check`` finds nothing fragmented. The
catalog (4 bytes a cluster) is the only state kept; the header and catalog
are written by ``close``, which cuts the file at the end of the last cluster
(``qemu-img check`` counts anything after it as leaked).

Zero data is never stored: a cluster that only ever sees ``write_zeroes``
stays unallocated (entry 0); inside an allocated cluster what is not written
stays a hole of the file and reads as zeros (explicit zeros on a block
device, where a cluster is zero-filled when it is allocated).
"""

from __future__ import annotations

import os
from array import array

from instar.errors import CreationError, ImageOpenError
from instar.files import pwrite_all, write_zeros
from instar.formats.base import Measurement, MeasureSource, OutputFile, ParsedOptions
from instar.formats.common import pack_table, unit_spans
from instar.formats.parallels.layout import (
    MAX_CREATE_CLUSTER_SIZE,
    MAX_IMAGE_FACTOR,
    MAX_TRACKS,
    SECTOR,
    catalog_end,
    new_header,
)
from instar.runtime_types import NamedTuple
from instar.safety import MAX_TABLE_BYTES

_UINT64 = (1 << 64) - 1


class Plan(NamedTuple):
    """A new image: its disk and cluster sizes and catalog entries."""

    size: int
    cluster_size: int
    entries: int

    @property
    def data_start(self) -> int:
        """Where the first cluster goes: after the header and catalog, to a cluster."""
        return new_header(self.size, self.cluster_size, self.entries).data_off * SECTOR


def plan(virtual_size: int, options: ParsedOptions, target: str) -> Plan:
    """The image ``qemu-img create`` would make, refused as it refuses it.

    qemu rounds both sizes up to a sector (the cluster size as a 64-bit
    number, which can wrap to 0), then checks the cluster size and the
    number of clusters; ``-o size`` is ignored (convert sets the size).
    """
    cluster_size = _round_up(options.number("cluster_size"))
    size = _round_up(virtual_size)
    if cluster_size >= MAX_CREATE_CLUSTER_SIZE:
        raise CreationError("Cluster size is too large")
    if size >= MAX_IMAGE_FACTOR * cluster_size:
        raise CreationError("Image size is too large for this cluster size")
    if cluster_size // SECTOR > MAX_TRACKS:
        # qemu-img creates it, then cannot open what it created.
        raise ImageOpenError(target, "Invalid image: Too big cluster")
    entries = -(-size // cluster_size)
    if entries * 4 > MAX_TABLE_BYTES:
        raise CreationError(
            f"a catalog of {entries} entries is over instar's limit of {MAX_TABLE_BYTES} bytes "
            "(choose a larger cluster_size)"
        )
    return Plan(size, cluster_size, entries)


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """What ``measure -O parallels`` answers (qemu 7.2 has no figures for it),
    by the writer's layout: header and catalog to a cluster, then each
    cluster with data. The image that would be refused is named as the
    output, which measure has none of."""
    new = plan(source.virtual_size if source is not None else size, options, "<output>")
    used = source.data_units(new.cluster_size) if source is not None else 0
    return Measurement(new.data_start + used * new.cluster_size,
                       new.data_start + new.entries * new.cluster_size)


def create_writer(out: OutputFile, virtual_size: int, options: ParsedOptions) -> ParallelsWriter:
    """A writer for a new image of ``virtual_size`` bytes, refused as qemu-img refuses it."""
    new = plan(virtual_size, options, out.name)
    return ParallelsWriter(out, new.size, new.cluster_size, new.entries)


def _round_up(value: int) -> int:
    """qemu's ROUND_UP to a sector, on an unsigned 64-bit number."""
    return (value + SECTOR - 1) // SECTOR * SECTOR & _UINT64


class ParallelsWriter:
    """A Parallels image written front to back; metadata is written by ``close``."""

    def __init__(self, out: OutputFile, size: int, cluster_size: int, entries: int) -> None:
        self._out = out
        self._header = new_header(size, cluster_size, entries)
        self._cluster = cluster_size
        self._catalog = array("I", bytes(4 * entries))
        assert self._catalog.itemsize == 4
        self._next_free = self._header.data_off * SECTOR  # where the next cluster goes

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for index, within, start, step in unit_spans(offset, len(data), self._cluster):
            host = self._host(index)
            pwrite_all(self._out.fd, view[start : start + step], host + within)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to do: what is not written reads as zeros (see module notes)."""

    def _host(self, index: int) -> int:
        """Cluster ``index``'s offset in the file, allocated at the end on first use."""
        entry = self._catalog[index]
        if entry:
            return entry * self._cluster
        host = self._next_free
        self._catalog[index] = host // self._cluster
        self._next_free += self._cluster
        if self._out.in_place:  # old device contents must not show through
            write_zeros(self._out.fd, host, self._cluster)
        return host

    def close(self) -> None:
        fd = self._out.fd
        table_end = catalog_end(len(self._catalog))
        pwrite_all(fd, self._header.pack() + pack_table(self._catalog, 4, "little"), 0)
        if self._out.in_place:
            write_zeros(fd, table_end, self._header.data_off * SECTOR - table_end)
        else:
            os.ftruncate(fd, self._next_free)

    def abort(self) -> None:
        pass
