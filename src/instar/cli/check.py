"""``instar check``: qemu-img check's options, output, messages and exit codes.

    instar check [-U] [-q] [-f fmt] [--output=ofmt] [-T src_cache] [--allow dir] FILE

Exit 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check could not
be done (or a bad command line), 63 the format has no check. Repairing
(``-r leaks|all``) is refused: instar never writes to an image it reads.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.output import report_error, report_lines
from instar.errors import ChecksNotSupportedError, UnsupportedError, UsageError

if TYPE_CHECKING:
    from instar.findings import CheckResult

HELP = """\
usage: instar check [-U] [-q] [-f fmt] [--output=ofmt] [-T src_cache] [--allow dir] filename

Check an image for consistency, as qemu-img check does: the same lines, summary and
exit status.
  -f, --format fmt       image format (probed when absent)
  --output=ofmt          human (the default) or json
  -q                     quiet: print no summary (the exit status tells)
  -T src_cache           cache mode of the image: checked, no effect
  -U, --force-share      read an image a running qemu holds a write lock on
  --allow dir            backing files may also come from dir (not in qemu-img)
  -r, --repair leaks|all refused: instar never writes to an image it reads
  -h, --help             show this help
Exit status: 0 no errors, 2 corruptions, 3 leaked clusters only, 1 the check could not
be done, 63 the format has no check.

Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = "hf:r:T:qU"
LONG_OPTIONS = {"help": False, "format": True, "repair": True, "output": True, "object": True,
                "image-opts": False, "force-share": False, "allow": True}
CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")
NOT_SUPPORTED = 63


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt: str | None = None
    output: str | None = None
    cache = "writeback"
    quiet = False
    access = AccessOptions()
    for option, value in parsed.options:
        if option in ("-h", "--help"):
            sys.stdout.write(HELP)
            return 0
        if access.take(option, value):
            continue
        if option in ("-f", "--format"):
            fmt = value
        elif option in ("-r", "--repair"):
            if value not in ("leaks", "all"):
                raise GetoptError(
                    f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}")
            raise UnsupportedError(
                f"-r {value} is not supported: instar check reports, it never repairs an image")
        elif option == "--output":
            output = value
        elif option == "-T":
            cache = value
        elif option == "-q":
            quiet = True
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    if output not in (None, "human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    if cache not in CACHE_MODES:
        raise UsageError(f"Invalid source cache option: {cache}")
    from instar.check import check_image

    try:
        result = check_image(parsed.operands[0], fmt, allow=access.allowed,
                             force_share=access.force_share)
    except ChecksNotSupportedError as error:
        report_error(str(error))
        return NOT_SUPPORTED
    return show(result, output == "json", quiet)


def show(result: CheckResult, json: bool, quiet: bool) -> int:
    """Print a `CheckResult` as qemu-img check does; returns the exit status."""
    from instar.check import render_human, render_json
    from instar.cli.info import write_stdout

    report_lines([(finding.message, finding.prefixed) for finding in result.findings])
    if result.findings_dropped:
        report_error(f"{result.findings_dropped} more lines like these were not kept "
                     f"(instar keeps the first {len(result.findings)})")
    if result.failure is not None:
        report_error(f"Check failed: {result.failure}")
        return 1
    if not quiet:
        write_stdout(render_json(result) if json else render_human(result))
    if result.check_errors:
        report_error("Check failed")
    return result.exit_code
