"""VDI: what ``qemu-img check`` 7.2 checks (qemu's ``vdi_co_check``).

qemu walks the block map it read at open: the header's ``blocks_in_image``
entries from ``offset_bmap`` (past the end of the file they read as zeros,
so as block 0), in block order. An allocated entry (below DISCARDED) names
a data block below ``blocks_in_image`` and counts as allocated, or is
"ERROR: block index I too large, is V". A data block an earlier entry named
is "ERROR: block index V also used by V" (qemu prints the block's number
twice), and counts as allocated all the same. Last, that count is compared
with the header's ``blocks_allocated``: "ERROR: allocated blocks mismatch,
is N, should be M". Each line is one corruption, printed without a prefix.
qemu checks nothing else (no data block against the end of the file or the
metadata: the reader refuses those when it reads) and reports no
allocation figures and no image end offset.

Bounded by the file, whatever ``blocks_in_image`` claims: the entries the
file holds are read a chunk at a time, those in its holes or past its end
(all zeros) are counted at once. The blocks seen so far are bits in anonymous memory
(`HostClaims`, kept exact up to qemu's largest map), backed only where an
entry names a block. A page of entries that is a progression of new
blocks (a static image, or one written in order) is claimed at once; any
other is claimed entry by entry (one short Python step each), and walked
again for its lines only when it has something to report (once instar
keeps no more lines, only counted). A chunk of equal entries (zeros, a
stretch never written) is counted at once.
"""

from __future__ import annotations

from array import array

from instar.findings import CORRUPTION, MAX_FINDINGS, CheckResult
from instar.formats.common import HostClaims, first_other, is_progression, le32_table_pieces
from instar.formats.vdi.layout import BLOCKS_MAX, DISCARDED, UNALLOCATED
from instar.formats.vdi.reader import VdiDriver

PAGE_ENTRIES = 1 << 15  # entries checked at once
READ_ENTRIES = 1 << 20  # entries read at once (4 MiB)


def check(driver: VdiDriver) -> CheckResult:
    result = CheckResult()
    header = driver.header
    blocks = header.blocks_in_image
    seen = HostClaims(blocks, 1, max_map_bytes=BLOCKS_MAX // 8 + 1)
    try:
        walk = _Walk(result, blocks, seen)
        for start, length, chunk in le32_table_pieces(driver.file, header.offset_bmap, blocks,
                                                      READ_ENTRIES):
            if chunk is None:  # zeros: a hole, or past the end of the file
                walk.run(start, 0, length)
            elif first_other(chunk, 0, length, chunk[0]) == length:
                walk.run(start, chunk[0], length)
            else:
                for first in range(0, length, PAGE_ENTRIES):
                    walk.page(start + first, chunk[first : first + PAGE_ENTRIES])
    finally:
        seen.close()
    if walk.allocated != header.blocks_allocated:
        result.add(CORRUPTION, "allocated-count-mismatch",
                   f"ERROR: allocated blocks mismatch, is {walk.allocated}, "
                   f"should be {header.blocks_allocated}")
    return result


class _Walk:
    """qemu's walk over the entries, in block order: the count of allocated
    entries, and the blocks named so far (``seen``)."""

    def __init__(self, result: CheckResult, blocks: int, seen: HostClaims) -> None:
        self.result = result
        self.blocks = blocks
        self.seen = seen
        self.allocated = 0

    def page(self, index: int, page: array[int]) -> None:
        """Entries ``index...`` of the map: a progression of new blocks (a
        static image, or one written in order) is claimed at once; otherwise
        each block named is claimed in order, and only a page with something
        to report is walked again for its lines."""
        first, count = page[0], len(page)
        if (first + count <= self.blocks and is_progression(page, first, 1)
                and self.seen.claim(first, count)):
            self.allocated += count
            return
        blocks = self.blocks
        named = [entry for entry in page if entry < blocks]
        self.allocated += len(named)
        fresh = self.seen.claim_each(named)
        too_large = count - len(named)
        if too_large:
            too_large -= page.count(UNALLOCATED) + page.count(DISCARDED)
        if not too_large and fresh.count(0) == 0:
            return
        if len(self.result.findings) >= MAX_FINDINGS:  # only counted from here on
            self.result.add_each(CORRUPTION, "block-index-too-large", too_large, str)
            self.result.add_each(CORRUPTION, "block-used-twice", fresh.count(0), str)
            return
        claims = iter(fresh)
        for position, entry in enumerate(page):
            if entry < blocks:
                if not next(claims):
                    self._used_twice(entry, 1)
            elif entry < DISCARDED:
                self._too_large(index + position, entry, 1)

    def run(self, index: int, value: int, length: int) -> None:
        """``length`` entries from ``index`` on, each ``value``."""
        if value >= DISCARDED:
            return
        if value >= self.blocks:
            self._too_large(index, value, length)
            return
        self.allocated += length
        self._used_twice(value, length - self.seen.claim(value, 1))

    def _too_large(self, index: int, value: int, count: int) -> None:
        """Entries ``index...index + count - 1``, each ``value``, too large."""
        self.result.add_each(CORRUPTION, "block-index-too-large", count,
                             lambda i: f"ERROR: block index {index + i} too large, is {value}")

    def _used_twice(self, block: int, count: int) -> None:
        """``count`` entries naming ``block``, which an entry before named."""
        message = f"ERROR: block index {block} also used by {block}"
        self.result.add_each(CORRUPTION, "block-used-twice", count, lambda i: message)
