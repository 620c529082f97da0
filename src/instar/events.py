"""What a running operation tells its caller, as plain data.

dd, convert and compare report through an `EventSink`: progress and lines to
print are small NamedTuples, not calls into the front end, so a worker
process can send them to the host as they are and the host decides how to
show them (the CLI draws qemu's meters and prints qemu's lines).
"""

from __future__ import annotations

from collections.abc import Callable

from instar.runtime_types import NamedTuple


class Progress(NamedTuple):
    """A copy has written ``done`` of its ``total`` bytes."""

    done: int
    total: int


class Advance(NamedTuple):
    """compare went through one more of qemu's chunks: ``length`` of ``total``
    bytes (qemu's meter adds each chunk's share, so the steps matter)."""

    length: int
    total: int


class Line(NamedTuple):
    """A line of output (compare's verdicts), without its newline."""

    text: str


class Notice(NamedTuple):
    """A warning after which the operation goes on (dd's "cannot skip")."""

    text: str


class MapEntry(NamedTuple):
    """One line of ``qemu-img map`` (qemu's MapEntry): ``length`` bytes from
    ``start`` answered ``depth`` layers down the chain; ``offset`` and
    ``filename`` where the bytes lie in a file (None where qemu knows no
    offset: compressed or unallocated data, zeros without a cluster)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None


class Mapped(NamedTuple):
    """map's next entries, merged as qemu merges them, in order."""

    entries: list[MapEntry]


def map_entry_from_data(data: object) -> MapEntry:
    """The MapEntry a worker sent (as a list: it crossed as plain data); ValueError unless
    every field has its type and no number is negative."""
    if not isinstance(data, list) or len(data) != len(MapEntry._fields):
        raise ValueError("a malformed map entry")
    start, length, depth, present, zero, is_data, offset, filename = data
    numbers_ok = all(type(n) is int and n >= 0 for n in (start, length, depth))
    flags_ok = all(type(flag) is bool for flag in (present, zero, is_data))
    if not (numbers_ok and flags_ok
            and (offset is None or (type(offset) is int and offset >= 0))
            and (filename is None or type(filename) is str)):
        raise ValueError("a malformed map entry")
    return MapEntry(start, length, depth, present, zero, is_data, offset, filename)


Event = Progress | Advance | Line | Notice | Mapped
EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink of a caller that wants no events."""
