"""qemu-img's ``-p`` progress meter: ``    (NN.NN/100%)`` redrawn on one line."""

from __future__ import annotations

import sys

from instar.cli.output import report_error
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TextIO

    from instar.events import Event, EventSink


class ProgressMeter:
    """Prints progress when it moves by at least ``step`` percent, as qemu does.

    The meter is a side show: if its stream fails (closed, full, a pipe whose
    reader left: ``convert -p | head -c1``) it stops drawing and the copy goes
    on to the end, as qemu-img's does; the exit status is the copy's.
    """

    def __init__(self, stream: TextIO | None = None, step: float = 1.0) -> None:
        self._stream: TextIO | None = sys.stdout if stream is None else stream
        self._step = step
        self._last = -step
        self.update(0, 1)

    def _draw(self, text: str) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # ValueError: a stream closed under us
            self._stream = None

    def update(self, done: int, total: int) -> None:
        percent = 100.0 if total == 0 else done * 100.0 / total
        if percent - self._last >= self._step or (percent == 100.0 and self._last < 100.0):
            self._last = percent
            self._draw(f"    ({percent:0.2f}/100%)\r")

    def finish(self) -> None:
        """The final 100% line and a newline, as qemu-img ends its meter."""
        self._draw("    (100.00/100%)\r\n")


def show_events(meter: ProgressMeter | None) -> EventSink:
    """The CLI's sink for a copy's events: progress on ``meter`` (when -p),
    notices as warnings on stderr."""

    def show(event: Event) -> None:
        from instar.events import Notice, Progress

        if isinstance(event, Progress):
            if meter is not None:
                meter.update(event.done, event.total)
        elif isinstance(event, Notice):
            report_error(event.text)

    return show
