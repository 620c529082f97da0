"""``instar create``: qemu-img create's options, output, messages and exit codes.

    instar create [-q] [-f fmt] [-o options] [-b backing_file [-F backing_fmt]] [-u]
                  [--allow dir] FILE [SIZE]

Order of checks, as qemu-img 7.2: the options as they come (each ``-o`` list's
syntax), ``-o help``, the file name, the size operand, then the creation
itself (`instar.create`), whose failures name the file.
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.dd import check_option_list, parse_creation_options
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.numbers import convert_number
from instar.events import Event, Line
from instar.formats.base import CreateOptions
from instar.sizes import INT64_MAX

HELP = """\
usage: instar create [-q] [-f fmt] [-o options] [-b backing_file [-F backing_fmt]] [-u]
                     [--allow dir] filename [size]

Create a new image that holds no data, as qemu-img create does.
  -f fmt             format of the new image: raw (default), file, qcow2, vmdk, vpc, vhdx,
                     vdi, parallels, qed or qcow
  -o options         creation options (key=value,...); '-o help' lists the format's
  -b backing_file    the backing file (qcow2, qed, qcow, vmdk), relative to the new image
  -F backing_fmt     the backing file's format (required with -b)
  -u                 do not open the backing file (a size must then be given; a vmdk's
                     is still opened for its CID, as qemu's vmdk driver does)
  -q                 quiet: no "Formatting" line
  --allow dir        the backing file may come from dir (not in qemu-img)
  -h, --help         show this help

size: bytes, or with a suffix k, M, G, T, P or E; without it the backing file's size.

Not supported (refused): --object objectdef
"""

SHORT_OPTIONS = "F:b:f:ho:qu"
LONG_OPTIONS = {"help": False, "object": True, "allow": True}
# The lines qemu adds to '-o help' when no file name says which protocol.
_PROTOCOL_HINT = ("\nThe protocol level may support further options.\n"
                  "Specify the target filename to include those options.\n")


def _wants_help(options: str) -> bool:
    """qemu's has_help_option: an item ``help`` or ``?`` in the list."""
    return any(item in ("help", "?") for item in options.replace(",,", "\0").split(","))


def _print_option_help(format_name: str, filename: str | None) -> int:
    from instar.convert import output_format
    from instar.formats.options import Option

    fmt = output_format(format_name)
    listed = [*fmt.create_options.listed(protocol=filename is not None),
              Option("size", "size", 0, "Virtual disk size")]
    if fmt.create_options.backing:
        listed += [Option("backing_file", "str", "", "File name of a base image"),
                   Option("backing_fmt", "str", "", "Image format of the base image")]
    print("Supported options:" if filename is not None else f"Supported {fmt.name} options:")
    for option in sorted(listed, key=lambda option: option.name):
        print(option.help_line())
    if filename is None:
        sys.stdout.write(_PROTOCOL_HINT)
    return 0


def _show(event: Event) -> None:
    if isinstance(event, Line):
        print(event.text)
        sys.stdout.flush()


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt = "raw"
    options = CreateOptions()
    option_text: list[str] = []
    backing_file: str | None = None
    backing_fmt: str | None = None
    open_backing = True
    quiet = False
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option == "-f":
            fmt = value
        elif option == "-o":
            check_option_list(value)
            option_text.append(value)
        elif option == "-b":
            backing_file = value
        elif option == "-F":
            backing_fmt = value
        elif option == "-u":
            open_backing = False
        elif option == "-q":
            quiet = True
    operands = parsed.operands
    filename = operands[0] if operands else None
    if option_text and _wants_help(",".join(option_text)):
        return _print_option_help(fmt, filename)
    for text in option_text:
        parse_creation_options(text, options.options)
    if filename is None:
        raise GetoptError("Expecting image file name")
    size = convert_number("image size", operands[1], 0, INT64_MAX) if len(operands) > 1 else None
    if len(operands) > 2:
        raise GetoptError(f"Unexpected argument: {operands[2]}")
    from instar.create import create

    create(filename, fmt, size, options=options, backing_file=backing_file,
           backing_fmt=backing_fmt, open_backing=open_backing, quiet=quiet,
           allow=access.allowed, events=_show)
    return 0
