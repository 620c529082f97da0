"""``instar compare``: qemu-img compare's verdicts, offsets and exit codes.

qemu-img walks both images in "chunks": runs of equal block status (the
intersection of the two images' runs), cut to 2 MiB where data is read. It
skips chunks that read as zeros on both sides, and reports a mismatch at the
first differing 512-byte *sector of the chunk*: so the offset printed is the
chunk start plus a multiple of 512, which is not always sector aligned (a raw
file of 1000 bytes has a chunk boundary at 1000). This module walks the same
chunks from `Image.extents`, but reads in larger blocks and compares bytes with
bytes; only the chunk arithmetic mirrors qemu, so the verdict, the offset, the
strict-mode messages and the progress meter are qemu's.

Exit codes, as qemu-img: 0 identical, 1 different, 2 an image could not be
opened, 3 block status failed, 4 a read failed.
"""

from __future__ import annotations

from instar.errors import CompareError, ImageReadError, InstarError
from instar.events import Advance, EventSink, Line, ignore
from instar.files import AlignedBuffer
from instar.image import ALLOCATED, EOF, ZERO, BlockImage, ExtentKind, StatusLayer
from instar.opener import Broker, ImageOpener
from instar.record import Record
from instar.safety import AllowedDirs, PathPolicy, allowed_dirs
from instar.worker import SandboxSettings, run_job

SECTOR = 512
IO_BUF_SIZE = 2 << 20  # qemu-img compare's chunk limit where it reads
READ_BLOCK = 4 * IO_BUF_SIZE  # what instar reads at once: whole qemu chunks
SCAN_STEP = 64 << 10  # first pass of the search for the first difference

IDENTICAL, DIFFERENT, OPEN_ERROR, STATUS_ERROR, READ_ERROR = 0, 1, 2, 3, 4



class Side(Record):
    """One of the two images: how it is named in messages, and its status."""

    __slots__ = ("buffer", "image", "layer", "name")

    def __init__(
        self,
        image: BlockImage,
        name: str,
        layer: StatusLayer,
    ) -> None:
        self.image = image
        self.name = name
        self.layer = layer
        self.buffer: AlignedBuffer | None = None  # `read`'s, reused block after block

    def query(self, offset: int) -> tuple[int, int, int]:
        try:
            return self.layer.query(offset)
        except (InstarError, OSError, StopIteration):
            raise self._status_error() from None

    def last_piece_start(self) -> int:
        """Where qemu's last answer (the one with the EOF flag) begins."""
        try:
            return self.layer.piece_start(self.image.virtual_size - 1)
        except (InstarError, OSError, StopIteration):
            raise self._status_error() from None

    def _status_error(self) -> CompareError:
        return CompareError(f"Sector allocation test failed for {self.name}", STATUS_ERROR)

    def read(self, offset: int, length: int) -> AlignedBuffer:
        """``buffer``, its first ``length`` bytes those at ``offset``. One buffer
        serves every block: a new one per block costs more in page faults than
        the comparison itself."""
        buffer = self.buffer
        if buffer is None or buffer.size < length:
            buffer = self.buffer = AlignedBuffer(length)  # made on the first read
        try:
            self.image.readinto(offset, buffer.view[:length])
        except (InstarError, OSError) as error:
            raise self._read_error(offset, error) from None
        return buffer

    def data_from(self, offset: int, end: int) -> tuple[int, int]:
        """``[start, stop)``: the first stretch of DATA extents in ``[offset,
        end)`` (``(end, end)`` if none). Before it the image reads as zeros
        without reading anything: a vhdx, whose block status qemu reports
        as data everywhere, compares its empty blocks at memory speed."""
        start = end
        try:
            for extent in self.image.extents(offset, end - offset):
                if extent.kind is ExtentKind.DATA:
                    if start == end:
                        start = extent.offset
                    continue
                if start != end:
                    return start, extent.offset
        except (InstarError, OSError) as error:
            raise self._read_error(offset, error) from None
        return start, end

    def _read_error(self, offset: int, error: InstarError | OSError) -> CompareError:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        if isinstance(error, ImageReadError) and error.image == self.name:
            reason = error.reason  # named once, by the message below
        return CompareError(
            f"Error while reading offset {offset} of {self.name}: {reason}", READ_ERROR
        )


def first_difference(left: bytes, right: bytes) -> int:
    """Offset of the first differing 512-byte sector of two equal-length
    buffers that differ; memcmp on slices, never a Python loop per byte."""
    length = len(left)
    start = 0
    while start < length and left[start : start + SCAN_STEP] == right[start : start + SCAN_STEP]:
        start += SCAN_STEP
    for sector in range(start, min(start + SCAN_STEP, length), SECTOR):
        if left[sector : sector + SECTOR] != right[sector : sector + SECTOR]:
            return sector
    raise ValueError("buffers do not differ")


class Comparison:
    """One qemu-img compare run over two opened images.

    With a progress meter the walk goes through qemu's chunks one by one (the
    meter shows each); otherwise it goes run by run, which finds the same
    first difference: runs start where qemu's chunks do, so the sector
    arithmetic is the same. Strict mode also compares the EOF flag, which
    only qemu's last answer of an image carries: runs stop there.
    """

    def __init__(self, a: Side, b: Side, *, strict: bool, events: EventSink,
                 progress: bool) -> None:
        self.a, self.b = a, b
        self.strict = strict
        self._events = events
        self._exact = progress
        self.size_a = a.image.virtual_size
        self.size_b = b.image.virtual_size
        self.base = max(self.size_a, self.size_b)
        self._zeros = bytes(READ_BLOCK)

    def tick(self, done: int) -> None:
        """qemu's meter advances by one chunk (``done`` bytes; 0 once open)."""
        if self._exact:
            self._events(Advance(done, self.base))

    def say(self, text: str) -> None:
        self._events(Line(text))

    def run(self) -> int:
        """Compare; print qemu's verdict through ``say``; return the exit code."""
        self.tick(0)
        if self.strict and self.size_a != self.size_b:
            self.say("Strict mode: Image size mismatch!")
            return DIFFERENT
        common = min(self.size_a, self.size_b)
        offset = 0
        while offset < common:
            flags_a, piece_a, run_a = self.a.query(offset)
            flags_b, piece_b, run_b = self.b.query(offset)
            if self.strict and (
                flags_a | (EOF if piece_a == self.size_a else 0)
                != flags_b | (EOF if piece_b == self.size_b else 0)
            ):
                self.say(f"Strict mode: Offset {offset} block status mismatch!")
                return DIFFERENT
            if self._exact:
                end = min(piece_a, piece_b)
            else:
                end = min(run_a, run_b)
                if self.strict:
                    end = self._before_last_pieces(offset, end, (piece_a, run_a),
                                                   (piece_b, run_b))
            if flags_a & ZERO and flags_b & ZERO:
                self.tick(end - offset)  # zeros on both sides: nothing to read
            elif flags_a & ALLOCATED or flags_b & ALLOCATED:
                mismatch = self._compare_data(
                    offset, end, not flags_a & ZERO, not flags_b & ZERO
                )
                if mismatch is not None:
                    self.say(f"Content mismatch at offset {mismatch}!")
                    return DIFFERENT
            else:
                self.tick(end - offset)
            offset = end
        if self.size_a != self.size_b:
            self.say("Warning: Image size mismatch!")
            longer = self.a if self.size_a > self.size_b else self.b
            mismatch = self._check_tail(longer, offset)
            if mismatch is not None:
                self.say(f"Content mismatch at offset {mismatch}!")
                return DIFFERENT
        self.say("Images are identical.")
        return IDENTICAL

    def _before_last_pieces(self, offset: int, end: int, a: tuple[int, int],
                            b: tuple[int, int]) -> int:
        """``end``, or sooner the start of an image's last answer inside
        ``[offset, end)``, where its EOF flag turns on."""
        for side, (piece, run), size in ((self.a, a, self.size_a), (self.b, b, self.size_b)):
            if run == size and piece != size:
                end = min(end, side.last_piece_start())
        return end

    def _compare_data(self, start: int, end: int, data_a: bool, data_b: bool) -> int | None:
        """First mismatch in ``[start, end)`` (qemu's offset), or None.

        Whole 2 MiB chunks (counted from ``start``, as qemu's) where both
        images' extents say zeros are skipped unread: they cannot differ."""
        position = start
        # Per side with data: the stretch of DATA extents found last.
        spans = [[side, start, start] for side, has in ((self.a, data_a), (self.b, data_b)) if has]
        while position < end:
            data_at = end
            for span in spans:
                side, low, high = span
                assert isinstance(side, Side) and isinstance(low, int) and isinstance(high, int)
                if position >= high:  # past the stretch of data found last: the next one
                    low, high = side.data_from(position, end)
                    span[1:] = [low, high]
                data_at = min(data_at, max(position, low))
            skip = (data_at - position) // IO_BUF_SIZE * IO_BUF_SIZE
            if skip:
                self._tick_chunks(position, position + skip)
                position += skip
                continue
            length = min(READ_BLOCK, end - position)
            left = self.a.read(position, length) if data_a else None
            right = self.b.read(position, length) if data_b else None
            mismatch = self._block_mismatch(left, right, length)
            if mismatch is not None:
                # qemu finishes the 2 MiB chunks before the one that differs.
                self._tick_chunks(position, position + mismatch // IO_BUF_SIZE * IO_BUF_SIZE)
                return position + mismatch
            self._tick_chunks(position, position + length)
            position += length
        return None

    def _block_mismatch(self, left: AlignedBuffer | None, right: AlignedBuffer | None,
                        length: int) -> int | None:
        """Where the first ``length`` bytes of two buffers (None: zeros) differ.
        ``startswith`` compares them in place, as one memcmp."""
        first, start = (self._zeros, 0) if left is None else (left.array, left.start)
        second = memoryview(self._zeros)[:length] if right is None else right.view[:length]
        if first.startswith(second, start):
            return None
        return first_difference(bytes(first[start : start + length]), bytes(second))

    def _tick_chunks(self, position: int, stop: int) -> None:
        """Progress for qemu's chunks of ``[position, stop)``: 2 MiB each,
        counted from ``position`` (always the start of one of qemu's chunks)."""
        if not self._exact:
            return
        while position < stop:
            done = min(IO_BUF_SIZE, stop - position)
            self.tick(done)
            position += done

    def _check_tail(self, side: Side, offset: int) -> int | None:
        """The part of the longer image past the shorter one must read as zeros."""
        size = side.image.virtual_size
        while offset < size:
            flags, piece, run = side.query(offset)
            end = piece if self._exact else run
            if flags & ALLOCATED and not flags & ZERO:
                mismatch = self._compare_data(offset, end, side is self.a, side is self.b)
                if mismatch is not None:
                    return mismatch
            else:
                self.tick(end - offset)
            offset = end
        return None


def compare(
    path_a: str,
    path_b: str,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    allow: AllowedDirs = (),
    events: EventSink = ignore,
    progress: bool = False,
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> int:
    """Compare two images as ``qemu-img compare``; returns its exit code.

    Verdicts go to ``events`` as `Line`s; with ``progress``, each of qemu's
    chunks as an `Advance` (the first, of 0 bytes, once the images are open).
    Failures raise CompareError with the exit code qemu-img uses (2 for an
    image that cannot be opened).
    """
    dirs = allowed_dirs(allow)  # once: a generator would be empty for the second image
    policy = PathPolicy.from_allow(dirs)

    def job(broker: Broker, send: EventSink) -> int:
        return _compare_job(broker, send, path_a, path_b, fmt_a, fmt_b, strict, progress)

    result = run_job(job, policy, sandbox, events, inputs=[path_a, path_b],
                     force_share=force_share)
    return int(result)


def _compare_job(broker: Broker, events: EventSink, path_a: str, path_b: str,
                 fmt_a: str | None, fmt_b: str | None, strict: bool, progress: bool) -> int:
    """compare itself, reaching files only through ``broker`` (it may run in a worker)."""
    opener = ImageOpener(broker=broker)
    try:
        sides = []
        for path, fmt in ((path_a, fmt_a), (path_b, fmt_b)):
            try:
                node = opener.open_node(path, fmt)
            except InstarError as error:
                failure = CompareError(str(error), OPEN_ERROR)
                failure.hint = error.hint  # "Is another process using the image?"
                raise failure from None
            sides.append(Side(node.image, path, StatusLayer(node.image)))
        return Comparison(sides[0], sides[1], strict=strict, events=events,
                          progress=progress).run()
    finally:
        opener.close()


__all__ = ["CompareError", "Comparison", "Side", "compare", "first_difference"]
