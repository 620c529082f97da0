"""VHD, which qemu calls "vpc": Virtual PC / Hyper-V virtual hard disks.

Reads fixed, dynamic and differencing disks; writes dynamic (qemu's default)
and fixed ones. The modules: `layout` (structures, checksums, CHS geometry),
`reader`, `writer`. Reader and writer are imported only when used, so probing
stays cheap.
"""

from __future__ import annotations

from instar.formats.base import FormatBase, FormatDetails, OptionSchema, ParsedOptions
from instar.formats.options import Option
from instar.formats.preallocation import FILE_OPTION
from instar.runtime_types import TYPE_CHECKING

# Here, not in layout, so that probing does not import the whole layout module.
FOOTER_COOKIE = b"conectix"

if TYPE_CHECKING:
    from instar.image import Driver


class VpcFormat(FormatBase):
    name = "vpc"
    reader = "instar.formats.vpc.reader:open_vpc"
    writer = "instar.formats.vpc.writer:create_writer"
    measurer = "instar.formats.vpc.writer:measure"
    updater = "instar.formats.vpc.guest_writes:guest_writer"
    create_options = OptionSchema(
        "vpc",
        (
            Option("force_size", "bool", False, "keep the exact size, not the CHS-rounded one"),
            Option("subformat", "str", "dynamic", "dynamic (default) or fixed"),
            FILE_OPTION,
        ),
    )

    def probe(self, header: bytes, filename: str) -> int:
        """qemu looks at offset 0 only, so a fixed VHD (footer at the end) probes as raw."""
        return 100 if header[: len(FOOTER_COOKIE)] == FOOTER_COOKIE else 0

    def describe(self, driver: Driver) -> FormatDetails:
        """``vpc_get_info``: the block size as cluster size, except for a fixed disk."""
        from instar.formats.vpc.reader import DynamicVpcDriver

        if isinstance(driver, DynamicVpcDriver):
            return FormatDetails(cluster_size=driver.block_size)
        return FormatDetails()

    def declared_size(self, length: int, options: ParsedOptions | None = None) -> int:
        from instar.formats.vpc.layout import declared_size

        options = options or self.create_options.defaults()
        return declared_size(length, options.flag("force_size"))


FORMAT = VpcFormat()
