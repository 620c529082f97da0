"""The Python API's image opening: `open_image` and the `OpenedImage` it returns."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from instar.image import Extent, Image
from instar.opener import ImageOpener
from instar.safety import PathPolicy


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
