"""qcow2 on-disk structures and constants (qemu docs/interop/qcow2.txt).

Only layout lives here: the header and its extensions as records that
parse and pack themselves, the feature bits, and the masks of L1/L2 entries.
The reader and the writer share it, so both agree on every field. All
numbers in qcow2 are big-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from instar.errors import FormatError
from instar.formats.common import zstd_module as zstd_module  # the writer's name for it
from instar.record import Record

MAGIC = b"QFI\xfb"
SECTOR = 512

MIN_CLUSTER_BITS = 9  # 512-byte clusters
MAX_CLUSTER_BITS = 21  # 2 MiB: qemu's implementation limit
MIN_EXTENDED_L2_CLUSTER_BITS = 14  # 32 subclusters of at least 512 bytes
SUBCLUSTERS = 32  # per cluster with extended L2 entries
MAX_BACKING_NAME = 1023  # qemu refuses longer backing file names
MAX_SNAPSHOTS = 65536  # qemu's QCOW_MAX_SNAPSHOTS
SNAPSHOT_HEADER_SIZE = 40  # fixed part of a snapshot table entry

# The version 2 header (72 bytes) and the fields version 3 adds (up to 104).
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
V3_FIELDS = struct.Struct(">QQQII")
V2_HEADER_LENGTH = V2_HEADER.size  # 72
V3_MIN_HEADER_LENGTH = V2_HEADER.size + V3_FIELDS.size  # 104
V3_HEADER_LENGTH = 112  # what qemu writes: the compression type byte, padded to 8
COMPRESSION_TYPE_OFFSET = 104

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2
)
# Compatible and autoclear feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Compression types (header byte 104).
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_HEADER = struct.Struct(">II")

FEATURE_ENTRY = struct.Struct(">BB46s")
FEATURE_INCOMPAT, FEATURE_COMPAT, FEATURE_AUTOCLEAR = 0, 1, 2
# The feature name table qemu writes into every version 3 image.
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (FEATURE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_INCOMPAT, 2, "external data file"),
    (FEATURE_INCOMPAT, 3, "compression type"),
    (FEATURE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)

# L1 and L2 entries.
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63  # refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # standard cluster reads as zeros (not with extended L2)
SUBCLUSTER_ALLOC_MASK = 0xFFFF_FFFF  # low half of the extended L2 bitmap
REFTABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00


class Header(Record):
    """The qcow2 header, versions 2 and 3 (version 2 fills in the fixed values)."""

    __slots__ = ("autoclear_features", "backing_file_offset", "backing_file_size", "cluster_bits",
                 "compatible_features", "compression_type", "crypt_method", "header_length",
                 "incompatible_features", "l1_size", "l1_table_offset", "nb_snapshots",
                 "refcount_order", "refcount_table_clusters", "refcount_table_offset", "size",
                 "snapshots_offset", "version")

    def __init__(
        self,
        version: int,
        backing_file_offset: int,
        backing_file_size: int,
        cluster_bits: int,
        size: int,
        crypt_method: int,
        l1_size: int,
        l1_table_offset: int,
        refcount_table_offset: int,
        refcount_table_clusters: int,
        nb_snapshots: int,
        snapshots_offset: int,
        incompatible_features: int = 0,
        compatible_features: int = 0,
        autoclear_features: int = 0,
        refcount_order: int = 4,
        header_length: int = V2_HEADER_LENGTH,
        compression_type: int = COMPRESSION_ZLIB,
    ) -> None:
        self.version = version
        self.backing_file_offset = backing_file_offset
        self.backing_file_size = backing_file_size
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """Decode a header from the first bytes of the file (at least 72 of them).

        Only the structure is decoded here; the reader checks the values.
        """
        if data[:4] != MAGIC:
            raise FormatError("Image is not in qcow2 format")
        if len(data) < V2_HEADER.size:
            raise FormatError("qcow2 header is truncated")
        (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method,
         l1_size, l1_offset, refcount_offset, refcount_clusters, nb_snapshots,
         snapshots_offset) = V2_HEADER.unpack_from(data)
        del magic
        header = cls(version, backing_offset, backing_size, cluster_bits, size, crypt_method,
                     l1_size, l1_offset, refcount_offset, refcount_clusters, nb_snapshots,
                     snapshots_offset)
        if version >= 3:
            if len(data) < V3_MIN_HEADER_LENGTH:
                raise FormatError("qcow2 header is truncated")
            (header.incompatible_features, header.compatible_features,
             header.autoclear_features, header.refcount_order,
             header.header_length) = V3_FIELDS.unpack_from(data, V2_HEADER.size)
            if header.header_length > COMPRESSION_TYPE_OFFSET and len(data) > 104:
                header.compression_type = data[COMPRESSION_TYPE_OFFSET]
        return header

    def pack(self) -> bytes:
        """The header bytes: 72 for version 2, ``header_length`` for version 3."""
        data = V2_HEADER.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset,
        )
        if self.version < 3:
            return data
        data += V3_FIELDS.pack(
            self.incompatible_features, self.compatible_features, self.autoclear_features,
            self.refcount_order, self.header_length,
        )
        if self.header_length > COMPRESSION_TYPE_OFFSET:
            data += bytes([self.compression_type])
        return data.ljust(self.header_length, b"\0")


class Extensions(Record):
    """The header extensions instar understands; unknown ones are skipped.

    ``bitmaps_payload`` is the bitmaps extension, decoded by instar info.
    """

    __slots__ = ("backing_format", "bitmaps_payload", "data_file", "feature_names",
                 "has_bitmaps", "has_crypto")

    def __init__(
        self,
        backing_format: str | None = None,
        data_file: str | None = None,
        feature_names: dict[tuple[int, int], str] | None = None,
        has_bitmaps: bool = False,
        bitmaps_payload: bytes = b"",
        has_crypto: bool = False,
    ) -> None:
        self.backing_format = backing_format
        self.data_file = data_file
        self.feature_names: dict[tuple[int, int], str] = (
            {} if feature_names is None else feature_names)
        self.has_bitmaps = has_bitmaps
        self.bitmaps_payload = bitmaps_payload
        self.has_crypto = has_crypto


def parse_extensions(data: bytes) -> Extensions:
    """Decode the extension area ``data`` (bounded by the caller) up to its end marker.

    An extension that runs past the area is malformed (qemu: "Header
    extension too large"); reaching the end of the area without an end
    marker is accepted, as qemu does.
    """
    found = Extensions()
    seen: set[int] = set()
    for ext_type, payload in extension_records(data):
        if ext_type in seen and ext_type != EXT_FEATURE_TABLE:
            raise FormatError(f"qcow2 header extension {ext_type:#010x} appears twice")
        seen.add(ext_type)
        _apply_extension(found, ext_type, payload)
    return found


def extension_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The extensions in the area ``data`` as (type, payload), in file order,
    up to the end marker (or the end of the area)."""
    position = 0
    while position + EXT_HEADER.size <= len(data):
        ext_type, length = EXT_HEADER.unpack_from(data, position)
        position += EXT_HEADER.size
        if ext_type == EXT_END:
            break
        if length > len(data) - position:
            raise FormatError(f"qcow2 header extension {ext_type:#010x} is too large")
        yield ext_type, data[position : position + length]
        position += (length + 7) & ~7


def _apply_extension(found: Extensions, ext_type: int, payload: bytes) -> None:
    if ext_type == EXT_BACKING_FORMAT:
        found.backing_format = _extension_string(payload, "backing file format")
    elif ext_type == EXT_DATA_FILE:
        found.data_file = _extension_string(payload, "data file name")
    elif ext_type == EXT_FEATURE_TABLE:
        for start in range(0, len(payload) - FEATURE_ENTRY.size + 1, FEATURE_ENTRY.size):
            kind, bit, raw_name = FEATURE_ENTRY.unpack_from(payload, start)
            name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
            found.feature_names[(kind, bit)] = name
    elif ext_type == EXT_BITMAPS:
        found.has_bitmaps = True  # dirty bitmaps do not change what the disk reads
        found.bitmaps_payload = payload
    elif ext_type == EXT_CRYPTO:
        found.has_crypto = True


def _extension_string(payload: bytes, what: str) -> str:
    """A string extension: not NUL-terminated, but stop at a NUL if one is there."""
    text = payload.split(b"\0", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"qcow2 {what} is not valid UTF-8") from None


def pack_extension(ext_type: int, payload: bytes) -> bytes:
    """One header extension, padded to 8 bytes."""
    padding = -len(payload) % 8
    return EXT_HEADER.pack(ext_type, len(payload)) + payload + bytes(padding)


def feature_table() -> bytes:
    """The feature name table payload qemu writes."""
    return b"".join(
        FEATURE_ENTRY.pack(kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES
    )


def compressed_shift(cluster_bits: int) -> int:
    """x in the spec: the bit where a compressed descriptor's sector count starts."""
    return 62 - (cluster_bits - 8)


def l2_entries(cluster_bits: int, extended_l2: bool) -> int:
    """Entries in one L2 table (extended entries are 16 bytes)."""
    return (1 << cluster_bits) // (16 if extended_l2 else 8)


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """L1 entries needed to map ``size`` bytes."""
    span = (1 << cluster_bits) * l2_entries(cluster_bits, extended_l2)
    return -(-size // span)


def held_clusters(entry: int, cluster: int, shift: int) -> tuple[int, int] | None:
    """(first cluster, count) an L2 entry holds a reference to, or None: a
    compressed entry's byte range (it may span clusters), or the host cluster
    of a standard entry (a zero cluster that keeps its allocation included).
    ``shift`` is `compressed_shift` of the cluster bits. Resize, snapshot and
    the refcount walks share it."""
    if entry & OFLAG_COMPRESSED:
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (62 - shift)) - 1)) + 1
        size = sectors * SECTOR - (host & (SECTOR - 1))
        return host // cluster, (host + size - 1) // cluster - host // cluster + 1
    if entry & L2E_OFFSET_MASK:
        return (entry & L2E_OFFSET_MASK) // cluster, 1
    return None
