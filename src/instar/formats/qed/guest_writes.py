"""Guest data written into an existing QED image, in place and crash safe.

The QED counterpart of `instar.formats.qcow2.guest_writes.GuestWriter` (the
same interface: ``rebase`` writes an overlay's missing clusters with `write`,
``commit`` its base with `overwrite`), on the shared
`instar.formats.cluster_writes.ClusterTableWriter` (the order of the writes
and why a crash leaves each cluster old or new is explained there). Zeros
the caller does not need stored become a zero cluster (entry 1, no data),
as qemu writes zeros into QED; a data cluster the image holds gets zero
bytes in place, as qemu writes them there.

qemu marks the image "needs check" while it allocates; this order needs no
check, so instar does not set the bit. An image that has it set (not closed
cleanly) is refused: qemu would check and repair it first.
"""

from __future__ import annotations

from instar.errors import UnsupportedError
from instar.formats.cluster_writes import ClusterTableWriter
from instar.formats.common import unpack_table
from instar.formats.qed import layout as L
from instar.formats.qed.reader import QedDriver, read_padded
from instar.mutate import ImageUpdate


class GuestWriter(ClusterTableWriter):
    """Whole guest clusters written into ``driver``'s image through ``update``."""

    BYTEORDER = "little"
    ZERO_ENTRY = L.ZERO_CLUSTER
    NAME = "QED"

    def __init__(self, driver: QedDriver, update: ImageUpdate, what: str) -> None:
        header = driver.header
        if header.features & L.FEATURE_NEED_CHECK:
            raise UnsupportedError(f"{what} of a QED image that was not closed cleanly is not "
                                   "supported yet")
        self.header = header
        self.length = L.qemu_length(driver.file.size)
        entries = header.table_entries
        needed = -(-header.image_size // (entries * header.cluster_size))
        l1 = unpack_table(read_padded(driver.file, header.l1_table_offset, needed * 8), 8,
                          "little")
        super().__init__(driver, update, l1_offset=header.l1_table_offset, l1=l1,
                         cluster=header.cluster_size, entries=entries,
                         table_bytes=entries * 8)

    def table_valid(self, offset: int) -> bool:
        return L.table_offset_valid(offset, self.header, self.length)

    def read_table(self, offset: int) -> bytes:
        return read_padded(self.driver.file, offset, self.table_bytes)
