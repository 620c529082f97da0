"""QED resize: qemu 7.2's ``bdrv_qed_co_truncate``, which only grows.

The L1 table of a QED image has a fixed size, so growing writes the new size
into the header and nothing else; qemu refuses a size its tables cannot map,
shrinking, and every preallocation mode but off.
"""

from __future__ import annotations

import errno

from instar.errors import ResizeError, UnsupportedError
from instar.formats.qed import layout as L
from instar.formats.qed.reader import QedDriver
from instar.mutate import ImageUpdate

_IMAGE_SIZE_OFFSET = 48  # after magic, sizes, three feature words and the L1 offset


def resize_qed(driver: QedDriver, update: ImageUpdate, new_size: int,
               preallocation: str, zero_fill: bool = False) -> None:
    """Write ``new_size`` into the header, as qemu does (or refuse as qemu).
    ``zero_fill``: the new part must read zeros over a longer backing file,
    which qemu's block layer asks of a driver that cannot do it."""
    header = driver.header
    if zero_fill:
        raise ResizeError("Block driver does not support requested flags", errno.ENOTSUP)
    if preallocation != "off":
        raise ResizeError(f"Unsupported preallocation mode '{preallocation}'")
    if not L.image_size_valid(new_size, header.cluster_size, header.table_size):
        raise ResizeError("Invalid image size specified", errno.EINVAL)
    if new_size < header.image_size:
        raise ResizeError("Shrinking images is currently not supported", errno.ENOTSUP)
    if header.features & L.FEATURE_NEED_CHECK:
        raise UnsupportedError("the QED image was not closed cleanly; instar does not check "
                               "and repair it before resizing yet")
    update.phase("header")
    update.write(_IMAGE_SIZE_OFFSET, new_size.to_bytes(8, "little"))
