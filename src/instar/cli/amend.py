"""``instar amend``: qemu-img amend's options, messages and exit codes.

    instar amend [-f fmt] [-q] [-p] [-t cache] [--force] [--allow dir] -o options FILE

As qemu-img 7.2's: ``-o`` may be given several times (the lists are joined);
without it, "Must specify options (-o)"; ``-o help`` with ``-f`` prints the
format's amend options without opening anything, without ``-f`` once the
image is open; then exactly one file name. The amendment itself is
`instar.amend`. ``-p`` shows no progress (amend's steps here are single
writes); ``-t`` is checked as qemu checks it, and otherwise ignored.
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.output import report_error
from instar.errors import UnsupportedError, UsageError
from instar.events import Event, Notice

HELP = """\
usage: instar amend [-f fmt] [-q] [-p] [-t cache] [--force] [--allow dir]
                    -o options filename

Change a qcow2 image's options in place, as qemu-img amend does.
  -o options       what to change (-o help lists them): lazy_refcounts, compat
                   (0.10 or 1.1), size, refcount_bits, data_file (an image that has
                   one), data_file_raw=off; the backing file only to what it is
  -f fmt           the image's format (probed when not given)
  -q               quiet
  -p               progress (accepted; nothing to show)
  -t cache         cache mode, checked as qemu checks it
  --force          accepted, as qemu-img takes it
  --allow dir      the image's backing file may come from dir (not in qemu-img)
  -h, --help       show this help

Not supported yet (refused): encrypted images (and so their encryption
options); compat=0.10 for images with zstd compression, or with a backing file
and zero clusters; size for an image with an external data file.
Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = ":ho:f:t:pq"
LONG_OPTIONS = {"help": False, "object": True, "image-opts": False, "force": False,
                "allow": True}
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")


def _show(event: Event) -> None:
    if isinstance(event, Notice):
        sys.stdout.flush()
        sys.stderr.write(event.text + "\n")
        sys.stderr.flush()


def _print_help(format_name: str) -> int:
    from instar.amend import no_amendment
    from instar.formats.registry import QEMU_DRIVERS

    if format_name not in QEMU_DRIVERS:
        report_error(f"Unknown file format '{format_name}'")
        return 1
    if format_name == "luks":
        raise UnsupportedError("amend -f luks is not supported")
    if format_name != "qcow2":
        report_error(str(no_amendment(format_name)))
        return 1
    from instar.formats.qcow2.amend import AMEND_OPTIONS

    print(f"Amend options for '{format_name}':")
    for option in AMEND_OPTIONS.options:
        print(option.help_line())
    return 0


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt: str | None = None
    texts: list[str] = []
    cache: str | None = None
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option == "-o":
            from instar.cli.dd import check_option_list

            check_option_list(value)
            texts.append(value)
        elif option == "-f":
            fmt = value
        elif option == "-t":
            cache = value
    if not texts:
        raise GetoptError("Must specify options (-o)")
    joined = ",".join(texts)
    wants_help = any(item in ("help", "?") for item in joined.replace(",,", "\0").split(","))
    if fmt is not None and wants_help:
        return _print_help(fmt)
    if len(parsed.operands) != 1:
        raise UsageError("Expecting one image file name")
    if cache is not None and cache not in CACHE_MODES:
        raise UsageError(f"Invalid cache option: {cache}")
    from instar.amend import amend
    from instar.cli.dd import parse_creation_options

    pairs: list[tuple[str, str]] = []
    if not wants_help:
        for text in texts:
            parse_creation_options(text, pairs)
    found = amend(parsed.operands[0], pairs, fmt=fmt, help_only=wants_help,
                  allow=access.allowed, events=_show)
    if wants_help:
        return _print_help(found)
    return 0
