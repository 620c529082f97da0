"""Parallels: what ``qemu-img check`` 7.2 checks (qemu's ``parallels_co_check``).

In qemu's order, each line printed without a prefix:

- the header's "inuse" mark (a writer did not close the image): "ERROR
  image was not closed correctly", one corruption;
- every catalog entry qemu read at open (the header's ``catalog_entries``,
  past the disk's clusters too; past the end of the file they read as 0):
  a cluster that starts past the end of the file (one that starts exactly
  there is not) is "ERROR cluster I is outside image", one corruption, and
  is still counted below, as qemu 7.2 counts it;
- the allocation figures: total clusters (the catalog's entries), allocated
  ones (entries not 0), fragmented ones (an allocated entry right after an
  allocated one whose cluster it does not follow in the file);
- the image end offset: the end of the cluster furthest in the file, or one
  cluster when none is allocated (so an image of small clusters whose
  catalog spans several of them leaks from its creation, as qemu says);
  a file longer than that is "ERROR space leaked at the end of the image N"
  (N bytes), counted as that many clusters, rounded up, of leaks.

qemu takes the file's length in whole sectors (``bdrv_getlength``): a file
that ends inside a sector is as long as the sector, for both comparisons.

qemu 7.2 does not look for two entries naming one cluster (the reader
refuses such an image when it reads). The catalog is read a chunk at a
time, only where the file holds data (holes and what lies past its end are
zeros: nothing to count); the figures of a chunk are computed at C speed
(`_figures`), never with a Python step per entry.
"""

from __future__ import annotations

import sys
from array import array
from itertools import chain

from instar.findings import CORRUPTION, LEAK, CheckResult, Finding
from instar.formats.common import le32_table_pieces
from instar.formats.parallels.layout import HEADER_SIZE, INUSE_MAGIC, SECTOR
from instar.formats.parallels.reader import ParallelsDriver

READ_ENTRIES = 1 << 16  # catalog entries read and counted at once


def check(driver: ParallelsDriver) -> CheckResult:
    result = CheckResult()
    header = driver.header
    file = driver.file
    size = -(-file.size // SECTOR) * SECTOR  # qemu's bdrv_getlength: whole sectors
    if header.inuse == INUSE_MAGIC:
        result.add(CORRUPTION, "image-not-closed", "ERROR image was not closed correctly")
    cluster = driver.cluster_size
    unit = cluster if header.extended else SECTOR  # the bytes an entry counts
    step = cluster // unit  # what the entry of the cluster that follows adds
    beyond = size // unit  # an entry above this starts past the end of the file
    entries = header.catalog_entries
    result.total_clusters = entries
    highest = previous = 0
    for start, _, chunk in le32_table_pieces(file, HEADER_SIZE, entries, READ_ENTRIES):
        if chunk is None:  # zeros: a hole, or past the end of the file
            previous = 0
            continue
        top = max(chunk)
        if top:
            allocated, fragmented = _figures(previous, chunk, step, top)
            result.allocated_clusters += allocated
            result.fragmented_clusters += fragmented
            highest = max(highest, top)
            if top > beyond:
                _outside(result, start, chunk, beyond)
        previous = chunk[-1]
    result.image_end_offset = end = highest * unit + cluster
    if size > end:
        # One line, counting the clusters it covers, rounded up.
        result.extend([Finding(LEAK, "leaked-space",
                               f"ERROR space leaked at the end of the image {size - end}")],
                      leaks=-(-(size - end) // cluster))
    return result


def _outside(result: CheckResult, start: int, chunk: array[int], beyond: int) -> None:
    """The entries of ``chunk`` (the first is entry ``start``) above ``beyond``."""
    outside = [start + i for i, entry in enumerate(chunk) if entry > beyond]
    result.add_each(CORRUPTION, "cluster-outside-image", len(outside),
                    lambda i: f"ERROR cluster {outside[i]} is outside image")


_FLAG = bytes([0] + [1] * 255)  # a byte as 0 or 1: bytes.translate's table
_ONES: dict[int, int] = {}  # n -> the number whose n bytes are all 1


def _ones(count: int) -> int:
    ones = _ONES.get(count)
    if ones is None:
        ones = int.from_bytes(b"\x01" * count, "little")
        if len(_ONES) < 8:
            _ONES[count] = ones
    return ones


def _nonzero(entries: bytes) -> bytes:
    """A byte for each 32-bit entry of ``entries``: 1 where it is not 0."""
    count = len(entries) // 4
    merged = 0
    for byte in range(4):  # OR the entries' bytes together, a whole plane at a time
        merged |= int.from_bytes(entries[byte::4], "little")
    return merged.to_bytes(count, "little").translate(_FLAG)


def _figures(previous: int, chunk: array[int], step: int, top: int) -> tuple[int, int]:
    """qemu's allocated and fragmented counts over ``chunk`` (``previous``:
    the entry before it, 0 at the start; ``top``: its largest entry): a
    fragmented entry and the one before are both allocated, and it is not
    ``step`` past that one.

    Computed a whole chunk at a time, in C: a byte per entry says whether
    it is allocated (the OR of its four bytes); the entries before it plus
    ``step`` are one addition on the chunk read as a single number (its
    digits the 32-bit entries, none of which can carry when ``top + step``
    fits in 32 bits: otherwise those pairs are compared one by one), and a
    byte per entry says where that differs from the entry.
    """
    count = len(chunk)
    if sys.byteorder == "big":
        swapped = array("I", chunk)
        swapped.byteswap()
        entries = swapped.tobytes()
    else:
        entries = chunk.tobytes()  # little-endian
    ones = _ones(count)
    allocated = _nonzero(entries)
    was_allocated = (b"\x01" if previous else b"\x00") + allocated[:-1]
    before = int.from_bytes(was_allocated, "little")
    pairs = (before & int.from_bytes(allocated, "little")).bit_count()
    if max(top, previous) + step <= 0xFFFFFFFF:
        entries_before = previous.to_bytes(4, "little") + entries[:-4]
        expected = int.from_bytes(entries_before, "little") + step * _quads(count)
        differs = _nonzero((expected ^ int.from_bytes(entries, "little")).to_bytes(
            4 * count, "little"))
        continuing = (before & (ones ^ int.from_bytes(differs, "little"))).bit_count()
    else:  # an entry near 2^32 - 1: its sum would carry into the next
        continuing = sum(1 for last, entry in zip(chain([previous], chunk), chunk, strict=False)
                         if last and entry == last + step)
    return count - allocated.count(0), pairs - continuing


_QUADS: dict[int, int] = {}  # n -> the number whose n 32-bit digits are all 1


def _quads(count: int) -> int:
    quads = _QUADS.get(count)
    if quads is None:
        quads = int.from_bytes((1).to_bytes(4, "little") * count, "little")
        if len(_QUADS) < 8:
            _QUADS[count] = quads
    return quads
