"""qcow2 refcounts as reading needs them: qemu's guess that an image was
preallocated with metadata only.

qemu's qcow2 driver guesses so (``qcow2_detect_metadata_preallocation``) the
first time it is asked for block status: the file has at least a ninth more
clusters in use, by its refcounts, than the file system holds for it (and at
least two more). Then the clusters it maps are mostly holes in the file, and
its block status asks the file where, so holes inside data clusters are
reported as zeros (``BDRV_BLOCK_RECURSE``). The reader does the same.
"""

from __future__ import annotations

import sys
from array import array

from instar.files import InputFile
from instar.formats.common import first_other
from instar.formats.qcow2 import layout as L

# Array type codes of the refcount widths of a byte or more.
_CODES = {8: "B", 16: "H", 32: "I", 64: "Q"}
# For widths under a byte: the lowest bit of each entry, in every byte.
_LOW_BITS = {1: 0xFF, 2: 0x55, 4: 0x11}


def nonzero_entries(block: bytes, width: int, count: int) -> int:
    """How many of the first ``count`` ``width``-bit refcounts of ``block``
    are not zero (entries under a byte are packed from the low bits up)."""
    code = _CODES.get(width)
    if code is not None:
        entries = array(code, block[: count * width // 8])
        return len(entries) - entries.count(0)
    value = int.from_bytes(block[: -(-count * width // 8)], "little")
    value &= (1 << (count * width)) - 1
    folded = value
    for shift in range(1, width):  # any bit of an entry lands on its lowest bit
        folded |= value >> shift
    mask = int.from_bytes(bytes([_LOW_BITS[width]]) * -(-count * width // 8), "little")
    return (folded & mask).bit_count()


def read_reftable(file: InputFile, header: L.Header) -> array[int]:
    """The refcount table (zeros where it lies past the end of the file, as
    qemu reads them); its size was checked at open."""
    size = header.refcount_table_clusters * header.cluster_size
    offset = header.refcount_table_offset
    data = file.pread(offset, size) if offset < file.size else b""
    table = array("Q", data.ljust(size, b"\0"))
    if sys.byteorder == "little":
        table.byteswap()
    return table


def metadata_preallocated(file: InputFile, header: L.Header, reftable: array[int]) -> bool:
    """qemu's guess: True when the refcounts name at least
    ``max(real * 10 / 9, real + 2)`` clusters of the file, ``real`` being the
    clusters the file system allocated for it. Counting stops there, as
    qemu's; a refcount block qemu could not use (unaligned) means no."""
    cluster = header.cluster_size
    real = file.allocated_size() // cluster
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-file.size // cluster)
    width = 1 << header.refcount_order
    per_block = cluster * 8 // width
    blocks = min(-(-end_cluster // per_block), len(reftable))
    counted, index = 0, 0
    while counted < threshold and (index := first_other(reftable, index, blocks, 0)) < blocks:
        offset = reftable[index] & L.REFTABLE_OFFSET_MASK
        if offset & (cluster - 1):
            return False  # qemu's corruption error: the guess fails
        if offset:
            block = file.pread(offset, cluster).ljust(cluster, b"\0")
            counted += nonzero_entries(block, width, min(per_block,
                                                         end_cluster - index * per_block))
        index += 1
    return counted >= threshold
