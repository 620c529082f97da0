"""``instar map``: qemu-img map's options, output and messages.

    instar map [-U] [-f fmt] [--output=ofmt] [--start-offset=OFFSET]
               [--max-length=LEN] [--allow dir] FILE

The walk runs in the worker; entries are printed here as they arrive, so a
failure leaves the entries before it printed, as qemu-img's does. The human
output stops, exit status 1, at data it cannot place (compressed clusters,
a VHDX), as qemu-img's does.
"""

from __future__ import annotations

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.cli.info import write_stdout
from instar.cli.numbers import convert_number
from instar.cli.output import escape_controls, report_error
from instar.errors import UsageError
from instar.runtime_types import TYPE_CHECKING
from instar.sizes import INT64_MAX

if TYPE_CHECKING:
    from instar.events import Event, MapEntry

HELP = """\
usage: instar map [-U] [-f fmt] [--output=ofmt] [--start-offset=OFFSET]
                  [--max-length=LEN] [--allow dir] filename

Show where the data of an image lies, as qemu-img map does, in the same layout.
  -f, --format fmt          image format (probed when absent)
  --output=ofmt             human (the default) or json
  -s, --start-offset OFFSET the first byte to map (default 0)
  -l, --max-length LEN      map at most LEN bytes (default: to the end)
  -U, --force-share         read an image a running qemu holds a write lock on
  --allow dir               backing files may also come from dir (not in qemu-img)
  -h, --help                show this help

Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = "hf:s:l:U"
LONG_OPTIONS = {"help": False, "format": True, "output": True, "object": True,
                "image-opts": False, "force-share": False, "start-offset": True,
                "max-length": True, "allow": True}


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    fmt: str | None = None
    output: str | None = None
    start = 0
    max_length: int | None = None
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option in ("-f", "--format"):
            fmt = value
        elif option == "--output":
            output = value
        elif option in ("-s", "--start-offset"):
            start = convert_number("start offset", value, 0, INT64_MAX)
        elif option in ("-l", "--max-length"):
            max_length = convert_number("max length", value, 0, INT64_MAX)
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    if output not in (None, "human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    printer = Printer(human=output != "json")
    from instar.map import map_image

    final = map_image(parsed.operands[0], fmt, start=start, max_length=max_length,
                      human=printer.human, allow=access.allowed, events=printer.show,
                      force_share=access.force_share)
    return printer.finish(final)


class Printer:
    """Prints the entries the walk sends, as qemu-img map prints them: each
    as soon as it arrives (every entry but the last has one after it)."""

    def __init__(self, human: bool) -> None:
        self.human = human
        self._opened = False
        self._first = True
        self._refused = False

    def show(self, event: Event) -> None:
        from instar.events import Mapped

        if not isinstance(event, Mapped):
            return
        parts: list[str] = []
        if not self._opened:
            self._opened = True
            from instar.map import HUMAN_HEADER

            parts.append(HUMAN_HEADER if self.human else "[")
        for entry in event.entries:
            if self._refused:
                break
            parts.append(self._entry(entry, last=False))
        if parts:
            write_stdout("".join(parts))

    def _entry(self, entry: MapEntry, last: bool) -> str:
        """qemu's ``dump_map_entry``: the text of one entry (and the separator
        before the next); notes a refusal of the human output."""
        from instar.map import human_line, human_refuses, json_entry

        first, self._first = self._first, False
        if not self.human:
            return json_entry(entry) + ("" if last else ",\n")
        if human_refuses(entry, first):
            self._refused = True
            return ""
        if entry.data and not entry.zero:
            return human_line(entry, escape_controls(entry.filename or ""))
        return ""

    def finish(self, final: MapEntry | None) -> int:
        """The end of a walk that did not fail: the last entry, qemu's last
        words, the exit status."""
        text = "" if final is None or self._refused else self._entry(final, last=True)
        if self._refused:
            from instar.map import UNMAPPABLE

            report_error(UNMAPPABLE)
            return 1
        write_stdout(text if self.human else text + "]\n")
        return 0
