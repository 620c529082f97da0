"""Reading VHD images (not yet: the writer comes first)."""

from __future__ import annotations

from instar.errors import UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.image import Image


def open_vpc(file: InputFile, resolver: Resolver) -> Image:
    raise UnsupportedError(f"instar cannot read vpc images yet: {file.name}")
