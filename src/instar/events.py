"""What a running operation tells its caller, as plain data.

dd, convert and compare report through an `EventSink`: progress and lines to
print are small NamedTuples, not calls into the front end, so a worker
process can send them to the host as they are and the host decides how to
show them (the CLI draws qemu's meters and prints qemu's lines).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


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


Event = Progress | Advance | Line | Notice
EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink of a caller that wants no events."""
