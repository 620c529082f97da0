"""Parallels expandable images (Parallels Desktop, Virtuozzo, qemu): reading and writing.

Reads version 1 (``WithoutFreeSpace``) and version 2 (``WithouFreSpacExt``)
images and checks their format extension (dirty bitmaps); writes version 2
images as ``qemu-img create -f parallels`` lays them out. The modules:
`layout` (the header), `extension` (the format extension), `reader`,
`writer`; imported only when used, so probing stays cheap.
"""

from __future__ import annotations

from instar.formats.base import FormatBase, FormatDetails, OptionSchema
from instar.formats.options import Option
from instar.formats.preallocation import FILE_OPTION
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.image import Driver

# Here, not in layout, so that probing does not import the layout module.
MAGIC_V1 = b"WithoutFreeSpace"
MAGIC_V2 = b"WithouFreSpacExt"
VERSION = 2
_PROBED_BYTES = 64  # qemu probes only a buffer that holds the whole header
_VERSION_FIELD = VERSION.to_bytes(4, "little")


class ParallelsFormat(FormatBase):
    name = "parallels"
    reader = "instar.formats.parallels.reader:open_parallels"
    checker = "instar.formats.parallels.check:check"
    writer = "instar.formats.parallels.writer:create_writer"
    measurer = "instar.formats.parallels.writer:measure"
    create_options = OptionSchema(
        "parallels",
        (
            Option("cluster_size", "size", 1 << 20,
                   "cluster size, rounded up to 512 bytes (1M)"),
            Option("size", "size", 0, "ignored: the size is the input's, as in qemu-img"),
            FILE_OPTION,
        ),
    )

    def probe(self, header: bytes, filename: str) -> int:
        """qemu's score: either magic and version 2. qemu probes a zero-padded
        2 KiB buffer, so a file shorter than the header still probes."""
        padded = header[:_PROBED_BYTES].ljust(_PROBED_BYTES, b"\0")
        if padded[:16] in (MAGIC_V1, MAGIC_V2) and padded[16:20] == _VERSION_FIELD:
            return 100
        return 0

    def describe(self, driver: Driver) -> FormatDetails:
        """qemu's parallels driver has no get_info: no cluster size, no dirty
        flag (the "inuse" mark) and no format-specific data in ``info``; the
        dirty bitmaps of the format extension are not shown by qemu-img 7.2."""
        return FormatDetails(dirty=None)


FORMAT = ParallelsFormat()
