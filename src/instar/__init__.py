"""instar: a safe, qemu-img-compatible disk image toolkit.

The Python API, small on purpose:

- `open_image(path, fmt=None, allow=())` returns an `Image` with
  ``virtual_size``, ``read(offset, length)`` and ``extents(offset, length)``;
  close it when done (``with closing(open_image(...))``).
- `dd(input_path, output_path, bs=512, count=None, skip=None, ...)` does what
  ``instar dd`` does.

Files named inside images (backing files, data files) are opened only from the
image's own directory or a directory listed in ``allow``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from instar.dd import DdWindow, dd, dd_window
from instar.errors import InstarError
from instar.image import Extent, ExtentKind, Image, Window
from instar.opener import ImageOpener
from instar.safety import PathPolicy

__version__ = "0.1.0"


class OpenedImage:
    """An Image together with every file it opened; ``close`` closes them all."""

    def __init__(self, image: Image, opener: ImageOpener) -> None:
        self._image = image
        self._opener = opener

    @property
    def virtual_size(self) -> int:
        return self._image.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        return self._image.read(offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return self._image.extents(offset, length)

    def close(self) -> None:
        self._opener.close()

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(path: str, fmt: str | None = None, allow: Iterable[str] = ()) -> OpenedImage:
    """Open ``path`` (format probed as qemu does when ``fmt`` is None)."""
    opener = ImageOpener(PathPolicy.for_image(path, allow))
    try:
        image = opener.open(path, fmt)
    except BaseException:
        opener.close()
        raise
    return OpenedImage(image, opener)


__all__ = [
    "DdWindow",
    "Extent",
    "ExtentKind",
    "Image",
    "InstarError",
    "OpenedImage",
    "Window",
    "dd",
    "dd_window",
    "open_image",
]
