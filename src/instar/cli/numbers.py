"""qemu-img's ``cvtnum_full``: a size operand with its range and messages."""

from __future__ import annotations

from instar.cli.output import report_warning
from instar.errors import UsageError
from instar.sizes import ParsedSize, SizeStatus, parse_size


class NumberError(UsageError):
    """A bad number; the message may span two lines, as qemu prints it."""


def convert_number(name: str, text: str, minimum: int, maximum: int) -> int:
    """Parse ``text`` for operand ``name`` in ``[minimum, maximum]``, as qemu-img."""
    parsed: ParsedSize = parse_size(text)
    if parsed.hex_with_suffix:
        report_warning(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
    if parsed.status is SizeStatus.SYNTAX:
        raise NumberError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    if parsed.status is SizeStatus.RANGE or not minimum <= parsed.value <= maximum:
        raise NumberError(f"Invalid {name} specified. Must be between {minimum} and {maximum}.")
    return parsed.value
