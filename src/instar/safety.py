"""Limits on what an untrusted image may make instar do, and the path allowlist.

Every number read from an image is checked against these before it sizes an
allocation or a loop. The allowlist decides which files an image may name
(backing files, data files, extents): by default only those inside the
directory of the image the user named.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from instar.errors import PolicyError

MAX_CHAIN_DEPTH = 16  # backing files below the top image
MAX_TABLE_BYTES = 32 << 20  # one metadata table (qcow2 L1, refcount table, BAT...)
MAX_METADATA_CACHE_BYTES = 64 << 20  # decoded tables kept in memory at once
MAX_HEADER_EXTENSION_BYTES = 64 << 10  # all qcow2 header extensions together
MAX_NAME_BYTES = 4096  # a file name stored inside an image


class PathPolicy:
    """Which directories files named inside images may come from.

    Paths are compared after resolving symbolic links, so a link inside an
    allowed directory cannot point outside it.
    """

    def __init__(self, allowed_dirs: Iterable[str]) -> None:
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs]

    @classmethod
    def for_image(cls, image_path: str, extra: Iterable[str] = ()) -> PathPolicy:
        """The default policy: the directory of ``image_path``, plus ``extra``."""
        return cls([os.path.dirname(os.path.abspath(image_path)) or ".", *extra])

    def check(self, path: str, what: str) -> str:
        """The resolved ``path`` if allowed, else PolicyError naming it."""
        resolved = os.path.realpath(path)
        for directory in self.allowed_dirs:
            if resolved == directory or resolved.startswith(directory.rstrip(os.sep) + os.sep):
                return resolved
        raise PolicyError(
            f"{what} '{path}' is outside the allowed directories "
            f"({', '.join(self.allowed_dirs)}); use --allow DIR to permit it"
        )
