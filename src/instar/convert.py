"""convert as qemu-img does it: whole images (concatenated) into a new image.

The same readers, copy engine and writers as dd; only the source differs
(the images themselves instead of a Window).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from instar.copy import ZERO_GRANULARITY
from instar.errors import CommitError, CreationError, OptionError, OutputError, UnsupportedError
from instar.events import EventSink
from instar.formats import registry
from instar.formats.base import Format
from instar.formats.options import (
    CreateOptions,
    OptionsArgument,
    as_create_options,
    parse_options,
)
from instar.formats.preallocation import given_mode
from instar.image import Concatenation, Image, Window
from instar.opener import Broker, ImageOpener
from instar.output import OutputSpec, write_image, write_in_place
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job


def output_format(name: str) -> Format:
    """The writable format ``name``, with qemu-img convert's message otherwise."""
    refusal = registry.creation_refusal(name)
    if refusal is not None:
        raise UnsupportedError(refusal)
    fmt = registry.get(name)
    if fmt is None:
        raise OutputError(f"Unknown file format '{name}'")
    return fmt


def convert(
    input_paths: Sequence[str],
    output_path: str,
    *,
    input_format: str | None = None,
    output_format_name: str = "raw",
    options: OptionsArgument = None,
    sparse_size: int = ZERO_GRANULARITY,
    no_create: bool = False,
    allow: AllowedDirs = (),
    events: EventSink | None = None,
    durable: bool = False,
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> None:
    """Convert ``input_paths`` (one after another) into ``output_path``.

    ``sparse_size`` 0 writes zeros as data (a fully allocated output);
    ``no_create`` writes over an existing image instead of creating one (see
    `_rewrite_existing` for structured formats);
    ``events`` gets `Progress` as the copy goes;
    ``durable`` fsyncs the output before it takes its name (qemu-img convert's
    default cache mode, "unsafe", does not flush, so neither does this by default).
    ``options`` is a `CreateOptions` or a dict of ``-o`` pairs; ``allow`` a list of
    directories, never a bare string (TypeError).
    """
    if isinstance(input_paths, str | bytes):
        raise TypeError("input_paths must be a sequence of paths, not a single str")
    paths = [os.fspath(path) for path in input_paths]
    create_options = as_create_options(options)
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> None:
        _convert_job(broker, send, paths, output_path, input_format, output_format_name,
                     create_options, sparse_size, no_create, durable)

    try:
        run_job(job, policy, sandbox, events,
                inputs=[*paths, *([output_path] if no_create else [])], outputs=[output_path],
                force_share=force_share)
    except CommitError as error:  # the sandbox host names the output after the job
        raise _conversion_failed(output_path, output_format_name, error) from None


def _convert_job(broker: Broker, events: EventSink, input_paths: list[str], output_path: str,
                 input_format: str | None, output_format_name: str, options: CreateOptions,
                 sparse_size: int, no_create: bool, durable: bool) -> None:
    """convert itself, reaching files only through ``broker`` (it may run in a worker)."""
    opener = ImageOpener(broker=broker)
    try:
        images: list[Image] = [opener.open(path, input_format) for path in input_paths]
        source = images[0] if len(images) == 1 else Concatenation(images)
        fmt = output_format(output_format_name)
        broker.check_output(output_path)
        try:
            parsed = parse_options(fmt.create_options, options)
            if parsed.compress and given_mode(parsed) not in (None, "off"):
                raise OptionError("Compression and preallocation not supported at the same time")
            declared = fmt.declared_size(source.virtual_size, parsed)
            if no_create and fmt.name == "raw":
                out = broker.open_output_in_place(output_path)
                write_in_place(source, out, fmt, parsed, events, durable)
                return
            if no_create:
                source, declared = _rewrite_existing(source, output_path, fmt, opener)
            write_image(source, output_path, OutputSpec(fmt, declared, parsed, sparse_size),
                        broker=broker, events=events, durable=durable)
        except CreationError as error:
            raise _conversion_failed(output_path, fmt.name, error) from None
    finally:
        opener.close()


def _conversion_failed(output_path: str, format_name: str, error: CreationError
                       ) -> CreationError:
    """qemu-img convert's wording of a failure to create the output."""
    return CreationError(f"{output_path}: error while converting {format_name}: {error}")


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
