"""QED images: the mapping function of the read core.

`QedDriver` answers as qemu's ``bdrv_qed_co_block_status``: never across an
L2 table's range; runs of unallocated clusters (the backing file answers),
of zero clusters, or of host-contiguous data clusters; one run over L2
tables that are not there. The L1 and L2 tables, the cache and the aliasing
check are the shared `ClusterTableDriver`'s.

qemu 7.2's header checks and messages come first (`layout.check_header`).
The need-check feature (an image not closed cleanly) changes nothing here:
qemu checks such an image only when it opens it read-write, and instar only
reads. Every table and cluster must lie where qemu accepts it: aligned, past
the header, before the end of the file (its length in whole sectors, as
qemu's block layer sees it, rounded down to a cluster; what lies in the last
partial sector reads as zeros). The L1 table is read only as far as the disk
needs it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.cluster_tables import ClusterTableDriver, Region, backing_name
from instar.formats.common import unpack_table
from instar.formats.qed import layout as L


class QedDriver(ClusterTableDriver):
    """A QED image's own layer."""

    ZERO_ENTRY = L.ZERO_CLUSTER

    def __init__(self, file: InputFile, header: L.Header, l1: array[int],
                 backing_name: str | None, backing_format: str | None) -> None:
        entries = header.table_entries
        super().__init__(
            file, l1, cluster_bits=header.cluster_size.bit_length() - 1, l2_entries=entries,
            table_bytes=entries * 8, byteorder="little",
        )
        self.header = header
        self._length = L.qemu_length(file.size)
        self.virtual_size = header.image_size
        self.backing_name = backing_name
        self.backing_format = backing_format

    def read_l2(self, l1_index: int) -> array[int]:
        """An L2 table where qemu accepts one (`layout.table_offset_valid`)."""
        offset = self._l1[l1_index]
        if not L.table_offset_valid(offset, self.header, self._length):
            raise FormatError(
                f"L2 table offset {offset:#x} is invalid (L1 index {l1_index:#x}): unaligned, "
                "inside the header or beyond the end of the file"
            )
        return unpack_table(read_padded(self.file, offset, self._table_bytes), 8, "little")

    def checked_host(self, host: int, guest: int) -> int:
        """A data cluster where qemu accepts one (`layout.cluster_offset_valid`)."""
        if not L.cluster_offset_valid(host, self.header, self._length):
            raise FormatError(
                f"cluster at guest offset {guest:#x} points to {host:#x}: unaligned, "
                "inside the header or beyond the end of the file"
            )
        return host

    def metadata_regions(self) -> Iterator[Region]:
        header = self.header
        yield 0, max(header.header_bytes, L.HEADER.size), "the image header"
        yield header.l1_table_offset, header.table_entries * 8, "the L1 table"


def open_qed(file: InputFile, resolver: Resolver) -> QedDriver:
    """Check the header as qemu does, read the L1 entries the disk needs, and
    open the backing file it names through the resolver (the policy applies)."""
    header = L.Header.parse(file.pread(0, L.HEADER.size))
    L.check_header(header, L.qemu_length(file.size))
    name, fmt = read_backing(header, file)
    # Every valid non-empty image has tables of at most 16 MiB (a larger
    # geometry's largest size wraps round to 0 in qemu's check): the entries
    # read here and each L2 table stay below instar's table limit.
    needed = -(-header.image_size // (header.table_entries * header.cluster_size))
    data = read_padded(file, header.l1_table_offset, needed * 8)
    driver = QedDriver(file, header, unpack_table(data, 8, "little"), name, fmt)
    if name is not None:
        driver.backing_image = resolver.open_backing(name, fmt, file)
    return driver


def read_padded(file: InputFile, offset: int, length: int) -> bytes:
    """A table qemu's checks put inside the file's whole sectors: its end may
    lie in the last partial sector, which reads as zeros."""
    return file.pread(offset, length).ljust(length, b"\0")


def read_backing(header: L.Header, file: InputFile) -> tuple[str | None, str | None]:
    """The backing file name and format the header gives ("raw" when it says
    not to probe), or (None, None)."""
    if not header.features & L.FEATURE_BACKING_FILE:
        return None, None
    offset, size = header.backing_filename_offset, header.backing_filename_size
    if offset + size > header.header_bytes:
        raise FormatError("QED backing filename offset is invalid")
    if size > L.MAX_BACKING_NAME:
        raise FormatError("Failed to read backing filename")
    name = backing_name(file.pread(offset, size))  # past the end of the file: zeros
    raw = header.features & L.FEATURE_BACKING_FORMAT_NO_PROBE
    return name, "raw" if raw else None
