"""Reading VDI images, dynamic and static, as qemu 7.2 reads them.

qemu answers block by block (1 MiB): an allocated block is DATA at its host
offset; an unallocated or discarded one is ZERO (qemu's vdi has no backing
file). A static image's blocks are also looked up in the file (qemu's
BDRV_BLOCK_RECURSE), so the holes of a sparse static image read as ZERO.

The block map is read in pages of 32768 entries (32 GiB of disk) when a
read first needs them, and kept in a bounded cache: a 512 TiB image (a
2 GiB block map, qemu's limit) costs nothing at open. The first time a
page is loaded, its entries are checked (docs/formats/vdi.md): every data
block must lie inside the file, clear of the header and the block map, and
no data block may be named by two entries (the aliasing check, `HostClaims`
over the grid of data blocks). A page that fails makes every later read
fail with the same message; ``info`` never reads the map.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterator

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import (
    HostClaims,
    TableCache,
    alias_message,
    first_other,
    metadata_alias_message,
)
from instar.formats.vdi import HEADER_SIZE
from instar.formats.vdi.layout import (
    BLOCK_SIZE,
    DISCARDED,
    TYPE_STATIC,
    UNALLOCATED,
    Header,
    blocks_for,
    bmap_bytes,
    checked_disk_size,
)
from instar.image import DATA, OFFSET_VALID, ZERO, Driver, Run, file_runs
from instar.safety import MAX_METADATA_CACHE_BYTES

PAGE_BITS = 15
PAGE_ENTRIES = 1 << PAGE_BITS
_PAGE_CACHE_BYTES = min(8 << 20, MAX_METADATA_CACHE_BYTES)
# No entry at or above this names a block in any file (4 PiB of data); below
# it, no entry's bytes can be mistaken for DISCARDED's (see `_canonical`).
_ENTRY_LIMIT = 0xFE000000
_DISCARDED_BYTES = array("I", [DISCARDED]).tobytes()
_UNALLOCATED_BYTES = array("I", [UNALLOCATED]).tobytes()


def open_vdi(file: InputFile, resolver: Resolver) -> Driver:
    """Open a VDI image; raise FormatError (qemu's words where qemu refuses) if malformed.

    Opened for ``check`` (the resolver's ``checking``), only qemu's refusals
    apply: the check reads the block map itself, as qemu does (zeros past the
    end of the file), and never the data."""
    header = Header.parse(file.pread(0, HEADER_SIZE))
    checking = getattr(resolver, "checking", False)
    size = checked_disk_size(header, strict=not checking)
    entries = blocks_for(size)
    if entries and header.offset_bmap + entries * 4 > file.size and not checking:
        raise FormatError(
            f"the block map ({entries} entries at offset {header.offset_bmap}) extends beyond "
            "the end of the file (the image is truncated or corrupt)")
    return VdiDriver(file, header, size)


class VdiDriver(Driver):
    """A VDI image over its block map (see the module notes)."""

    def __init__(self, file: InputFile, header: Header, size: int) -> None:
        self.file = file
        self.name = file.name
        self.header = header
        self.virtual_size = size
        self.block_size = BLOCK_SIZE
        self.static = header.image_type == TYPE_STATIC
        self._entries = blocks_for(size)
        self._bmap_offset = header.offset_bmap
        self._data_offset = data = header.offset_data
        # Entries below this name a block that ends inside the file.
        self._block_limit = min(_ENTRY_LIMIT, max(0, (file.size - data) // BLOCK_SIZE))
        # The metadata a data block must not overlap, as ranges of block indexes.
        self._metadata = [
            (*_blocks_over(data, start, length), start, what)
            for start, length, what in ((0, HEADER_SIZE, "the header"),
                                        (header.offset_bmap,
                                         bmap_bytes(header.blocks_in_image), "the block map"))
        ]
        pages = -(-self._entries // PAGE_ENTRIES)
        self._checked = bytearray(pages)  # pages whose entries were checked and claimed
        self._pages: TableCache[array[int]] = TableCache(
            self._load_page, _PAGE_CACHE_BYTES // (PAGE_ENTRIES * 4))
        # Data blocks claimed so far, on the grid of blocks from offset_data.
        self._claims = HostClaims(max(0, file.size - data), BLOCK_SIZE)
        self.corruption: str | None = None  # a page failed its check: reading fails

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if self.corruption is not None:
            raise FormatError(self.corruption)
        end = offset + length
        position = offset
        while position < end:
            index, within = divmod(position, BLOCK_SIZE)
            number = index >> PAGE_BITS
            page = self._pages.get(number)
            base = number << PAGE_BITS
            slot = index - base
            entry = page[slot]
            if entry == UNALLOCATED:  # DISCARDED too: pages are canonical
                last = min(len(page), -(-end // BLOCK_SIZE) - base)
                following = first_other(page, slot + 1, last, UNALLOCATED)
                stop = min(end, (base + following) * BLOCK_SIZE)
                # qemu answers each block on its own.
                yield Run(position, stop, ZERO, step=BLOCK_SIZE)
                position = stop
                continue
            step = min(end - position, BLOCK_SIZE - within)
            host = self._data_offset + entry * BLOCK_SIZE + within
            if self.static:
                yield from file_runs(self.file, host, step, position, DATA)
            else:
                yield Run(position, position + step, DATA | OFFSET_VALID, self.file, host)
            position += step

    # -- the block map, a page at a time --

    def _read_page(self, number: int) -> array[int]:
        """Page ``number`` of the block map as stored."""
        first = number << PAGE_BITS
        count = min(PAGE_ENTRIES, self._entries - first)
        data = self.file.pread_exact(self._bmap_offset + first * 4, count * 4, "block map")
        page = array("I")
        assert page.itemsize == 4
        page.frombytes(data)
        if sys.byteorder == "big":
            page.byteswap()
        return page

    def _load_page(self, number: int) -> array[int]:
        """Page ``number``, checked and claimed the first time, canonical."""
        page = self._read_page(number)
        if not self._checked[number]:
            try:
                self._check(number, page)
            except FormatError as error:
                self.corruption = str(error)
                raise
            self._checked[number] = 1
        return _canonical(page)

    def _check(self, number: int, page: array[int]) -> None:
        """Every data block the page names lies in the file, clear of the
        metadata, and is claimed once (or FormatError). Sorted, the page's
        entries are checked with a few C-speed passes and claimed as runs of
        consecutive blocks: one claim for the usual layout."""
        values = sorted(page)
        count = bisect_left(values, DISCARDED)
        if not count:
            return
        base = number << PAGE_BITS
        if values[count - 1] >= self._block_limit:
            slot = next(i for i, v in enumerate(page) if self._block_limit <= v < DISCARDED)
            raise FormatError(
                f"block map entry {base + slot} points beyond the end of the file "
                "(the image is truncated or corrupt)")
        for low, high, region, what in self._metadata:
            at = bisect_left(values, low, 0, count)
            if at < count and values[at] <= high:
                block = values[at]
                start = self._data_offset + block * BLOCK_SIZE
                raise FormatError(metadata_alias_message(
                    max(start, region), (base + page.index(block)) * BLOCK_SIZE, what))
        allocated = values[:count]
        if allocated[-1] - allocated[0] == count - 1 and len(set(allocated)) == count:
            runs = [(allocated[0], count)]
        else:
            runs = self._runs(page, base, allocated)
        for first, length in runs:
            if not self._claims.claim(first * BLOCK_SIZE, length * BLOCK_SIZE):
                raise FormatError(self._alias(number, page, first, first + length))

    def _runs(self, page: array[int], base: int, allocated: list[int]) -> list[tuple[int, int]]:
        """(first block, count) of each run of consecutive blocks in sorted
        ``allocated``; a block named twice in the page is FormatError."""
        runs: list[tuple[int, int]] = []
        start = previous = allocated[0]
        for block in allocated[1:]:
            if block == previous:
                first = page.index(block)
                second = page.index(block, first + 1)
                raise FormatError(alias_message(
                    self._data_offset + block * BLOCK_SIZE, (base + first) * BLOCK_SIZE,
                    (base + second) * BLOCK_SIZE))
            if block != previous + 1:
                runs.append((start, previous + 1 - start))
                start = block
            previous = block
        runs.append((start, previous + 1 - start))
        return runs

    def _alias(self, number: int, page: array[int], first: int, end: int) -> str:
        """The message for blocks ``[first, end)`` of page ``number``, some of
        which a page checked before names too (found by reading those pages
        again: this is the error path)."""
        for other in range(len(self._checked)):
            if other == number or not self._checked[other]:
                continue
            theirs = self._read_page(other)
            values = sorted(theirs)
            at = bisect_left(values, first)
            if at < len(values) and values[at] < end:
                block = values[at]
                return alias_message(
                    self._data_offset + block * BLOCK_SIZE,
                    ((number << PAGE_BITS) + page.index(block)) * BLOCK_SIZE,
                    ((other << PAGE_BITS) + theirs.index(block)) * BLOCK_SIZE)
        # The claim map is coarse (a file over 256 TiB): the twin is not known exactly.
        guest = ((number << PAGE_BITS) + page.index(first)) * BLOCK_SIZE
        return metadata_alias_message(
            self._data_offset + first * BLOCK_SIZE, guest, "near a block mapped elsewhere")

    def close(self) -> None:
        self._claims.close()
        self._pages.clear()
        self.file.close()


def _blocks_over(data: int, start: int, length: int) -> tuple[int, int]:
    """The block indexes ``[low, high]`` whose data blocks (from ``data`` on)
    overlap host bytes ``[start, start + length)``; empty when high < low."""
    low = max(0, (start - data) // BLOCK_SIZE)
    high = -(-(start + length - data) // BLOCK_SIZE) - 1
    return low, high


def _canonical(page: array[int]) -> array[int]:
    """The page with DISCARDED entries as UNALLOCATED (both read as zeros), so
    one search skips a run of either. A checked page's allocated entries are
    all below `_ENTRY_LIMIT`, so the byte pattern of DISCARDED can only match
    at an entry's start."""
    if not page.count(DISCARDED):
        return page
    canonical = array("I")
    canonical.frombytes(page.tobytes().replace(_DISCARDED_BYTES, _UNALLOCATED_BYTES))
    return canonical
