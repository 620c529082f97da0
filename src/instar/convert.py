"""convert as qemu-img does it: whole images (concatenated) into a new image.

The same readers, copy engine and writers as dd; only the source differs
(the images themselves instead of a Window).
"""

from __future__ import annotations

from collections.abc import Sequence

from instar.copy import ZERO_GRANULARITY, Progress
from instar.errors import CreationError, OptionError, OutputError, UnsupportedError
from instar.formats import registry
from instar.formats.base import CreateOptions, Format
from instar.image import Concatenation, Image, Window
from instar.opener import ImageOpener
from instar.output import refuse_same_file, write_image, write_in_place
from instar.safety import PathPolicy


def output_format(name: str) -> Format:
    """The writable format ``name``, with qemu-img convert's message otherwise."""
    fmt = registry.get(name)
    if fmt is None:
        if registry.is_recognised_only(name):
            raise UnsupportedError(registry.unsupported_message(name, writing=True))
        raise OutputError(f"Unknown file format '{name}'")
    return fmt


def convert(
    input_paths: Sequence[str],
    output_path: str,
    *,
    input_format: str | None = None,
    output_format_name: str = "raw",
    options: CreateOptions | None = None,
    sparse_size: int = ZERO_GRANULARITY,
    no_create: bool = False,
    allow: tuple[str, ...] = (),
    progress: Progress | None = None,
    durable: bool = False,
) -> None:
    """Convert ``input_paths`` (one after another) into ``output_path``.

    ``sparse_size`` 0 writes zeros as data (a fully allocated output);
    ``no_create`` writes over an existing image instead of creating one (see
    `_rewrite_existing` for structured formats);
    ``durable`` fsyncs the output before it takes its name (qemu-img convert's
    default cache mode, "unsafe", does not flush, so neither does this by default).
    """
    options = options or CreateOptions()
    opener = ImageOpener(PathPolicy.for_image(input_paths[0], allow))
    try:
        images: list[Image] = [opener.open(path, input_format) for path in input_paths]
        source = images[0] if len(images) == 1 else Concatenation(images)
        fmt = output_format(output_format_name)
        refuse_same_file(output_path, opener.opened)
        declared = fmt.declared_size(source.virtual_size, options)
        if no_create and fmt.name == "raw":
            write_in_place(source, output_path, fmt, options, progress, durable)
            return
        if no_create:
            source, declared = _rewrite_existing(source, output_path, fmt, opener)
        try:
            write_image(source, output_path, fmt, declared, options, progress,
                        zero_granularity=sparse_size, durable=durable)
        except OptionError:
            raise
        except CreationError as error:
            raise CreationError(
                f"{output_path}: error while converting {fmt.name}: {error}"
            ) from None
    finally:
        opener.close()


def _rewrite_existing(
    source: Image, target: str, fmt: Format, opener: ImageOpener
) -> tuple[Image, int]:
    """``convert -n`` into an existing structured image: what to write, and its size.

    qemu writes the source over the start of the existing image and leaves the
    rest as it was. instar's writers only create images, so it writes a new
    image of the same format and virtual size whose content is exactly that
    (the source, then the old image's tail) and renames it over the target,
    atomically. The old image's creation options (cluster size...) are not kept.
    """
    old = opener.open(target, fmt.name)
    if old.virtual_size < source.virtual_size:
        raise OutputError("output file is smaller than input file")
    tail = old.virtual_size - source.virtual_size
    if tail:
        source = Concatenation([source, Window(old, source.virtual_size, tail)])
    return source, old.virtual_size
