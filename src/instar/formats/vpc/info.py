"""What qemu says about a VHD: ``qemu-img info`` (the `describe` hook) and
block status (for ``instar compare``), as qemu's vpc driver.

qemu's vpc driver ignores a differencing disk's parent: no backing file is
named, and what the disk does not hold reads as zeros.
"""

from __future__ import annotations

from collections.abc import Iterator

from instar.formats.base import (
    DATA,
    OFFSET_VALID,
    ZERO,
    FormatDetails,
    StatusRun,
    runs_from_extents,
)
from instar.formats.vpc.reader import DynamicVpcImage
from instar.image import Image


def describe(image: Image) -> FormatDetails:
    """``vpc_get_info``: the block size as cluster size, except for a fixed disk."""
    if isinstance(image, DynamicVpcImage):
        return FormatDetails(cluster_size=image.block_size)
    return FormatDetails()


def block_status(image: Image) -> Iterator[StatusRun]:
    """``vpc_co_block_status``: a fixed disk is data, which qemu looks up in
    the file (ZERO over its holes); a dynamic one answers block by block where
    blocks are allocated, and for a whole stretch of unallocated blocks at
    once (zeros)."""
    if not isinstance(image, DynamicVpcImage):
        for run in runs_from_extents(image):
            yield run._replace(flags=run.flags | DATA)
        return
    size = image.virtual_size
    block = image.block_size
    start = 0
    allocated = False
    for index in range(-(-size // block)):
        here = image.block_allocated(index)
        if index and here != allocated:
            yield _run(start, index * block, allocated, block)
            start = index * block
        allocated = here
    if size:
        yield _run(start, size, allocated, block)


def _run(start: int, end: int, allocated: bool, block: int) -> StatusRun:
    if allocated:
        return StatusRun(start, end, DATA | OFFSET_VALID, block, start)
    return StatusRun(start, end, ZERO)
