"""qcow (version 1) on-disk structures and qemu's rules for them.

A qcow image is a 48-byte header, the backing file name after it, the L1
table (qemu puts it right after the name, 8-byte aligned), then L2 tables and
data clusters wherever the file grew. Numbers are big-endian. An L2 entry is
a host offset, or, with its top bit set, a compressed cluster: the size in
bytes in the next ``cluster_bits`` bits, the host offset below them. The
backing file fields are qcow2's (offset at 8, size at 16). The reader and the
writer share what is here.
"""

from __future__ import annotations

import struct

from instar.errors import FormatError
from instar.formats.qcow import MAGIC, VERSION
from instar.runtime_types import NamedTuple

HEADER = struct.Struct(">4sIQIIQBBHIQ")  # 48 bytes
SECTOR = 512
CRYPT_NONE, CRYPT_AES = 0, 1
COMPRESSED = 1 << 63
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
MIN_L2_BITS, MAX_L2_BITS = 6, 13  # tables of 512 bytes to 64 KiB
MAX_BACKING_NAME = 1023
MAX_L1_ENTRIES = 0x7FFFFFFF // 8  # qemu's INT_MAX / sizeof(uint64_t)
# What qemu-img create writes: 4 KiB clusters, 512 entries a table (a backing
# file makes them 512 bytes and 4096, which instar does not write).
CLUSTER_BITS, L2_BITS = 12, 9


class Header(NamedTuple):
    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int  # bytes; qemu reads whole sectors of it
    cluster_bits: int
    l2_bits: int
    padding: int
    crypt_method: int
    l1_table_offset: int

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """The first 48 bytes; what lies past the end of the file reads as
        zeros, as qemu reads it."""
        return cls(*HEADER.unpack(data[: HEADER.size].ljust(HEADER.size, b"\0")))

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l1_entries(self) -> int:
        """The L1 entries the size needs (qemu rounds up, in bytes)."""
        return l1_entries(self.size, self.cluster_bits, self.l2_bits)


def l1_entries(size: int, cluster_bits: int, l2_bits: int) -> int:
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def check_header(header: Header) -> None:
    """The header's fields, in qemu 7.2's order, with its messages (the
    encryption method is the reader's: it depends on whether data is read)."""
    if header.magic != MAGIC:
        raise FormatError("Image not in qcow format")
    if header.version != VERSION:
        error = FormatError(f"qcow (v{VERSION}) does not support qcow version {header.version}")
        if header.version in (2, 3):
            error.hint = "Try the 'qcow2' driver instead."
        raise error
    if header.size <= 1:
        raise FormatError("Image size is too small (must be at least 2 bytes)")
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError("Cluster size must be between 512 and 64k")
    if not MIN_L2_BITS <= header.l2_bits <= MAX_L2_BITS:
        raise FormatError("L2 table size must be between 512 and 64k")


def check_size(header: Header) -> None:
    """qemu's bound on the L1 table (after the encryption method)."""
    shift = header.cluster_bits + header.l2_bits
    if header.size > (1 << 64) - 1 - (1 << shift) or header.l1_entries > MAX_L1_ENTRIES:
        raise FormatError("Image too large")


def compressed_entry(host: int, size: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster of ``size`` bytes at ``host``."""
    return COMPRESSED | size << (63 - cluster_bits) | host


def compressed_range(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, size in bytes) of a compressed cluster's L2 entry."""
    shift = 63 - cluster_bits
    return entry & ((1 << shift) - 1), (entry >> shift) & ((1 << cluster_bits) - 1)
