"""VHD, which qemu calls "vpc": Virtual PC / Hyper-V virtual hard disks.

Reads fixed, dynamic and differencing disks; writes dynamic (qemu's default)
and fixed ones. The modules: `layout` (structures, checksums, CHS geometry),
`reader`, `writer`. Reader and writer are imported only when used, so probing
stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from instar.files import InputFile
from instar.formats.base import (
    CreateOptions,
    FormatDetails,
    OptionSpec,
    OutputFile,
    Resolver,
    Writer,
)

# Here, not in layout, so that probing does not import the whole layout module.
FOOTER_COOKIE = b"conectix"

if TYPE_CHECKING:
    from instar.image import Driver


class VpcFormat:
    name = "vpc"
    create_options = (
        OptionSpec("force_size", "bool (on/off)", "keep the exact size, not the CHS-rounded one"),
        OptionSpec("subformat", "str", "dynamic (default) or fixed"),
    )

    def probe(self, header: bytes, filename: str) -> int:
        """qemu looks at offset 0 only, so a fixed VHD (footer at the end) probes as raw."""
        return 100 if header[: len(FOOTER_COOKIE)] == FOOTER_COOKIE else 0

    def open(self, file: InputFile, resolver: Resolver) -> Driver:
        from instar.formats.vpc.reader import open_vpc

        return open_vpc(file, resolver)

    def describe(self, driver: Driver) -> FormatDetails:
        """``vpc_get_info``: the block size as cluster size, except for a fixed disk."""
        from instar.formats.vpc.reader import DynamicVpcDriver

        if isinstance(driver, DynamicVpcDriver):
            return FormatDetails(cluster_size=driver.block_size)
        return FormatDetails()

    def declared_size(self, length: int, options: CreateOptions | None = None) -> int:
        force = options is not None and options.options.get("force_size") == "on"
        from instar.formats.vpc.layout import declared_size

        return declared_size(length, force)

    def create(self, out: OutputFile, virtual_size: int, options: CreateOptions) -> Writer:
        from instar.formats.vpc.writer import create_writer

        return create_writer(out, virtual_size, options)


FORMAT = VpcFormat()
