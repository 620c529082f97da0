"""file: qemu's file protocol driver named as a format (``-f file``, ``-O file``).

qemu-img accepts any driver's name where a format goes; ``file`` then reads
and writes the image file's bytes as they are, exactly as raw does over the
file, under its own name: ``info`` says "file format: file", and its
creation options are the file's own (``size``, ``preallocation``, ``nocow``,
``extent_size_hint``). qemu never probes it, and has no size measurement for
it. instar serves it with raw's driver and writer.
"""

from __future__ import annotations

from instar.formats.base import OptionSchema
from instar.formats.options import refused
from instar.formats.preallocation import FILE_OWN_OPTION
from instar.formats.raw import RawFormat


class FileFormat(RawFormat):
    name = "file"
    create_options = OptionSchema(
        "file",
        (
            refused("extent_size_hint", "size"),
            refused("nocow", "bool"),
            FILE_OWN_OPTION,
            refused("size", "size"),
        ),
    )
    measurer = None  # qemu: "Block driver 'file' does not support size measurement"

    def probe(self, header: bytes, filename: str) -> int:
        return 0  # named only, never detected


FORMAT = FileFormat()
