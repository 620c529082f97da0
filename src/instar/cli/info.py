"""``instar info``: qemu-img info's options, output and messages.

    instar info [-U] [-f fmt] [--output=ofmt] [--backing-chain] [--allow dir]
                [--qemu-version version] FILE

``--qemu-version`` picks the output of a qemu-img release: 7.2 (the default)
or 8.0 and later, which add a ``Child node '/file':`` section (``children``
in JSON) describing the file under each image.
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.errors import UsageError

HELP = """\
usage: instar info [-U] [-f fmt] [--output=ofmt] [--backing-chain] [--allow dir]
                   [--qemu-version version] filename

Show what qemu-img info shows about an image, in the same words and layout.
  -f, --format fmt          image format (probed when absent)
  --output=ofmt             human (the default) or json
  --backing-chain           show every image of the backing chain
  -U, --force-share         read an image a running qemu holds a write lock on
  --allow dir               backing files may also come from dir (not in qemu-img)
  --qemu-version version    the output of qemu-img 7.2 (the default) or 8.0 and later,
                            which adds the "Child node '/file':" section (not in qemu-img)
  -h, --help                show this help

Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = "hf:U"
LONG_OPTIONS = {"help": False, "format": True, "image-opts": False, "backing-chain": False,
                "force-share": False, "output": True, "object": True, "allow": True,
                "qemu-version": True}


def parse_qemu_version(text: str) -> tuple[int, int]:
    """``8``, ``8.0``, ``7.2``... as (major, minor); 7.2 is the oldest form."""
    major, _, minor = text.partition(".")
    if not major.isdigit() or (minor and not minor.isdigit()):
        raise UsageError(f"--qemu-version must be a qemu release such as 7.2 or 8.0: {text}")
    return int(major), int(minor or 0)


def write_stdout(text: str) -> None:
    """Print ``text``; names that are not UTF-8 go out as their original bytes."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.flush()


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt: str | None = None
    output = "human"
    chain = False
    version = (7, 2)
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option in ("-f", "--format"):
            fmt = value
        elif option == "--output":
            if value not in ("human", "json"):
                raise UsageError("--output must be used with human or json as argument.")
            output = value
        elif option == "--backing-chain":
            chain = True
        elif option == "--qemu-version":
            version = parse_qemu_version(value)
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    from instar.info import info

    write_stdout(info(parsed.operands[0], fmt, output=output, chain=chain,
                      allow=access.allowed, qemu_version=version, force_share=access.force_share))
    return 0
