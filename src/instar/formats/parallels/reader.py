"""Reading Parallels images, version 1 and 2, as qemu 7.2 reads them.

The header is checked in qemu's order with qemu's words; the catalog is read
as far as it covers the disk and lies in the file (qemu reads past the end of
the file as zeros: so does instar, without reading it); the format extension
is checked as qemu loads it (`extension`). The "inuse" mark (an image a
writer did not close) is ignored, as qemu ignores it when it opens an image
read-only; ``qemu-img check`` is where qemu reports it.

Where instar is stricter than qemu (qemu reads such images), reading fails
in one line while ``info`` still describes the image, as ``qemu-img info``
does: a catalog entry whose cluster starts past the end of the file (what
``qemu-img check`` calls a cluster outside the image), and a host cluster
that two catalog entries map, or one over the header, the catalog or the
format extension (`HostClaims`). qemu's catalog index is 32 bits wide: a disk
of more than 2^32 clusters reads cluster ``i + 2^32`` from entry ``i``; that
too is two guest clusters on one host cluster, refused where it happens.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import (
    HostClaims,
    alias_message,
    first_other,
    metadata_alias_message,
    read_le32_table,
)
from instar.formats.parallels.extension import Region, check_extension
from instar.formats.parallels.layout import (
    HEADER_SIZE,
    MAGIC_V1,
    MAGIC_V2,
    MAX_CATALOG_ENTRIES,
    MAX_TRACKS,
    SECTOR,
    VERSION,
    Header,
    catalog_end,
)
from instar.image import DATA, OFFSET_VALID, Driver, Run
from instar.safety import MAX_TABLE_BYTES

_INDEX_RANGE = 1 << 32  # qemu keeps a catalog index in 32 bits


def open_parallels(file: InputFile, resolver: Resolver) -> Driver:
    """Open a Parallels image; raise FormatError (qemu's words) if qemu would not.

    Opened for ``check`` (the resolver's ``checking``), the catalog is not
    read (nor held to instar's table limit): the check reads it itself, a
    piece at a time, and the layer refuses every read."""
    header = Header.parse(file.pread(0, HEADER_SIZE))
    if header.version != VERSION or header.magic not in (MAGIC_V1, MAGIC_V2):
        raise FormatError("Image not in Parallels format")
    if header.tracks == 0:
        raise FormatError("Invalid image: Zero sectors per track")
    if header.tracks > MAX_TRACKS:
        raise FormatError("Invalid image: Too big cluster")
    if header.catalog_entries > MAX_CATALOG_ENTRIES:
        raise FormatError("Catalog too large")
    cluster_size = header.tracks * SECTOR
    regions = [Region(0, catalog_end(header.catalog_entries), "the header and catalog")]
    if header.ext_off:
        regions += check_extension(file, header.ext_off, cluster_size, header.disk_sectors)
    if getattr(resolver, "checking", False):
        driver = ParallelsDriver(file, header, array("I"), regions)
        driver.corruption = "the image was opened for check only: its catalog was not read"
        driver._checked = True
        return driver
    catalog = _read_catalog(file, header, cluster_size)
    return ParallelsDriver(file, header, catalog, regions)


def _read_catalog(file: InputFile, header: Header, cluster_size: int) -> array[int]:
    """The catalog entries that cover the disk and lie in the file; those past
    the end of the file read as 0 (unallocated), as qemu reads them."""
    clusters = -(-header.disk_sectors * SECTOR // cluster_size)
    needed = min(header.catalog_entries, clusters)
    stored = min(needed, -(-max(0, file.size - HEADER_SIZE) // 4))
    if stored * 4 > MAX_TABLE_BYTES:
        raise FormatError(
            f"catalog of {needed} entries is over instar's limit of {MAX_TABLE_BYTES} bytes"
        )
    return read_le32_table(file, HEADER_SIZE, stored)


class ParallelsDriver(Driver):
    """One Parallels image over its catalog.

    qemu answers a run of clusters that follow each other in the file at
    once (data at a valid offset: qemu does not ask the file which of it
    reads as zeros), and a stretch of unallocated clusters at once (nothing
    here: zeros).
    """

    def __init__(
        self, file: InputFile, header: Header, catalog: array[int], regions: list[Region]
    ) -> None:
        self.file = file
        self.name = file.name
        self.header = header
        self.virtual_size = header.disk_sectors * SECTOR
        self.cluster_size = header.tracks * SECTOR
        # Bytes a catalog entry counts: a cluster (version 2) or a sector (version 1).
        self._entry_unit = self.cluster_size if header.extended else SECTOR
        self._catalog = catalog
        self._regions = regions
        self._checked = False
        self.corruption: str | None = None  # a mapping qemu reads and instar refuses

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if not self._checked:
            self.corruption = self._check()
            self._checked = True
        if self.corruption is not None:
            raise FormatError(self.corruption)
        catalog, cluster, unit = self._catalog, self.cluster_size, self._entry_unit
        end = offset + length
        last = min(len(catalog), -(-end // cluster))  # the entries the range needs
        position = offset
        while position < end:
            index = position // cluster
            if index >= last or catalog[index] == 0:
                following = first_other(catalog, index + 1, last, 0) if index < last else last
                stop = end if following >= last else min(end, following * cluster)
                yield Run(position, stop, 0)
                position = stop
                continue
            host = catalog[index] * unit + position - index * cluster
            following = index + 1  # clusters that follow this one in the file
            while following < last and catalog[following] * unit == (
                catalog[following - 1] * unit + cluster
            ):
                following += 1
            stop = min(end, following * cluster)
            yield Run(position, stop, DATA | OFFSET_VALID, self.file, host)
            position = stop

    # --- the aliasing check -------------------------------------------------------------------

    def _check(self) -> str | None:
        """Every allocated cluster starts inside the file and is mapped once,
        clear of the image's metadata; the message reading gives otherwise."""
        catalog, cluster, unit = self._catalog, self.cluster_size, self._entry_unit
        count = len(catalog)
        claims = HostClaims(self.file.size, SECTOR)
        try:
            for start, length, _what in self._regions:
                if not claims.claim(start, length):  # regions that overlap: claim what is left
                    for sector in range(start, start + length, SECTOR):
                        claims.claim(sector, SECTOR)
            index = first_other(catalog, 0, count, 0)
            while index < count:
                host = catalog[index] * unit
                if host > self.file.size:
                    return (f"catalog entry {index} points beyond the end of the file "
                            "(the image is truncated or corrupt)")
                run = index + 1  # entries that continue it in the file, claimed at once
                while (run < count and catalog[run] * unit == host + (run - index) * cluster
                       and catalog[run] * unit <= self.file.size):
                    run += 1
                if not claims.claim(host, (run - index) * cluster):
                    for single in range(index, run):
                        if not claims.claim(catalog[single] * unit, cluster):
                            return self._alias(single)
                index = first_other(catalog, run, count, 0)
            return self._wrapped()
        finally:
            claims.close()

    def _alias(self, index: int) -> str:
        """The message for entry ``index``, whose cluster overlaps metadata or another's."""
        catalog, cluster, unit = self._catalog, self.cluster_size, self._entry_unit
        host = catalog[index] * unit
        guest = index * cluster
        for start, length, what in self._regions:
            if start < host + cluster and host < start + length:
                return metadata_alias_message(max(host, start), guest, what)
        first = catalog.index(catalog[index])  # an identical entry before it: found in C
        for other in itertools.chain([first] if first != index else [], range(len(catalog))):
            start = catalog[other] * unit
            if catalog[other] and other != index and start < host + cluster and host < (
                start + cluster
            ):
                return alias_message(max(host, start), guest, other * cluster)
        raise AssertionError("an overlap without a second cluster")  # pragma: no cover

    def _wrapped(self) -> str | None:
        """Past 2^32 clusters qemu's index wraps: cluster ``i + 2^32`` is read
        from entry ``i``. A disk that large with such an entry allocated maps
        one host cluster twice."""
        clusters = -(-self.virtual_size // self.cluster_size)
        if clusters <= _INDEX_RANGE:
            return None
        reached = min(len(self._catalog), clusters - _INDEX_RANGE)
        index = first_other(self._catalog, 0, reached, 0)
        if index >= reached:
            return None
        return alias_message(self._catalog[index] * self._entry_unit, index * self.cluster_size,
                             (index + _INDEX_RANGE) * self.cluster_size)

    def close(self) -> None:
        self.file.close()
