"""Reading Bochs "growing" redolog disks as qemu 7.2 reads them.

The header (little-endian) holds the names, the version, the header size
(where the catalog begins), the catalog's entry count, the bitmap size, the
extent size and the disk size (at 88 in version 2, at 84 in version 1). Each
catalog entry is an extent's index in the file, 0xFFFFFFFF when the extent
is not allocated; extent ``e`` lies at ``data_offset + e * span``, a sector
bitmap (bit ``i`` of byte ``i // 8``, least significant first, says whether
sector ``i`` is stored) then the sectors. qemu checks the header in this
order, with these messages; unstored sectors read as zeros.

Where instar is stricter than qemu (which reads what lies past the end of the
file as zeros), it refuses to read the disk (``info`` still describes it, as
qemu-img's does): a catalog that does not lie in the file, an allocated
extent whose bitmap does not (sectors past the end still read as zeros, as
a disk whose last extent is partly written ends before it), two entries
naming one extent, an extent over the header or the catalog.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.bochs import HEADER_SIZE, VERSION_1, is_bochs_header
from instar.formats.common import (
    TableCache,
    alias_message,
    first_other,
    metadata_alias_message,
)
from instar.image import DATA, OFFSET_VALID, ZERO, Driver, Run

SECTOR = 512
U32 = 0xFFFFFFFF
UNALLOCATED = U32
MAX_CATALOG = 0x100000  # qemu's bound: what bximage needs for its largest disk
MAX_EXTENT = 0x800000  # qemu's bound
_BITMAP_CACHE = 4096  # extent bitmaps kept (each at most 2 KiB)


class Header:
    """The header fields qemu uses, as qemu computes them (32-bit arithmetic)."""

    def __init__(self, data: bytes) -> None:
        def u32(at: int) -> int:
            return int.from_bytes(data[at : at + 4], "little")

        self.version = u32(64)
        self.header_size = u32(68)  # where the catalog begins
        self.catalog = u32(72)
        self.bitmap = u32(76)
        self.extent = u32(80)
        disk_at = 84 if self.version == VERSION_1 else 88
        self.sectors = int.from_bytes(data[disk_at : disk_at + 8], "little") // SECTOR
        self.data_offset = (self.header_size + self.catalog * 4) & U32
        self.bitmap_blocks = 1 + ((self.bitmap - 1) & U32) // SECTOR
        self.extent_blocks = 1 + ((self.extent - 1) & U32) // SECTOR

    @property
    def span(self) -> int:
        """Bytes from one extent's bitmap to the next one's."""
        return SECTOR * (self.bitmap_blocks + self.extent_blocks)

    @property
    def used(self) -> int:
        """The catalog entries the disk reaches (qemu never reads the others)."""
        return -(-self.sectors // (self.extent // SECTOR))

    def bitmap_offset(self, entry: int) -> int:
        return self.data_offset + entry * self.span


def open_bochs(file: InputFile, resolver: Resolver) -> Driver:
    """Open a growing redolog; FormatError (qemu's words where qemu has them) if malformed."""
    data = file.pread(0, HEADER_SIZE).ljust(HEADER_SIZE, b"\0")
    if not is_bochs_header(data):
        raise FormatError("Image not in Bochs format")
    header = Header(data)
    if header.catalog > MAX_CATALOG:
        raise FormatError("Catalog size is too large")
    extent = header.extent
    if extent < SECTOR:
        raise FormatError("Extent size must be at least 512")
    if extent & (extent - 1):
        raise FormatError(f"Extent size {extent} is not a power of two")
    if extent > MAX_EXTENT:
        raise FormatError(f"Extent size {extent} is too large")
    if header.catalog < header.used:
        raise FormatError("Catalog size is too small for this disk size")
    size = header.catalog * 4
    data = file.pread(header.header_size, size)
    catalog = array("I")
    assert catalog.itemsize == 4
    catalog.frombytes(data.ljust(size, b"\0"))  # qemu reads zeros past the end of the file
    if sys.byteorder == "big":
        catalog.byteswap()
    corruption = None
    if len(data) < size:
        corruption = (
            f"the catalog ({header.catalog} entries at offset {header.header_size}) lies "
            "beyond the end of the file (the image is truncated or corrupt)"
        )
    return BochsDriver(file, header, catalog, corruption or _check_extents(file, header, catalog))


def _check_extents(file: InputFile, header: Header, catalog: array[int]) -> str | None:
    """Why reading must fail, or None: an allocated extent whose bitmap lies
    beyond the end of the file, an extent named twice, or one over the
    header or the catalog. Only the entries the disk reaches count."""
    allocated = [entry for entry in catalog[: header.used] if entry != UNALLOCATED]
    if not allocated:
        return None
    bitmap_bytes = -(-header.extent // SECTOR // 8)
    highest = max(allocated)
    if header.bitmap_offset(highest) + bitmap_bytes > file.size:
        return (
            f"catalog entry {catalog.index(highest)} points beyond the end of the file "
            "(the image is truncated or corrupt)"
        )
    named = set(allocated)
    if len(named) != len(allocated):
        return _twice_named(header, catalog)
    regions = ((0, HEADER_SIZE, "the image header"),
               (header.header_size, 4 * header.catalog, "the catalog"))
    span = header.span
    for start, length, what in regions:
        if not length:
            continue
        # Extents whose span meets [start, start + length).
        first = max(0, (start - header.data_offset) // span)
        last = (start + length - 1 - header.data_offset) // span
        for entry in range(first, min(last, highest) + 1):
            if entry in named:
                guest = catalog.index(entry) * header.extent
                host = max(start, header.bitmap_offset(entry))
                return metadata_alias_message(host, guest, what)
    return None


def _twice_named(header: Header, catalog: array[int]) -> str:
    """The message for the first extent two catalog entries name."""
    seen: dict[int, int] = {}
    for index, entry in enumerate(catalog[: header.used]):
        if entry == UNALLOCATED:
            continue
        if entry in seen:
            return alias_message(header.bitmap_offset(entry), seen[entry] * header.extent,
                                 index * header.extent)
        seen[entry] = index
    raise AssertionError("no extent is named twice")  # pragma: no cover


class BochsDriver(Driver):
    """A growing redolog over its catalog and extent bitmaps.

    qemu's bochs has no block-status callback: it says DATA over the whole
    disk (``generic_status``); the mapping still tells unstored sectors
    (zeros, never read) from stored ones.
    """

    generic_status = True

    def __init__(
        self, file: InputFile, header: Header, catalog: array[int], corruption: str | None
    ) -> None:
        self.file = file
        self.name = file.name
        self.header = header
        self.virtual_size = header.sectors * SECTOR
        self.extent = header.extent
        self._catalog = catalog
        self._sectors = header.extent // SECTOR
        self._bitmaps: TableCache[int] = TableCache(self._load_bitmap, _BITMAP_CACHE)
        self.corruption = corruption

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if self.corruption is not None:
            raise FormatError(self.corruption)
        end = offset + length
        extent = self.extent
        position = offset
        while position < end:
            index, within = divmod(position, extent)
            entry = self._catalog[index]
            if entry == UNALLOCATED:
                last = -(-end // extent)  # the catalog entries the range needs
                stop = min(end, first_other(self._catalog, index + 1, last, UNALLOCATED) * extent)
                yield Run(position, stop, ZERO)
                position = stop
                continue
            step = min(end - position, extent - within)
            data = self.header.bitmap_offset(entry) + SECTOR * self.header.bitmap_blocks
            first, last = within // SECTOR, -(-(within + step) // SECTOR)
            for start, stop, stored in bit_runs(self._bitmaps.get(index), first, last):
                low = max(within, start * SECTOR)
                high = min(within + step, stop * SECTOR)
                at = position + low - within
                if stored:
                    yield Run(at, at + high - low, DATA | OFFSET_VALID, self.file, data + low)
                else:
                    yield Run(at, at + high - low, ZERO)
            position += step

    def _load_bitmap(self, index: int) -> int:
        """Extent ``index``'s bitmap as an integer: bit ``i`` is sector ``i``."""
        at = self.header.bitmap_offset(self._catalog[index])
        data = self.file.pread_exact(at, -(-self._sectors // 8), "extent bitmap")
        return int.from_bytes(data, "little")

    def close(self) -> None:
        self.file.close()


def bit_runs(bits: int, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
    """Runs ``(start, stop, set)`` of equal bits over bits ``[first, last)`` of
    ``bits`` (bit 0 the least significant): a few big-integer operations per
    run, never one per bit."""
    span = last - first
    window = (bits >> first) & ((1 << span) - 1)
    done = 0
    while done < span:
        if window & 1:
            run = (~window & (window + 1)).bit_length() - 1  # the trailing ones
        elif window:
            run = (window & -window).bit_length() - 1  # the trailing zeros
        else:
            run = span - done
        run = min(run, span - done)
        yield first + done, first + done + run, bool(window & 1)
        window >>= run
        done += run
