"""The options by which every image command is told what it may read.

``--allow DIR`` (repeatable: a directory whose files an image may name),
``-U``/``--force-share`` (read an image a running qemu holds a write lock
on), and qemu's ``--object`` and ``--image-opts``, which instar does not take
and refuses in one line. Each command's option loop hands every option to
`AccessOptions.take` first, so the options keep their order
(`AccessOptions.command_options` does it, and raises `HelpRequested` where
``-h``/``--help`` stands, as qemu-img prints a command's help there).
"""

from __future__ import annotations

from collections.abc import Iterator

from instar.cli.getopt import Parsed
from instar.errors import UnsupportedError


class HelpRequested(Exception):
    """-h or --help on a command's line: the command's HELP is printed, exit 0."""


class AccessOptions:
    """What a command line said about access, as its options are read."""

    def __init__(self, allow: list[str] | None = None) -> None:
        self.allow: list[str] = [] if allow is None else allow  # appended to in place
        self.force_share = False

    def take(self, option: str, value: str) -> bool:
        """Record ``option`` if it is one of these (True); False for any other."""
        if option == "--allow":
            self.allow.append(value)
        elif option in ("-U", "--force-share"):
            self.force_share = True
        elif option in ("--image-opts", "--object"):
            raise UnsupportedError(f"{option} is not supported")
        else:
            return False
        return True

    def command_options(self, parsed: Parsed) -> Iterator[tuple[str, str]]:
        """The options left to the command, in order, once these are taken."""
        for option, value in parsed.options:
            if option in ("-h", "--help"):
                raise HelpRequested
            if not self.take(option, value):
                yield option, value

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(self.allow)
