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

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from instar.errors import InstarError
from instar.image import ExtentKind, Image
from instar.opener import ImageOpener
from instar.safety import PathPolicy

SECTOR = 512
IO_BUF_SIZE = 2 << 20  # qemu-img compare's chunk limit where it reads
READ_BLOCK = 4 * IO_BUF_SIZE  # what instar reads at once: whole qemu chunks
SCAN_STEP = 64 << 10  # first pass of the search for the first difference

IDENTICAL, DIFFERENT, OPEN_ERROR, STATUS_ERROR, READ_ERROR = 0, 1, 2, 3, 4

Say = Callable[[str], None]
# Called with (bytes done in a chunk, size of the larger image), as qemu
# calls qemu_progress_print; (0, size) once the images are open.
ProgressCallback = Callable[[int, int], None]


class CompareError(InstarError):
    """A failure with qemu-img compare's exit code (2, 3 or 4)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Status(enum.Enum):
    """What block status says of a run, as far as compare can tell apart."""

    DATA = "data"  # allocated, stored bytes
    ZERO = "zero"  # allocated, reads as zeros (a raw hole, a qcow2 zero cluster)
    UNALLOCATED = "unallocated"  # nowhere in the chain: zeros, not allocated


@dataclass(frozen=True)
class Run:
    start: int
    end: int
    status: Status


@dataclass
class Side:
    """One of the two images: how it is named in messages, and its runs."""

    image: Image
    name: str
    raw: bool  # qemu reports raw holes as allocated zeros

    def runs(self) -> Iterator[Run]:
        """Maximal runs of one status over the whole image, in order."""
        pending: Run | None = None
        size = self.image.virtual_size
        try:
            for extent in self.image.extents(0, size):
                status = _status(extent.kind, self.raw)
                if pending is not None and pending.status == status:
                    pending = Run(pending.start, extent.end, status)
                    continue
                if pending is not None:
                    yield pending
                pending = Run(extent.offset, extent.end, status)
        except (InstarError, OSError):
            raise CompareError(
                f"Sector allocation test failed for {self.name}", STATUS_ERROR
            ) from None
        if pending is not None:
            yield pending

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self.image.read(offset, length)
        except (InstarError, OSError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise CompareError(
                f"Error while reading offset {offset} of {self.name}: {reason}", READ_ERROR
            ) from None


def _status(kind: ExtentKind, raw: bool) -> Status:
    if kind is ExtentKind.DATA:
        return Status.DATA
    if kind is ExtentKind.ZERO or raw:
        return Status.ZERO
    return Status.UNALLOCATED


class _Cursor:
    """Walks a Side's runs forward: the run containing a given offset."""

    def __init__(self, side: Side) -> None:
        self._runs = side.runs()
        self._current: Run | None = None

    def at(self, offset: int) -> Run:
        while self._current is None or self._current.end <= offset:
            self._current = next(self._runs)
        return self._current


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
    """One qemu-img compare run over two opened images."""

    def __init__(self, a: Side, b: Side, *, strict: bool, say: Say,
                 progress: ProgressCallback | None) -> None:
        self.a, self.b = a, b
        self.strict = strict
        self.say = say
        self._progress = progress
        self.size_a = a.image.virtual_size
        self.size_b = b.image.virtual_size
        self.base = max(self.size_a, self.size_b)
        self._zeros = bytes(READ_BLOCK)

    def tick(self, done: int) -> None:
        if self._progress is not None:
            self._progress(done, self.base)

    def run(self) -> int:
        """Compare; print qemu's verdict through ``say``; return the exit code."""
        self.tick(0)
        if self.strict and self.size_a != self.size_b:
            self.say("Strict mode: Image size mismatch!")
            return DIFFERENT
        cursor_a, cursor_b = _Cursor(self.a), _Cursor(self.b)
        common = min(self.size_a, self.size_b)
        offset = 0
        while offset < common:
            run_a, run_b = cursor_a.at(offset), cursor_b.at(offset)
            end = min(run_a.end, run_b.end)
            if self.strict and self._strict_status(run_a, self.size_a) != self._strict_status(
                run_b, self.size_b
            ):
                self.say(f"Strict mode: Offset {offset} block status mismatch!")
                return DIFFERENT
            if run_a.status is Status.DATA or run_b.status is Status.DATA:
                mismatch = self._compare_data(
                    offset, end, run_a.status is Status.DATA, run_b.status is Status.DATA
                )
                if mismatch is not None:
                    self.say(f"Content mismatch at offset {mismatch}!")
                    return DIFFERENT
            else:
                self.tick(end - offset)  # zeros on both sides: nothing to read
            offset = end
        if self.size_a != self.size_b:
            self.say("Warning: Image size mismatch!")
            longer, cursor = (self.a, cursor_a) if self.size_a > self.size_b else (self.b, cursor_b)
            mismatch = self._check_tail(longer, cursor, offset)
            if mismatch is not None:
                self.say(f"Content mismatch at offset {mismatch}!")
                return DIFFERENT
        self.say("Images are identical.")
        return IDENTICAL

    @staticmethod
    def _strict_status(run: Run, size: int) -> tuple[Status, bool]:
        """What strict mode compares: the status and whether the run reaches
        the end of its image (qemu's BDRV_BLOCK_EOF flag)."""
        return run.status, run.end == size

    def _compare_data(self, start: int, end: int, data_a: bool, data_b: bool) -> int | None:
        """First mismatch in ``[start, end)`` (qemu's offset), or None."""
        position = start
        while position < end:
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

    def _block_mismatch(self, left: bytes | None, right: bytes | None, length: int) -> int | None:
        zeros = self._zeros if length == READ_BLOCK else bytes(length)
        left_bytes = zeros if left is None else left
        right_bytes = zeros if right is None else right
        if left_bytes == right_bytes:
            return None
        return first_difference(left_bytes, right_bytes)

    def _tick_chunks(self, position: int, stop: int) -> None:
        """Progress for qemu's chunks of ``[position, stop)``: 2 MiB each,
        counted from ``position`` (always the start of one of qemu's chunks)."""
        while position < stop:
            done = min(IO_BUF_SIZE, stop - position)
            self.tick(done)
            position += done

    def _check_tail(self, side: Side, cursor: _Cursor, offset: int) -> int | None:
        """The part of the longer image past the shorter one must read as zeros."""
        size = side.image.virtual_size
        while offset < size:
            run = cursor.at(offset)
            if run.status is Status.DATA:
                data_a, data_b = side is self.a, side is self.b
                mismatch = self._compare_data(offset, run.end, data_a, data_b)
                if mismatch is not None:
                    return mismatch
            else:
                self.tick(run.end - offset)
            offset = run.end
        return None


def compare(
    path_a: str,
    path_b: str,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    allow: tuple[str, ...] = (),
    say: Say = print,
    progress: ProgressCallback | None = None,
) -> int:
    """Compare two images as ``qemu-img compare``; returns its exit code.

    Verdicts go through ``say``; failures raise CompareError with the exit
    code qemu-img uses (2 for an image that cannot be opened).
    """
    openers: list[ImageOpener] = []
    try:
        sides = []
        for path, fmt in ((path_a, fmt_a), (path_b, fmt_b)):
            opener = ImageOpener(PathPolicy.for_image(path, allow))
            openers.append(opener)
            try:
                node = opener.open_node(path, fmt)
            except InstarError as error:
                raise CompareError(str(error), OPEN_ERROR) from None
            sides.append(Side(node.image, path, node.format.name == "raw"))
        return Comparison(sides[0], sides[1], strict=strict, say=say, progress=progress).run()
    finally:
        for opener in openers:
            opener.close()


__all__ = ["CompareError", "Comparison", "Side", "compare", "first_difference"]
