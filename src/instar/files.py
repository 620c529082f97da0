"""Open files handed to format code, and the write helpers writers share.

Format code never opens a path: the host side (`instar.opener.HostBroker`)
opens files and passes an `InputFile`, a positioned-read wrapper around a file
descriptor. ``pread`` keeps reads thread-safe and free of seek state.
"""

from __future__ import annotations

import os
import stat

from instar.errors import FormatError


class ExactReads:
    """``pread_exact`` for any readable file-like with ``size`` and ``pread``."""

    size: int
    name: str

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes, or a FormatError saying which structure is cut off."""
        if offset < 0 or offset + length > self.size:
            raise FormatError(f"{what} at offset {offset} lies beyond the end of the file")
        data = self.pread(offset, length)
        if len(data) != length:
            raise FormatError(f"{what} at offset {offset} is truncated")
        return data


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

    def allocated_size(self) -> int:
        """The bytes the file system allocated for the file (st_blocks * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_ZEROS = bytes(4 << 20)


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
