"""``instar commit``: qemu-img commit's arguments, output, messages and exit codes.

    instar commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p]
                  [--allow dir] FILE

As qemu-img 7.2: the options (a bad ``-r`` refused as it is read), then
exactly one file name, then the cache mode, then the commit itself
(`instar.commit`), then "Image committed." unless ``-q``. ``-p`` draws
qemu's meter (0 once the image is open, 0 when the job starts, 100 when it
ends); ``-r`` is checked and
otherwise ignored (instar does not slow the copy down).
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.check import CACHE_MODES
from instar.cli.compare import QemuProgress
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.numbers import convert_number
from instar.errors import InstarError
from instar.events import Advance, Event, Line, Notice

HELP = """\
usage: instar commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p]
                     [--allow dir] filename

Write an image's data into its backing file, as qemu-img commit does, then
empty the image (its backing file now reads the same).
  -b base              commit into this image of the backing chain (named as the
                       image above it names it, or relative to it), with the
                       data of every image between; implies -d
  -d                   keep the image's data (do not empty it)
  -f fmt               the image's format (probed when not given)
  -t cache             cache mode: checked, no effect
  -r rate_limit        checked, no effect
  -p                   show progress
  -q                   quiet: no "Image committed." line
  --allow dir          the backing files, and the base written to, may come from
                       dir (not in qemu-img)
  -h, --help           show this help

The base may be raw, qcow2, vmdk, vpc or vhdx (docs/cli.md lists what is refused);
a qcow2 image is emptied as qemu does.
Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = ":f:ht:b:dpqr:"
LONG_OPTIONS = {"help": False, "object": True, "image-opts": False, "allow": True}
_INT64_MAX = (1 << 63) - 1


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt: str | None = None
    base: str | None = None
    drop = progress = quiet = False
    cache = "writeback"
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option == "-f":
            fmt = value
        elif option == "-t":
            cache = value
        elif option == "-b":
            base = value
        elif option == "-d":
            drop = True
        elif option == "-p":
            progress = True
        elif option == "-q":
            quiet = True
        elif option == "-r":
            convert_number("rate limit", value, 0, _INT64_MAX)
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    if cache not in CACHE_MODES:
        raise InstarError(f"Invalid cache option: {cache}")
    meters: list[QemuProgress] = []  # drawn once the image is open, as qemu's
    committed: list[str] = []

    def show(event: Event) -> None:
        if isinstance(event, Advance):
            if progress and not quiet:
                if not meters:
                    meters.append(QemuProgress())
                meters[0].add(0.0)
        elif isinstance(event, Line):
            committed.append(event.text)  # after the meter's last line
        elif isinstance(event, Notice):
            sys.stdout.flush()
            sys.stderr.write(event.text + "\n")
            sys.stderr.flush()

    try:
        from instar.commit import commit

        commit(parsed.operands[0], fmt=fmt, base=base, drop=drop, quiet=quiet,
               allow=access.allowed, events=show)
    finally:
        if meters:
            if sys.exc_info()[0] is None:
                meters[0].add(100.0)
            meters[0].end()
    for line in committed:
        print(line)
    return 0
