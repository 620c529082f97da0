"""``instar measure``: qemu-img measure's options, output, messages and exit codes.

    instar measure [--output human|json] [-O fmt] [-o options]
                   [--size N | [-f fmt] [-U] [--allow dir] FILE]

Order of checks, as qemu-img 7.2: the options as they come (``--output``,
``--size``, ``-o`` lists), the operands, then open the image, then the output
format, then its options (a bad one is followed by "Invalid options for file
format"), then the format's figures. raw and qcow2 print qemu's figures;
vmdk, vpc, vhdx, vdi and parallels, which qemu 7.2 refuses ("does not support
size measurement"), print instar's own (docs/cli.md).
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions, HelpRequested
from instar.cli.dd import check_option_list, parse_creation_options
from instar.cli.getopt import BadOptionError, gnu_getopt
from instar.cli.numbers import convert_number
from instar.cli.output import report_error, report_hint, report_plain
from instar.errors import OptionError, UnsupportedError, UsageError
from instar.formats.base import CreateOptions
from instar.sizes import INT64_MAX

HELP = """\
usage: instar measure [--output=ofmt] [-O output_fmt] [-o options]
                      [--size N | [-f fmt] [-U] [--allow dir] filename]

Say how large a new image would be, as qemu-img measure does: created with
--size N bytes, or converted from filename (its whole backing chain).
  --size N           the size of an empty image (k M G T P E suffixes)
  -f fmt             format of the image to convert (probed when absent)
  -O output_fmt      format of the new image: raw (default), qcow2; also vmdk, vpc,
                     vhdx, vdi and parallels, which qemu-img 7.2 cannot measure
  -o options         creation options (key=value,...), as qemu-img measure takes them
  --output=ofmt      human (the default) or json
  -U, --force-share  read an image a running qemu holds a write lock on
  --allow dir        backing and data files may also come from dir (not in qemu-img)
  -h, --help         show this help

Prints "required size" (the bytes the new image needs) and "fully allocated size"
(with every block allocated); "bitmaps size" for a qcow2 image measured as qcow2.

Not supported (refused): --object objectdef, --image-opts, -l snapshot_param
"""

SHORT_OPTIONS = "hf:O:o:l:U"
LONG_OPTIONS = {"help": False, "image-opts": False, "object": True, "output": True,
                "size": True, "force-share": False, "allow": True}


def run(args: list[str]) -> int:
    try:
        parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    except BadOptionError as error:  # qemu-img measure lets getopt complain, then helps
        report_plain(f"measure: {error.glibc_message}")
        raise HelpRequested from None
    fmt: str | None = None
    out_format = "raw"
    options = CreateOptions()
    output = "human"
    size: int | None = None
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option == "-f":
            fmt = value
        elif option == "-O":
            out_format = value
        elif option == "-o":
            check_option_list(value)
            parse_creation_options(value, options.options)
        elif option == "--output":
            if value not in ("human", "json"):
                raise UsageError("--output must be used with human or json as argument.")
            output = value
        elif option == "--size":
            size = convert_number("image size", value, 0, INT64_MAX)
        elif option == "-l":
            raise UnsupportedError(f"{option} is not supported")
    operands = parsed.operands
    if len(operands) > 1:
        raise UsageError("At most one filename argument is allowed.")
    filename = operands[0] if operands else None
    if filename is None and fmt is not None:
        raise UsageError("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        raise UsageError("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        raise UsageError("Either --size N or one filename must be specified.")
    from instar.measure import measure, render

    try:
        result = measure(filename, size=size, fmt=fmt, output_format_name=out_format,
                         options=options, allow=access.allowed, force_share=access.force_share)
    except OptionError as error:  # a bad -o: qemu adds which format it was for
        report_error(str(error))
        if error.hint:
            report_hint(error.hint)
        report_error(f"Invalid options for file format '{out_format}'")
        return 1
    sys.stdout.write(render(result, output))
    sys.stdout.flush()
    return 0
