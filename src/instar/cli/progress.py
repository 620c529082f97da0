"""qemu-img's ``-p`` progress meter: ``    (NN.NN/100%)`` redrawn on one line."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from instar.cli.output import report_error

if TYPE_CHECKING:
    from instar.events import Event, EventSink


class ProgressMeter:
    """Prints progress when it moves by at least ``step`` percent, as qemu does."""

    def __init__(self, stream: TextIO | None = None, step: float = 1.0) -> None:
        self._stream = sys.stdout if stream is None else stream
        self._step = step
        self._last = -step
        self.update(0, 1)

    def update(self, done: int, total: int) -> None:
        percent = 100.0 if total == 0 else done * 100.0 / total
        if percent - self._last >= self._step or (percent == 100.0 and self._last < 100.0):
            self._last = percent
            self._stream.write(f"    ({percent:0.2f}/100%)\r")
            self._stream.flush()

    def finish(self) -> None:
        """The final 100% line and a newline, as qemu-img ends its meter."""
        self._stream.write("    (100.00/100%)\r\n")
        self._stream.flush()


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
