"""What qemu says about a VHDX: ``qemu-img info`` (the `describe` hook) and
block status (for ``instar compare``), as qemu 7.2's vhdx driver.

The driver's get_info gives the block size as cluster size (fixed images
included) and it has no format-specific data. It has no block-status
callback either, so qemu's generic answer applies: the whole image is data,
allocated, at no known offset, in one answer that reaches the end of the
image, whatever the BAT says (a hole reads as zeros, but is compared as data).
"""

from __future__ import annotations

from collections.abc import Iterator

from instar.formats.base import DATA, FormatDetails, StatusRun
from instar.formats.vhdx.reader import VhdxImage


def describe(image: VhdxImage) -> FormatDetails:
    """``vhdx_get_info``: the block size, and the dirty flag qemu's get_info
    leaves false."""
    return FormatDetails(cluster_size=image.block_size)


def block_status(image: VhdxImage) -> Iterator[StatusRun]:
    """``bdrv_co_block_status`` of a driver without the callback: one run of
    data (no OFFSET_VALID: vhdx is no protocol driver)."""
    if image.virtual_size:
        yield StatusRun(0, image.virtual_size, DATA)
