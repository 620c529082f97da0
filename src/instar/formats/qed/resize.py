"""QED resize: qemu 7.2's ``bdrv_qed_co_truncate``, which only grows.

The L1 table of a QED image has a fixed size, so growing writes the new size
into the header and nothing else; qemu refuses a size its tables cannot map,
shrinking, and every preallocation mode but off.
"""

from __future__ import annotations

from instar.errors import ResizeError, UnsupportedError
from instar.formats.qed import layout as L
from instar.formats.qed.reader import QedDriver
from instar.mutate import ImageUpdate

_IMAGE_SIZE_OFFSET = 48  # after magic, sizes, three feature words and the L1 offset


def resize_qed(driver: QedDriver, update: ImageUpdate, new_size: int,
               preallocation: str) -> None:
    """Write ``new_size`` into the header, as qemu does (or refuse as qemu)."""
    header = driver.header
    if preallocation != "off":
        raise ResizeError(f"Unsupported preallocation mode '{preallocation}'")
    if not L.image_size_valid(new_size, header.cluster_size, header.table_size):
        raise ResizeError("Invalid image size specified")
    if new_size < header.image_size:
        raise ResizeError("Shrinking images is currently not supported")
    if header.features & L.FEATURE_NEED_CHECK:
        raise UnsupportedError("the QED image was not closed cleanly; instar does not check "
                               "and repair it before resizing yet")
    update.phase("header")
    update.write(_IMAGE_SIZE_OFFSET, new_size.to_bytes(8, "little"))
