"""raw: the file is the disk. Holes are found with SEEK_DATA/SEEK_HOLE.

qemu reports a raw image's size as its length rounded up to 512 bytes and
reads the padding as zeros; instar does the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from instar.files import InputFile, pwrite_all, write_zeros
from instar.formats.base import FormatBase, OptionSchema, OutputFile, ParsedOptions
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
    """Writes data in place; zero runs stay holes in a new regular file."""

    def __init__(self, out: OutputFile, virtual_size: int,
                 options: ParsedOptions | None = None) -> None:
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


class RawFormat(FormatBase):
    """qemu shows no cluster size and no format-specific data for raw; its
    get_info succeeds, so JSON carries "dirty-flag": false (FormatDetails())."""

    name = "raw"
    create_options = OptionSchema("raw")  # none: qemu's (size, preallocation...) are unknown here
    reader = "instar.formats.raw:open_driver"
    writer = "instar.formats.raw:RawWriter"

    def probe(self, header: bytes, filename: str) -> int:
        return 1  # anything is raw, as the last resort


FORMAT = RawFormat()
