"""VHD ("vpc") on-disk structures: footer, dynamic disk header, checksums, CHS geometry.

Everything here is pure: bytes in, records and NamedTuples out (and back). The reader and
the writer share it, so what one writes the other parses with the same code.

All integers are big-endian. A dynamic or differencing image is

    footer copy (512) | dynamic header (1024) | BAT | blocks... | footer (512)

where each block is its sector bitmap (padded to 512 bytes, most significant
bit first = lowest sector) followed by ``block_size`` bytes of data. A fixed
image is the raw disk followed by the footer.
"""

from __future__ import annotations

import struct

from instar.formats.vpc import (
    FOOTER_COOKIE as FOOTER_COOKIE,  # re-exported: defined there for probing
)
from instar.record import Record
from instar.runtime_types import NamedTuple

SECTOR = 512
FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024

DYNAMIC_COOKIE = b"cxsparse"
NO_OFFSET = 0xFFFFFFFFFFFFFFFF  # "no next structure" (qemu and Microsoft tools set all 64 bits)
UNALLOCATED = 0xFFFFFFFF  # a BAT entry of a block not in the file

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4

FEATURES_RESERVED = 0x00000002  # "must always be set"
FORMAT_VERSION = 0x00010000
DYNAMIC_HEADER_VERSION = 0x00010000
TIMESTAMP_BASE = 946684800  # 2000-01-01T00:00:00Z, the VHD epoch

DEFAULT_BLOCK_SIZE = 2 << 20

# CHS limits: the largest geometry a footer can hold, and qemu's size limit.
CHS_MAX_CYLINDERS = 65535
CHS_MAX_HEADS = 16
CHS_MAX_SECTORS = 255
MAX_GEOMETRY_SECTORS = CHS_MAX_CYLINDERS * CHS_MAX_HEADS * CHS_MAX_SECTORS
MAX_SECTORS = 0xFF000000  # 2040 GiB
TOO_LARGE_MESSAGE = "Disk size is too large, max size is 2040 GiB"

# Creator applications whose footers give the size in "current size" rather than
# by CHS geometry (qemu 7.2's list; "qem2" is qemu with force_size=on).
CURRENT_SIZE_CREATORS = frozenset({b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"})

# The footer: cookie, features, format version, data offset, timestamp, creator
# app, creator version, creator OS, original size, current size, cylinders,
# heads, sectors per track, disk type, checksum, UUID, saved state, reserved.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
_FOOTER_CHECKSUM_AT = 64
# The dynamic header before the locators: cookie, data offset, table offset,
# version, max table entries, block size, checksum, parent UUID, parent
# timestamp, reserved, parent unicode name (UTF-16 big-endian).
_DYNAMIC = struct.Struct(">8sQQIIII16sII512s")
_DYNAMIC_CHECKSUM_AT = 36
# A parent locator: platform code, data space, data length, reserved, data offset.
_LOCATOR = struct.Struct(">4sIIIQ")
LOCATOR_COUNT = 8
_LOCATORS_AT = _DYNAMIC.size  # 576; 8 locators of 24 bytes, then 256 reserved

assert _FOOTER.size == FOOTER_SIZE
assert _LOCATORS_AT + LOCATOR_COUNT * _LOCATOR.size + 256 == DYNAMIC_HEADER_SIZE


def checksum(data: bytes) -> int:
    """The VHD checksum: one's complement of the byte sum (checksum field zeroed)."""
    return ~sum(data) & 0xFFFFFFFF


def _checksum_without(data: bytes, at: int) -> int:
    return checksum(data[:at] + bytes(4) + data[at + 4 :])


class Geometry(NamedTuple):
    """Cylinders, heads and sectors per track, as the footer stores them."""

    cylinders: int
    heads: int
    sectors: int

    @property
    def total_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors

    @property
    def is_maximum(self) -> bool:
        """The geometry that means "size is in the footer's current size field"."""
        return self.total_sectors == MAX_GEOMETRY_SECTORS


MAX_GEOMETRY = Geometry(CHS_MAX_CYLINDERS, CHS_MAX_HEADS, CHS_MAX_SECTORS)


def chs_geometry(total_sectors: int) -> Geometry:
    """The CHS geometry for ``total_sectors`` (the VHD specification's algorithm).

    The product of the result may be below ``total_sectors``: the algorithm
    rounds down. `rounded_geometry` searches upward for one that covers a size.
    """
    total = min(total_sectors, MAX_GEOMETRY_SECTORS)
    if total >= CHS_MAX_CYLINDERS * 16 * 63:
        sectors, heads = 255, 16
        cylinders_times_heads = total // sectors
    else:
        sectors = 17
        cylinders_times_heads = total // sectors
        heads = max(4, -(-cylinders_times_heads // 1024))
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cylinders_times_heads = total // sectors
        if cylinders_times_heads >= heads * 1024:
            sectors, heads = 63, 16
            cylinders_times_heads = total // sectors
    return Geometry(cylinders_times_heads // heads, heads, sectors)


class SizeChoice(NamedTuple):
    """What a new image declares: its geometry and its size in sectors."""

    geometry: Geometry
    total_sectors: int

    @property
    def size(self) -> int:
        return self.total_sectors * SECTOR

    @property
    def too_large(self) -> bool:
        return self.total_sectors > MAX_SECTORS


def rounded_geometry(length: int, force_size: bool = False) -> SizeChoice:
    """The geometry and size qemu gives a new image asked to hold ``length`` bytes.

    The size is first rounded up to a sector. Without ``force_size`` the
    sector count grows one at a time until its geometry covers the request;
    a geometry at the CHS maximum (or ``force_size``) keeps the exact size.
    `SizeChoice.too_large` says the result is over qemu's 2040 GiB limit.
    """
    sectors = -(-length // SECTOR)
    if force_size:
        geometry = MAX_GEOMETRY
    else:
        wanted = min(MAX_GEOMETRY_SECTORS, sectors)
        geometry = Geometry(0, 0, 0)
        candidate = wanted
        while geometry.total_sectors < wanted:
            geometry = chs_geometry(candidate)
            candidate += 1
    if geometry.is_maximum:
        return SizeChoice(geometry, sectors)
    return SizeChoice(geometry, geometry.total_sectors)


def declared_size(length: int, force_size: bool = False) -> int:
    """The virtual size of a new VHD asked to hold ``length`` bytes (CHS rounded
    unless ``force_size``)."""
    return rounded_geometry(length, force_size).size


class Footer(Record):
    """The hard disk footer (at the end of every image, copied at 0 in dynamic ones)."""

    __slots__ = ("checksum", "cookie", "creator_app", "creator_os", "creator_version",
                 "current_size", "data_offset", "disk_type", "features", "geometry",
                 "original_size", "saved_state", "timestamp", "uuid", "version")

    def __init__(
        self,
        disk_type: int,
        current_size: int,
        geometry: Geometry,
        data_offset: int = NO_OFFSET,
        original_size: int | None = None,  # None: same as current_size
        features: int = FEATURES_RESERVED,
        version: int = FORMAT_VERSION,
        timestamp: int = 0,
        creator_app: bytes = b"qemu",
        creator_version: int = 0x00050003,
        creator_os: bytes = b"Wi2k",
        uuid: bytes = bytes(16),
        saved_state: int = 0,
        cookie: bytes = FOOTER_COOKIE,
        checksum: int = 0,  # as stored (parse) or computed (pack)
    ) -> None:
        self.disk_type = disk_type
        self.current_size = current_size
        self.geometry = geometry
        self.data_offset = data_offset
        self.original_size = original_size
        self.features = features
        self.version = version
        self.timestamp = timestamp
        self.creator_app = creator_app
        self.creator_version = creator_version
        self.creator_os = creator_os
        self.uuid = uuid
        self.saved_state = saved_state
        self.cookie = cookie
        self.checksum = checksum

    def pack(self) -> bytes:
        """The 512 footer bytes, checksum computed."""
        original = self.current_size if self.original_size is None else self.original_size
        fields = (
            self.cookie, self.features, self.version, self.data_offset,
            self.timestamp & 0xFFFFFFFF, self.creator_app, self.creator_version,
            self.creator_os, original, self.current_size, self.geometry.cylinders,
            self.geometry.heads, self.geometry.sectors, self.disk_type,
        )  # fmt: skip
        unsummed = _FOOTER.pack(*fields, 0, self.uuid, self.saved_state)
        self.checksum = checksum(unsummed)
        return _FOOTER.pack(*fields, self.checksum, self.uuid, self.saved_state)

    @classmethod
    def parse(cls, data: bytes) -> Footer:
        """A footer from 512 bytes (no validation beyond the layout)."""
        (cookie, features, version, data_offset, timestamp, creator_app, creator_version,
         creator_os, original, current, cylinders, heads, sectors, disk_type, stored,
         uuid, saved_state) = _FOOTER.unpack(data[:FOOTER_SIZE])  # fmt: skip
        return cls(
            disk_type=disk_type, current_size=current,
            geometry=Geometry(cylinders, heads, sectors), data_offset=data_offset,
            original_size=original, features=features, version=version,
            timestamp=timestamp, creator_app=creator_app, creator_version=creator_version,
            creator_os=creator_os, uuid=uuid, saved_state=saved_state, cookie=cookie,
            checksum=stored,
        )  # fmt: skip

    @staticmethod
    def checksum_matches(data: bytes) -> bool:
        """True when the stored checksum of these 512 footer bytes is right."""
        stored = int.from_bytes(data[_FOOTER_CHECKSUM_AT : _FOOTER_CHECKSUM_AT + 4], "big")
        return _checksum_without(data[:FOOTER_SIZE], _FOOTER_CHECKSUM_AT) == stored

    def uses_current_size(self) -> bool:
        """Whether qemu sizes this disk by ``current_size`` instead of C*H*S."""
        return self.creator_app in CURRENT_SIZE_CREATORS or self.geometry.is_maximum

    def virtual_size(self) -> int:
        """The disk size as qemu 7.2 computes it, in bytes (whole sectors)."""
        if self.uses_current_size():
            return self.current_size // SECTOR * SECTOR
        return self.geometry.total_sectors * SECTOR


class ParentLocator(NamedTuple):
    """One of the eight parent locator entries of a differencing disk."""

    platform: bytes
    data_space: int
    data_length: int
    data_offset: int

    @property
    def is_empty(self) -> bool:
        return self.platform == bytes(4)


_NO_LOCATORS = tuple(ParentLocator(bytes(4), 0, 0, 0) for _ in range(LOCATOR_COUNT))


class DynamicHeader(Record):
    """The dynamic disk header of dynamic and differencing images."""

    __slots__ = ("block_size", "checksum", "cookie", "data_offset", "locators",
                 "max_table_entries", "parent_name", "parent_timestamp", "parent_uuid",
                 "table_offset", "version")

    def __init__(
        self,
        table_offset: int,
        max_table_entries: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        data_offset: int = NO_OFFSET,
        version: int = DYNAMIC_HEADER_VERSION,
        parent_uuid: bytes = bytes(16),
        parent_timestamp: int = 0,
        parent_name: bytes = bytes(512),  # UTF-16 big-endian, NUL padded
        locators: tuple[ParentLocator, ...] = _NO_LOCATORS,
        cookie: bytes = DYNAMIC_COOKIE,
        checksum: int = 0,
    ) -> None:
        self.table_offset = table_offset
        self.max_table_entries = max_table_entries
        self.block_size = block_size
        self.data_offset = data_offset
        self.version = version
        self.parent_uuid = parent_uuid
        self.parent_timestamp = parent_timestamp
        self.parent_name = parent_name
        self.locators = locators
        self.cookie = cookie
        self.checksum = checksum

    def pack(self) -> bytes:
        """The 1024 header bytes, checksum computed."""
        locators = b"".join(
            _LOCATOR.pack(loc.platform, loc.data_space, loc.data_length, 0, loc.data_offset)
            for loc in self.locators
        )
        locators += bytes(LOCATOR_COUNT * _LOCATOR.size - len(locators))

        def build(stored: int) -> bytes:
            head = _DYNAMIC.pack(
                self.cookie, self.data_offset, self.table_offset, self.version,
                self.max_table_entries, self.block_size, stored, self.parent_uuid,
                self.parent_timestamp, 0, self.parent_name,
            )  # fmt: skip
            return head + locators + bytes(256)

        self.checksum = checksum(build(0))
        return build(self.checksum)

    @classmethod
    def parse(cls, data: bytes) -> DynamicHeader:
        """A dynamic header from 1024 bytes (no validation beyond the layout)."""
        (cookie, data_offset, table_offset, version, entries, block_size, stored,
         parent_uuid, parent_timestamp, _reserved, parent_name,
         ) = _DYNAMIC.unpack_from(data)  # fmt: skip
        locators = tuple(
            ParentLocator(platform, space, length, offset)
            for platform, space, length, _zero, offset in (
                _LOCATOR.unpack_from(data, _LOCATORS_AT + i * _LOCATOR.size)
                for i in range(LOCATOR_COUNT)
            )
        )
        return cls(
            table_offset=table_offset, max_table_entries=entries, block_size=block_size,
            data_offset=data_offset, version=version, parent_uuid=parent_uuid,
            parent_timestamp=parent_timestamp, parent_name=parent_name,
            locators=locators, cookie=cookie, checksum=stored,
        )  # fmt: skip

    @staticmethod
    def checksum_matches(data: bytes) -> bool:
        stored = int.from_bytes(data[_DYNAMIC_CHECKSUM_AT : _DYNAMIC_CHECKSUM_AT + 4], "big")
        return _checksum_without(data[:DYNAMIC_HEADER_SIZE], _DYNAMIC_CHECKSUM_AT) == stored


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit a sector, padded to a sector.

    This is qemu's formula; it agrees with the specification for blocks of
    4 KiB and more, the only sizes instar accepts.
    """
    return -(-(block_size // (8 * SECTOR)) // SECTOR) * SECTOR


def bat_entries(total_sectors: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """BAT entries qemu gives a disk of ``total_sectors``: enough blocks to cover it."""
    per_block = block_size // SECTOR
    return -(-total_sectors // per_block)
