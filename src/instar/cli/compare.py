"""``instar compare``: qemu-img compare's options, messages and exit codes.

    instar compare [-U] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [--allow dir] A B

Verdicts go to stdout (nothing with -q); exit 0 identical, 1 different,
2 an image cannot be opened (or a bad -T), 3 block status failed, 4 a read
failed; a bad command line exits 1, as qemu-img. ``-T`` is checked and
otherwise ignored (instar has no cache modes).
"""

from __future__ import annotations

import struct
import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.output import report_error

HELP = """\
usage: instar compare [-U] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [--allow dir]
                      filename1 filename2

Compare the contents of two images, as qemu-img compare does.
  -f fmt             format of the first image (probed when absent)
  -F fmt             format of the second image (probed when absent)
  -T src_cache       cache mode of the images: checked, no effect
  -s                 strict: images of different sizes, or with different allocation,
                     are different
  -q                 quiet: print nothing, only the exit status tells
  -p                 show progress
  -U, --force-share  read images a running qemu holds a write lock on
  --allow dir        backing files may also come from dir (not in qemu-img)
  -h, --help         show this help
Exit status: 0 identical, 1 different, 2 cannot open, 3 block status failed,
4 read error.

Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = "hf:F:T:pqsU"
LONG_OPTIONS = {"help": False, "image-opts": False, "object": True, "force-share": False,
                "allow": True}
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")
MIN_SKIP = 2.0  # percent between two progress lines, as qemu-img compare


def _f32(value: float) -> float:
    """``value`` rounded to a C float, as qemu's progress arithmetic is."""
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


class QemuProgress:
    """qemu's progress meter (util/qemu-progress.c) in single precision, so
    the lines printed are the ones qemu-img prints."""

    def __init__(self) -> None:
        self.current = 0.0
        self.last_print = 0.0

    def update(self, done: int, base: int) -> None:
        """qemu_progress_print(((float) done / base) * 100, 100)."""
        self.add(0.0 if done == 0 else _f32(_f32(_f32(float(done)) / _f32(float(base))) * 100))

    def add(self, delta: float) -> None:
        """qemu_progress_print(delta, 100): ``delta`` percent more (a C float)."""
        current = _f32(self.current + _f32(_f32(delta / 100) * 100))
        current = min(current, 100.0)
        self.current = current
        if current > _f32(self.last_print + MIN_SKIP) or current in (0.0, 100.0):
            self.last_print = current
            sys.stdout.write(f"    ({current:3.2f}/100%)\r")
            sys.stdout.flush()

    @staticmethod
    def end() -> None:
        sys.stdout.write("\n")


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt_a: str | None = None
    fmt_b: str | None = None
    strict = quiet = progress = False
    cache = "writeback"
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option == "-f":
            fmt_a = value
        elif option == "-F":
            fmt_b = value
        elif option == "-s":
            strict = True
        elif option == "-q":
            quiet = True
        elif option == "-p":
            progress = True
        elif option == "-T":
            cache = value
    if len(parsed.operands) != 2:
        raise GetoptError("Expecting two image file names")
    meter = QemuProgress() if progress and not quiet else None
    try:
        return _compare(parsed.operands, fmt_a, fmt_b, strict, quiet, cache, access.allowed, meter,
                        access.force_share)
    finally:
        if meter is not None:
            meter.end()


def _compare(operands: list[str], fmt_a: str | None, fmt_b: str | None, strict: bool,
             quiet: bool, cache: str, allow: tuple[str, ...], meter: QemuProgress | None,
             force_share: bool) -> int:
    from instar.compare import OPEN_ERROR, CompareError, compare

    if cache not in CACHE_MODES:
        report_error(f"Invalid source cache option: {cache}")
        return OPEN_ERROR

    from instar.events import Advance, Event, Line

    def show(event: Event) -> None:
        if isinstance(event, Line):
            if not quiet:
                sys.stdout.write(event.text + "\n")
                sys.stdout.flush()
        elif isinstance(event, Advance) and meter is not None:
            meter.update(event.length, event.total)

    try:
        return compare(operands[0], operands[1], fmt_a=fmt_a, fmt_b=fmt_b, strict=strict,
                       allow=allow, events=show, progress=meter is not None,
                       force_share=force_share)
    except CompareError as error:
        report_error(str(error))
        if error.hint:
            print(error.hint, file=sys.stderr)
        return error.exit_code
