"""One exception hierarchy for instar.

The CLI turns every `InstarError` into a one-line message (after the program
prefix) and exit status 1; anything else escaping is a bug in instar, not bad
input. Messages follow qemu-img's wording where a user may script against it.

Every one of them survives pickling (the sandboxed worker will raise them in
another process; so do multiprocessing pools in callers' code), whatever its
``__init__`` takes: see `InstarError.__reduce__`.
"""

from __future__ import annotations

from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
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


class UnknownFeatureError(UnsupportedError):
    """An image sets a feature bit no reader knows (qcow2's unknown incompatible
    features): refused, and reported by ``inspect`` as its own finding."""


class PolicyError(InstarError):
    """A path or resource the safety policy does not allow."""


class OutputError(InstarError):
    """The output image could not be created or written."""


class ResizeError(InstarError):
    """resize refused or failed, in qemu-img's words. ``warning`` is a warning
    qemu-img prints after the error ("Shrinking an image will delete...").
    ``errno`` is what qemu's truncate returns with the words, where qemu has
    one: commit's job, which grows a base, reports only that."""

    warning: str | None = None
    errno: int = 0

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        if errno:
            self.errno = errno


class UpdateError(ResizeError):
    """A change to an image in place failed (the system's reason)."""


class StoppedUpdate(ResizeError):
    """An update stopped on purpose after `instar.mutate.stop_after` changes
    (the tests' crash hook)."""


class RebaseError(InstarError):
    """rebase refused or failed, in qemu-img's words."""


class ImageCommitError(InstarError):
    """commit (of an overlay into its backing file) refused or failed, in qemu-img's words."""


class OptionError(UsageError):
    """A creation option the format does not take, or -c where it cannot compress.

    qemu reports these before creating anything, unprefixed by the file name.
    """


class CreationError(OutputError):
    """The output format refused to create the image (a bad option value, a size
    it cannot hold); callers add qemu's "error while creating/converting" prefix."""


class TooLargeError(CreationError):
    """The format cannot hold the image's size and says so in its own words (qemu's
    driver fails with EFBIG): convert shows the words, qemu-img create replaces
    them, as it replaces every EFBIG failure, with "The image size is too large
    for file format 'FMT'"."""


class CommitError(CreationError):
    """The finished output could not take its name. The sandbox host commits
    after the worker's job has returned, outside the job's own wording of
    creation errors, so the command adds its prefix around the whole job."""


class WriteError(OutputError):
    """The file system failed a write of the output (ENOSPC, EFBIG, EIO...).

    Worded as qemu-img convert words it, "error while writing at byte OFFSET:
    REASON"; ``offset`` (where in the image) and ``reason`` (the strerror) let
    a command word it its own way (dd: "error while writing to output image
    file: REASON"), passed as ``message``.
    """

    def __init__(self, offset: int, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"error while writing at byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class ReadError(InstarError):
    """The file system failed a read of an input (EIO from a failing disk).

    qemu-img convert's "error while reading at byte OFFSET: REASON", or, for
    the map of what is allocated, "error while reading block status at offset
    OFFSET: REASON"; ``message`` rewords it (dd's "error while reading from
    input image file: REASON").
    """

    def __init__(self, offset: int, reason: str, block_status: bool = False,
                 message: str | None = None) -> None:
        if message is None:
            message = (f"error while reading block status at offset {offset}: {reason}"
                       if block_status else f"error while reading at byte {offset}: {reason}")
        super().__init__(message)
        self.offset = offset
        self.reason = reason


class WorkerLimitError(InstarError):
    """The sandboxed worker hit one of its limits (memory, CPU, wall clock) or died."""


class ChecksNotSupportedError(InstarError):
    """The format has no structural check (raw, vpc): qemu-img check's exit status 63."""

    def __init__(self, message: str = "This image format does not support checks") -> None:
        super().__init__(message)


class SnapshotError(InstarError):
    """snapshot -c/-a/-d refused or failed in qemu's words; the command puts
    qemu-img's "Could not create snapshot 'NAME': " before it. ``before`` is a
    line qemu prints ahead of that one (a refusal from the step that failed)."""

    before: str | None = None

    def __init__(self, message: str, number: int = 0) -> None:
        super().__init__(message)
        self.errno = number


class AmendError(FormatError):
    """amend refused in qemu's words; ``hint`` is qemu's advice line."""
