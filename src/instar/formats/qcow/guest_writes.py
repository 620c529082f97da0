"""Guest data written into an existing qcow (version 1) image, in place and
crash safe: ``commit`` writes its base through `GuestWriter` (`overwrite`).

On the shared `instar.formats.cluster_writes.ClusterTableWriter` (the order
of the writes and why a crash leaves each cluster old or new is explained
there). qcow has no zero clusters and no refcounts: zeros are stored as a
cluster of zero bytes, as qemu stores them; a compressed cluster that gets
new content is replaced by a new cluster, its old bytes left unnamed in the
file, as qemu leaves them. New clusters and L2 tables go past the end of the
file, each on a cluster boundary, as qemu puts them. An encrypted image is
refused (instar takes no keys; its reader refuses it first).
"""

from __future__ import annotations

from instar.errors import UnsupportedError
from instar.formats.cluster_writes import ClusterTableWriter
from instar.formats.common import unpack_table
from instar.formats.qcow import layout as L
from instar.formats.qcow.reader import QcowDriver
from instar.mutate import ImageUpdate


class GuestWriter(ClusterTableWriter):
    """Whole guest clusters written into ``driver``'s image through ``update``."""

    BYTEORDER = "big"
    COMPRESSED_FLAG = L.COMPRESSED
    NAME = "qcow"

    def __init__(self, driver: QcowDriver, update: ImageUpdate, what: str) -> None:
        header = driver.header
        if driver.encrypted:
            raise UnsupportedError(f"{what}: writing into an encrypted qcow image is not "
                                   "supported")
        entries = 1 << header.l2_bits
        l1 = unpack_table(driver.file.pread_exact(header.l1_table_offset,
                                                  header.l1_entries * 8, "L1 table"), 8, "big")
        super().__init__(driver, update, l1_offset=header.l1_table_offset, l1=l1,
                         cluster=header.cluster_size, entries=entries, table_bytes=entries * 8)

    def table_valid(self, offset: int) -> bool:
        """As the reader accepts one: cluster-aligned, inside the file."""
        return (not offset % self.cluster
                and offset + self.table_bytes <= self.driver.file.size)

    def read_table(self, offset: int) -> bytes:
        return self.driver.file.pread_exact(offset, self.table_bytes, "L2 table")
