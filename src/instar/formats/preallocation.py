"""``preallocation``: qemu's modes, their messages, and the host space behind them.

Two option owners, as in qemu 7.2. qcow2 has its own option (``off``,
``metadata``, ``falloc``, ``full``; a bad value is QAPI's "does not accept
value"). Every other written format takes the file protocol's (``off``,
``falloc``, ``full``; a bad value is "invalid parameter value", ``metadata``
"Unsupported preallocation mode"): raw and file preallocate the file, and
the formats whose driver rewrites the file it created (vmdk, vpc, vhdx, vdi,
parallels, qed, qcow) end with the same image as ``off``, as qemu's do.

Writers call `file_mode` or `qcow2_mode` before writing anything, and
`reserve` for the host ranges the mode fills: one place for what a mode does
to the file (qcow2's data clusters and raw's whole file alike).
"""

from __future__ import annotations

import errno
import os

from instar.errors import CreationError
from instar.formats.options import Option, ParsedOptions

FILE_MODES = ("off", "falloc", "full")
QCOW2_MODES = ("off", "metadata", "falloc", "full")


def _help(modes: tuple[str, ...]) -> str:
    return f"Preallocation mode (allowed values: {', '.join(modes)})"


# The file protocol's option, as a format taking it lists it (with a file name).
FILE_OPTION = Option("preallocation", "str", "off", _help(FILE_MODES), protocol=True)
# The file driver's own (``-f file``), listed without a file name too.
FILE_OWN_OPTION = Option("preallocation", "str", "off", _help(FILE_MODES))
QCOW2_OPTION = Option("preallocation", "str", "off", _help(QCOW2_MODES))


def _given(options: ParsedOptions) -> str:
    option = options.schema.find("preallocation")
    if option is None or not option.supported:
        return "off"
    return options.text("preallocation")


def file_mode(options: ParsedOptions) -> str:
    """The file protocol's mode, with qemu's messages for one it refuses."""
    mode = _given(options)
    if mode == "metadata":
        raise CreationError("Unsupported preallocation mode: metadata")
    if mode not in FILE_MODES:
        raise CreationError(f"invalid parameter value: {mode}")
    return mode


def qcow2_mode(options: ParsedOptions) -> str:
    """qcow2's own mode, with qemu's QAPI message for a value it does not know."""
    mode = _given(options)
    if mode not in QCOW2_MODES:
        raise CreationError(f"Parameter 'preallocation' does not accept value '{mode}'")
    return mode


def given_mode(options: ParsedOptions) -> str | None:
    """The text ``-o preallocation`` set, unchecked (convert's test against
    ``-c`` compares it with "off" as qemu-img does), or None."""
    return options.texts.get("preallocation") if "preallocation" in options.given else None


def reserve(fd: int, offset: int, length: int, mode: str) -> None:
    """Give ``[offset, offset + length)`` of a new file the host space ``mode``
    asks for: ``falloc`` reserves it (reads as holes), ``full`` writes zeros,
    ``metadata`` and ``off`` leave it to the file's final length."""
    if length <= 0 or mode in ("off", "metadata"):
        return
    from instar.files import write_zeros

    try:
        if mode == "falloc":
            os.posix_fallocate(fd, offset, length)
        else:
            write_zeros(fd, offset, length)
    except OSError as error:
        reason = error.strerror or os.strerror(error.errno or errno.EIO)
        what = "preallocate new data" if mode == "falloc" else "write zeros for preallocation"
        raise CreationError(f"Could not {what}: {reason}") from None
