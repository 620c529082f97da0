"""Reading VMDK (not written yet)."""

from __future__ import annotations

from instar.errors import UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.image import Image


def open_vmdk(file: InputFile, resolver: Resolver) -> Image:
    raise UnsupportedError(f"'{file.name}' is a vmdk image, which instar cannot read yet")
