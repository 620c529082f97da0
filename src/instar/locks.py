"""qemu's image locks: whether a running qemu forbids reading an image now.

qemu holds OFD byte locks on every image file it has open: a read lock on
byte 100 + n for each permission n it holds, and on byte 200 + n for each it
does not share with others (block/file-posix.c). qemu-img refuses to open an
image that a running VM writes (it holds "write") unless ``-U`` says to share,
and so does instar: reading an image while a guest writes it gives neither
the old nor the new disk.
"""

from __future__ import annotations

import fcntl
import struct

PERM_BASE, SHARED_BASE = 100, 200
_F_OFD_GETLK = 36
_F_WRLCK, _F_UNLCK = 1, 2
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid
# (byte, message): what reading without -U needs nobody else to hold.
_READ_CONFLICTS = (
    (PERM_BASE + 1, 'Failed to get shared "write" lock'),  # someone may write it
    (SHARED_BASE + 0, 'Failed to get "consistent read" lock'),  # someone forbids reading
)


def _held(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    query = _FLOCK.pack(_F_WRLCK, 0, byte, 1, 0)
    try:
        answer = fcntl.fcntl(fd, _F_OFD_GETLK, query)
    except OSError:
        return False  # no OFD locks here (an old kernel, some file systems): qemu's too
    return bool(_FLOCK.unpack(answer)[0] != _F_UNLCK)


def read_conflict(fd: int) -> str | None:
    """qemu's message if a lock forbids reading the file open as ``fd``, else None."""
    for byte, message in _READ_CONFLICTS:
        if _held(fd, byte):
            return message
    return None


def write_conflict(fd: int) -> str | None:
    """qemu's message if a lock forbids changing the file open as ``fd``
    (resize): anyone else holding a permission on it, or not sharing writes or
    resizes with others, is a running qemu that would see the change happen."""
    if any(_held(fd, PERM_BASE + n) for n in range(5)) or \
            _held(fd, SHARED_BASE + 1) or _held(fd, SHARED_BASE + 3):
        return 'Failed to get "write" lock'
    return read_conflict(fd)
