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

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

# The signals that end instar as they end qemu-img (their default action terminates).
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Terminated(BaseException):
    """A terminating signal arrived; raised where the program was, so every
    ``finally`` runs. A BaseException, so ``except Exception`` cannot swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
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
    as it does for qemu-img. Main thread only (as `signal.signal`)."""
    previous: dict[int, Handler] = {}
    for number in TERMINATING:
        handler = signal.getsignal(number)
        if handler is signal.SIG_IGN or handler is None:  # None: set outside Python
            continue
        previous[number] = handler
        signal.signal(number, _terminate)
    return previous


def restore(previous: dict[int, Handler]) -> None:
    """Put back the handlers `install` replaced."""
    for number, handler in previous.items():
        signal.signal(number, handler)


def received() -> int | None:
    """The terminating signal `Terminated` was raised for, if one came. Once
    one has, the process dies of it (`die`), so this is never stale."""
    return _received[0] if _received else None


def die(signum: int) -> None:
    """End the process by ``signum`` with its default action (after cleanup),
    so the parent sees what qemu-img's parent sees. Never returns."""
    signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal somehow did not end us


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold terminating signals for the duration of the block, then deliver
    any that came to the handler that was installed.

    Only the main thread can change handlers; elsewhere the block runs as it
    is (the signal is then handled in the main thread anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    holding = [True]
    previous: dict[int, Handler] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        if holding:
            pending.append(signum)
            return
        # The block is over but this handler was not replaced yet (another
        # signal's handler raised while they were being put back): act as the
        # one it stood in for.
        signal.signal(signum, previous[signum])
        signal.raise_signal(signum)

    try:
        for number in TERMINATING:
            handler = signal.getsignal(number)
            if handler is signal.SIG_IGN or handler is None:  # None: set outside Python
                continue
            previous[number] = handler
            signal.signal(number, hold)
        yield
    finally:
        holding.clear()
        restore(previous)
        for held in dict.fromkeys(pending):
            signal.raise_signal(held)
