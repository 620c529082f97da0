"""Termination signals: clean up, then die by the signal, as qemu-img dies by it.

qemu-img installs no handler for SIGINT, SIGTERM or SIGHUP: it dies at once
and its exit status says which signal killed it (130 or 143 in a shell). instar
has more to undo on the way out (a worker process to kill, an unnamed output
to drop, a half-written temporary file to unlink), so the CLI turns these
signals into `Terminated`, which unwinds through every ``finally``; once the
cleanup is done, `die` restores the default disposition and sends the signal
again, so the exit status is qemu's.

A few steps must not be cut in half by a signal (giving the finished output
its name: link, then rename; starting the worker and taking charge of it):
`deferred` holds any of these signals that arrives inside such a step and
delivers it, to whatever handler is installed, when the step is over. It
works for any caller, not only the CLI: with Python's own SIGINT handler the
KeyboardInterrupt simply comes after the step.
"""

from __future__ import annotations

import os

from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    import signal as system_signals
else:
    # The signal module without its enums: making them costs more at start-up
    # than anything else here. Handlers and constants are plain ints.
    import _signal as system_signals

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType, TracebackType
    from typing import Any

    Handler = Callable[[int, FrameType | None], Any] | int | None

# The signals that end instar as they end qemu-img (their default action terminates).
TERMINATING = (system_signals.SIGINT, system_signals.SIGTERM, system_signals.SIGHUP)


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9: the name the signal module's enum would give."""
    names: dict[str, object] = vars(system_signals)
    for name, value in names.items():
        if value == signum and name.startswith("SIG") and not name.startswith(("SIG_", "SIGRT")):
            return name
    return f"signal {signum}"


class Terminated(BaseException):
    """A terminating signal arrived; raised where the program was, so every
    ``finally`` runs. A BaseException, so ``except Exception`` cannot swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


_received: list[int] = []  # the first terminating signal, once one came


def _terminate(signum: int, frame: FrameType | None) -> None:
    """The CLI's handler: the first signal raises `Terminated`; later ones are
    only noted, so that a second Ctrl-C cannot interrupt the cleanup."""
    if _received:
        return
    _received.append(signum)
    raise Terminated(signum)


def install() -> dict[int, Handler]:
    """Make SIGINT, SIGTERM and SIGHUP raise `Terminated`; returns the handlers
    they had, for `restore`. A signal that was ignored when instar started
    (``nohup``, a background job of a non-interactive shell) stays ignored,
    as it does for qemu-img. Outside the main thread it installs nothing."""
    previous: dict[int, Handler] = {}
    _replace_handlers(_terminate, previous)
    return previous


def _replace_handlers(handler: Handler, previous: dict[int, Handler]) -> None:
    """Give each terminating signal that is not ignored ``handler``, noting
    each handler replaced in ``previous`` as it goes. Outside the main thread
    (where Python cannot set a handler) it changes nothing."""
    for number in TERMINATING:
        current = system_signals.getsignal(number)
        if current == system_signals.SIG_IGN or current is None:  # None: set outside Python
            continue
        try:
            system_signals.signal(number, handler)
        except ValueError:  # not the main thread
            break
        previous[number] = current


def restore(previous: dict[int, Handler]) -> None:
    """Put back the handlers `install` replaced."""
    for number, handler in previous.items():
        system_signals.signal(number, handler)


def received() -> int | None:
    """The terminating signal `Terminated` was raised for, if one came. Once
    one has, the process dies of it (`die`), so this is never stale."""
    return _received[0] if _received else None


def die(signum: int) -> None:
    """End the process by ``signum`` with its default action (after cleanup),
    so the parent sees what qemu-img's parent sees. Never returns."""
    system_signals.signal(signum, system_signals.SIG_DFL)
    try:
        system_signals.pthread_sigmask(system_signals.SIG_UNBLOCK, {signum})
    except OSError:
        pass
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal somehow did not end us


class deferred:
    """Hold terminating signals for the duration of the block, then deliver
    any that came to the handler that was installed.

    Only the main thread can change handlers; elsewhere the block runs as it
    is (the signal is then handled in the main thread anyway).
    """

    def __init__(self) -> None:
        self._pending: list[int] = []
        self._holding = True
        self._previous: dict[int, Handler] = {}

    def __enter__(self) -> None:
        try:
            _replace_handlers(self._hold, self._previous)
        except BaseException:  # a signal came while they were being replaced
            self.__exit__(None, None, None)
            raise

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self._holding:
            self._pending.append(signum)
            return
        # The block is over but this handler was not replaced yet (another
        # signal's handler raised while they were being put back): act as the
        # one it stood in for.
        system_signals.signal(signum, self._previous[signum])
        system_signals.raise_signal(signum)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._holding = False
        restore(self._previous)
        for held in dict.fromkeys(self._pending):
            system_signals.raise_signal(held)


__all__ = ["TERMINATING", "Terminated", "deferred", "die", "install", "received", "restore",
           "signal_name", "system_signals"]
