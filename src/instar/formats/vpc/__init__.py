"""VHD, which qemu calls "vpc": Virtual PC / Hyper-V virtual hard disks.

Reads fixed, dynamic and differencing disks; writes dynamic (qemu's default)
and fixed ones. The modules: `layout` (structures, checksums, CHS geometry),
`reader`, `writer`. Reader and writer are imported only when used, so probing
stays cheap.
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

# Here, not in layout, so that probing does not import the whole layout module.
FOOTER_COOKIE = b"conectix"

if TYPE_CHECKING:
    from instar.formats.base import StatusRun


class VpcFormat:
    name = "vpc"
    create_options = OptionSchema(
        "vpc",
        (
            Option("force_size", "bool", False, "keep the exact size, not the CHS-rounded one"),
            Option("subformat", "str", "dynamic", "dynamic (default) or fixed"),
        ),
    )

    def probe(self, header: bytes, filename: str) -> int:
        """qemu looks at offset 0 only, so a fixed VHD (footer at the end) probes as raw."""
        return 100 if header[: len(FOOTER_COOKIE)] == FOOTER_COOKIE else 0

    def open(self, file: InputFile, resolver: Resolver) -> Image:
        from instar.formats.vpc.reader import open_vpc

        return open_vpc(file, resolver)

    def describe(self, image: Image) -> FormatDetails:
        """What ``qemu-img info`` shows (`instar.formats.vpc.info`)."""
        from instar.formats.vpc.info import describe

        return describe(image)

    def block_status(self, image: Image) -> Iterator[StatusRun]:
        """qemu's block status of ``image`` (`instar.formats.vpc.info`)."""
        from instar.formats.vpc.info import block_status

        return block_status(image)

    def backing_image(self, image: Image) -> Image | None:
        return None  # qemu reads a differencing disk without its parent

    def declared_size(self, length: int, options: ParsedOptions | None = None) -> int:
        from instar.formats.vpc.layout import declared_size

        options = options or self.create_options.defaults()
        return declared_size(length, options.flag("force_size"))

    def create(self, out: OutputFile, virtual_size: int, options: ParsedOptions) -> Writer:
        from instar.formats.vpc.writer import create_writer

        return create_writer(out, virtual_size, options)


FORMAT = VpcFormat()
