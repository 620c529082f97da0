"""The Parallels format extension: one cluster of features (dirty bitmaps).

qemu 7.2 loads it whenever it opens an image read-only (``ext_off`` set) and
fails the open with its own words when it is damaged; the bitmaps it loads
are shown nowhere by ``qemu-img`` 7.2 (not by ``info`` either). instar checks
the extension as qemu does, word for word, and keeps only where its clusters
lie (they are the image's metadata: no guest cluster may map onto them). The
bitmaps' contents are never read: no command shows them.

The cluster: a header (magic, MD5 of the rest of the cluster), then features,
each a 32-byte header (magic, flags, data size) and its data padded to 8
bytes, up to an end-of-features header. A dirty bitmap feature holds the
disk's size in sectors, a UUID (the bitmap's name), its granularity in
sectors, and an L1 table of 64-bit entries, each a cluster of the serialized
bitmap (its sector), 0 (all clear) or 1 (all set).

Where qemu 7.2 goes wrong instar refuses instead, in its own words: features
that run past the cluster (qemu 7.2 does not count their data against what is
left, and reads past its buffer), a granularity that is no power of two of at
least 512 bytes (qemu aborts), an extension cluster larger than instar reads.
"""

from __future__ import annotations

import struct

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.parallels.layout import SECTOR
from instar.image import MAX_VIRTUAL_SIZE
from instar.runtime_types import NamedTuple
from instar.safety import MAX_TABLE_BYTES

EXTENSION_MAGIC = 0xAB234CEF23DCEA87
END_OF_FEATURES = 0
DIRTY_BITMAP = 0x20385FAE252CB34A

_EXTENSION_HEADER = struct.Struct("<Q16s")  # magic, MD5 of the rest of the cluster
_FEATURE_HEADER = struct.Struct("<QQI4x")  # magic, flags, data size
_BITMAP = struct.Struct("<Q16sII")  # disk sectors, UUID, granularity (sectors), L1 entries
_INT64_MAX = (1 << 63) - 1


class Region(NamedTuple):
    """Host bytes the extension uses, for the aliasing check."""

    start: int
    length: int
    what: str


def check_extension(
    file: InputFile, ext_off: int, cluster_size: int, disk_sectors: int
) -> list[Region]:
    """Check the extension at sector ``ext_off`` as qemu 7.2 loads it; the
    regions it occupies (its cluster, then each bitmap data cluster)."""
    start = _signed(ext_off << 9)
    if start <= 0:
        raise FormatError(f"format extension offset {ext_off} (sectors) is out of range")
    if cluster_size > MAX_TABLE_BYTES:
        raise FormatError(
            f"format extension cluster of {cluster_size} bytes is over instar's limit of "
            f"{MAX_TABLE_BYTES} bytes"
        )
    if start > MAX_VIRTUAL_SIZE - cluster_size:
        raise FormatError("Failed to read Format Extension cluster: Input/output error")
    cluster = file.pread(start, cluster_size).ljust(cluster_size, b"\0")
    regions = [Region(start, cluster_size, "the format extension")]
    magic, checksum = _EXTENSION_HEADER.unpack_from(cluster)
    if magic != EXTENSION_MAGIC:
        raise FormatError(
            f"Wrong parallels Format Extension magic: 0x{magic:x}, "
            f"expected: 0x{EXTENSION_MAGIC:x}"
        )
    if _md5(memoryview(cluster)[_EXTENSION_HEADER.size :]) != checksum:
        raise FormatError(
            "Wrong checksum in Format Extension header. Format extension is corrupted."
        )
    names: set[str] = set()
    position = _EXTENSION_HEADER.size
    # qemu's count of what is left: it subtracts feature headers only.
    remaining = cluster_size - _EXTENSION_HEADER.size
    while True:
        if remaining < _FEATURE_HEADER.size:
            raise FormatError(
                f"Can not read feature header, as remaining bytes ({remaining}) in Format "
                f"Extension is less than Feature header size ({_FEATURE_HEADER.size})"
            )
        if position + _FEATURE_HEADER.size > cluster_size:
            raise FormatError("a feature header of the format extension lies past its cluster")
        magic, flags, data_size = _FEATURE_HEADER.unpack_from(cluster, position)
        position += _FEATURE_HEADER.size
        remaining -= _FEATURE_HEADER.size
        if flags:
            raise FormatError("Flags for extension feature are unsupported")
        if data_size > remaining:
            raise FormatError("Feature data_size exceedes Format Extension cluster")
        if position + data_size > cluster_size:
            raise FormatError("a feature of the format extension runs past its cluster")
        if magic == END_OF_FEATURES:
            return regions
        if magic != DIRTY_BITMAP:
            raise FormatError(f"Unknown feature: 0x{magic:x}")
        data = memoryview(cluster)[position : position + data_size]
        regions += _check_bitmap(data, cluster_size, disk_sectors, names)
        position += -(-data_size // 8) * 8


def _check_bitmap(
    data: memoryview, cluster_size: int, disk_sectors: int, names: set[str]
) -> list[Region]:
    """One dirty bitmap feature, checked in qemu's order; its data clusters."""
    if len(data) < _BITMAP.size:
        raise FormatError(
            f"Too small Bitmap Feature area in Parallels Format Extension: {len(data)} bytes, "
            f"expected at least {_BITMAP.size} bytes"
        )
    sectors, uuid, granularity_sectors, l1_size = _BITMAP.unpack_from(data)
    if sectors != disk_sectors:
        raise FormatError(
            f"Bitmap size (in sectors) {_signed(sectors)} differs from disk size in sectors "
            f"{disk_sectors}"
        )
    if l1_size * 8 > len(data) - _BITMAP.size:
        raise FormatError("Bitmaps feature corrupted: l1 table exceeds extension data_size")
    name = _uuid_text(uuid)
    granularity = (granularity_sectors << 9) & 0xFFFFFFFF  # qemu shifts a 32-bit number
    if granularity < SECTOR or granularity & (granularity - 1):
        raise FormatError(
            f"dirty bitmap {name} has a granularity of {granularity_sectors} sectors: not a "
            "power of two of at least 512 bytes (qemu 7.2 aborts on it)"
        )
    if name in names:
        raise FormatError(f"Bitmap already exists: {name}")
    names.add(name)
    if disk_sectors > _INT64_MAX // SECTOR:
        raise FormatError("could not get length of device: File too large")
    expected = _table_size(disk_sectors * SECTOR, granularity, cluster_size)
    if expected != l1_size:
        raise FormatError(
            f"Bitmap table size {l1_size} does not correspond to bitmap size and cluster "
            f"size. Expected {expected}"
        )
    regions = []
    for entry in struct.unpack_from(f"<{l1_size}Q", data, _BITMAP.size):
        if entry in (0, 1):  # all clear, all set: no cluster
            continue
        start = _signed(entry << 9)
        if start < 0 or start > MAX_VIRTUAL_SIZE - cluster_size:
            raise FormatError("Failed to read bitmap data cluster: Input/output error")
        regions.append(Region(start, cluster_size, f"data of dirty bitmap {name}"))
    return regions


def _md5(data: memoryview) -> bytes:
    """MD5 without importing hashlib, which in a confined worker would need every
    compiled hash module: CPython's ``_md5``, loaded before the worker is forked
    (`instar.worker_imports.EXTENSIONS`), else hashlib's (a Python built without it)."""
    try:
        import _md5  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - CPython has it unless built without
        import hashlib

        return hashlib.md5(data, usedforsecurity=False).digest()
    digest: bytes = _md5.md5(data).digest()
    return digest


def _table_size(disk_bytes: int, granularity: int, cluster_size: int) -> int:
    """The L1 entries qemu expects: the serialized bitmap (64-bit words of
    one bit per granule) in clusters."""
    if not disk_bytes:
        return 0
    words = ((disk_bytes - 1) // granularity >> 6) + 1
    return -(-words * 8 // cluster_size)


def _uuid_text(data: bytes) -> str:
    """The UUID as qemu prints it: its 16 bytes in order, 8-4-4-4-12."""
    text = data.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _signed(value: int) -> int:
    """A 64-bit two's complement number (qemu's shifted offsets wrap so)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value
