"""The read side: the Image protocol, the read core, and the views dd and convert copy.

An Image is what every command reads. Its extents say where data is, so the
copy engine never reads holes or zero clusters; DATA extents may still
contain zeros (the engine checks), ZERO and UNALLOCATED read as zeros.
Every format's image is a `BlockImage`: the format supplies one mapping
function (a `Driver`), and this module does the rest once for all of them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from instar.errors import FormatError, ImageReadError, UnsupportedError
from instar.runtime_types import TYPE_CHECKING, Enum, NamedTuple, Protocol

if TYPE_CHECKING:
    from instar.files import ExactReads, InputFile


class ExtentKind(Enum):
    DATA = "data"  # bytes are stored (may still be zero)
    ZERO = "zero"  # reads as zeros, known without reading
    UNALLOCATED = "unallocated"  # nothing stored here; reads as zeros


class Extent(NamedTuple):
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


# ---------------------------------------------------------------------------
# The read core: one mapping function per format, one layered image for all.
#
# A format answers qemu's ``bdrv_co_block_status`` question for its own layer
# only: for a guest range, runs of DATA (in which open file, at which host
# offset), COMPRESSED (a unit the format decodes), ZERO, or nothing
# (UNALLOCATED: the backing image answers). `BlockImage` builds everything
# else on those answers, once, for every format: reading with coalesced
# preads, extents for the copy engine, falling through to the backing image
# with zeros past its end, qemu's block status for compare, and the
# "block status above" walk of a chain (`StatusLayer`).

# qemu's BDRV_BLOCK_* flags (include/block/block-common.h).
DATA, ZERO, OFFSET_VALID, ALLOCATED, EOF = 0x01, 0x02, 0x04, 0x10, 0x20
# instar's own: DATA stored compressed; the format decodes ``Run.unit``.
COMPRESSED = 0x100
STATUS_FLAGS = DATA | ZERO | OFFSET_VALID  # what qemu's answer carries


class Run(NamedTuple):
    """What a format says of guest bytes ``[start, end)``: one answer of qemu's.

    ``flags``: DATA, ZERO, OFFSET_VALID, COMPRESSED; neither DATA nor ZERO
    means the layer holds nothing here and the backing image answers. With
    OFFSET_VALID, ``file`` holds the bytes from ``host`` on. A COMPRESSED run
    lies inside one unit: ``unit`` is the format's handle for it and ``host``
    the offset of ``start`` in the decoded unit. qemu answers some runs in
    pieces: with ``step``, one piece per ``step`` bytes counted from
    ``anchor`` (a VMDK grain, a qcow2 L2 table's range); the pieces matter
    only where qemu shows them (compare's strict mode and progress).
    """

    start: int
    end: int
    flags: int
    file: ExactReads | None = None
    host: int = 0
    unit: object = None
    step: int = 0
    anchor: int = 0

    def piece_end(self, offset: int) -> int:
        """Where qemu's answer for a query at ``offset`` ends."""
        if not self.step:
            return self.end
        return min(self.end, self.anchor + ((offset - self.anchor) // self.step + 1) * self.step)

    def piece_start(self, offset: int) -> int:
        """Where qemu's answer holding ``offset`` begins."""
        if not self.step:
            return self.start
        return max(self.start, self.anchor + (offset - self.anchor) // self.step * self.step)


class Driver:
    """One format's layer: its mapping function and what decoding needs.

    Subclasses set ``virtual_size`` and ``name`` (the image file, for
    messages), implement `map`, and where they have compressed units,
    `decompress`. ``backing`` is the image below (its format found it,
    through the host's resolver). ``generic_status``: qemu's driver has no
    block-status callback, so qemu says DATA over the whole image (vhdx).
    """

    virtual_size: int = 0
    name: str = ""
    generic_status: bool = False

    @property
    def backing(self) -> Image | None:
        return None

    def map(self, offset: int, length: int) -> Iterator[Run]:
        """Runs covering exactly ``[offset, offset + length)``, in order."""
        raise NotImplementedError

    def check_backing_read(self) -> None:
        """Raise if reading from the backing image must fail (a VMDK whose
        parent's CID does not match: qemu fails such reads, not the open)."""

    def decompress(self, run: Run) -> bytes:
        """The whole decoded unit of a COMPRESSED run."""
        raise NotImplementedError(f"{type(self).__name__} has no compressed units")

    def close(self) -> None:
        """Close the files this layer opened (not the backing image)."""


# qemu's BDRV_MAX_LENGTH: no disk may be larger (2^63 less 1 GiB, so every
# offset and length fits a signed 64-bit number with room for alignment).
MAX_VIRTUAL_SIZE = (1 << 63) - (1 << 30)


class BlockImage:
    """The Image every command uses: one format's layer over its backing chain."""

    def __init__(self, driver: Driver) -> None:
        if driver.virtual_size > MAX_VIRTUAL_SIZE:
            # What qemu says of any format whose header claims more (a VMDK
            # descriptor's extents can add up to any number).
            raise FormatError("Could not refresh total sector count: File too large")
        self.driver = driver
        self._unit: tuple[int, object, bytes] | None = None  # the last decoded unit

    @property
    def virtual_size(self) -> int:
        return self.driver.virtual_size

    @property
    def backing(self) -> Image | None:
        return self.driver.backing

    # --- reading -------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``: host runs that continue each other
        in one file are read with one pread; a single piece is returned as is.
        A malformed structure, or data stored in a way instar cannot decode (a
        dmg chunk compressed with lzfse), raises `ImageReadError` naming the image."""
        check_range(self, offset, length)
        try:
            return self._read(offset, length)
        except ImageReadError:
            raise  # from a backing image, named already
        except (FormatError, UnsupportedError) as error:
            raise ImageReadError(self.driver.name, str(error)) from None

    def _read(self, offset: int, length: int) -> bytes:
        parts = [piece if isinstance(piece, bytes) else _pread_padded(*piece)
                 for piece in self._pieces(offset, length)]
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` with the bytes at ``offset``; returns its length.
        Stored bytes are read straight into it: a caller that reuses one
        buffer (compare) does not make the C library map and fault in fresh
        memory for every block. Errors as `read`'s."""
        view = memoryview(buffer).cast("B")
        check_range(self, offset, len(view))
        at = 0
        try:
            for piece in self._pieces(offset, len(view)):
                if isinstance(piece, bytes):
                    view[at : at + len(piece)] = piece
                    at += len(piece)
                    continue
                file, host, size = piece
                got = file.pread_into(view[at : at + size], host)
                view[at + got : at + size] = bytes(size - got)  # past the end of the file
                at += size
        except ImageReadError:
            raise
        except (FormatError, UnsupportedError) as error:
            raise ImageReadError(self.driver.name, str(error)) from None
        return len(view)

    def _pieces(self, offset: int, length: int) -> Iterator[bytes | tuple[ExactReads, int, int]]:
        """The bytes at ``offset`` in order: each either given (zeros, decoded
        units, the backing image's) or (file, host offset, length) still to
        read, host runs that continue each other in one file joined."""
        file: ExactReads | None = None
        host = size = 0  # a pending run of adjacent host bytes in ``file``
        for run in self.driver.map(offset, length):
            flags, count = run.flags, run.end - run.start
            if flags & (ZERO | COMPRESSED) == 0 and flags & DATA and run.file is not None:
                if size and run.file is file and host + size == run.host:
                    size += count
                    continue
                if size and file is not None:
                    yield file, host, size
                file, host, size = run.file, run.host, count
                continue
            if size and file is not None:
                yield file, host, size
                size = 0
            if flags & ZERO:
                yield bytes(count)
            elif flags & DATA:
                yield self._decoded(run, count)
            else:
                yield self._read_backing(run.start, count)
        if size and file is not None:
            yield file, host, size

    def _decoded(self, run: Run, count: int) -> bytes:
        """``count`` bytes of a compressed unit, decoding each unit once in a row."""
        key = id(run.file)
        cached = self._unit
        if cached is not None and cached[0] == key and cached[1] == run.unit:
            unit = cached[2]
        else:
            unit = self.driver.decompress(run)
            self._unit = (key, run.unit, unit)
        piece = unit[run.host : run.host + count]
        if len(piece) != count:
            raise FormatError(
                f"compressed data at guest offset {run.start:#x} decodes to fewer bytes "
                "than the disk needs"
            )
        return piece

    def _read_backing(self, offset: int, length: int) -> bytes:
        """Bytes the layer does not hold: the backing image's, zeros past its end."""
        backing = self.driver.backing
        if backing is None:
            return bytes(length)
        self.driver.check_backing_read()
        inside = max(0, min(length, backing.virtual_size - offset))
        if not inside:
            return bytes(length)
        data = backing.read(offset, inside)
        return data if inside == length else data + bytes(length - inside)

    # --- extents -------------------------------------------------------------

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        return merge_extents(self._extents(offset, length))

    def _answers(self, offset: int, length: int) -> Iterator[Run]:
        """The driver's runs; a malformed structure raises `ImageReadError`."""
        try:
            yield from self.driver.map(offset, length)
        except ImageReadError:
            raise
        except (FormatError, UnsupportedError) as error:
            raise ImageReadError(self.driver.name, str(error)) from None

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        for run in self._answers(offset, length):
            flags = run.flags
            if flags & ZERO:
                yield Extent(run.start, run.end - run.start, ExtentKind.ZERO)
            elif flags & DATA:
                yield Extent(run.start, run.end - run.start, ExtentKind.DATA)
            else:
                yield from self._backing_extents(run.start, run.end - run.start)

    def _backing_extents(self, offset: int, length: int) -> Iterator[Extent]:
        backing = self.driver.backing
        if backing is None:
            yield Extent(offset, length, ExtentKind.UNALLOCATED)
            return
        self.driver.check_backing_read()
        inside = max(0, min(length, backing.virtual_size - offset))
        if inside:
            yield from backing.extents(offset, inside)
        if inside < length:
            yield Extent(offset + inside, length - inside, ExtentKind.ZERO)

    # --- block status ----------------------------------------------------------

    def status_runs(self, start: int = 0) -> Iterator[Run]:
        """qemu's answers for this layer alone from ``start`` to the end, in order."""
        size = self.virtual_size
        if self.driver.generic_status:
            if start < size:
                yield Run(0, size, DATA)
            return
        for run in self._answers(start, max(0, size - start)):
            yield run if not run.flags & COMPRESSED else run._replace(flags=run.flags & ~COMPRESSED)

    def close(self) -> None:
        backing = self.driver.backing
        self.driver.close()
        if backing is not None:
            backing.close()


def _pread_padded(file: ExactReads | None, offset: int, length: int) -> bytes:
    """Stored bytes; what lies past the end of the file reads as zeros, as in qemu."""
    assert file is not None
    data = file.pread(offset, length)
    return data if len(data) == length else data + bytes(length - len(data))


class Status(NamedTuple):
    """qemu's answer for a guest offset, from a walk down a chain (`StatusLayer`)."""

    flags: int  # DATA, ZERO, OFFSET_VALID, ALLOCATED
    piece_end: int  # where qemu's answer ends
    end: int  # where this run of equal answers ends
    depth: int = 0  # how many layers below the top the answer comes from
    file: ExactReads | None = None  # with OFFSET_VALID: the file holding the bytes
    host: int = 0  # with OFFSET_VALID: where the queried offset lies in ``file``


class StatusLayer:
    """qemu's block status down a chain: a layer's answers and, where it has
    nothing, its backing layer's. Queries go forward only, from ``start``.

    ``above`` picks which of qemu's two walks: ``bdrv_block_status_above``
    (compare), where zeros past the end of a shorter backing image count as
    allocated there; or qemu-img map's, which asks each layer on its own
    (``bdrv_block_status``) and goes down while a layer has nothing, so those
    zeros are the upper layer's own, not allocated.
    """

    def __init__(self, image: Image, start: int = 0, *, above: bool = True) -> None:
        self.size = image.virtual_size
        self._above = above
        self._backing: StatusLayer | None = None
        if isinstance(image, BlockImage):
            self._runs = image.status_runs(start)
            backing = image.backing
            if backing is not None and not image.driver.generic_status:
                self._backing = StatusLayer(backing, start, above=above)
        else:
            self._runs = runs_from_extents(image, start)
        self._run: Run | None = None

    def _at(self, offset: int) -> Run:
        while self._run is None or self._run.end <= offset:
            self._run = next(self._runs)
        return self._run

    def query(self, offset: int) -> tuple[int, int, int]:
        """(flags with ALLOCATED, end of qemu's answer, end of the run) at
        ``offset``; EOF is the caller's (the answer reaches the image end)."""
        return self.status(offset)[:3]

    def status(self, offset: int) -> Status:
        """The answer at ``offset``: flags, where it ends, from how deep, where."""
        run = self._at(offset)
        flags = run.flags & STATUS_FLAGS
        piece_end = run.piece_end(offset)
        backing = self._backing
        if flags & (DATA | ZERO):
            flags |= ALLOCATED
        elif backing is None or (offset >= backing.size and not self._above):
            flags |= ZERO  # nothing below, or past its end: zeros, not allocated
        elif offset >= backing.size:
            # Past the end of a shorter backing file: qemu synthesises zeros
            # "allocated" there.
            return Status(ZERO | ALLOCATED, piece_end, run.end)
        else:
            below = backing.status(offset)
            return below._replace(piece_end=min(piece_end, below.piece_end),
                                  end=min(run.end, below.end), depth=below.depth + 1)
        if flags & OFFSET_VALID:
            return Status(flags, piece_end, run.end, 0, run.file, run.host + offset - run.start)
        return Status(flags, piece_end, run.end)

    def piece_start(self, position: int) -> int:
        """Where qemu's answer that holds ``position`` begins (``position``
        lies in the run the last query was in, or a later one)."""
        run = self._at(position)
        start = run.piece_start(position)
        if run.flags & (DATA | ZERO) or self._backing is None or position >= self._backing.size:
            return start
        return max(start, self._backing.piece_start(position))


def runs_from_extents(image: Image, start: int = 0) -> Iterator[Run]:
    """Block status of an image that is no `BlockImage` (a Window...): raw's,
    data or zeros, both at a valid offset, in maximal runs, from ``start``."""
    pending: Run | None = None
    for extent in image.extents(start, max(0, image.virtual_size - start)):
        flags = DATA | OFFSET_VALID if extent.kind is ExtentKind.DATA else ZERO | OFFSET_VALID
        if pending is not None and pending.flags == flags:
            pending = pending._replace(end=extent.end)
            continue
        if pending is not None:
            yield pending
        pending = Run(extent.offset, extent.end, flags)
    if pending is not None:
        yield pending


def file_runs(
    file: InputFile, start: int, length: int, guest: int, flags: int, data_end: int = -1
) -> Iterator[Run]:
    """``length`` bytes of ``file`` from ``start``, as runs at guest offset
    ``guest``: DATA where the file has data, ZERO over its holes and past its
    end or ``data_end`` (SEEK_DATA/SEEK_HOLE), always at a valid offset, in
    maximal runs; ``flags`` are added to every run (a fixed VHD or a flat
    extent is DATA even over holes)."""
    data = flags | DATA | OFFSET_VALID
    hole = flags | ZERO | OFFSET_VALID
    pending: Run | None = None
    for offset, count, has_data in file_layout(file, start, length, data_end):
        at = guest + offset - start
        run = Run(at, at + count, data if has_data else hole, file, offset)
        if pending is not None and pending.flags == run.flags:
            pending = pending._replace(end=run.end)
            continue
        if pending is not None:
            yield pending
        pending = run
    if pending is not None:
        yield pending


def file_layout(
    file: InputFile, offset: int, length: int, data_end: int = -1
) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, holds data) pieces of a file range: SEEK_DATA and
    SEEK_HOLE find the holes; past the end of the file (or ``data_end``) is
    a hole."""
    end = offset + length
    file_end = min(end, file.size if data_end < 0 else min(data_end, file.size))
    position = offset
    while position < file_end:
        region = _data_region(file, position, file_end)
        if region is None:  # the file system cannot say: all data
            yield position, file_end - position, True
            position = file_end
            break
        data_start, data_end = region
        if data_start > position:
            yield position, data_start - position, False
        if data_start >= file_end:
            position = file_end
            break
        yield data_start, data_end - data_start, True
        position = data_end
    if position < end:
        yield position, end - position, False


def _data_region(file: InputFile, position: int, file_end: int) -> tuple[int, int] | None:
    """Where the data at or after ``position`` starts and ends (both at most
    ``file_end``), or None if the file system cannot say.

    The last region found is kept on the file, as qemu's block-status cache
    keeps it: a copy reads a large data region in chunks, and each SEEK_HOLE
    can walk the whole rest of the region (tmpfs walks it page by page).
    """
    known = file.data_region
    if known is not None and known[0] <= position < known[1]:
        return position, min(known[1], file_end)
    data_start = _seek(file.fd, position, os.SEEK_DATA, file_end)
    if data_start is None:
        return None
    if data_start >= file_end:
        return file_end, file_end
    hole = _seek(file.fd, data_start, os.SEEK_HOLE, file_end)
    if hole is None:
        return data_start, file_end
    file.data_region = (data_start, hole)
    return data_start, min(hole, file_end)


def next_data(file: InputFile, offset: int, end: int) -> int | None:
    """Where the file's next data at or after ``offset`` begins (``end`` if
    none before it), or None if the file system cannot say (SEEK_DATA)."""
    found = _seek(file.fd, offset, os.SEEK_DATA, end)
    return None if found is None else min(found, end)


def _seek(fd: int, position: int, whence: int, file_end: int) -> int | None:
    """lseek for SEEK_DATA/SEEK_HOLE: ``file_end`` past the last data, None if unsupported."""
    try:
        return os.lseek(fd, position, whence)
    except OSError as error:
        if error.errno == errno.ENXIO:
            return file_end
        if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
