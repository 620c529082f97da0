"""Limits on what an untrusted image may make instar do, and the path allowlist.

Every number read from an image is checked against these before it sizes an
allocation or a loop. The allowlist decides which files an image may name
(backing files, data files, extents, parents): by default none at all; the
directories given with ``--allow`` or INSTAR_ALLOW.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from instar.errors import PolicyError

# Directories as the API takes them: a list, tuple, set or any other iterable.
AllowedDirs = Iterable[str | os.PathLike[str]]

MAX_CHAIN_DEPTH = 16  # backing files below the top image
MAX_TABLE_BYTES = 32 << 20  # one metadata table (qcow2 L1, refcount table, BAT...)
MAX_METADATA_CACHE_BYTES = 64 << 20  # decoded tables kept in memory at once
MAX_HEADER_EXTENSION_BYTES = 64 << 10  # all qcow2 header extensions together
MAX_NAME_BYTES = 4096  # a file name stored inside an image
# The map of which host units of a file an image's mapping claims (aliasing
# check): one bit per unit up to this size, coarser beyond. Anonymous memory,
# so only the pages that hold a claim are ever resident.
MAX_CLAIM_MAP_BYTES = 32 << 20


def allowed_dirs(allow: AllowedDirs) -> list[str]:
    """``allow`` as a list of directory names; TypeError for a bare string.

    A string is an iterable of one-character strings: ``allow="/data"`` would
    allow "/", the whole file system, so it is refused rather than iterated.
    """
    if isinstance(allow, str | bytes | bytearray | os.PathLike):
        raise TypeError(
            f"allow must be an iterable of directories, not {type(allow).__name__}: "
            f"write allow=[{allow!r}]"
        )
    dirs = []
    for entry in allow:
        name = os.fspath(entry)
        if not isinstance(name, str):
            raise TypeError(f"allow entries must be str or os.PathLike[str], not {name!r}")
        dirs.append(name)
    return dirs


class PathPolicy:
    """Which directories files named inside images may come from.

    Paths are compared after resolving symbolic links, so a link inside an
    allowed directory cannot point outside it.
    """

    def __init__(self, allowed: AllowedDirs) -> None:
        resolved = (os.path.realpath(d) for d in allowed_dirs(allowed))
        self.allowed_dirs = list(dict.fromkeys(resolved))  # each once, in order

    @classmethod
    def from_allow(cls, allow: AllowedDirs = ()) -> PathPolicy:
        """The policy of a command: the directories in ``allow`` (``--allow``)
        and in INSTAR_ALLOW (colon-separated), and nothing else. An image opens
        no other file by default, not even one beside it: an upload directory
        holds other people's files (the CVE-2022-47951 pattern).

        Every entry point (dd, convert, info, compare, open_image) starts here,
        so each refuses ``allow="/dir"`` before it opens anything.
        """
        from_env = [d for d in os.environ.get("INSTAR_ALLOW", "").split(":") if d]
        return cls([*allowed_dirs(allow), *from_env])

    def check(self, path: str, what: str) -> str:
        """The resolved ``path`` if allowed, else PolicyError naming it (and
        never saying whether it exists)."""
        resolved = os.path.realpath(path)
        for directory in self.allowed_dirs:
            if resolved == directory or resolved.startswith(directory.rstrip(os.sep) + os.sep):
                return resolved
        raise PolicyError(
            f"{what} '{path}' is outside the allowed directories "
            f"({', '.join(self.allowed_dirs) or 'none'}); use --allow DIR to permit it"
        )
