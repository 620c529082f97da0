"""One exception hierarchy for instar.

The CLI turns every `InstarError` into a one-line message (after the program
prefix) and exit status 1; anything else escaping is a bug in instar, not bad
input. Messages follow qemu-img's wording where a user may script against it.

Every one of them survives pickling (the sandboxed worker will raise them in
another process; so do multiprocessing pools in callers' code), whatever its
``__init__`` takes: see `InstarError.__reduce__`.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[InstarError], args: tuple[Any, ...]) -> InstarError:
    """Unpickle without calling ``cls.__init__``, whose parameters may differ
    from the ``args`` it passed on (ImageOpenError keeps only its message)."""
    return cls.__new__(cls, *args)


class InstarError(Exception):
    """Base class: an error the user can act on, printed as one line.

    ``hint`` is printed after it without the program prefix, as qemu-img
    follows some messages with advice ("Try 'instar --help' ...").
    """

    hint: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce calls cls(*self.args): a TypeError for any
        # subclass whose __init__ takes other arguments than its message.
        # Rebuilding from args and restoring __dict__ (attributes, an
        # instance's hint, __notes__) works for every subclass.
        return (_rebuild, (type(self), self.args), self.__dict__ or None)


class UsageError(InstarError):
    """The command line is wrong (unknown option, bad operand, bad number)."""


class ImageOpenError(InstarError):
    """An image could not be opened: missing, wrong format, or malformed header.

    Printed as qemu does: ``Could not open 'NAME': REASON``.
    """

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"Could not open '{filename}': {reason}")
        self.filename = filename
        self.reason = reason


class CompareError(InstarError):
    """A compare failure with qemu-img compare's exit code (2, 3 or 4)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class InvalidArgumentError(InstarError, ValueError):
    """A Python API call with a bad argument (``bs=0``, a negative ``count``, a
    read outside the image): a ValueError too, so ``except ValueError`` written
    before it existed still catches it."""


class FormatError(InstarError):
    """Image bytes violate the format or one of instar's safety limits."""


class ImageReadError(FormatError):
    """A malformed structure found while reading an image (after it opened):
    the message names the image, ``IMAGE: REASON``."""

    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"{image}: {reason}")
        self.image = image
        self.reason = reason


class DriverError(FormatError):
    """A format driver failed with an errno and no message of its own (its
    strerror is the message). qemu then names the file twice, "Could not open
    'F': Could not open 'F': Invalid argument": the opener composes that."""


class ChainDepthError(InstarError):
    """A backing chain deeper than instar's limit. Not a FormatError, so no level of
    the chain wraps it: the top image reports it, once."""


class UnsupportedError(InstarError):
    """A feature qemu supports that instar does not (yet): refused clearly."""


class PolicyError(InstarError):
    """A path or resource the safety policy does not allow."""


class OutputError(InstarError):
    """The output image could not be created or written."""


class OptionError(UsageError):
    """A creation option the format does not take, or -c where it cannot compress.

    qemu reports these before creating anything, unprefixed by the file name.
    """


class CreationError(OutputError):
    """The output format refused to create the image (a bad option value, a size
    it cannot hold); callers add qemu's "error while creating/converting" prefix."""


class WorkerLimitError(InstarError):
    """The sandboxed worker hit one of its limits (memory, CPU, wall clock) or died."""
