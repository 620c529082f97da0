"""qcow (version 1) images: the mapping function of the read core.

`QcowDriver` answers as qemu's ``qcow_co_block_status``: one cluster at a
time, DATA at a host offset for a stored cluster, DATA for a compressed one
(decoded here, bounded to the cluster), nothing for a cluster the image does
not hold (the backing file answers). The L1 and L2 tables, the cache and the
aliasing check are the shared `ClusterTableDriver`'s.

qemu 7.2's header checks and messages come first (`layout.check_header`).
An AES-encrypted image opens only to be described (``info``, as qemu-img
info opens it without a key); reading it is refused with the words qemu uses
when no key is given. Where qemu reads past the end of the file as zeros or
follows any offset, instar refuses: the L1 table must lie inside the file,
L2 tables and data clusters must be cluster-aligned and start inside it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from instar.errors import FormatError, UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.cluster_tables import ClusterTableDriver, Region, backing_name, merged_regions
from instar.formats.common import DEFLATE, inflate, unpack_table
from instar.formats.qcow import layout as L
from instar.image import Run
from instar.safety import MAX_TABLE_BYTES

KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher"  # qemu, without a key


class QcowDriver(ClusterTableDriver):
    """A qcow image's own layer."""

    L2_OFFSET_MASK = L.COMPRESSED - 1
    COMPRESSED_FLAG = L.COMPRESSED
    ANSWERS_PER_CLUSTER = True

    def __init__(self, file: InputFile, header: L.Header, l1: array[int],
                 backing_name: str | None) -> None:
        super().__init__(
            file, l1, cluster_bits=header.cluster_bits, l2_entries=1 << header.l2_bits,
            table_bytes=8 << header.l2_bits, byteorder="big",
        )
        self.header = header
        self.virtual_size = header.size // L.SECTOR * L.SECTOR  # qemu sees whole sectors
        self.backing_name = backing_name
        self.encrypted = header.crypt_method == L.CRYPT_AES

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if self.encrypted:  # opened only to be described
            raise FormatError(KEY_REQUIRED)
        return super().map(offset, length)

    def metadata_regions(self) -> Iterator[Region]:
        """The header, the backing file name and the L1 table: qemu packs
        them into the first clusters, so they are claimed together."""
        header = self.header
        regions = [(0, L.HEADER.size, "the image header")]
        if header.backing_file_offset:
            regions.append((header.backing_file_offset, header.backing_file_size,
                            "the backing file name"))
        regions.append((header.l1_table_offset, len(self._l1) * 8, "the L1 table"))
        yield from merged_regions(regions, self._cluster)

    def compressed_range(self, entry: int) -> tuple[int, int]:
        return L.compressed_range(entry, self._bits)

    def decompress(self, run: Run) -> bytes:
        """One compressed cluster, raw deflate, decompressed to exactly a
        cluster (bounded: a stream that would give more is refused)."""
        entry = run.unit
        assert isinstance(entry, int)
        host, size = self.compressed_range(entry)
        where = f"compressed cluster at guest offset {run.start - run.host:#x}"
        if host >= self.file.size:
            raise FormatError(f"{where} points to {host:#x}, beyond the end of the file")
        out = inflate(self.file.pread(host, size), self._cluster, DEFLATE, where)
        if len(out) != self._cluster:
            raise FormatError(f"{where} decompresses to {len(out)} bytes, not a whole cluster")
        return out


def open_qcow(file: InputFile, resolver: Resolver) -> QcowDriver:
    """Check the header as qemu does, read the L1 table, and open the backing
    file it names through the resolver (the policy applies; it is probed:
    qcow stores no backing format)."""
    header = L.Header.parse(file.pread(0, L.HEADER.size))
    L.check_header(header)
    if header.crypt_method == L.CRYPT_AES:
        if getattr(resolver, "reads_data", True):  # instar takes no keys
            raise UnsupportedError(KEY_REQUIRED)
    elif header.crypt_method != L.CRYPT_NONE:
        raise FormatError("invalid encryption method in qcow header")
    L.check_size(header)
    entries = header.l1_entries
    if entries * 8 > MAX_TABLE_BYTES:
        raise FormatError(
            f"L1 table of {entries} entries is over instar's limit of {MAX_TABLE_BYTES} bytes"
        )
    data = file.pread_exact(header.l1_table_offset, entries * 8, "L1 table")
    name = read_backing_name(header, file)
    driver = QcowDriver(file, header, unpack_table(data, 8, "big"), name)
    if name is not None:
        driver.backing_image = resolver.open_backing(name, None, file)
    return driver


def read_backing_name(header: L.Header, file: InputFile) -> str | None:
    """The backing file name, or None (no offset, or an empty name)."""
    if header.backing_file_offset == 0:
        return None
    if header.backing_file_size > L.MAX_BACKING_NAME:
        raise FormatError("Backing file name too long")
    # Past the end of the file: zeros, as qemu reads it (an empty name).
    return backing_name(file.pread(header.backing_file_offset, header.backing_file_size))
