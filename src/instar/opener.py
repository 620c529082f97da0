"""Host side of opening images: paths, probing, the allowlist and chain depth.

This is the only place that turns a path into an open file. Format code gets
the open file and a `ChainResolver` to ask for the files an image names, so
the same format code can later run in a sandboxed worker handed only fds.

`ImageOpener.open` gives the Image (dd, convert); `ImageOpener.open_node`
also says which format and file it chose (info, compare), and can leave the
backing file unopened, as qemu-img info does (BDRV_O_NO_BACKING).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from instar.errors import (
    ChainDepthError,
    FormatError,
    ImageOpenError,
    PolicyError,
    UnsupportedError,
)
from instar.files import InputFile
from instar.formats import registry
from instar.formats.base import Format
from instar.image import Extent, Image
from instar.safety import MAX_CHAIN_DEPTH, PathPolicy


@dataclass(frozen=True)
class OpenedNode:
    """One image as opened: its reader, the format chosen and its own file."""

    path: str
    image: Image
    format: Format
    file: InputFile


@dataclass
class ImageOpener:
    """Opens a top image and everything it names; remembers what it opened.

    ``opened`` (every file) lets callers refuse an output that is one of the
    inputs, and close all of them; ``nodes`` (every image, backing files
    first, the top image last) says which format each image was read as.
    """

    policy: PathPolicy
    opened: list[InputFile] = field(default_factory=list)
    nodes: list[OpenedNode] = field(default_factory=list)

    def open(self, path: str, fmt_name: str | None = None, depth: int = 0) -> Image:
        """Open ``path`` as ``fmt_name`` (probed when None) with qemu's messages."""
        return self.open_node(path, fmt_name, depth=depth).image

    def open_node(
        self, path: str, fmt_name: str | None = None, *, with_backing: bool = True, depth: int = 0
    ) -> OpenedNode:
        """Open ``path`` and say how: the Image, its format and its file.

        Without ``with_backing`` the backing file is named but never opened,
        and unallocated parts read as zeros (qemu's BDRV_O_NO_BACKING); data
        files and extents are still opened, as they hold the image itself.
        """
        if not path:
            raise ImageOpenError(path, "The 'file' block driver requires a file name")
        try:
            file = InputFile.open(path)
        except OSError as error:
            reason = f"Could not open '{path}': {error.strerror}"
            raise ImageOpenError(path, reason) from None
        self.opened.append(file)
        if not (file.is_regular or file.is_block_device):
            raise ImageOpenError(path, f"'file' driver requires '{path}' to be a regular file")
        fmt = self.choose_format(file, path, fmt_name)
        resolver = ChainResolver(self, depth) if with_backing else NoBackingResolver(self, depth)
        try:
            image = fmt.open(file, resolver)
        except ChainDepthError as error:
            if depth:  # up to the top image unwrapped, not once per level
                raise
            raise ImageOpenError(path, str(error)) from None
        except FormatError as error:
            raise ImageOpenError(path, str(error)) from None
        except OSError as error:
            raise ImageOpenError(path, error.strerror or str(error)) from None
        node = OpenedNode(path, image, fmt, file)
        self.nodes.append(node)
        return node

    def choose_format(self, file: InputFile, path: str, fmt_name: str | None) -> Format:
        """The format named by ``fmt_name``, or probed from the file when None."""
        if fmt_name is None:
            try:
                header = file.pread(0, registry.PROBE_SIZE)
            except OSError as error:
                raise ImageOpenError(path, error.strerror or str(error)) from None
            return registry.probe(header, path)
        fmt = registry.get(fmt_name)
        if fmt is not None:
            return fmt
        if registry.is_recognised_only(fmt_name):
            raise UnsupportedError(
                f"Could not open '{path}': {registry.unsupported_message(fmt_name, writing=False)}"
            )
        raise ImageOpenError(path, f"Unknown driver '{fmt_name}'")

    def close(self) -> None:
        for file in self.opened:
            file.close()
        self.opened.clear()
        self.nodes.clear()


def combine_path(base: str, name: str) -> str:
    """qemu's ``path_combine``: ``name`` relative to the directory of ``base``.

    Pure text (the part of ``base`` up to its last '/', then ``name``), so
    names show as qemu shows them: ``./d//x.vmdk`` names ``./d//x-flat.vmdk``.
    """
    if name.startswith("/"):
        return name
    return base[: base.rfind("/") + 1] + name


@dataclass
class ChainResolver:
    """The `Resolver` given to format code for one image in a chain."""

    opener: ImageOpener
    depth: int

    def _resolve(self, name: str, child: InputFile, what: str) -> str:
        if "\0" in name or not name:
            raise FormatError(f"{what} name is not a valid path")
        path = combine_path(child.name, name)
        self.opener.policy.check(path, what)
        return path

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        if self.depth + 1 > MAX_CHAIN_DEPTH:
            raise ChainDepthError(f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
        path = self._resolve(name, child, "backing file")
        try:
            return self.opener.open(path, fmt, self.depth + 1)
        except ImageOpenError as error:
            raise FormatError(f"Could not open backing file: {error}") from None

    def open_file(self, name: str, child: InputFile, what: str) -> InputFile:
        path = self._resolve(name, child, what)
        try:
            file = InputFile.open(path)
        except OSError as error:
            raise FormatError(f"Could not open {what} '{path}': {error.strerror}") from None
        self.opener.opened.append(file)
        return file


class AbsentBacking:
    """Stands in for a backing file left unopened: an image of no bytes.

    Formats read past the end of a backing image as zeros, so every
    unallocated cluster reads as zeros, as with qemu's BDRV_O_NO_BACKING.
    """

    virtual_size = 0

    def read(self, offset: int, length: int) -> bytes:
        if offset != 0 or length != 0:
            raise ValueError("the backing file was not opened")
        return b""

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return iter(())

    def close(self) -> None:
        pass


@dataclass
class NoBackingResolver(ChainResolver):
    """Opens data files and extents as usual, never the backing file."""

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        return AbsentBacking()


__all__ = [
    "AbsentBacking",
    "ChainResolver",
    "ImageOpener",
    "NoBackingResolver",
    "OpenedNode",
    "PolicyError",
    "combine_path",
]
