"""instar: a safe, qemu-img-compatible disk image toolkit.

The Python API, small on purpose (``dir(instar)`` lists it):

- `open_image(path, fmt=None, allow=())` returns an `OpenedImage`: a context
  manager (``with open_image(...) as image:``) with ``format`` (the format it
  was read as), ``virtual_size``, ``read(offset, length)`` and
  ``extents(offset, length)``. An image dropped without ``close`` gives a
  ResourceWarning.
- `dd(input_path, output_path, bs=512, count=None, skip=None, ...)` does what
  ``instar dd`` does; ``options`` is a `CreateOptions` or a dict of ``-o``
  pairs (``{"cluster_size": "65536"}``).
- `check_image(path, fmt=None, allow=())` does what ``instar check`` does
  (qemu-img check's walk, read only) and returns a `CheckResult`: qemu's
  counters, ``exit_code``, ``failure`` and ``findings``, each a `Finding`
  (``kind``, a stable ``code``, qemu's ``message``); a format qemu has no
  check for (raw, vpc) raises `ChecksNotSupportedError`.
- `inspect(path, fmt=None, policy=None, allow=())` returns a `Verdict`: the
  detected format, the virtual size, ``safe`` and the findings (``instar
  inspect``; `InspectPolicy` says what is allowed). `InspectingStream(source,
  fmt=None, ...)` wraps an upload stream, inspects it as it passes in bounded
  memory and gives the same verdict (docs/inspect.md).

Files named inside images (backing files, data files) are opened only from the
image's own directory or a directory listed in ``allow``: a list or other
iterable of directories; a bare string raises TypeError (iterated, "/data"
would allow "/").

Errors are `InstarError` subclasses: `ImageOpenError` (cannot open, with
``filename`` and ``reason``), `FormatError` (malformed image), `PolicyError`
(a file outside the allowed directories), `UnsupportedError`, `OutputError`,
and `InvalidArgumentError` for bad arguments (``bs=0``, a negative ``count``,
a read outside the image), which is also a ValueError. All of them pickle, so
they cross process boundaries intact.
"""

from __future__ import annotations

import importlib

from instar.runtime_types import TYPE_CHECKING

__version__ = "0.1.0"

# Loaded on first use, so that ``instar --version`` and ``instar info`` start fast.
_LAZY = {
    "CheckResult": "instar.findings",
    "ChecksNotSupportedError": "instar.errors",
    "Finding": "instar.findings",
    "check_image": "instar.check",
    "DdWindow": "instar.dd_core",
    "dd": "instar.dd_core",
    "dd_window": "instar.dd_core",
    "CreateOptions": "instar.formats.base",
    "FormatError": "instar.errors",
    "ImageOpenError": "instar.errors",
    "InstarError": "instar.errors",
    "InvalidArgumentError": "instar.errors",
    "OutputError": "instar.errors",
    "PolicyError": "instar.errors",
    "UnsupportedError": "instar.errors",
    "Extent": "instar.image",
    "ExtentKind": "instar.image",
    "Image": "instar.image",
    "Window": "instar.image",
    "OpenedImage": "instar.api",
    "open_image": "instar.api",
    "inspect": "instar.inspection",
    "InspectingStream": "instar.inspect_stream",
    "InspectPolicy": "instar.verdict",
    "Verdict": "instar.verdict",
}

if TYPE_CHECKING:
    from typing import Any

    from instar.api import OpenedImage, open_image
    from instar.check import check_image
    from instar.dd_core import DdWindow, dd, dd_window
    from instar.errors import (
        ChecksNotSupportedError,
        FormatError,
        ImageOpenError,
        InstarError,
        InvalidArgumentError,
        OutputError,
        PolicyError,
        UnsupportedError,
    )
    from instar.findings import CheckResult, Finding
    from instar.formats.base import CreateOptions
    from instar.image import Extent, ExtentKind, Image, Window
    from instar.inspect_stream import InspectingStream
    from instar.inspection import inspect
    from instar.verdict import InspectPolicy, Verdict


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'instar' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The API (lazy names included, which plain dir() would miss) and the
    module's dunders; not its helpers (importlib, _LAZY) nor loaded submodules."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


__all__ = [
    "CheckResult",
    "ChecksNotSupportedError",
    "CreateOptions",
    "DdWindow",
    "Extent",
    "ExtentKind",
    "Finding",
    "FormatError",
    "Image",
    "ImageOpenError",
    "InspectPolicy",
    "InspectingStream",
    "InstarError",
    "InvalidArgumentError",
    "OpenedImage",
    "OutputError",
    "PolicyError",
    "UnsupportedError",
    "Verdict",
    "Window",
    "check_image",
    "dd",
    "dd_window",
    "inspect",
    "open_image",
]
