"""The Python API's image opening: `open_image` and the `OpenedImage` it returns.

Callers are services that read images in-process (Glance-style): arguments are
checked here, with documented exceptions, before the readers see them, and an
image that is dropped without ``close`` says so (ResourceWarning), as files do.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Iterator

from instar.errors import InvalidArgumentError
from instar.image import Extent, Image
from instar.opener import ImageOpener
from instar.safety import AllowedDirs, PathPolicy


class OpenedImage:
    """An opened image and every file it opened (backing files, data files).

    ``format`` is the format the image was read as (probed unless given).
    ``read`` and ``extents`` take a range inside ``[0, virtual_size)`` and raise
    `InvalidArgumentError` (a ValueError) outside it or once closed. Use it as
    a context manager, or call ``close``; closing twice is harmless.
    """

    def __init__(self, image: Image, opener: ImageOpener, path: str, fmt: str) -> None:
        self._image = image
        self._opener = opener
        self._closed = False
        self.path = path
        self.format = fmt
        # Kept so that repr still says it after close, when the reader is gone.
        self._virtual_size = image.virtual_size

    @property
    def virtual_size(self) -> int:
        """The guest-visible size in bytes."""
        return self._virtual_size

    @property
    def closed(self) -> bool:
        """True once ``close`` has run."""
        return self._closed

    def _check(self, offset: int, length: int) -> None:
        """The range must lie inside the image: readers trust their callers."""
        if self._closed:
            raise InvalidArgumentError(f"I/O operation on closed image {self.path!r}")
        offset, length = operator.index(offset), operator.index(length)  # TypeError for 1.5
        if offset < 0 or length < 0 or offset > self._virtual_size - length:
            raise InvalidArgumentError(
                f"range [{offset}, {offset + length}) is outside the image "
                f"({self._virtual_size} bytes); offset and length must not be negative"
            )

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, as the guest sees them."""
        self._check(offset, length)
        return self._image.read(offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Where ``[offset, offset + length)`` holds data, zeros or nothing, in order.

        The range is checked now, not when the iterator is first advanced.
        """
        self._check(offset, length)
        return self._image.extents(offset, length)

    def close(self) -> None:
        """Close every file the image opened."""
        if not self._closed:
            self._closed = True
            self._opener.close()

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<OpenedImage {self.path!r} format={self.format!r} "
            f"virtual_size={self._virtual_size} {state}>"
        )

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            # No caller to point at from __del__; source= lets tracemalloc say
            # where the image was opened.
            warnings.warn(f"unclosed image {self!r}", ResourceWarning, stacklevel=1, source=self)
            self.close()


def open_image(
    path: str | os.PathLike[str], fmt: str | None = None, allow: AllowedDirs = ()
) -> OpenedImage:
    """Open ``path`` as ``fmt`` (probed as qemu does when None).

    Files the image names (backing files, data files, extents) are opened only
    from its own directory or one of the directories in ``allow``, a list (a
    bare string raises TypeError). Raises `ImageOpenError` (or another
    `InstarError`) for an image that cannot be opened.
    """
    name = os.fspath(path)
    opener = ImageOpener(PathPolicy.from_allow(allow))
    try:
        node = opener.open_node(name, fmt)
    except BaseException:
        opener.close()
        raise
    return OpenedImage(node.image, opener, name, node.format.name)
