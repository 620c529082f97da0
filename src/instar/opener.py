"""Host side of opening images: paths, probing, the allowlist and chain depth.

This is the only place that turns a path into an open file. Format code gets
the open file and a `ChainResolver` to ask for the files an image names, so
the same format code can later run in a sandboxed worker handed only fds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from instar.errors import FormatError, ImageOpenError, PolicyError, UnsupportedError
from instar.files import InputFile
from instar.formats import registry
from instar.formats.base import Format
from instar.image import Image
from instar.safety import MAX_CHAIN_DEPTH, PathPolicy


@dataclass
class ImageOpener:
    """Opens a top image and everything it names; remembers every file opened.

    ``opened`` lets callers refuse an output that is one of the inputs, and
    close all of them.
    """

    policy: PathPolicy
    opened: list[InputFile] = field(default_factory=list)

    def open(self, path: str, fmt_name: str | None = None, depth: int = 0) -> Image:
        """Open ``path`` as ``fmt_name`` (probed when None) with qemu's messages."""
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
        fmt = self._choose_format(file, path, fmt_name)
        try:
            return fmt.open(file, ChainResolver(self, depth))
        except FormatError as error:
            raise ImageOpenError(path, str(error)) from None
        except OSError as error:
            raise ImageOpenError(path, error.strerror or str(error)) from None

    def _choose_format(self, file: InputFile, path: str, fmt_name: str | None) -> Format:
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
                f"Could not open '{path}': instar cannot read {fmt_name} images yet"
            )
        raise ImageOpenError(path, f"Unknown driver '{fmt_name}'")

    def close(self) -> None:
        for file in self.opened:
            file.close()
        self.opened.clear()


@dataclass
class ChainResolver:
    """The `Resolver` given to format code for one image in a chain."""

    opener: ImageOpener
    depth: int

    def _resolve(self, name: str, child: InputFile, what: str) -> str:
        if "\0" in name or not name:
            raise FormatError(f"{what} name is not a valid path")
        base = os.path.dirname(child.name)
        path = name if os.path.isabs(name) else os.path.join(base, name)
        self.opener.policy.check(path, what)
        return path

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        if self.depth + 1 > MAX_CHAIN_DEPTH:
            raise FormatError(f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
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


__all__ = ["ChainResolver", "ImageOpener", "PolicyError"]
