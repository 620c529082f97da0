"""How the CLI prints: errors and warnings in qemu-img's form, and standard
output that may be closed, full or a pipe nobody reads.

Messages often quote text from an untrusted image (a create type, a backing
file name). Control characters in them are shown escaped, so an image can
neither forge extra lines of output nor send escape sequences to a terminal.

qemu-img ignores failures to write its standard streams (``info > /dev/full``
exits 0). instar never lets one become a traceback: `GuardedStdout` notes the
first failure and drops what follows, so a progress meter that cannot be
drawn does not stop a copy (as in qemu-img); the CLI then decides whether
the lost text was the command's result (see `instar.cli.main`).
"""

from __future__ import annotations

import errno
import os
import sys

from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, TextIO

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


def _write_stderr(line: str) -> None:
    """One line on stderr; nothing (and no exception) if stderr is closed or
    failing: there is nowhere left to say so, and the exit status still does."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        _detach(stream)


def report_error(message: str, multiline: bool = False) -> None:
    """``instar: MESSAGE`` on stderr, as qemu's error_report.

    ``multiline`` is for instar's own two-line messages (each line gets the
    prefix, as qemu prints its pairs of error_report calls).
    """
    for line in printable(message, keep_newlines=multiline).split("\n"):
        _write_stderr(f"{PROGRAM}: {line}")


def report_warning(message: str) -> None:
    _write_stderr(f"{PROGRAM}: warning: {printable(message)}")


def report_plain(text: str) -> None:
    """A line on stderr without the program prefix, control characters escaped
    (glibc's getopt messages, which quote the command line)."""
    _write_stderr(printable(text))


def report_hint(text: str) -> None:
    """A line after an error without the program prefix ("Try 'instar --help'...")."""
    _write_stderr(text)


def report_lines(lines: list[tuple[str, bool]]) -> None:
    """Lines on stderr at once (a check may print a hundred thousand), each
    (text, prefixed): with the program's prefix as error_report prints, or as
    it stands as fprintf prints; control characters escaped (the text may
    quote an image)."""
    if lines:
        _write_stderr("\n".join(f"{PROGRAM}: {escape_controls(text)}" if prefixed
                                 else escape_controls(text) for text, prefixed in lines))


def _detach(stream: Any) -> None:
    """After a failed write to the process's own stdout or stderr, point that
    descriptor at /dev/null: what the stream still buffers then goes nowhere
    quietly, instead of failing again when Python flushes it at exit (which
    would print "Exception ignored" and change the exit status to 120)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    if fd not in (1, 2):
        return
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def protect_standard_descriptors() -> None:
    """Open /dev/null on any of descriptors 0, 1 and 2 that is closed.

    A program started with ``>&-`` would otherwise get descriptor 1 for the
    first file it opens, and a later print would land inside that file (an
    image); Python has then set ``sys.stdout`` to None, which `GuardedStdout`
    reports as closed.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # lowest free: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _is_progress(text: str) -> bool:
    """Whether ``text`` is what qemu's progress meters write: a redraw
    ("    (12.34/100%)\r"), the final line (the same with "\r\n") or compare's
    newline. (By hand, not with a regular expression: importing ``re`` would
    cost every command's start-up more than this ever does.)"""
    if text == "\n":
        return True
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\r"):
        text = text[:-1]
    else:
        return False
    meter = text.lstrip(" ")
    if not (meter.startswith("(") and meter.endswith("/100%)")):
        return False
    whole, dot, fraction = meter[1:-len("/100%)")].partition(".")
    return bool(dot) and whole.isdecimal() and fraction.isdecimal()


class _GuardedBuffer:
    """``GuardedStdout.buffer``: the binary stream, with the same guard."""

    def __init__(self, owner: GuardedStdout) -> None:
        self._owner = owner

    def write(self, data: bytes) -> int:
        owner = self._owner
        if owner.usable():
            assert owner.stream is not None
            try:
                owner.stream.buffer.write(data)
                owner.stream.buffer.flush()
            except OSError as error:
                owner.failed(error)
        owner.lost_result = owner.lost_result or owner.error is not None
        return len(data)

    def flush(self) -> None:
        self._owner.flush()


class GuardedStdout:
    """Standard output while a command runs: each write goes to ``stream`` at
    once (so a failure belongs to the text that failed) until one fails (a
    full disk, a closed descriptor, a reader that went away); that first
    error is kept in ``error`` and everything after it is dropped.

    ``lost_result`` says whether any text other than a progress meter's was
    lost: losing the meter is qemu-img's "nothing happened", losing the text
    a command exists to print (info's) is not. ``stream`` None is a standard
    output that was closed when instar started. Encoding errors are not
    caught: callers handle them (info prints names that are not UTF-8 as
    their bytes).
    """

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.error: OSError | None = None
        self.lost_result = False
        self.buffer = _GuardedBuffer(self)

    def failed(self, error: OSError) -> None:
        if self.error is None:
            self.error = error
            _detach(self.stream)

    def usable(self) -> bool:
        """Whether writes still go out (noting a closed stdout as the failure)."""
        if self.stream is None and self.error is None:
            self.error = OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self.error is None

    def write(self, text: str) -> int:
        if self.usable():
            assert self.stream is not None
            try:
                self.stream.write(text)
                self.stream.flush()
            except OSError as error:
                self.failed(error)
        if self.error is not None and not _is_progress(text):
            self.lost_result = True
        return len(text)

    def flush(self) -> None:
        if self.stream is not None and self.error is None:
            try:
                self.stream.flush()
            except OSError as error:
                self.failed(error)
                self.lost_result = True

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...
        if self.stream is None:
            raise AttributeError(name)
        return getattr(self.stream, name)
