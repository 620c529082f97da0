"""Parallels on-disk structures: the 64-byte header, shared by reader and writer.

All integers are little-endian. An image is

    header (64) | catalog (4 bytes an entry) | ... | clusters (from data_off)

A catalog ("BAT") entry of 0 is an unallocated cluster. Otherwise it gives
where the cluster lies: in sectors for version 1 images (magic
``WithoutFreeSpace``), in clusters for the extended version 2 (magic
``WithouFreSpacExt``, qemu's ``off_multiplier``). Version 1 keeps a 32-bit
sector count (the high half of the field is padding). ``ext_off`` (sectors)
names the format extension cluster (dirty bitmaps), `extension.py`.
"""

from __future__ import annotations

import struct

from instar.formats.parallels import MAGIC_V1 as MAGIC_V1  # re-exported: defined there
from instar.formats.parallels import MAGIC_V2 as MAGIC_V2  # for probing
from instar.formats.parallels import VERSION as VERSION
from instar.runtime_types import NamedTuple

SECTOR = 512
HEADER_SIZE = 64
INUSE_MAGIC = 0x746F6E59  # "Ynot": a writer had the image open (qemu: "not closed correctly")
DEFAULT_CLUSTER_SIZE = 1 << 20
HEADS = 16  # the geometry qemu writes: 16 heads, 32 sectors a cylinder
SECTORS_PER_CYLINDER = 32

# qemu 7.2's limits on what it opens.
MAX_TRACKS = 0x7FFFFFFF // 513  # sectors a cluster: "Invalid image: Too big cluster"
MAX_CATALOG_ENTRIES = 0x7FFFFFFF // 4  # "Catalog too large"
# ... and on what it creates (a cluster size below 2^31, fewer than 2^32 clusters).
MAX_IMAGE_FACTOR = 1 << 32
MAX_CREATE_CLUSTER_SIZE = ((1 << 63) - 1) // MAX_IMAGE_FACTOR

_HEADER = struct.Struct("<16sIIIIIQIIIQ")
assert _HEADER.size == HEADER_SIZE


class Header(NamedTuple):
    """The header's fields, in their on-disk order."""

    magic: bytes
    version: int
    heads: int
    cylinders: int
    tracks: int  # sectors a cluster
    catalog_entries: int
    sectors: int  # the disk's size (version 1: only the low 32 bits count)
    inuse: int
    data_off: int  # sector where clusters begin (0: right after the catalog)
    flags: int
    ext_off: int  # sector of the format extension cluster, 0 for none

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """The header in ``data`` (shorter data reads as padded with zeros, as
        qemu reads past the end of a file)."""
        return cls._make(_HEADER.unpack(data[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0")))

    def pack(self) -> bytes:
        return _HEADER.pack(*self)

    @property
    def extended(self) -> bool:
        """Version 2 (catalog entries count clusters), else version 1 (sectors)."""
        return self.magic == MAGIC_V2

    @property
    def disk_sectors(self) -> int:
        """The disk's size in sectors as qemu takes it: 32 bits in version 1."""
        return self.sectors if self.extended else self.sectors & 0xFFFFFFFF


def catalog_end(entries: int) -> int:
    """Where a catalog of ``entries`` entries ends: qemu's ``bat_entry_off``."""
    return HEADER_SIZE + 4 * entries


def data_offset_sectors(entries: int, cluster_size: int) -> int:
    """Where qemu-img create puts the first cluster: after the header and the
    catalog, rounded up to a whole cluster (in sectors)."""
    return -(-catalog_end(entries) // cluster_size) * cluster_size // SECTOR


def new_header(size: int, cluster_size: int, entries: int) -> Header:
    """The header qemu-img create writes for a disk of ``size`` bytes (a
    multiple of 512): version 2, its geometry, nothing in use, no extension."""
    return Header(
        magic=MAGIC_V2,
        version=VERSION,
        heads=HEADS,
        cylinders=(size // SECTOR // HEADS // SECTORS_PER_CYLINDER) & 0xFFFFFFFF,
        tracks=cluster_size // SECTOR,
        catalog_entries=entries,
        sectors=-(-size // SECTOR),
        inuse=0,
        data_off=data_offset_sectors(entries, cluster_size),
        flags=0,
        ext_off=0,
    )
