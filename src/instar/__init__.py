"""instar: a safe, qemu-img-compatible disk image toolkit.

The Python API, small on purpose:

- `open_image(path, fmt=None, allow=())` returns an `Image` with
  ``virtual_size``, ``read(offset, length)`` and ``extents(offset, length)``;
  use it as a context manager (``with open_image(...) as image:``).
- `dd(input_path, output_path, bs=512, count=None, skip=None, ...)` does what
  ``instar dd`` does.

Files named inside images (backing files, data files) are opened only from the
image's own directory or a directory listed in ``allow``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Loaded on first use, so that ``instar --version`` and ``instar info`` start fast.
_LAZY = {
    "DdWindow": "instar.dd_core",
    "dd": "instar.dd_core",
    "dd_window": "instar.dd_core",
    "InstarError": "instar.errors",
    "Extent": "instar.image",
    "ExtentKind": "instar.image",
    "Image": "instar.image",
    "Window": "instar.image",
    "OpenedImage": "instar.api",
    "open_image": "instar.api",
}

if TYPE_CHECKING:
    from instar.api import OpenedImage, open_image
    from instar.dd_core import DdWindow, dd, dd_window
    from instar.errors import InstarError
    from instar.image import Extent, ExtentKind, Image, Window


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'instar' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
