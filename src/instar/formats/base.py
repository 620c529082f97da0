"""What every format module provides: the `Format` and `Writer` protocols.

A format module knows one on-disk layout and nothing else: it never opens a
path (the host side hands it open files through a `Resolver`), and no writer
knows about dd (the copy engine feeds it a Window like any Image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from instar.files import InputFile
from instar.image import Image


class Resolver(Protocol):
    """Host-side services a reader may ask for: files named inside an image.

    The host resolves the name against the allowlist and the chain-depth
    limit, so format code never touches the file system itself.
    """

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        """Open the backing image ``name`` that ``child`` refers to."""
        ...

    def open_file(self, name: str, child: InputFile, what: str) -> InputFile:
        """Open a plain file ``child`` names: a qcow2 data file, a VMDK extent...

        ``what`` names the role in messages ("data file", "extent").
        """
        ...


@dataclass
class OutputFile:
    """An open output, created by the host side (a temporary file or a device)."""

    fd: int
    name: str  # the target the user named, for messages
    # Written over existing content (a block device, or convert -n): zeros must be
    # written, and the file keeps its size.
    in_place: bool = False


@dataclass
class CreateOptions:
    """Creation options, as ``-o key=value`` and ``-c`` give them."""

    options: dict[str, str] = field(default_factory=dict)
    compress: bool = False


class Writer(Protocol):
    """Writes an image sequentially: increasing offsets, then ``close``.

    ``write_zeroes`` declares a run that must read back as zeros; a fresh
    image already does, so most writers do nothing, but a block device must.
    ``close`` writes the metadata; ``abort`` gives up (the host deletes the file).
    """

    def write(self, offset: int, data: bytes) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Format(Protocol):
    """One image format: probing, reading, sizing and creating."""

    name: str

    def probe(self, header: bytes, filename: str) -> int:
        """A score for ``header`` (the first 2048 bytes); 0 means "not mine"."""
        ...

    def open(self, file: InputFile, resolver: Resolver) -> Image:
        """Read an image from an open file; raise FormatError if malformed."""
        ...

    def declared_size(self, length: int, options: CreateOptions | None = None) -> int:
        """The virtual size a new image gets when asked for ``length`` bytes.

        ``options`` matter where a creation option changes the rounding (vpc's
        ``force_size``).
        """
        ...

    def create(self, out: OutputFile, virtual_size: int, options: CreateOptions) -> Writer:
        """Start writing a new image of ``virtual_size`` bytes into ``out``."""
        ...
