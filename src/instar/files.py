"""Open files handed to format code, and the write helpers writers share.

Format code never opens a path: the host side (`instar.opener.HostBroker`)
opens files and passes an `InputFile`, a positioned-read wrapper around a file
descriptor. ``pread`` keeps reads thread-safe and free of seek state.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from instar.errors import FormatError


class ExactReads:
    """``pread_exact`` for any readable file-like with ``size`` and ``pread``."""

    size: int
    name: str

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pread_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; returns the bytes read (fewer only at
        the end of the file)."""
        data = self.pread(offset, len(view))
        view[: len(data)] = data
        return len(data)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes, or a FormatError saying which structure is cut off."""
        self._check_within(offset, length, what)
        data = self.pread(offset, length)
        self._check_complete(len(data), length, offset, what)
        return data

    def pread_exact_into(self, view: memoryview, offset: int, what: str) -> None:
        """Fill ``view`` exactly, as `pread_exact` reads (a large table without
        a second copy of it in memory)."""
        self._check_within(offset, len(view), what)
        self._check_complete(self.pread_into(view, offset), len(view), offset, what)

    def _check_within(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or offset + length > self.size:
            raise FormatError(f"{what} at offset {offset} lies beyond the end of the file")

    @staticmethod
    def _check_complete(got: int, length: int, offset: int, what: str) -> None:
        if got != length:
            raise FormatError(f"{what} at offset {offset} is truncated")


class ReadWindow:
    """Many small reads of one region served from reads of ``size`` bytes:
    qcow2's 65,536 snapshot entries are two reads each otherwise.

    ``read(offset, length)`` returns exactly ``length`` bytes or raises one of
    ``errors``; when a window cannot be read whole (it runs past the end of
    the file), the piece asked for is read alone, so its error is its own.
    """

    def __init__(self, read: Callable[[int, int], bytes],
                 errors: tuple[type[Exception], ...], size: int = 1 << 20) -> None:
        self._read = read
        self._errors = errors
        self._size = size
        self._start = 0
        self._data = b""

    def __call__(self, offset: int, length: int) -> bytes:
        start = offset - self._start
        if start < 0 or start + length > len(self._data):
            try:
                self._data = self._read(offset, max(length, self._size))
            except self._errors:
                self._data = self._read(offset, length)
            self._start, start = offset, 0
        return self._data[start : start + length]


class InputFile(ExactReads):
    """A read-only open file: ``pread`` plus its size, named for messages."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        info = os.fstat(fd)
        self.is_block_device = stat.S_ISBLK(info.st_mode)
        self.is_regular = stat.S_ISREG(info.st_mode)
        self.identity = (info.st_dev, info.st_ino)
        if self.is_block_device:
            self.size = os.lseek(fd, 0, os.SEEK_END)
        else:
            self.size = info.st_size
        # The last (start, end) of data SEEK_DATA/SEEK_HOLE found (`image.file_layout`).
        self.data_region: tuple[int, int] | None = None

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at end of file.
        An offset no file can reach (2^63 on: an image's field times its unit)
        reads nothing, as past the end of the file, never an OverflowError."""
        if length <= 0 or offset >= 1 << 63:
            return b""
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # A short read before the end of file: read the rest in a loop.
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def pread_into(self, view: memoryview, offset: int) -> int:
        """`pread` into ``view`` without a new buffer (preadv), looping over short reads."""
        if offset >= 1 << 63:
            return 0
        got = 0
        while got < len(view):
            count = os.preadv(self.fd, [view[got:]], offset + got)
            if not count:
                break
            got += count
        return got

    def allocated_size(self) -> int:
        """The bytes the file system allocated for the file (st_blocks * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_ZEROS = bytes(4 << 20)
PAGE = 4096  # the alignment of `AlignedBuffer`


class AlignedBuffer:
    """A reusable read buffer whose bytes start on a page boundary.

    Why: the kernel copies file data into a buffer that starts a few bytes
    past a page boundary (glibc puts a large allocation 16 bytes past one)
    about three times slower than into an aligned one: 140 against 48 ms of
    system time per 256 MiB from the page cache on this project's machines.
    ``array[start : start + size]`` is the aligned part; ``array`` stays a
    bytearray so ``array.startswith(other, start)`` compares in place."""

    __slots__ = ("array", "size", "start", "view")

    def __init__(self, size: int) -> None:
        import ctypes  # loaded anyway where a worker confines itself

        self.array = bytearray(size + PAGE)
        address = ctypes.addressof((ctypes.c_char * len(self.array)).from_buffer(self.array))
        self.start = -address % PAGE
        self.size = size
        self.view = memoryview(self.array)[self.start : self.start + size]



def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Explicit zeros over ``[offset, offset + length)``, in bounded pieces.

    Writers need them where a fresh file's holes do not give zeros: a block
    device or an image written in place.
    """
    zeros = memoryview(_ZEROS)
    while length > 0:
        step = min(length, len(zeros))
        pwrite_all(fd, zeros[:step], offset)
        offset += step
        length -= step
