"""One exception hierarchy for instar.

The CLI turns every `InstarError` into a one-line message (after the program
prefix) and exit status 1; anything else escaping is a bug in instar, not bad
input. Messages follow qemu-img's wording where a user may script against it.
"""

from __future__ import annotations


class InstarError(Exception):
    """Base class: an error the user can act on, printed as one line.

    ``hint`` is printed after it without the program prefix, as qemu-img
    follows some messages with advice ("Try 'instar --help' ...").
    """

    hint: str | None = None


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


class FormatError(InstarError):
    """Image bytes violate the format or one of instar's safety limits."""


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
