"""The copy engine: every byte of an Image into a Writer, skipping what is not there.

It asks the reader for extents first, so holes and zero clusters are never
read; DATA extents are read in large aligned chunks and checked for zeros at
the writer's granularity, so all-zero pieces are declared, not written.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from instar.events import EventSink, Progress
from instar.formats.base import Writer
from instar.image import ExtentKind, Image

CHUNK = 2 << 20  # bytes read at once from a DATA extent
ZERO_GRANULARITY = 64 << 10  # zero detection inside a chunk
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_PIECE = bytes(ZERO_GRANULARITY)


def copy_image(
    image: Image,
    writer: Writer,
    *,
    chunk: int = CHUNK,
    zero_granularity: int = ZERO_GRANULARITY,
    events: EventSink | None = None,
) -> None:
    """Copy all of ``image`` into ``writer`` at the same offsets, then close it.

    Reading runs in a thread ahead of writing (the GIL is released while the
    kernel copies and while zlib/zstd decompress), so on two cores the input
    and output sides overlap, as qemu-img's do; at most ``PREFETCH`` pieces
    wait in between.

    ``zero_granularity`` 0 turns zero detection off: zeros are written as data
    (``qemu-img convert -S 0``, a fully allocated output). Smaller values than
    ``ZERO_GRANULARITY`` are raised to it: pieces are tested in a Python loop,
    and finer holes would change only the allocation, never the bytes.
    """
    if zero_granularity:
        zero_granularity = max(zero_granularity, ZERO_GRANULARITY)
    total = image.virtual_size
    for offset, length, data in _prefetched(_read_plan(image, chunk), PREFETCH):
        if data is not None:
            _write_nonzero(writer, offset, data, zero_granularity)
        elif zero_granularity == 0:
            _write_zero_data(writer, offset, offset + length, chunk)
        else:
            writer.write_zeroes(offset, length)
        if events is not None:
            events(Progress(offset + length, total))
    writer.close()


# (offset, length, the bytes read) for data; (offset, length, None) for a run of zeros.
Piece = tuple[int, int, bytes | None]
PREFETCH = 2


def _read_plan(image: Image, chunk: int) -> Iterator[Piece]:
    """The image as pieces in order: DATA read in chunks aligned to ``chunk``
    (so cluster-based readers stay on boundaries), everything else as zero runs."""
    total = image.virtual_size
    if not total:
        return
    for extent in image.extents(0, total):
        if extent.kind is not ExtentKind.DATA:
            yield extent.offset, extent.length, None
            continue
        position = extent.offset
        while position < extent.end:
            step_end = min(extent.end, (position // chunk + 1) * chunk)
            yield position, step_end - position, image.read(position, step_end - position)
            position = step_end


_Message = tuple[str, Piece | BaseException | None]


def _prefetched(items: Iterator[Piece], depth: int) -> Iterator[Piece]:
    """``items``, produced by a background thread running up to ``depth`` ahead.

    An exception in the producer is raised here, in the consumer; if the
    consumer stops early (an error while writing), the producer is told to
    stop and is joined before this returns.
    """
    channel: queue.Queue[_Message] = queue.Queue(depth)
    stop = threading.Event()

    def put(message: _Message) -> bool:
        while not stop.is_set():
            try:
                channel.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as error:  # handed to the consumer, which raises it
            put(("error", error))

    producer = threading.Thread(target=produce, name="instar-reader", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = channel.get()
            if kind == "end":
                return
            if isinstance(value, BaseException):
                raise value
            assert value is not None
            yield value
    finally:
        stop.set()
        producer.join()


def _write_zero_data(writer: Writer, start: int, end: int, chunk: int) -> None:
    for position in range(start, end, chunk):
        writer.write(position, _ZERO_CHUNK[: min(chunk, end - position)])


def _is_zero(data: bytes, start: int, end: int) -> bool:
    """True if ``data[start:end]`` is all zeros: a memcmp in place, no slice copied."""
    length = end - start
    zeros = _ZERO_PIECE if length == len(_ZERO_PIECE) else _ZERO_CHUNK[:length]
    return data.startswith(zeros, start)


def _write_nonzero(writer: Writer, offset: int, data: bytes, granularity: int) -> None:
    """Write ``data`` at ``offset``, declaring all-zero pieces instead of writing them.

    Zero tests are memcmps against a zero buffer (``startswith`` compares in
    place, where slicing would copy every piece first); neighbouring non-zero
    pieces are written together. Granularity 0 writes everything.
    """
    if granularity == 0:
        writer.write(offset, data)
        return
    if _ZERO_CHUNK.startswith(data):
        writer.write_zeroes(offset, len(data))
        return
    if offset // granularity == (offset + len(data) - 1) // granularity:
        # Within one piece. Across two, a zero half would make a writer allocate
        # a unit for zeros, which measure (counting units with data) leaves out.
        writer.write(offset, data)
        return
    run_start = 0  # start of the pending run of pieces of one kind
    run_is_zero: bool | None = None
    # Pieces start at absolute multiples of the granularity.
    piece_start = 0
    piece_end = min(len(data), granularity - offset % granularity)
    while piece_start < len(data):
        is_zero = _is_zero(data, piece_start, piece_end)
        if run_is_zero is not None and is_zero != run_is_zero:
            _flush(writer, offset, data, run_start, piece_start, run_is_zero)
            run_start = piece_start
        run_is_zero = is_zero
        piece_start, piece_end = piece_end, min(len(data), piece_end + granularity)
    if run_is_zero is not None:
        _flush(writer, offset, data, run_start, len(data), run_is_zero)


def _flush(writer: Writer, offset: int, data: bytes, start: int, end: int, zero: bool) -> None:
    if zero:
        writer.write_zeroes(offset + start, end - start)
    elif start == 0 and end == len(data):
        writer.write(offset, data)
    else:  # a view, not a slice: a slice would copy the run (0.1 s per GiB of them)
        writer.write(offset + start, memoryview(data)[start:end])
