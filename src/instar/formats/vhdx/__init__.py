"""VHDX (Hyper-V virtual hard disk v2): reading and writing.

``layout`` holds the on-disk structures, ``writer`` creates dynamic and fixed
images the way ``qemu-img create -f vhdx`` lays them out, ``reader`` opens
dynamic, fixed and differencing images (``log`` replays a pending metadata
log in memory, never touching the file). ``info`` says what qemu's driver
shows to ``qemu-img info`` and ``compare``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from instar.files import InputFile
from instar.formats.base import (
    FormatDetails,
    OptionSchema,
    OutputFile,
    ParsedOptions,
    Resolver,
    Writer,
)
from instar.formats.options import Option
from instar.image import Image
from instar.sizes import round_up

if TYPE_CHECKING:
    from instar.formats.base import StatusRun
    from instar.formats.vhdx.reader import VhdxImage

# Here, not in layout, so that probing does not import the whole layout module.
FILE_SIGNATURE = b"vhdxfile"


class VhdxFormat:
    name = "vhdx"
    create_options = OptionSchema(
        "vhdx",
        (
            Option("block_size", "size", 0, "block size, 1M to 256M; 0 chooses by image size"),
            Option("block_state_zero", "bool", True, "mark zero blocks ZERO (default on)"),
            Option("log_size", "size", 1 << 20, "log size, at least 1M (1M)"),
            Option("subformat", "str", "dynamic", "dynamic (default) or fixed"),
        ),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if header.startswith(FILE_SIGNATURE) else 0

    def open(self, file: InputFile, resolver: Resolver) -> Image:
        from instar.formats.vhdx import reader

        return reader.open_vhdx(file, resolver)

    def describe(self, image: Image) -> FormatDetails:
        """What ``qemu-img info`` shows (`instar.formats.vhdx.info`)."""
        from instar.formats.vhdx.info import describe

        return describe(_vhdx_image(image))

    def block_status(self, image: Image) -> Iterator[StatusRun]:
        """qemu's block status of ``image`` (`instar.formats.vhdx.info`)."""
        from instar.formats.vhdx.info import block_status

        return block_status(_vhdx_image(image))

    def backing_image(self, image: Image) -> Image | None:
        """None: qemu's answer covers every byte (qemu 7.2 cannot open a
        differencing VHDX at all), so no parent is ever asked."""
        return None

    def declared_size(self, length: int, options: ParsedOptions | None = None) -> int:
        return round_up(length, 512)

    def create(self, out: OutputFile, virtual_size: int, options: ParsedOptions) -> Writer:
        from instar.formats.vhdx import writer

        return writer.create(out, virtual_size, options)


def _vhdx_image(image: Image) -> VhdxImage:
    """``image`` as the reader's class: the hooks take what ``open`` returned."""
    from instar.formats.vhdx.reader import VhdxImage

    if not isinstance(image, VhdxImage):
        raise TypeError(f"not an image the vhdx format opened: {type(image).__name__}")
    return image


FORMAT = VhdxFormat()
