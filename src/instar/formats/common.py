"""Helpers every format shares, so no format keeps a private copy.

Read side: bounded inflate (zlib, raw deflate, zstd), the LRU table cache.
Write side: the ordered compression pool, the zero-skipping cluster
sequencer, endian table packing.
"""

from __future__ import annotations

import os
import sys
import zlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from instar.errors import FormatError

if TYPE_CHECKING:
    from concurrent.futures import Future

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

    def clear(self) -> None:
        self._tables.clear()


DEFLATE, ZLIB, ZSTD = "deflate", "zlib", "zstd"


def inflate(data: bytes, limit: int, codec: str, where: str) -> bytes:
    """Decompress one unit, never producing more than ``limit`` bytes.

    ``codec``: DEFLATE (raw deflate, any window: qcow2), ZLIB (a zlib stream:
    VMDK grains) or ZSTD. Returns what the unit decodes to (callers check the
    length they need); a corrupt stream raises FormatError naming ``where``.
    A stream never decodes past ``limit``: a unit cannot be made to allocate
    more than its own size. Raw deflate is cut there (qemu reads the start of
    a longer qcow2 zlib stream); a zlib stream or a zstd frame that goes on
    past it is refused, as qemu refuses them.
    """
    try:
        if codec == ZSTD:
            decompressor = zstd_module().ZstdDecompressor()
            out: bytes = decompressor.decompress(data, max_length=limit)
            if len(out) == limit and not decompressor.eof:
                # qemu takes a frame only if it ends with the unit: a longer one
                # is a bomb, one cut short is damaged.
                if decompressor.decompress(b"", max_length=1):
                    raise FormatError(f"{where} does not inflate to at most {limit} bytes")
                if not decompressor.eof:
                    raise FormatError(f"{where} ends inside a zstd frame")
            return out
        inflater = zlib.decompressobj(-15 if codec == DEFLATE else 15)
        out = inflater.decompress(data, limit)
    except (zlib.error, ValueError, EOFError) as error:
        raise FormatError(f"{where} does not decompress: {error}") from None
    except Exception as error:  # zstd.ZstdError, which lives in a lazy import
        if type(error).__name__ != "ZstdError":
            raise
        raise FormatError(f"{where} does not decompress: {error}") from None
    if codec == ZLIB and not inflater.eof:
        raise FormatError(f"{where} does not inflate to at most {limit} bytes")
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
        if not isinstance(data, bytes | bytearray):
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
        self, first: int, data: bytes | bytearray, view: memoryview, start: int, count: int
    ) -> None:
        """Hand on ``count`` whole units from ``data[start:]`` in runs between zero units.

        The zero test is ``startswith`` against a zero unit: a memcmp in place,
        where slicing would copy every unit first.
        """
        unit = self._unit
        if not self._check_whole:
            self._emit(first, view[start : start + count * unit])
            return
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
