"""raw: the file is the disk. Sparse files are read with SEEK_DATA/SEEK_HOLE.

qemu reports a raw image's size as its length rounded up to 512 bytes and
reads the padding as zeros; instar does the same.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from instar.files import InputFile, pwrite_all, write_zeros
from instar.formats.base import (
    FormatDetails,
    OptionSchema,
    OutputFile,
    ParsedOptions,
    Resolver,
    Writer,
)
from instar.image import Extent, ExtentKind, Image, check_range
from instar.sizes import round_up

SECTOR = 512


class RawImage:
    """A raw file as an Image; holes in the file are UNALLOCATED extents."""

    def __init__(self, file: InputFile) -> None:
        self.file = file
        self._virtual_size = round_up(file.size, SECTOR)

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        data = self.file.pread(offset, length)
        return data if len(data) == length else data + bytes(length - len(data))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        end = offset + length
        file_end = min(end, self.file.size)
        position = offset
        while position < file_end:
            data_start = _seek(self.file.fd, position, os.SEEK_DATA, file_end)
            if data_start is None:  # the file system cannot say: all data
                yield Extent(position, file_end - position, ExtentKind.DATA)
                position = file_end
                break
            data_start = min(data_start, file_end)
            if data_start > position:
                yield Extent(position, data_start - position, ExtentKind.UNALLOCATED)
            if data_start >= file_end:
                position = file_end
                break
            hole = _seek(self.file.fd, data_start, os.SEEK_HOLE, file_end)
            data_end = file_end if hole is None else min(hole, file_end)
            yield Extent(data_start, data_end - data_start, ExtentKind.DATA)
            position = data_end
        if position < end:  # past the end of the file: qemu's sector padding
            yield Extent(position, end - position, ExtentKind.ZERO)

    def close(self) -> None:
        self.file.close()


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


class RawWriter:
    """Writes data in place; zero runs stay holes in a new regular file."""

    def __init__(self, out: OutputFile, virtual_size: int) -> None:
        self._out = out
        self._size = virtual_size

    def write(self, offset: int, data: bytes) -> None:
        pwrite_all(self._out.fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._out.in_place:  # a fresh file reads as zeros already
            write_zeros(self._out.fd, offset, length)

    def close(self) -> None:
        if not self._out.in_place:
            os.ftruncate(self._out.fd, self._size)

    def abort(self) -> None:
        pass


class RawFormat:
    name = "raw"
    create_options = OptionSchema("raw")  # none: qemu's (size, preallocation...) are unknown here

    def probe(self, header: bytes, filename: str) -> int:
        return 1  # anything is raw, as the last resort

    def open(self, file: InputFile, resolver: Resolver) -> RawImage:
        return RawImage(file)

    def declared_size(self, length: int, options: ParsedOptions | None = None) -> int:
        return round_up(length, SECTOR)

    def describe(self, image: Image) -> FormatDetails:
        """qemu shows no cluster size and no format-specific data for raw;
        its get_info succeeds, so JSON carries "dirty-flag": false."""
        return FormatDetails()

    def create(self, out: OutputFile, virtual_size: int, options: ParsedOptions) -> Writer:
        return RawWriter(out, virtual_size)


FORMAT = RawFormat()
