"""How the CLI prints errors and warnings: qemu-img's form, instar's name.

Messages often quote text from an untrusted image (a create type, a backing
file name). Control characters in them are shown escaped, so an image can
neither forge extra lines of output nor send escape sequences to a terminal.
"""

from __future__ import annotations

import sys

PROGRAM = "instar"


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")


def printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every non-printable character escaped (``\\n`` kept if asked)."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or (keep_newlines and char == "\n") else _escape(char)
        for char in text
    )


def _is_control(char: str) -> bool:
    code = ord(char)
    # C0, DEL and C1, as characters or as raw bytes that were not UTF-8 (surrogateescape)
    return code < 0x20 or 0x7F <= code <= 0x9F or 0xDC80 <= code <= 0xDC9F


def escape_controls(text: str) -> str:
    """``text`` with its control characters escaped and the rest as it is.

    For output that otherwise prints an image's names as qemu-img does (``info``):
    only what a terminal would act on is changed.
    """
    if text.isprintable():
        return text
    return "".join(_escape(char) if _is_control(char) else char for char in text)


def report_error(message: str, multiline: bool = False) -> None:
    """``instar: MESSAGE`` on stderr, as qemu's error_report.

    ``multiline`` is for instar's own two-line messages (each line gets the
    prefix, as qemu prints its pairs of error_report calls).
    """
    for line in printable(message, keep_newlines=multiline).split("\n"):
        print(f"{PROGRAM}: {line}", file=sys.stderr)


def report_warning(message: str) -> None:
    print(f"{PROGRAM}: warning: {printable(message)}", file=sys.stderr)
