"""The read side: the Image protocol, extents, and the Window view dd copies.

An Image is what every format reader returns. Its extents say where data is,
so the copy engine never reads holes or zero clusters; DATA extents may still
contain zeros (the engine checks), ZERO and UNALLOCATED read as zeros.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class ExtentKind(enum.Enum):
    DATA = "data"  # bytes are stored (may still be zero)
    ZERO = "zero"  # reads as zeros, known without reading
    UNALLOCATED = "unallocated"  # nothing stored here; reads as zeros


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: ExtentKind

    @property
    def end(self) -> int:
        return self.offset + self.length


class Image(Protocol):
    """A readable disk image of ``virtual_size`` bytes.

    ``read`` and ``extents`` take ranges inside ``[0, virtual_size)``; ``extents``
    yields contiguous extents covering exactly the asked range, in order.
    """

    @property
    def virtual_size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def extents(self, offset: int, length: int) -> Iterator[Extent]: ...

    def close(self) -> None: ...


def check_range(image: Image, offset: int, length: int) -> None:
    """Reject a range outside the image: a caller bug, never an input problem."""
    if offset < 0 or length < 0 or offset + length > image.virtual_size:
        raise ValueError(
            f"range [{offset}, {offset + length}) outside image of {image.virtual_size} bytes"
        )


def merge_extents(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Join adjacent extents of the same kind, so callers see long runs."""
    pending: Extent | None = None
    for extent in extents:
        if extent.length == 0:
            continue
        if pending is not None and pending.kind == extent.kind and pending.end == extent.offset:
            pending = Extent(pending.offset, pending.length + extent.length, pending.kind)
            continue
        if pending is not None:
            yield pending
        pending = extent
    if pending is not None:
        yield pending


class Window:
    """``length`` bytes of ``image`` starting at ``start``; zeros past its end.

    This is all dd needs: the copy engine copies a Window like any Image.
    """

    def __init__(self, image: Image, start: int, length: int) -> None:
        if start < 0 or length < 0:
            raise ValueError("window start and length must not be negative")
        self._image = image
        self._start = start
        self._length = length
        # How much of the window the image really covers.
        self._inside = max(0, min(length, image.virtual_size - start))

    @property
    def virtual_size(self) -> int:
        return self._length

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        inside = max(0, min(length, self._inside - offset))
        data = self._image.read(self._start + offset, inside) if inside else b""
        return data + bytes(length - inside) if inside < length else data

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        inside = max(0, min(length, self._inside - offset))
        if inside:
            for extent in self._image.extents(self._start + offset, inside):
                yield Extent(extent.offset - self._start, extent.length, extent.kind)
        if inside < length:
            yield Extent(offset + inside, length - inside, ExtentKind.ZERO)

    def close(self) -> None:
        self._image.close()


class Concatenation:
    """Several images one after another, as ``qemu-img convert A B OUT`` reads them."""

    def __init__(self, parts: list[Image]) -> None:
        if not parts:
            raise ValueError("nothing to concatenate")
        self._parts = parts
        self._starts: list[int] = []
        total = 0
        for part in parts:
            self._starts.append(total)
            total += part.virtual_size
        self._size = total

    @property
    def virtual_size(self) -> int:
        return self._size

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[Image, int, int, int]]:
        """(part, start of part, offset inside part, length) for a range."""
        end = offset + length
        for part, start in zip(self._parts, self._starts, strict=True):
            lo, hi = max(offset, start), min(end, start + part.virtual_size)
            if lo < hi:
                yield part, start, lo - start, hi - lo

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        return b"".join(part.read(inner, n) for part, _, inner, n in self._pieces(offset, length))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        for part, start, inner, n in self._pieces(offset, length):
            for extent in part.extents(inner, n):
                yield Extent(extent.offset + start, extent.length, extent.kind)

    def close(self) -> None:
        for part in self._parts:
            part.close()
