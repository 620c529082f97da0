"""``instar dd``: qemu-img dd's grammar, messages, exit codes and order of checks.

Order, as qemu-img: options, operands left to right, if/of present, open the
input, look up the output format, create the output, copy. Extensions beyond
qemu-img dd (documented in docs/cli.md): ``-o``, ``-c``, ``-p``, ``--allow``,
``--require-safe``.
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import gnu_getopt
from instar.cli.numbers import convert_number
from instar.cli.progress import ProgressMeter, show_events
from instar.errors import UsageError
from instar.formats.base import CreateOptions
from instar.record import Record
from instar.sizes import INT64_MAX

HELP = """\
usage: instar dd [-U] [-f fmt] [-O output_fmt] [-o options] [-c] [-p] [--allow dir]
                 [--require-safe] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output

Copy a window of an image into a new image, exactly as qemu-img dd does.
  bs=block_size      bytes per block (1 to 2147483647, default 512; k M G T P E suffixes)
  count=blocks       copy up to this many blocks from the START of the input (qemu's)
  skip=blocks        skip this many blocks of the input
  if=input           input image
  of=output          output image, replaced atomically
  -f fmt             format of the input (probed when absent)
  -O output_fmt      format of the output: raw (default), qcow2, vmdk, vpc or vhdx
  -o options         creation options (key=value,...) as convert's (not in qemu-img dd)
  -c                 compress the output: qcow2; vmdk streamOptimized (not in qemu-img dd)
  -p                 show progress (not in qemu-img dd)
  -U, --force-share  read an input a running qemu holds a write lock on
  --allow dir        backing and data files may also come from dir (not in qemu-img)
  --require-safe     refuse an input that instar inspect calls unsafe, before
                     writing anything (not in qemu-img)
  -h, --help         show this help

Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = "hf:O:Uo:cp"
LONG_OPTIONS = {"help": False, "image-opts": False, "force-share": False, "object": True,
                "allow": True, "require-safe": False}


class DdRequest(Record):
    """A dd command line, parsed."""

    __slots__ = ("allow", "bs", "count", "force_share", "input_format", "input_path",
                 "options", "output_format", "output_path", "progress", "require_safe", "skip")

    def __init__(
        self,
        input_path: str | None = None,
        output_path: str | None = None,
        bs: int = 512,
        count: int | None = None,
        skip: int | None = None,
        input_format: str | None = None,
        output_format: str = "raw",
        options: CreateOptions | None = None,
        progress: bool = False,
        force_share: bool = False,
        allow: list[str] | None = None,
        require_safe: bool = False,
    ) -> None:
        self.input_path = input_path
        self.output_path = output_path
        self.bs = bs
        self.count = count
        self.skip = skip
        self.input_format = input_format
        self.output_format = output_format
        self.options = CreateOptions() if options is None else options
        self.progress = progress
        self.force_share = force_share
        self.allow: list[str] = [] if allow is None else allow
        self.require_safe = require_safe


def check_option_list(text: str) -> None:
    """qemu-img refuses a ``-o`` text that is empty, starts with a comma or ends in
    an odd number of commas (one that is not an escaped ``,,``)."""
    trailing = len(text) - len(text.rstrip(","))
    if not text or text.startswith(",") or trailing % 2:
        raise UsageError(f"Invalid option list: {text}")


def parse_creation_options(text: str, into: list[tuple[str, str]]) -> None:
    """``-o key=value,key=value`` (``,,`` is a literal comma, as in qemu), appended
    to ``into`` in order; the format's schema checks them later.

    A bare ``name`` means ``name=on`` and ``noname`` means ``name=off``: qemu's
    short form (meant for bool options, taken for any, without a warning).
    """
    check_option_list(text)
    for item in text.replace(",,", "\0").split(","):
        if not item:
            continue
        key, has_value, value = item.replace("\0", ",").partition("=")
        if not has_value:
            key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
        into.append((key, value))


def parse_dd_args(args: list[str]) -> DdRequest | None:
    """Parse a dd command line; None means help was printed."""
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    request = DdRequest()
    access = AccessOptions(request.allow)
    for option, value in parsed.options:
        if option in ("-h", "--help"):
            sys.stdout.write(HELP)
            return None
        if access.take(option, value):
            continue
        if option == "-f":
            request.input_format = value
        elif option == "-O":
            request.output_format = value
        elif option == "-o":
            parse_creation_options(value, request.options.options)
        elif option == "-c":
            request.options.compress = True
        elif option == "-p":
            request.progress = True
        elif option == "--require-safe":
            request.require_safe = True
    request.force_share = access.force_share
    for operand in parsed.operands:
        _apply_operand(request, operand)
    return request


def _apply_operand(request: DdRequest, operand: str) -> None:
    name, has_value, value = operand.partition("=")
    if not has_value:
        raise UsageError(f"unrecognized operand {operand}")
    if name == "bs":
        request.bs = convert_number("bs", value, 1, 2147483647)
    elif name == "count":
        request.count = convert_number("count", value, 0, INT64_MAX)
    elif name == "skip":
        request.skip = convert_number("skip", value, 0, INT64_MAX)
    elif name == "if":
        request.input_path = value
    elif name == "of":
        request.output_path = value
    else:
        raise UsageError(f"unrecognized operand {name}")


def run(args: list[str]) -> int:
    request = parse_dd_args(args)
    if request is None:
        return 0
    if request.input_path is None or request.output_path is None:
        raise UsageError("Must specify both input and output files")
    if request.require_safe:
        from instar.inspection import require_safe

        require_safe([request.input_path], request.input_format, allow=tuple(request.allow),
                     force_share=request.force_share)
    from instar.dd_core import dd

    meter = ProgressMeter() if request.progress else None
    dd(
        request.input_path,
        request.output_path,
        bs=request.bs,
        count=request.count,
        skip=request.skip,
        input_format=request.input_format,
        output_format=request.output_format,
        options=request.options,
        allow=tuple(request.allow),
        events=show_events(meter),
        force_share=request.force_share,
    )
    if meter is not None:
        meter.finish()
    return 0
