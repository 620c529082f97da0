"""``instar rebase``: qemu-img rebase's arguments, output, messages and exit codes.

    instar rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u]
                  [-b backing_file] [-F backing_fmt] [--allow dir] FILE

As qemu-img 7.2: the options, then exactly one file name, then ``-b`` unless
``-u`` (``-u`` without ``-b`` removes the backing file, as ``-b ""`` does),
then the two cache modes, then the rebase itself (`instar.rebase`). ``-p``
draws qemu's progress meter unless ``-q``.
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.check import CACHE_MODES
from instar.cli.compare import QemuProgress, _f32
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.errors import InstarError
from instar.events import Advance, Event, EventSink, Notice

HELP = """\
usage: instar rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u]
                     -b backing_file [-F backing_fmt] [--allow dir] filename

Change the backing file of an image, as qemu-img rebase does.
  -b backing_file      the new backing file ("" for none), relative to the image's
                       directory unless absolute
  -F backing_fmt       its format (needed with a backing file)
  -u                   unsafe: change the name in the header only; without -u the
                       image gets a copy of every part the old backing file read
                       differently from the new one, so it reads the same after
  -f fmt               the image's format (probed when not given)
  -t cache, -T cache   cache modes: checked, no effect
  -p                   show progress
  -q                   quiet
  -U, --force-share    read a new backing file a running qemu holds a write lock on
  --allow dir          the old and new backing files may come from dir (not in qemu-img)
  -h, --help           show this help

qcow2 and qed images can be rebased (qemu refuses the other formats).
Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = ":hf:F:b:upt:T:qU"
_ONE_BY_ONE = 1 << 14  # steps of the meter added one by one, as qemu adds them
LONG_OPTIONS = {"help": False, "object": True, "image-opts": False, "force-share": False,
                "allow": True}


def _shower(meter: QemuProgress | None) -> EventSink:
    """Progress on ``meter`` (with -p), qemu's warnings as they are on stderr."""

    def show(event: Event) -> None:
        if isinstance(event, Advance):
            if meter is not None:  # qemu: 100 / (size / MIN(size, 2 MiB)), a C float
                share = _f32(100.0 / _f32(float(event.total)))
                if event.length <= _ONE_BY_ONE:
                    for _ in range(event.length):
                        meter.add(share)
                else:
                    meter.add(min(100.0, event.length * share))
        elif isinstance(event, Notice):
            sys.stdout.flush()
            sys.stderr.write(event.text + "\n")
            sys.stderr.flush()

    return show


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt: str | None = None
    backing_fmt: str | None = None
    backing: str | None = None
    unsafe = progress = quiet = False
    cache = source_cache = "writeback"
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option == "-f":
            fmt = value
        elif option == "-F":
            backing_fmt = value
        elif option == "-b":
            backing = value
        elif option == "-u":
            unsafe = True
        elif option == "-p":
            progress = True
        elif option == "-t":
            cache = value
        elif option == "-T":
            source_cache = value
        elif option == "-q":
            quiet = True
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    if not unsafe and backing is None:
        raise GetoptError("Must specify backing file (-b) or use unsafe mode (-u)")
    meter = QemuProgress() if progress and not quiet else None
    if meter is not None:
        meter.add(0.0)
    try:
        if cache not in CACHE_MODES:
            raise InstarError(f"Invalid cache option: {cache}")
        if source_cache not in CACHE_MODES:
            raise InstarError(f"Invalid source cache option: {source_cache}")
        from instar.rebase import rebase

        rebase(parsed.operands[0], backing, fmt=fmt, backing_fmt=backing_fmt, unsafe=unsafe,
               allow=access.allowed, force_share=access.force_share,
               events=_shower(meter))
    finally:
        if meter is not None:
            if sys.exc_info()[0] is None:
                meter.add(100.0)
            meter.end()
    return 0
