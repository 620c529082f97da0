"""raw: the file is the disk. Holes are found with SEEK_DATA/SEEK_HOLE.

qemu reports a raw image's size as its length rounded up to 512 bytes and
reads the padding as zeros; instar does the same.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from instar.errors import CreationError
from instar.files import InputFile, pwrite_all, write_zeros
from instar.formats.base import (
    FormatBase,
    Measurement,
    MeasureSource,
    OptionSchema,
    OutputFile,
    ParsedOptions,
)
from instar.formats.preallocation import FILE_OPTION, file_mode, reserve
from instar.image import BlockImage, Driver, Run, file_runs
from instar.sizes import round_up

SECTOR = 512


class RawDriver(Driver):
    """A raw file as a layer: data where the file has data, zeros over its
    holes and its sector padding, at a valid offset (as qemu's file-posix)."""

    def __init__(self, file: InputFile) -> None:
        self.file = file
        self.name = file.name
        self.virtual_size = round_up(file.size, SECTOR)

    def map(self, offset: int, length: int) -> Iterator[Run]:
        return file_runs(self.file, offset, length, offset, 0)

    def close(self) -> None:
        self.file.close()


def open_driver(file: InputFile, resolver: object = None) -> RawDriver:
    """The format's open: a raw file names no other file."""
    return RawDriver(file)


def open_raw(file: InputFile) -> BlockImage:
    """``file`` read as a raw image."""
    return BlockImage(RawDriver(file))


class RawWriter:
    """Writes data in place; zero runs stay holes in a new regular file.

    A new file is given its full size first, as qemu's raw driver does when it
    creates the image, so a size the file system (or ``ulimit -f``) cannot
    hold is a creation error before anything is copied: qemu's "Could not
    resize file: File too large". With ``preallocation`` (the file
    protocol's) the whole file is then reserved (``falloc``) or written with
    zeros (``full``) before any data, as qemu's file driver creates it.
    """

    def __init__(self, out: OutputFile, virtual_size: int,
                 options: ParsedOptions | None = None) -> None:
        self._out = out
        self._size = virtual_size
        mode = file_mode(options) if options is not None else "off"
        if not out.in_place:
            try:
                os.ftruncate(out.fd, virtual_size)
            except OverflowError:  # past what off_t holds: the kernel would say EFBIG
                raise CreationError(f"Could not resize file: {os.strerror(errno.EFBIG)}") from None
            except OSError as error:
                raise CreationError(f"Could not resize file: {error.strerror}") from None
            reserve(out.fd, 0, virtual_size, mode)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self._out.fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._out.in_place:  # a fresh file reads as zeros already
            write_zeros(self._out.fd, offset, length)

    def close(self) -> None:
        pass  # sized when created; nothing else to write

    def abort(self) -> None:
        pass


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """qemu's ``raw_measure``: a raw file is as long as the disk, holes or not.
    ``size`` is rounded up to a sector, modulo 2^64 as qemu's arithmetic."""
    required = source.virtual_size if source is not None else round_up(size, SECTOR)
    required &= (1 << 64) - 1
    return Measurement(required, required)


class RawFormat(FormatBase):
    """qemu shows no cluster size and no format-specific data for raw; its
    get_info succeeds, so JSON carries "dirty-flag": false (FormatDetails())."""

    name = "raw"
    # The file protocol's preallocation; qemu's other protocol options are refused by create.
    create_options = OptionSchema("raw", (FILE_OPTION,))
    reader = "instar.formats.raw:open_driver"
    writer = "instar.formats.raw:RawWriter"
    measurer: str | None = "instar.formats.raw:measure"
    checks_preallocation = True

    def probe(self, header: bytes, filename: str) -> int:
        return 1  # anything is raw, as the last resort


FORMAT = RawFormat()
