"""dd as qemu-img does it: a window of the input copied to a new image.

(Named dd_core so that the module does not shadow the function ``instar.dd``.)

`dd_window` is qemu-img's arithmetic (``count`` is an absolute end measured
from the start of the input, not from ``skip``); `dd` is Window + copy engine.
"""

from __future__ import annotations

import os

from instar.errors import (
    CommitError,
    CreationError,
    InvalidArgumentError,
    OutputError,
    ReadError,
    WriteError,
)
from instar.events import EventSink, Notice
from instar.formats import registry
from instar.formats.options import (
    CreateOptions,
    OptionsArgument,
    as_create_options,
    parse_options,
)
from instar.image import Window
from instar.opener import Broker, ImageOpener
from instar.output import OutputSpec, write_image
from instar.runtime_types import NamedTuple
from instar.safety import AllowedDirs, PathPolicy
from instar.sizes import INT64_MAX
from instar.worker import SandboxSettings, run_job

DEFAULT_BS = 512


class DdWindow(NamedTuple):
    """The bytes dd copies: ``[start, start + length)`` of the input."""

    start: int
    length: int
    skipped_past_end: bool  # qemu warns "cannot skip to specified offset", exit 0


def check_dd_numbers(bs: int, count: int | None, skip: int | None) -> None:
    """Refuse what the command line cannot say (its parser keeps bs >= 1 and
    count, skip >= 0): from Python they would make a window of negative length."""
    if bs < 1:
        raise InvalidArgumentError(f"bs must be at least 1, not {bs}")
    if count is not None and count < 0:
        raise InvalidArgumentError(f"count must not be negative, not {count}")
    if skip is not None and skip < 0:
        raise InvalidArgumentError(f"skip must not be negative, not {skip}")


def dd_window(size: int, bs: int, count: int | None = None, skip: int | None = None) -> DdWindow:
    """qemu-img dd's window over an input of ``size`` bytes, overflow-safe.

    Raises InvalidArgumentError (a ValueError) for ``bs < 1`` or a negative
    ``count`` or ``skip``.
    """
    check_dd_numbers(bs, count, skip)
    if count is not None and count <= INT64_MAX // bs and count * bs < size:
        size = count * bs
    if skip is not None and (skip > INT64_MAX // bs or size < skip * bs):
        return DdWindow(size, 0, skipped_past_end=True)
    start = 0 if skip is None else skip * bs
    return DdWindow(start, size - start, skipped_past_end=False)


def dd(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    bs: int = DEFAULT_BS,
    count: int | None = None,
    skip: int | None = None,
    input_format: str | None = None,
    output_format: str = "raw",
    options: OptionsArgument = None,
    allow: AllowedDirs = (),
    events: EventSink | None = None,
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> DdWindow:
    """Copy a window of ``input_path`` into a new ``output_path``, as ``qemu-img dd``.

    Returns the window copied; ``skipped_past_end`` is True when ``skip`` lies
    beyond the input (the output is then empty, as qemu's is, and a `Notice`
    event goes to ``events`` once the output exists, where qemu warns).
    ``events`` also gets `Progress` as the copy goes.
    ``options`` is a `CreateOptions` or a dict of ``-o`` pairs (``{"cluster_size":
    "65536"}``); ``allow`` a list of directories, never a bare string (TypeError).
    Raises an `InstarError` subclass for bad input, with qemu-img's wording, and
    `InvalidArgumentError` (a ValueError) for ``bs < 1`` or a negative ``count``
    or ``skip``, before anything is opened. The image is read in a sandboxed
    worker as ``sandbox`` says (default: the process's settings, `instar.worker`).
    """
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    check_dd_numbers(bs, count, skip)
    create_options = as_create_options(options)
    policy = PathPolicy.from_allow(allow)

    from instar.convert import data_file_targets

    outputs = [output_path, *data_file_targets(output_format, create_options)]

    def job(broker: Broker, send: EventSink) -> list[int | bool]:
        window = _dd_job(broker, send, input_path, output_path, bs, count, skip, input_format,
                         output_format, create_options)
        return [window.start, window.length, window.skipped_past_end]

    try:
        start, length, skipped = run_job(job, policy, sandbox, events,
                                         inputs=[input_path], outputs=outputs,
                                         force_share=force_share)
    except CommitError as error:  # the sandbox host names the output after the job
        raise _creation_failed(output_path, error) from None
    return DdWindow(int(start), int(length), bool(skipped))


def _creation_failed(output_path: str, error: CreationError) -> CreationError:
    """qemu-img dd's wording of a failure to create the output."""
    return CreationError(f"{output_path}: error while creating output image: {error}")


def _dd_job(broker: Broker, events: EventSink, input_path: str, output_path: str, bs: int,
            count: int | None, skip: int | None, input_format: str | None, output_format: str,
            create_options: CreateOptions) -> DdWindow:
    """dd itself, reaching files only through ``broker`` (it may run in a worker)."""
    opener = ImageOpener(broker=broker)
    try:
        image = opener.open(input_path, input_format)
        refusal = registry.creation_refusal(output_format)
        if refusal is not None:
            raise OutputError(refusal)
        out_fmt = registry.get(output_format)
        if out_fmt is None:
            raise OutputError("Unknown file format")
        window = dd_window(image.virtual_size, bs, count, skip)
        broker.check_output(output_path)
        view = Window(image, window.start, window.length)
        notice = None
        if window.skipped_past_end:
            notice = Notice(f"{input_path}: cannot skip to specified offset")
        try:
            parsed = parse_options(out_fmt.create_options, create_options)
            declared = out_fmt.declared_size(window.length, parsed)
            write_image(view, output_path, OutputSpec(out_fmt, declared, parsed),
                        broker=broker, events=events, notice=notice)
        except CreationError as error:
            raise _creation_failed(output_path, error) from None
        except WriteError as error:  # qemu-img dd's words for a failed write or read
            raise WriteError(error.offset, error.reason,
                             f"error while writing to output image file: {error.reason}") from None
        except ReadError as error:
            raise ReadError(error.offset, error.reason,
                            message=f"error while reading from input image file: {error.reason}"
                            ) from None
        return window
    finally:
        opener.close()
