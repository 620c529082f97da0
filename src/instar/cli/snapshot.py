"""``instar snapshot``: qemu-img snapshot's options and messages; ``-l`` lists.

    instar snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot]
                    [--allow dir] FILE

As qemu-img 7.2's: no ``-f`` (the image is always probed), one action at
most, and none lists nothing (qemu opens the image and does nothing). ``-a``,
``-c`` and ``-d`` change the image: refused, not supported yet. ``-q`` has
nothing to silence in a listing, as in qemu.
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.info import write_stdout
from instar.cli.output import escape_controls
from instar.errors import UnsupportedError

HELP = """\
usage: instar snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot]
                       [--allow dir] filename

List the internal snapshots of an image, as qemu-img snapshot -l does.
  -l                        list the snapshots (nothing for a format without them)
  -U, --force-share         read an image a running qemu holds a write lock on
  -q                        quiet (a listing is printed all the same, as in qemu-img)
  --allow dir               backing files may also come from dir (not in qemu-img)
  -h, --help                show this help

Not supported yet (refused): -a, -c, -d (they change the image).
Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = ":la:c:d:hqU"
LONG_OPTIONS = {"help": False, "object": True, "image-opts": False, "force-share": False,
                "allow": True}
ACTIONS = ("-l", "-a", "-c", "-d")
RAW_PROBED = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
)


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    action: str | None = None
    access = AccessOptions()
    for option, value in parsed.options:
        if option in ("-h", "--help"):
            sys.stdout.write(HELP)
            return 0
        if access.take(option, value):
            continue
        if option in ACTIONS:
            if action is not None:
                raise GetoptError("Cannot mix '-l', '-a', '-c', '-d'")
            action = option
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    if action not in (None, "-l"):
        raise UnsupportedError(f"snapshot {action}: changing an image's snapshots is not "
                               "supported yet")
    from instar.info import snapshot_list
    from instar.snapshot import list_snapshots

    filename = parsed.operands[0]
    listing = list_snapshots(filename, allow=access.allowed, force_share=access.force_share)
    if action is None and listing.format == "raw":
        # qemu opens the image for writing when no action is given, and warns
        # as it does for any probed raw image opened so.
        sys.stderr.write(RAW_PROBED.format(escape_controls(filename)))
    if action == "-l" and listing.snapshots:
        write_stdout(snapshot_list(listing.snapshots))
    return 0
