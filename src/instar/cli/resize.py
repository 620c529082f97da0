"""``instar resize``: qemu-img resize's arguments, output, messages and exit codes.

    instar resize [-f fmt] [-q] [--shrink] [--preallocation=mode] [--allow dir]
                  FILE [+|-]SIZE

As qemu-img 7.2: the size is the last argument, taken off before the options
are parsed (so ``-1G`` is a size, not an option); then the options; then
exactly one file name; then the size, whose sign makes it relative; then the
resize itself (`instar.resize`).
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.output import report_error, report_hint, report_warning
from instar.errors import ResizeError
from instar.events import Event, Line, Notice

HELP = """\
usage: instar resize [-f fmt] [-q] [--shrink] [--preallocation=mode] [--allow dir]
                     filename [+|-]size

Change the virtual size of an image in place, as qemu-img resize does.
  -f fmt               the image's format (probed when not given)
  -q                   quiet: no "Image resized." line
  --shrink             allow the image to become smaller (data past the new end is lost)
  --preallocation=mode off (default), falloc or full for the part a raw image grows by;
                       metadata is refused for raw, as qemu does; qcow2 takes metadata,
                       falloc and full too (not with a backing file or extended L2)
  --allow dir          the image's backing file may come from dir (not in qemu-img)
  -h, --help           show this help

size: bytes, or with a suffix k, M, G, T, P or E; with + or -, relative to the
current size. raw, file, qcow2 and qed (growing only) images can be resized;
qemu refuses the other formats and so does instar.

Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = "f:hq"
LONG_OPTIONS = {"help": False, "object": True, "image-opts": False, "preallocation": True,
                "shrink": False, "allow": True}
_MODES = ("off", "metadata", "falloc", "full")


def _show(event: Event) -> None:
    if isinstance(event, Line):
        print(event.text)
        sys.stdout.flush()
    elif isinstance(event, Notice):
        sys.stdout.flush()
        sys.stderr.write(event.text + "\n")
        sys.stderr.flush()


def run(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(HELP)
        return 0
    if len(args) < 2:
        raise GetoptError("Not enough arguments")
    size_text = args[-1]
    parsed = gnu_getopt(args[:-1], SHORT_OPTIONS, LONG_OPTIONS)
    fmt: str | None = None
    quiet = shrink = False
    preallocation = "off"
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option == "-f":
            fmt = value
        elif option == "-q":
            quiet = True
        elif option == "--shrink":
            shrink = True
        elif option == "--preallocation":
            if value not in _MODES:
                raise ResizeError(f"Invalid preallocation mode '{value}'")
            preallocation = value
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting image file name and size")
    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    from instar.formats.options import parse_size_option

    size = parse_size_option("size", size_text[1:] if relative else size_text)
    from instar.resize import resize

    try:
        resize(parsed.operands[0], size, relative=relative, fmt=fmt, shrink=shrink,
               preallocation=preallocation, quiet=quiet, allow=access.allowed, events=_show)
    except ResizeError as error:
        if error.warning is None:
            raise
        report_error(str(error))
        if error.hint:
            report_hint(error.hint)
        report_warning(error.warning)
        return 1
    return 0
