"""``instar snapshot``: qemu-img snapshot's options and messages; ``-l`` lists.

    instar snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot]
                    [--allow dir] FILE

As qemu-img 7.2's: no ``-f`` (the image is always probed), one action at
most, and none lists nothing (qemu opens the image and does nothing). ``-c``
creates, ``-a`` applies and ``-d`` deletes a qcow2 internal snapshot in place
(`instar.snapshot.change_snapshots`); with ``-U`` they are refused before the
image is opened, as qemu refuses them. ``-q`` has nothing to silence, as in
qemu (these commands print nothing on success).
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.info import write_stdout
from instar.cli.output import escape_controls, report_error
from instar.errors import ImageOpenError, SnapshotError
from instar.events import Event, Notice

HELP = """\
usage: instar snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot]
                       [--allow dir] filename

List, create, apply or delete the internal snapshots of an image, as
qemu-img snapshot does (only qcow2 images have them).
  -l                        list the snapshots (nothing for a format without them)
  -c snapshot               create a snapshot of the image as it is now
  -a snapshot               apply a snapshot: the image becomes what it was then
  -d snapshot               delete a snapshot
  -U, --force-share         read an image a running qemu holds a write lock on
                            (with -l only: qemu refuses it for the others)
  -q                        quiet (a listing is printed all the same, as in qemu-img)
  --allow dir               backing files may also come from dir (not in qemu-img)
  -h, --help                show this help

-a takes a snapshot's ID or its tag (an ID first); -d takes its tag only, as
qemu-img does.
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
    name = ""
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option in ACTIONS:
            if action is not None:
                raise GetoptError("Cannot mix '-l', '-a', '-c', '-d'")
            action = option
            name = value
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    if action not in (None, "-l"):
        return _change(parsed.operands[0], action, name, access)
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


def _show(event: Event) -> None:
    if isinstance(event, Notice):
        sys.stdout.flush()
        sys.stderr.write(event.text + "\n")
        sys.stderr.flush()


def _change(filename: str, action: str, name: str, access: AccessOptions) -> int:
    """-c, -a or -d: qemu refuses -U for them before opening anything."""
    if access.force_share:
        raise ImageOpenError(filename, "force-share=on can only be used with read-only images")
    from instar.snapshot import change_snapshots

    try:
        change_snapshots(filename, action, name, allow=access.allowed, events=_show)
    except SnapshotError as error:
        if error.before is None:
            raise
        report_error(error.before)
        report_error(str(error))
        return 1
    return 0
