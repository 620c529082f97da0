"""How the CLI prints errors and warnings: qemu-img's form, instar's name."""

from __future__ import annotations

import sys

PROGRAM = "instar"


def report_error(message: str) -> None:
    """``instar: MESSAGE`` on stderr; each line prefixed, as qemu's error_report calls."""
    for line in message.split("\n"):
        print(f"{PROGRAM}: {line}", file=sys.stderr)


def report_warning(message: str) -> None:
    print(f"{PROGRAM}: warning: {message}", file=sys.stderr)
