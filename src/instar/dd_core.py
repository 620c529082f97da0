"""dd as qemu-img does it: a window of the input copied to a new image.

(Named dd_core so that the module does not shadow the function ``instar.dd``.)

`dd_window` is qemu-img's arithmetic (``count`` is an absolute end measured
from the start of the input, not from ``skip``); `dd` is Window + copy engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from instar.copy import Progress
from instar.errors import CreationError, OutputError
from instar.formats import registry
from instar.formats.base import CreateOptions
from instar.image import Window
from instar.opener import ImageOpener
from instar.output import refuse_same_file, write_image
from instar.safety import PathPolicy
from instar.sizes import INT64_MAX

DEFAULT_BS = 512


@dataclass(frozen=True)
class DdWindow:
    """The bytes dd copies: ``[start, start + length)`` of the input."""

    start: int
    length: int
    skipped_past_end: bool  # qemu warns "cannot skip to specified offset", exit 0


def dd_window(size: int, bs: int, count: int | None = None, skip: int | None = None) -> DdWindow:
    """qemu-img dd's window over an input of ``size`` bytes, overflow-safe."""
    if bs < 1:
        raise ValueError("bs must be at least 1")
    if count is not None and count <= INT64_MAX // bs and count * bs < size:
        size = count * bs
    if skip is not None and (skip > INT64_MAX // bs or size < skip * bs):
        return DdWindow(size, 0, skipped_past_end=True)
    start = 0 if skip is None else skip * bs
    return DdWindow(start, size - start, skipped_past_end=False)


def dd(
    input_path: str,
    output_path: str,
    *,
    bs: int = DEFAULT_BS,
    count: int | None = None,
    skip: int | None = None,
    input_format: str | None = None,
    output_format: str = "raw",
    options: CreateOptions | None = None,
    allow: tuple[str, ...] = (),
    progress: Progress | None = None,
    on_skip_past_end: Callable[[], None] | None = None,
) -> DdWindow:
    """Copy a window of ``input_path`` into a new ``output_path``, as ``qemu-img dd``.

    Returns the window copied; ``skipped_past_end`` is True when ``skip`` lies
    beyond the input (the output is then empty, as qemu's is, and
    ``on_skip_past_end`` is called once the output exists, where qemu warns).
    Raises an `InstarError` subclass for bad input, with qemu-img's wording.
    """
    opener = ImageOpener(PathPolicy.for_image(input_path, allow))
    try:
        image = opener.open(input_path, input_format)
        out_fmt = registry.get(output_format)
        if out_fmt is None:
            if registry.is_recognised_only(output_format):
                raise OutputError(registry.unsupported_message(output_format, writing=True))
            raise OutputError("Unknown file format")
        window = dd_window(image.virtual_size, bs, count, skip)
        refuse_same_file(output_path, opener.opened)
        view = Window(image, window.start, window.length)
        options = options or CreateOptions()
        declared = out_fmt.declared_size(window.length, options)
        on_created = on_skip_past_end if window.skipped_past_end else None
        try:
            write_image(
                view, output_path, out_fmt, declared, options, progress,
                on_created,
            )
        except CreationError as error:
            raise CreationError(
                f"{output_path}: error while creating output image: {error}"
            ) from None
        return window
    finally:
        opener.close()
