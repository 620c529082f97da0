"""Helpers every format shares, so no format keeps a private copy.

Read side: bounded inflate (zlib, raw deflate, zstd, bzip2), the LRU table cache,
skipping runs of equal table entries at memory speed, and the map of host
units an image's mapping has claimed (the aliasing check).
Write side: the ordered compression pool, the zero-skipping cluster
sequencer, endian table packing (and unpacking, for readers).
"""

from __future__ import annotations

import mmap
import os
import sys
import zlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator

from instar.errors import FormatError
from instar.files import ExactReads, InputFile
from instar.image import file_layout
from instar.runtime_types import TYPE_CHECKING, Generic, TypeVar
from instar.safety import MAX_CLAIM_MAP_BYTES

if TYPE_CHECKING:
    from concurrent.futures import Future
    from typing import Any, Literal

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


def read_le32_table(file: ExactReads, offset: int, count: int) -> array[int]:
    """``count`` little-endian 32-bit entries at ``offset`` of ``file``, as
    qemu reads a table: what lies past the end of the file reads as zeros."""
    data = file.pread(offset, 4 * count)
    return unpack_table(data + bytes(4 * count - len(data)), 4, "little")


def le32_table_pieces(file: InputFile, offset: int, count: int, chunk: int
                      ) -> Iterator[tuple[int, int, array[int] | None]]:
    """The ``count`` entries of a table of little-endian 32-bit entries at
    ``offset``, as qemu reads them, in pieces: (first index, length, entries),
    ``entries`` None for a stretch of zeros (a hole in the file, or past its
    end), never read; the entries the file holds at most ``chunk`` at a time.
    A table of gigabytes of holes costs a few lseeks."""
    position = 0  # the first entry not yet given
    for start, length, has_data in file_layout(file, offset, 4 * count):
        if not has_data:
            continue
        first = max(position, (start - offset) // 4)
        end = min(count, -(-(start + length - offset) // 4))
        if first > position:
            yield position, first - position, None
        for at in range(first, end, chunk):
            size = min(chunk, end - at)
            yield at, size, read_le32_table(file, offset + 4 * at, size)
        position = max(position, end)
    if position < count:
        yield position, count - position, None


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
    size of its file, region by region. A caller that must stay exact (a
    check counting every block named twice) passes a larger
    ``max_map_bytes``: still only the pages that hold a claim are backed.
    """

    def __init__(self, size: int, unit: int, max_map_bytes: int | None = None) -> None:
        if unit <= 0 or unit & (unit - 1):
            raise ValueError(f"claim unit {unit} is not a power of two")
        self.unit = unit
        self._shift = unit.bit_length() - 1
        self.units = max(1, -(-size // unit))
        limit = MAX_CLAIM_MAP_BYTES if max_map_bytes is None else max_map_bytes
        self.exact = self.units <= limit * 8
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

    def claim_each(self, units: Iterable[int]) -> bytearray:
        """Claim the units of index ``units`` one by one, in order (an exact
        map only): a 1 for each newly claimed, a 0 for each claimed before
        (by an earlier claim, or earlier in ``units``). For a check that
        reports every unit named twice: one short Python step a unit."""
        if not self.exact:
            raise ValueError("claim_each needs an exact claim map")
        bitmap = self._map
        flags = bytearray()
        append = flags.append
        for unit in units:
            byte, bit = unit >> 3, 1 << (unit & 7)
            value = bitmap[byte]
            if value & bit:
                append(0)
            else:
                bitmap[byte] = value | bit
                append(1)
        return flags

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

    def count(self, offset: int, length: int) -> int:
        """How many units of ``[offset, offset + length)`` are claimed (coarse:
        the claims in the cells the range touches): a check's leaks are the
        units nothing claimed. Counted a chunk at a time, in C."""
        first = offset >> self._shift
        end = min(self.units, (offset + length + self.unit - 1) >> self._shift)
        if first >= end:
            return 0
        if not self.exact:
            counts = self._counts
            assert counts is not None
            return sum(counts[first >> self._cell_bits : ((end - 1) >> self._cell_bits) + 1])
        bitmap = self._map
        low, high = first >> 3, (end - 1) >> 3  # the bytes holding the range's bits
        total = 0
        for start in range(low, high + 1, _COUNT_CHUNK):
            chunk = bitmap[start : min(high + 1, start + _COUNT_CHUNK)]
            total += int.from_bytes(chunk, "little").bit_count()
        total -= (bitmap[low] & ((1 << (first & 7)) - 1)).bit_count()  # before the range
        if end & 7:
            total -= (bitmap[high] >> (end & 7)).bit_count()  # after it
        return total

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


_COUNT_CHUNK = 1 << 20  # bitmap bytes counted at once


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


DEFLATE, ZLIB, ZSTD, BZIP2 = "deflate", "zlib", "zstd", "bzip2"


def inflate(data: bytes, limit: int, codec: str, where: str) -> bytes:
    """Decompress one unit, never producing more than ``limit`` bytes.

    ``codec``: DEFLATE (raw deflate, any window: qcow2), ZLIB (a zlib stream:
    VMDK grains, cloop blocks, dmg chunks), ZSTD, or BZIP2 (dmg chunks).
    Returns what the unit decodes to (callers check the length they need); a
    corrupt stream raises FormatError naming ``where``. A stream that would
    decode past ``limit`` is refused once one byte past it shows up (a
    compression bomb: a unit that stands for more than its own size); at
    most ``limit + 1`` bytes are ever produced. qemu refuses such a zlib or
    bzip2 stream or zstd frame too, but keeps the first ``limit`` bytes of a
    raw deflate stream (qcow2's zlib): there instar differs. A zstd frame
    that ends inside the unit's last byte is damaged, as qemu says; a zlib or
    bzip2 stream must end inside the unit.
    """
    try:
        if codec == ZSTD:
            decompressor = zstd_module().ZstdDecompressor()
            out: bytes = decompressor.decompress(data, max_length=limit)
            more = not decompressor.eof and not decompressor.needs_input and bool(
                decompressor.decompress(b"", max_length=1)
            )
            if len(out) == limit and not more and not decompressor.eof:
                # qemu takes a frame only if it ends with the unit.
                raise FormatError(f"{where} ends inside a zstd frame")
            ended = True  # a frame cut short earlier: callers check the length
        elif codec == BZIP2:
            import bz2  # on first use: only dmg has bzip2 units

            unpacker = bz2.BZ2Decompressor()
            out = unpacker.decompress(data, max_length=limit)
            more = not unpacker.eof and not unpacker.needs_input and bool(
                unpacker.decompress(b"", max_length=1)
            )
            ended = unpacker.eof
        else:
            inflater = zlib.decompressobj(-15 if codec == DEFLATE else 15)
            out = inflater.decompress(data, limit)
            more = not inflater.eof and bool(inflater.decompress(inflater.unconsumed_tail, 1))
            ended = inflater.eof
    except (zlib.error, ValueError, EOFError, OSError) as error:  # bz2 says OSError
        raise FormatError(f"{where} does not decompress: {error}") from None
    except Exception as error:  # zstd.ZstdError, which lives in a lazy import
        if type(error).__name__ != "ZstdError":
            raise
        raise FormatError(f"{where} does not decompress: {error}") from None
    if more:
        raise FormatError(f"{where} inflates to more than {limit} bytes (a compression bomb)")
    if codec in (ZLIB, BZIP2) and not ended:
        raise FormatError(f"{where} ends inside its {codec} stream (cut short or corrupt)")
    return out


def zstd_module() -> Any:
    """The zstd module (imported on first use): the standard library's from 3.14."""
    if sys.version_info >= (3, 14):
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]
    else:
        from backports import zstd
    return zstd


# =============================================================================================
# Write side: endian table packing, the zero-skipping unit sequencer, the ordered
# compression pool. Writers take data in increasing offsets (see formats.base.Writer).
# =============================================================================================

_TABLE_TYPECODES: dict[int, str] = {4: "I", 8: "Q"}
assert all(array(code).itemsize == width for width, code in _TABLE_TYPECODES.items())


def pack_table(
    values: Iterable[int],
    width: Literal[4, 8],
    byteorder: Literal["big", "little"],
    size: int = 0,
    fill: int = 0,
) -> bytes:
    """``values`` as unsigned ``width``-byte integers in ``byteorder``, then ``fill``
    bytes up to ``size`` bytes.

    Every format's tables (qcow2 L1/L2/refcount table, VHD BAT, VMDK GD/GT,
    VHDX BAT) differ only in these parameters; an array and one byteswap pack
    them at C speed. ``values`` itself is never changed.
    """
    typecode = _TABLE_TYPECODES[width]
    if isinstance(values, array) and values.typecode == typecode and byteorder == sys.byteorder:
        data = values.tobytes()
    else:
        table = array(typecode, values)
        if byteorder != sys.byteorder:
            table.byteswap()
        data = table.tobytes()
    if len(data) < size:
        data += bytes([fill]) * (size - len(data))
    return data


def unpack_table(data: bytes, width: Literal[4, 8], byteorder: Literal["big", "little"]
                 ) -> array[int]:
    """Table bytes as native unsigned ``width``-byte integers: `pack_table` undone
    (qcow2 and qcow L1/L2 tables are big-endian, QED's little-endian)."""
    table = array(_TABLE_TYPECODES[width])
    table.frombytes(data[: len(data) - len(data) % width])
    if byteorder != sys.byteorder:
        table.byteswap()
    return table


def read_table(file: ExactReads, offset: int, entries: int, width: Literal[4, 8],
               byteorder: Literal["big", "little"], what: str) -> array[int]:
    """``entries`` table entries read from ``offset`` straight into their
    array (`unpack_table` of a `pread_exact`, without the bytes in between:
    a 2 PiB qcow2's L1 table is 32 MiB)."""
    table = array(_TABLE_TYPECODES[width], bytes(width)) * entries
    file.pread_exact_into(memoryview(table).cast("B"), offset, what)
    if byteorder != sys.byteorder:
        table.byteswap()
    return table


def unit_spans(offset: int, length: int, unit: int) -> Iterator[tuple[int, int, int, int]]:
    """``[offset, offset + length)`` cut at multiples of ``unit``, as
    (unit index, offset in the unit, offset in the range, length) per piece.

    For writers that place every piece straight into its block (VHD, VHDX)
    rather than assembling whole units as `UnitSequencer` does.
    """
    done = 0
    while done < length:
        index, within = divmod(offset + done, unit)
        step = min(length - done, unit - within)
        yield index, within, done, step
        done += step


Emit = Callable[[int, memoryview], None]


class UnitSequencer:
    """Turns writes in increasing offsets into runs of whole, non-zero units.

    The units are qcow2 clusters or VMDK grains. A unit written in pieces is
    assembled in one reused buffer (what is not written stays zero); runs of
    whole units are handed on without a copy; all-zero units are dropped, as a
    new image reads them as zeros. ``emit(first, data)`` receives
    ``len(data) // unit`` units from unit index ``first``, contiguous in the
    disk. ``data`` may be the reused buffer: a sink that keeps it beyond the
    call must copy it unless ``data.readonly``.

    ``check_whole=False`` leaves whole units untested (qcow2 clusters at least
    as large as the copy engine's zero granularity arrive already tested).
    """

    def __init__(self, unit: int, size: int, emit: Emit, *, check_whole: bool = True) -> None:
        self._unit = unit
        self._size = size
        self._emit = emit
        self._check_whole = check_whole
        self._zero = bytes(unit)
        self._position = 0  # writes must not go back before this
        self._pending_index = -1  # the unit being assembled, or -1
        self._pending = bytearray()  # allocated on the first partial unit, then reused

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Hand on the whole units of ``data``; keep a partial one until it is complete."""
        end = offset + len(data)
        if offset < self._position:
            raise ValueError(f"write at {offset} goes back before {self._position}")
        if end > self._size:
            raise ValueError(f"write [{offset}, {end}) outside the image")
        if self._check_whole and not isinstance(data, bytes | bytearray):
            data = bytes(data)  # zero tests use bytes.startswith
        view = memoryview(data)
        unit = self._unit
        position = offset
        while position < end:
            index, within = divmod(position, unit)
            if index != self._pending_index:
                self.flush()
                whole = (end - position) // unit
                if within == 0 and whole:
                    self._emit_whole(index, data, view, position - offset, whole)
                    position += whole * unit
                    continue
                self._start_pending(index)
            step = min(unit - within, end - position)
            start = position - offset
            self._pending[within : within + step] = view[start : start + step]
            position += step
            if within + step == unit:
                self.flush()
        self._position = end

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to store (a new image reads as zeros); only the order is checked."""
        if offset < self._position:
            raise ValueError(f"zeroes at {offset} go back before {self._position}")
        self._position = offset + length

    def flush(self) -> None:
        """Hand on the unit being assembled, if any: before the metadata is written."""
        if self._pending_index < 0:
            return
        index, self._pending_index = self._pending_index, -1
        if self._pending != self._zero:
            self._emit(index, memoryview(self._pending))

    def _start_pending(self, index: int) -> None:
        if self._pending:
            self._pending[:] = self._zero
        else:
            self._pending = bytearray(self._unit)
        self._pending_index = index

    def _emit_whole(
        self, first: int, data: bytes | bytearray | memoryview, view: memoryview, start: int,
        count: int,
    ) -> None:
        """Hand on ``count`` whole units from ``data[start:]`` in runs between zero units.

        The zero test is ``startswith`` against a zero unit: a memcmp in place,
        where slicing would copy every unit first.
        """
        unit = self._unit
        if not self._check_whole:
            self._emit(first, view[start : start + count * unit])
            return
        assert not isinstance(data, memoryview)  # write made it bytes to test the units
        zero = self._zero
        run_start = -1
        for i in range(count):
            is_zero = data.startswith(zero, start + i * unit)
            if is_zero and run_start >= 0:
                self._emit(first + run_start, view[start + run_start * unit : start + i * unit])
                run_start = -1
            elif not is_zero and run_start < 0:
                run_start = i
        if run_start >= 0:
            self._emit(first + run_start, view[start + run_start * unit : start + count * unit])


R = TypeVar("R")
Codec = Callable[[], Callable[[memoryview], R]]  # makes one thread's compress function

COMPRESS_BATCH_BYTES = 512 << 10  # units handed to a thread at once
COMPRESS_IN_FLIGHT_BYTES = 8 << 20  # units queued or being compressed at once


class CompressionPool(Generic[R]):
    """Compresses units on a few threads and delivers the results in order.

    zlib and zstd release the GIL, so units compress in parallel while the
    writer places earlier results. Units travel in batches of about
    ``COMPRESS_BATCH_BYTES`` (one hand-off per batch, not per unit); each
    thread calls ``codec()`` once, so a codec that can reuse a context (zstd)
    keeps one per thread. ``deliver(index, unit, result)`` runs on the
    caller's thread, in unit order. ``concurrent.futures`` is imported only
    when a pool is made: writers without compression never load it.
    """

    def __init__(
        self,
        unit: int,
        codec: Codec[R],
        deliver: Callable[[int, memoryview, R], None],
        *,
        name: str,
        batch_bytes: int = COMPRESS_BATCH_BYTES,
        in_flight_bytes: int = COMPRESS_IN_FLIGHT_BYTES,
    ) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(4, os.cpu_count() or 1))
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            workers, thread_name_prefix=name
        )
        self._local = threading.local()
        self._unit = unit
        self._codec = codec
        self._deliver = deliver
        self._batch_units = max(1, batch_bytes // unit)
        self._max_batches = max(2 * workers, in_flight_bytes // (self._batch_units * unit))
        self._batch: list[tuple[int, memoryview]] = []  # runs of units for the next task
        self._batch_count = 0  # units in ``_batch``
        self._in_flight: deque[tuple[list[tuple[int, memoryview]], Future[list[R]]]] = deque()

    def submit(self, first: int, data: memoryview) -> None:
        """Queue the units of ``data`` (indexes from ``first``); deliver those done."""
        if not data.readonly:  # a caller's reused buffer: keep a copy
            data = memoryview(bytes(data))
        unit = self._unit
        count = len(data) // unit
        done = 0
        while done < count:
            take = min(count - done, self._batch_units - self._batch_count)
            self._batch.append((first + done, data[done * unit : (done + take) * unit]))
            self._batch_count += take
            done += take
            if self._batch_count == self._batch_units:
                self._send()
        self._retire(self._max_batches)

    def finish(self) -> None:
        """Compress what is queued and deliver every result."""
        if self._batch:
            self._send()
        self._retire(0)

    def close(self) -> None:
        """Stop the threads; results not delivered yet are dropped (after an error)."""
        for _, future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        self._batch, self._batch_count = [], 0
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _send(self) -> None:
        assert self._executor is not None, "the pool is closed"
        batch, self._batch, self._batch_count = self._batch, [], 0
        self._in_flight.append((batch, self._executor.submit(self._compress, batch)))

    def _compress(self, batch: list[tuple[int, memoryview]]) -> list[R]:
        """Runs on a pool thread: every unit of ``batch``, with this thread's codec."""
        compress: Callable[[memoryview], R] | None = getattr(self._local, "compress", None)
        if compress is None:
            compress = self._local.compress = self._codec()
        unit = self._unit
        return [compress(run[i : i + unit]) for _, run in batch for i in range(0, len(run), unit)]

    def _retire(self, keep: int) -> None:
        """Deliver finished batches in order, waiting while more than ``keep`` are out."""
        unit = self._unit
        deliver = self._deliver
        in_flight = self._in_flight
        while in_flight and (len(in_flight) > keep or in_flight[0][1].done()):
            batch, future = in_flight.popleft()
            results = future.result()
            k = 0
            for first, run in batch:
                for i in range(len(run) // unit):
                    deliver(first + i, run[i * unit : (i + 1) * unit], results[k])
                    k += 1
