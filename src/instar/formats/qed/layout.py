"""QED on-disk structures and qemu's rules for them (qemu docs/interop/qed_spec.txt).

A QED image is its header (``header_size`` clusters, holding the backing file
name), an L1 table and L2 tables of ``table_size`` clusters each, and data
clusters. Table entries are little-endian host offsets: 0 is a cluster that is
not here (the backing file answers), 1 a cluster that reads as zeros. Every
number is little-endian. The reader and the writer share the checks below, so
what one writes the other accepts.
"""

from __future__ import annotations

import struct

from instar.errors import FormatError
from instar.formats.qed import MAGIC
from instar.runtime_types import NamedTuple

HEADER = struct.Struct("<4sIIIQQQQQII")  # 64 bytes
FEATURE_BACKING_FILE = 1 << 0
FEATURE_NEED_CHECK = 1 << 1  # not closed cleanly; qemu checks it when opening read-write
FEATURE_BACKING_FORMAT_NO_PROBE = 1 << 2  # the backing file is raw
KNOWN_FEATURES = FEATURE_BACKING_FILE | FEATURE_NEED_CHECK | FEATURE_BACKING_FORMAT_NO_PROBE

MIN_CLUSTER_SIZE = 4 << 10
MAX_CLUSTER_SIZE = 64 << 20
DEFAULT_CLUSTER_SIZE = 64 << 10
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
DEFAULT_TABLE_SIZE = 4
ZERO_CLUSTER = 1  # the L2 entry of a cluster that reads as zeros
MAX_BACKING_NAME = 4095  # qemu keeps the name in a 4096-byte buffer, NUL included
SECTOR = 512
UINT32_MAX = (1 << 32) - 1
UINT64_MASK = (1 << 64) - 1


class Header(NamedTuple):
    """The QED header, as the file holds it (the reader checks the values)."""

    magic: bytes
    cluster_size: int
    table_size: int  # clusters per L1 or L2 table
    header_size: int  # clusters before the L1 table's allowed area
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int  # bytes from the start of the file
    backing_filename_size: int

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """The first 64 bytes; what lies past the end of the file reads as zeros,
        as qemu reads it."""
        return cls(*HEADER.unpack(data[: HEADER.size].ljust(HEADER.size, b"\0")))

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    @property
    def table_entries(self) -> int:
        """Entries in one L1 or L2 table."""
        return self.cluster_size * self.table_size // 8

    @property
    def header_bytes(self) -> int:
        return self.header_size * self.cluster_size


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def cluster_size_valid(cluster_size: int) -> bool:
    return is_power_of_two(cluster_size) and MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE


def table_size_valid(table_size: int) -> bool:
    return is_power_of_two(table_size) and MIN_TABLE_SIZE <= table_size <= MAX_TABLE_SIZE


def max_image_size(cluster_size: int, table_size: int) -> int:
    """qemu's largest image for a geometry, computed in 64 bits as qemu does:
    where the true value needs more, it wraps round to 0 (2^70 and beyond are
    multiples of 2^64), and only an empty image is valid."""
    entries = cluster_size * table_size // 8
    return entries * cluster_size * entries & UINT64_MASK


def image_size_valid(size: int, cluster_size: int, table_size: int) -> bool:
    return size <= max_image_size(cluster_size, table_size) and size % SECTOR == 0


def qemu_length(file_size: int) -> int:
    """The file's length as qemu's block layer gives it: whole sectors."""
    return -(-file_size // SECTOR) * SECTOR


def table_offset_valid(offset: int, header: Header, file_size: int) -> bool:
    """qemu's check of an L1 or L2 table's offset: its first and last cluster
    aligned, past the header and before the end of the file (``file_size``
    as `qemu_length` gives it, rounded down to a cluster). A table of one
    cluster never passes: qemu's overflow test takes "last == first" for a
    wrap-around."""
    cluster = header.cluster_size
    end = (offset + (header.table_size - 1) * cluster) & UINT64_MASK
    if end <= offset:
        return False
    return cluster_offset_valid(offset, header, file_size) and cluster_offset_valid(
        end, header, file_size
    )


def cluster_offset_valid(offset: int, header: Header, file_size: int) -> bool:
    """A host cluster qemu accepts: aligned, past the header, inside the file."""
    if offset & (header.cluster_size - 1):
        return False
    return header.header_bytes <= offset < file_size // header.cluster_size * header.cluster_size


def check_header(header: Header, file_size: int) -> None:
    """The header's fields, in qemu 7.2's order, with its messages
    (``file_size`` as `qemu_length` gives it)."""
    if header.magic != MAGIC:
        raise FormatError("Image not in QED format")
    unknown = header.features & ~KNOWN_FEATURES
    if unknown:
        raise FormatError(f"Unsupported QED features: {unknown:x}")
    if not cluster_size_valid(header.cluster_size):
        raise FormatError("QED cluster size is invalid")
    if not table_size_valid(header.table_size):
        raise FormatError("QED table size is invalid")
    if not image_size_valid(header.image_size, header.cluster_size, header.table_size):
        raise FormatError("QED image size is invalid")
    if not table_offset_valid(header.l1_table_offset, header, file_size):
        raise FormatError("QED table offset is invalid")
    if header.header_size > UINT32_MAX // header.cluster_size:
        raise FormatError("QED header size is too large")
