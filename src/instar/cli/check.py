"""``instar check``: qemu-img check's options, output, messages and exit codes.

    instar check [-U] [-q] [-f fmt] [-r leaks|all] [--output=ofmt] [-T src_cache]
                 [--allow dir] FILE

Exit 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check could not
be done (or a bad command line), 63 the format has no check. ``-r`` repairs
as qemu-img 7.2 does (qcow2; `instar.check.repair_image`): qemu's lines,
"The following inconsistencies were found and repaired", then the second
check of the fixed image.
"""

from __future__ import annotations

import sys

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.output import report_error, report_lines
from instar.errors import ChecksNotSupportedError, ImageOpenError, UsageError
from instar.events import Event, Notice
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.findings import CheckResult

HELP = """\
usage: instar check [-U] [-q] [-f fmt] [-r leaks|all] [--output=ofmt] [-T src_cache]
                    [--allow dir] filename

Check an image for consistency, as qemu-img check does: the same lines, summary and
exit status.
  -f, --format fmt       image format (probed when absent)
  --output=ofmt          human (the default) or json
  -q                     quiet: print no summary (the exit status tells)
  -T src_cache           cache mode of the image: checked, no effect
  -U, --force-share      read an image a running qemu holds a write lock on
  --allow dir            backing files may also come from dir (not in qemu-img)
  -r, --repair leaks|all repair leaked clusters, or all that qemu-img repairs (qcow2;
                         the image is changed in place, then checked again)
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
    repair: str | None = None
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option in ("-f", "--format"):
            fmt = value
        elif option in ("-r", "--repair"):
            if value not in ("leaks", "all"):
                raise GetoptError(
                    f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}")
            repair = value
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
    if repair is not None:
        return _repair(parsed.operands[0], fmt, repair, output == "json", quiet, access)
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


def _show_notice(event: Event) -> None:
    if isinstance(event, Notice):
        sys.stdout.flush()
        sys.stderr.write(event.text + "\n")
        sys.stderr.flush()


def _repair(path: str, fmt: str | None, mode: str, json: bool, quiet: bool,
            access: AccessOptions) -> int:
    """``check -r``: the first check's lines, qemu-img's "repaired" block and
    the second check's result when something was fixed, else the first's."""
    from instar.check import repair_image
    from instar.cli.info import write_stdout

    if access.force_share:
        raise ImageOpenError(path, "force-share=on can only be used with read-only "
                             "images")
    try:
        repaired = repair_image(path, mode, fmt, allow=access.allowed, events=_show_notice)
    except ChecksNotSupportedError as error:
        report_error(str(error))
        return NOT_SUPPORTED
    first, second = repaired
    if second is None:
        return show(first, json, quiet)
    report_lines([(finding.message, finding.prefixed) for finding in first.findings])
    if not quiet and not json:
        write_stdout("The following inconsistencies were found and repaired:\n\n"
                     f"    {first.leaks_fixed} leaked clusters\n"
                     f"    {first.corruptions_fixed} corruptions\n\n"
                     "Double checking the fixed image now...\n")
    return show(second, json, quiet)
