"""The ``instar`` command: qemu-img-compatible sub-commands.

Each sub-command is one module with a ``run(args) -> int``. Every
`InstarError` becomes ``instar: MESSAGE`` on stderr and exit status 1, as
qemu-img's errors do, and so does an OSError from the system (the file
system, the streams); anything else escaping is a bug and shows a traceback.

What happens around a command, and why:

- SIGINT, SIGTERM and SIGHUP unwind it (`instar.signals`): the worker is
  killed, an unfinished output dropped; then instar dies by the signal, as
  qemu-img does, so the exit status says which.
- Standard output goes through `GuardedStdout`: a progress meter that cannot
  be drawn is ignored, as qemu-img ignores it; losing a command's result
  (info's text, help) is one line on stderr and exit status 1 (compare keeps
  its verdict as the status). qemu-img exits 0 in both cases.
- Descriptors 0-2 closed at start are reopened on /dev/null, so no file
  instar opens can take their place.
"""

from __future__ import annotations

import importlib
import sys

from instar import signals
from instar.cli.access import HelpRequested
from instar.cli.output import (
    GuardedStdout,
    protect_standard_descriptors,
    report_error,
    report_hint,
)
from instar.errors import InstarError, UsageError
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.worker import SandboxSettings

COMMANDS = {
    "dd": "instar.cli.dd",
    "convert": "instar.cli.convert",
    "create": "instar.cli.create",
    "info": "instar.cli.info",
    "compare": "instar.cli.compare",
    "check": "instar.cli.check",
    "inspect": "instar.cli.inspect",
    "map": "instar.cli.map",
    "measure": "instar.cli.measure",
    "resize": "instar.cli.resize",
    "snapshot": "instar.cli.snapshot",
    "amend": "instar.cli.amend",
    "rebase": "instar.cli.rebase",
    "commit": "instar.cli.commit",
}
# qemu-img 7.2's commands: one instar lacks is refused as such, not as a typo.
QEMU_COMMANDS = ("amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create",
                 "dd", "info", "map", "measure", "snapshot", "rebase", "resize")

USAGE = """\
instar version {version} - a safe, qemu-img-compatible disk image toolkit
usage: instar [standard options] command [command options]

Command syntax:
  amend [-f fmt] [-q] [-p] [-t cache] [--force] [--allow dir] -o options filename
  check [-U] [-q] [-f fmt] [-r leaks|all] [--output=ofmt] [-T src_cache] [--allow dir] \
filename
  commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] [--allow dir] \
filename
  compare [-U] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [--allow dir] \
filename1 filename2
  convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] \
[-o options] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--allow dir] \
[--require-safe] filename [filename2 [...]] output_filename
  create [-q] [-f fmt] [-o options] [-b backing_file [-F backing_fmt]] [-u] [--allow dir] \
filename [size]
  dd [-U] [-f fmt] [-O output_fmt] [-o options] [-c] [-p] [--allow dir] [--require-safe] \
[bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [-U] [-f fmt] [--output=ofmt] [--backing-chain] [--allow dir] \
[--qemu-version version] filename
  inspect [-U] [-f claimed] [--output=ofmt] [--allow-backing] [--allow-data-file] \
[--allow-extents] [--accept codes] [--vmdk-types T1,T2] [--allow-formats F1,F2] \
[--policy file] [--allow dir] filename
  map [-U] [-f fmt] [--output=ofmt] [--start-offset=OFFSET] [--max-length=LEN] \
[--allow dir] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] \
[--size N | [-f fmt] [-U] [--allow dir] filename]
  rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file \
[-F backing_fmt] [--allow dir] filename
  resize [-f fmt] [-q] [--shrink] [--preallocation=mode] [--allow dir] \
filename [+|-]size
  snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] [--allow dir] filename

Standard options:
  -h, --help       display this help and exit
  -V, --version    output version information and exit

Run 'instar COMMAND --help' for what a command takes.
"""


def _sandbox_settings(args: list[str]) -> SandboxSettings:
    """Take the sandbox options off the front of ``args`` (in place)."""
    from instar.cli.sandbox_options import settings_from, take_sandbox_options

    rest, values = take_sandbox_options(args)
    args[:] = rest
    return settings_from(values)


def main(argv: list[str] | None = None) -> int:
    """Run instar with ``argv`` (default: sys.argv[1:]); returns the exit status,
    or ends the process by the signal that interrupted it."""
    args = list(sys.argv[1:] if argv is None else argv)
    protect_standard_descriptors()
    saved = sys.stdout
    stdout = GuardedStdout(saved)
    handlers: dict[int, signals.Handler] = {}
    status = 1
    try:
        handlers = signals.install()  # none outside the main thread
        sys.stdout = stdout  # duck-typed: write, flush, buffer; the rest is delegated
        status = _main(args)
        stdout.flush()
    except signals.Terminated:
        pass  # everything is undone by now; die below
    finally:
        sys.stdout = saved
        signals.restore(handlers)
    signum = signals.received()
    if signum is not None:
        signals.die(signum)
    if stdout.lost_result and stdout.error is not None:
        report_error(f"error while writing to standard output: {stdout.error.strerror}")
        if not args or args[0] != "compare":  # compare's status is its verdict
            status = 1
    return status


def _main(args: list[str]) -> int:
    """The command line's command; ``args`` loses its sandbox options."""
    from instar import __version__

    try:
        settings = _sandbox_settings(args)
    except InstarError as error:
        report_error(str(error))
        return 1
    if args and args[0] == "--sandbox-status":
        from instar.cli.sandbox_options import print_status

        return print_status(settings)
    if not args:
        report_error("Not enough arguments")
        report_hint("Try 'instar --help' for more information")
        return 1
    command = args[0]
    if command in ("-h", "--help"):
        sys.stdout.write(USAGE.format(version=__version__))
        return 0
    if command in ("-V", "--version"):
        print(f"instar version {__version__}")
        return 0
    module_name = COMMANDS.get(command)
    if module_name is None:
        if command in QEMU_COMMANDS:
            report_error(f"'{command}' is a qemu-img command instar does not implement yet")
        else:
            report_error(f"Command not found: {command}")
        report_hint("Try 'instar --help' for more information")
        return 1
    module = importlib.import_module(module_name)
    from instar.worker import configure

    previous = configure(settings)  # every job of this command runs so
    try:
        status: int = module.run(args[1:])
    except HelpRequested:
        sys.stdout.write(module.HELP)
        return 0
    except InstarError as error:
        # Only instar's own usage messages span lines; image-derived text never may.
        report_error(str(error), multiline=isinstance(error, UsageError))
        if error.hint:
            report_hint(error.hint)
        return 1
    except OSError as error:  # the system's, not instar's: one line, no traceback
        report_error(describe_os_error(error))
        return 1
    finally:
        configure(previous)
    return status


def describe_os_error(error: OSError) -> str:
    """``NAME: REASON`` for an OSError that names a file, else ``REASON``."""
    reason = error.strerror or str(error)
    if error.filename is not None:
        return f"{error.filename}: {reason}"
    return reason
