"""Helpers every format shares, so no format keeps a private copy.

Read side: bounded inflate (zlib, raw deflate, zstd), the LRU table cache,
skipping runs of equal table entries at memory speed, and the map of host
units an image's mapping has claimed (the aliasing check).
Write side: the ordered compression pool, the zero-skipping cluster
sequencer, endian table packing.
"""

from __future__ import annotations

import mmap
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from instar.errors import FormatError
from instar.safety import MAX_CLAIM_MAP_BYTES

# ---------------------------------------------------------------------------
# Read side

Table = TypeVar("Table")


class TableCache(Generic[Table]):
    """Decoded metadata tables (L2 tables, grain tables, sector bitmaps) by
    key, least recently used dropped first; ``load`` reads one on a miss.

    ``limit`` bounds the tables kept, so memory stays bounded however large
    the image claims to be.
    """

    def __init__(self, load: Callable[[int], Table], limit: int) -> None:
        self._load = load
        self._limit = max(1, limit)
        self._tables: OrderedDict[int, Table] = OrderedDict()

    def get(self, key: int) -> Table:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = self._load(key)
        self._tables[key] = table
        if len(self._tables) > self._limit:
            self._tables.popitem(last=False)
        return table

    def __contains__(self, key: int) -> bool:
        return key in self._tables

    def clear(self) -> None:
        self._tables.clear()


# --- skipping runs of equal entries -----------------------------------------------------------

_SKIP_BLOCK = 4096  # entries compared at once
_PATTERNS: dict[tuple[str, int, int, int], bytes] = {}


def first_other(table: array[int], start: int, stop: int, value: int) -> int:
    """The first index in ``[start, stop)`` whose entry is not ``value``, or ``stop``.

    Empty stretches of a table (an unallocated L1, grain directory or BAT of
    an empty disk of petabytes has millions of entries) are skipped a block
    at a time with a memcmp, then the differing entry is found by halving:
    never a Python loop per entry.
    """
    return first_unlike(table, start, stop, value)


def first_unlike(
    table: array[int], start: int, stop: int, value: int, every: int = 1, other: int = 0
) -> int:
    """`first_other` for a table whose entries repeat with a period: every
    entry is ``value`` but each ``every``-th (``index % every == every - 1``),
    which is ``other`` (a VHDX BAT: ``every - 1`` payload entries, then a
    sector bitmap entry)."""
    stop = min(stop, len(table))
    if start >= stop:
        return stop
    if table[start] != (other if every > 1 and start % every == every - 1 else value):
        return start
    key = (table.typecode, value, every, other)
    pattern = _PATTERNS.get(key)
    periods = max(1, _SKIP_BLOCK // every)
    if pattern is None:
        period = array(table.typecode, [value]) * (every - 1) + array(table.typecode, [other])
        if every == 1:
            period = array(table.typecode, [value])
        pattern = _PATTERNS[key] = (period * (periods + 1)).tobytes()
    block = periods * every  # entries compared at once: whole periods
    size = table.itemsize
    view = memoryview(table).cast("B")
    try:
        index = start
        while index < stop:
            end = min(stop, index + block)
            if pattern.startswith(view[index * size : end * size], index % every * size):
                index = end
                continue
            low, high = index, end  # the first difference lies in [low, high)
            while high - low > 1:
                middle = (low + high) // 2
                if pattern.startswith(view[low * size : middle * size], low % every * size):
                    low = middle
                else:
                    high = middle
            return low
        return stop
    finally:
        view.release()


_PROGRESSION_BLOCK = 1 << 14  # entries compared at once
_WEIGHTS: dict[tuple[int, int], tuple[int, int]] = {}


def is_progression(table: array[int], first: int, step: int) -> bool:
    """Whether ``table`` is ``first, first + step, first + 2 * step...``: the
    usual layout of an L2 table or a grain directory.

    Compared as big integers, a block of entries at a time: the entries of
    a block read as one number in base 2^bits must equal ``f * R + step * S``
    with ``R = sum(B^i)`` and ``S = sum(i * B^i)`` (every digit of the
    progression fits in an entry, so the digits are unique). That is a few
    linear passes in C, not one Python object per entry.
    """
    count, width = len(table), table.itemsize
    if first < 0 or step < 0 or (first + max(0, count - 1) * step) >> (8 * width):
        return False
    order = sys.byteorder
    view = memoryview(table).cast("B")
    try:
        for start in range(0, count, _PROGRESSION_BLOCK):
            n = min(_PROGRESSION_BLOCK, count - start)
            ones, ramp = _weights(width, n)
            found = int.from_bytes(view[start * width : (start + n) * width], order)
            if found != (first + start * step) * ones + step * ramp:
                return False
        return True
    finally:
        view.release()


def _weights(width: int, count: int) -> tuple[int, int]:
    """(sum of B^i, sum of i * B^i) for i below ``count``, B = 2^(8 * width)."""
    key = (width, count)
    found = _WEIGHTS.get(key)
    if found is not None:
        return found
    bits = 8 * width
    ones = int.from_bytes((1).to_bytes(width, "little") * count, "little")
    ramp, done = 0, 1  # ramp holds the sum for i below ``done``
    while done < count:  # double: the upper half is the lower one plus done * B^i each
        take = min(done, count - done)
        lower = ramp & ((1 << (bits * take)) - 1)
        part_ones = int.from_bytes((1).to_bytes(width, "little") * take, "little")
        ramp += (lower + done * part_ones) << (bits * done)
        done += take
    if len(_WEIGHTS) < 64:
        _WEIGHTS[key] = (ones, ramp)
    return ones, ramp


# --- the aliasing check ---------------------------------------------------------------------


class HostClaims:
    """Which host units of one file an image's mapping has claimed.

    A host cluster, grain or block mapped by two guest ranges (or by a guest
    range and the image's own metadata) is corruption: qemu-img check calls
    it so, and it lets a small file stand for far more data than it holds.
    Formats claim each unit once, when the table that makes it reachable is
    loaded (an L2 table, a grain table, a BAT at open), never per read, so
    reading the same range again costs nothing and is never flagged.

    One bit per ``unit`` bytes of the file, in anonymous memory: the kernel
    backs only the pages that hold a claim, so an image pays for the part of
    its file it maps, and at most `MAX_CLAIM_MAP_BYTES` (a 1 TiB file of
    64 KiB clusters needs 2 MiB). Claims are unit-aligned in every caller,
    which makes the check exact. A file with more units than that (512-byte
    clusters on a file over 128 GiB) is tracked coarsely instead: cells of
    2^k units, each with a count of the units claimed in it, so a claim is
    refused only when its cell would hold more units than it has. That no
    longer catches every alias, but still bounds what an image maps by the
    size of its file, region by region.
    """

    def __init__(self, size: int, unit: int) -> None:
        if unit <= 0 or unit & (unit - 1):
            raise ValueError(f"claim unit {unit} is not a power of two")
        self.unit = unit
        self._shift = unit.bit_length() - 1
        self.units = max(1, -(-size // unit))
        self.exact = self.units <= MAX_CLAIM_MAP_BYTES * 8
        self._cell_bits = 0
        self._counts: memoryview[int] | None = None
        if self.exact:
            self._map = mmap.mmap(-1, -(-self.units // 8))
            return
        typecode, width, cell_bits = _cell_layout(self.units)
        self._cell_bits = cell_bits
        self._map = mmap.mmap(-1, ((self.units >> cell_bits) + 1) * width)
        self._counts = memoryview(self._map).cast(typecode)

    def close(self) -> None:
        """Give the memory back now (a driver's close)."""
        if self._counts is not None:
            self._counts.release()
            self._counts = None
        self._map.close()

    def claim(self, offset: int, length: int) -> bool:
        """Claim host bytes ``[offset, offset + length)`` (unit-aligned, or
        rounded out to units); False, claiming nothing, if part of it is
        claimed already (in the coarse mode: if a cell would overflow).
        What lies past the end of the file is not tracked."""
        first = offset >> self._shift
        end = min(self.units, (offset + length + self.unit - 1) >> self._shift)
        if first >= end:
            return True
        if self.exact:
            return self._claim_bits(first, end)
        return self._claim_cells(first, end)

    def claimed(self, offset: int, length: int) -> bool:
        """Whether any unit of ``[offset, offset + length)`` is claimed (or,
        coarse, lies in a cell with a claim)."""
        first = offset >> self._shift
        end = min(self.units, (offset + length + self.unit - 1) >> self._shift)
        if self.exact:
            return any(self._map[unit >> 3] & (1 << (unit & 7)) for unit in range(first, end))
        counts = self._counts
        assert counts is not None
        return any(counts[cell] for cell in range(first >> self._cell_bits,
                                                  ((end - 1) >> self._cell_bits) + 1))

    def _claim_bits(self, first: int, end: int) -> bool:
        bitmap = self._map
        low, low_bit = first >> 3, first & 7
        high, high_bit = end >> 3, end & 7
        if low == high:  # within one byte: the common case of one unit
            mask = ((1 << (end - first)) - 1) << low_bit
            byte = bitmap[low]
            if byte & mask:
                return False
            bitmap[low] = byte | mask
            return True
        head = (0xFF << low_bit) & 0xFF if low_bit else 0
        full_start = low + 1 if low_bit else low
        tail = (1 << high_bit) - 1
        if head and bitmap[low] & head:
            return False
        if tail and bitmap[high] & tail:
            return False
        if full_start < high and bitmap[full_start:high].count(0) != high - full_start:
            return False
        if head:
            bitmap[low] |= head
        if full_start < high:
            bitmap[full_start:high] = b"\xff" * (high - full_start)
        if tail:
            bitmap[high] |= tail
        return True

    def _claim_cells(self, first: int, end: int) -> bool:
        counts = self._counts
        assert counts is not None
        bits = self._cell_bits
        capacity = 1 << bits
        changes: list[tuple[int, int]] = []
        cell = first >> bits
        last = (end - 1) >> bits
        while cell <= last:
            start = max(first, cell << bits)
            stop = min(end, (cell + 1) << bits)
            if stop - start == capacity and cell < last:
                # Whole cells: all of them must be empty (a memcmp on the run).
                run_end = min(last, end >> bits)
                width = counts.itemsize
                if self._map[cell * width : run_end * width].count(0) != (run_end - cell) * width:
                    return False
                changes.append((cell, -(run_end - cell)))
                cell = run_end
                continue
            count = counts[cell] + stop - start
            if count > capacity:
                return False
            changes.append((cell, count))
            cell += 1
        for cell, count in changes:
            if count < 0:
                pattern = array(counts.format, [capacity]).tobytes()
                width = len(pattern)
                self._map[cell * width : (cell - count) * width] = pattern * -count
            else:
                counts[cell] = count
        return True


def _cell_layout(units: int) -> tuple[Literal["B", "H", "I", "Q"], int, int]:
    """(typecode, width, log2 of the units per cell) of the coarse counts: the
    narrowest counter whose cells fit `MAX_CLAIM_MAP_BYTES` and hold their count."""
    layouts: tuple[tuple[Literal["B", "H", "I", "Q"], int], ...] = (
        ("B", 1), ("H", 2), ("I", 4), ("Q", 8)
    )
    for typecode, width in layouts:
        needed = -(-units * width // MAX_CLAIM_MAP_BYTES)  # units per cell, at least
        cell_bits = max(1, (needed - 1).bit_length())
        if cell_bits < 8 * width:
            return typecode, width, cell_bits
    raise ValueError(f"{units} units cannot be counted")  # pragma: no cover - past 2^64


def alias_message(host: int, first: int, second: int) -> str:
    """qemu-img check's "corruption": one host offset behind two guest offsets."""
    low, high = sorted((first, second))
    return (
        f"host offset {host:#x} is mapped by two guest ranges, at guest offsets "
        f"{low:#x} and {high:#x} (a host unit mapped twice: the image is corrupt)"
    )


def metadata_alias_message(host: int, guest: int, what: str) -> str:
    """A guest range mapped onto the image's own metadata."""
    return (
        f"host offset {host:#x}, mapped at guest offset {guest:#x}, is also {what} "
        "(a host unit mapped twice: the image is corrupt)"
    )


DEFLATE, ZLIB, ZSTD = "deflate", "zlib", "zstd"


def inflate(data: bytes, limit: int, codec: str, where: str) -> bytes:
    """Decompress one unit, never producing more than ``limit`` bytes.

    ``codec``: DEFLATE (raw deflate, any window: qcow2), ZLIB (a zlib stream:
    VMDK grains) or ZSTD. Returns what the unit decodes to (callers check the
    length they need); a corrupt stream raises FormatError naming ``where``.
    A stream that would decode past ``limit`` is refused once one byte past
    it shows up (a compression bomb: a unit that stands for more than its own
    size); at most ``limit + 1`` bytes are ever produced. qemu instead keeps
    the first ``limit`` bytes of such a stream.
    """
    try:
        if codec == ZSTD:
            decompressor = zstd_module().ZstdDecompressor()
            out: bytes = decompressor.decompress(data, max_length=limit)
            more = not decompressor.eof and not decompressor.needs_input and bool(
                decompressor.decompress(b"", max_length=1)
            )
            ended = True  # a zstd frame cut short is a truncated unit: callers check the length
        else:
            inflater = zlib.decompressobj(-15 if codec == DEFLATE else 15)
            out = inflater.decompress(data, limit)
            more = not inflater.eof and bool(inflater.decompress(inflater.unconsumed_tail, 1))
            ended = inflater.eof
    except (zlib.error, ValueError, EOFError) as error:
        raise FormatError(f"{where} does not decompress: {error}") from None
    except Exception as error:  # zstd.ZstdError, which lives in a lazy import
        if type(error).__name__ != "ZstdError":
            raise
        raise FormatError(f"{where} does not decompress: {error}") from None
    if more:
        raise FormatError(f"{where} inflates to more than {limit} bytes (a compression bomb)")
    if codec == ZLIB and not ended:
        raise FormatError(f"{where} does not inflate to at most {limit} bytes")
    return out


def zstd_module() -> Any:
    """The zstd module (imported on first use): the standard library's from 3.14."""
    if sys.version_info >= (3, 14):
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]
    else:
        from backports import zstd
    return zstd
