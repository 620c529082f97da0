"""Unit tests of the core pieces: Window, Concatenation, the copy engine, the API."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import instar
from helpers import pattern
from instar.copy import copy_image
from instar.errors import FormatError
from instar.image import Concatenation, Extent, ExtentKind, Window, merge_extents


class MemoryImage:
    """An in-memory Image with explicit extents, for driving the engine."""

    def __init__(self, data: bytes, extents: list[Extent] | None = None) -> None:
        self.data = data
        self._extents = extents or [Extent(0, len(data), ExtentKind.DATA)]
        self.reads: list[tuple[int, int]] = []

    @property
    def virtual_size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = offset + length
        for extent in self._extents:
            lo, hi = max(offset, extent.offset), min(end, extent.end)
            if lo < hi:
                yield Extent(lo, hi - lo, extent.kind)

    def close(self) -> None:
        pass


class RecordingWriter:
    def __init__(self, size: int) -> None:
        self.buffer = bytearray(b"\xee" * size)
        self.calls: list[tuple[str, int, int]] = []
        self.closed = False

    def write(self, offset: int, data: bytes) -> None:
        assert not self.calls or offset >= self.calls[-1][1] + self.calls[-1][2]
        self.calls.append(("data", offset, len(data)))
        self.buffer[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        assert not self.calls or offset >= self.calls[-1][1] + self.calls[-1][2]
        self.calls.append(("zero", offset, length))
        self.buffer[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        pass


def test_window_shifts_and_pads_with_zeros() -> None:
    image = MemoryImage(pattern(10_000))
    window = Window(image, 9_000, 3_000)
    assert window.virtual_size == 3_000
    assert window.read(0, 3_000) == pattern(10_000)[9_000:] + bytes(2_000)
    assert list(window.extents(0, 3_000)) == [
        Extent(0, 1_000, ExtentKind.DATA), Extent(1_000, 2_000, ExtentKind.ZERO)]
    with pytest.raises(ValueError):
        window.read(2_999, 2)


def test_window_past_the_end_is_all_zeros() -> None:
    window = Window(MemoryImage(pattern(100)), 500, 50)
    assert window.read(0, 50) == bytes(50)
    assert list(window.extents(0, 50)) == [Extent(0, 50, ExtentKind.ZERO)]


def test_concatenation_reads_across_parts() -> None:
    a, b = MemoryImage(pattern(1000)), MemoryImage(pattern(500, seed=3))
    both = Concatenation([a, b])
    assert both.virtual_size == 1500
    assert both.read(900, 300) == pattern(1000)[900:] + pattern(500, seed=3)[:200]
    assert [e.offset for e in both.extents(0, 1500)] == [0, 1000]


def test_merge_extents_joins_neighbours_of_one_kind() -> None:
    parts = [Extent(0, 10, ExtentKind.DATA), Extent(10, 5, ExtentKind.DATA),
             Extent(15, 0, ExtentKind.ZERO), Extent(15, 5, ExtentKind.ZERO)]
    assert list(merge_extents(iter(parts))) == [
        Extent(0, 15, ExtentKind.DATA), Extent(15, 5, ExtentKind.ZERO)]


def test_engine_skips_holes_without_reading_and_declares_zero_pieces() -> None:
    size = 12 << 20
    data = bytearray(pattern(size))
    data[4 << 20 : 8 << 20] = bytes(4 << 20)  # a hole: never read
    data[(9 << 20) + 65536 : (9 << 20) + 3 * 65536] = bytes(2 * 65536)  # zeros inside data
    extents = [Extent(0, 4 << 20, ExtentKind.DATA), Extent(4 << 20, 4 << 20,
               ExtentKind.UNALLOCATED), Extent(8 << 20, 4 << 20, ExtentKind.DATA)]
    image = MemoryImage(bytes(data), extents)
    writer = RecordingWriter(size)
    copy_image(image, writer)
    assert writer.closed and bytes(writer.buffer) == bytes(data)
    assert all(not (offset < 8 << 20 and offset + n > 4 << 20) for offset, n in image.reads)
    assert ("zero", 4 << 20, 4 << 20) in writer.calls
    assert ("zero", (9 << 20) + 65536, 2 * 65536) in writer.calls
    assert max(n for kind, _, n in writer.calls if kind == "data") <= 4 << 20


def test_engine_without_zero_detection_writes_everything() -> None:
    image = MemoryImage(bytes(300_000), [Extent(0, 300_000, ExtentKind.ZERO)])
    writer = RecordingWriter(300_000)
    copy_image(image, writer, zero_granularity=0)
    assert {kind for kind, _, _ in writer.calls} == {"data"}
    assert bytes(writer.buffer) == bytes(300_000)


def test_api_open_image_and_dd(tmp_path: Path) -> None:
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(5000))
    with instar.open_image(str(source)) as image:
        assert image.virtual_size == 5120  # qemu pads raw images to the sector
        assert image.read(4990, 130) == pattern(5000)[4990:] + bytes(120)
        kinds = [e.kind for e in image.extents(0, image.virtual_size)]
        assert kinds[0] is ExtentKind.DATA and kinds[-1] is ExtentKind.ZERO
    window = instar.dd(str(source), str(tmp_path / "out.raw"), bs=1000, skip=1, count=3)
    assert (window.start, window.length, window.skipped_past_end) == (1000, 2000, False)
    assert (tmp_path / "out.raw").read_bytes() == pattern(5000)[1000:3000] + bytes(48)
    with pytest.raises(instar.InstarError, match="Could not open"):
        instar.open_image(str(tmp_path / "missing"))


class FailingImage(MemoryImage):
    """Raises a FormatError on the read of a given offset, as a corrupt image would."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, offset: int, length: int) -> bytes:
        if offset <= self.fail_at < offset + length:
            raise FormatError("bad cluster")
        return super().read(offset, length)


class FailingWriter(RecordingWriter):
    def write(self, offset: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")


def test_reader_error_reaches_the_caller_and_nothing_is_closed() -> None:
    image = FailingImage(pattern(20 << 20), fail_at=9 << 20)
    writer = RecordingWriter(20 << 20)
    with pytest.raises(FormatError, match="bad cluster"):
        copy_image(image, writer)
    assert not writer.closed
    assert all(offset < 9 << 20 for _, offset, _ in writer.calls)
    assert threading.active_count() == 1  # the reader thread is gone


def test_writer_error_stops_the_reader_thread() -> None:
    image = MemoryImage(pattern(64 << 20))
    with pytest.raises(OSError, match="No space"):
        copy_image(image, FailingWriter(64 << 20))
    assert threading.active_count() == 1
    assert len(image.reads) <= 4  # it stopped reading, a few chunks ahead at most
