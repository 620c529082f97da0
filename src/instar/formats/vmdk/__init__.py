"""VMDK: VMware's virtual disk format, as qemu reads and writes it.

Reads monolithicSparse (header versions 1-3), streamOptimized, monolithicFlat,
twoGbMaxExtentSparse/Flat and parent chains; writes monolithicSparse (qemu-img
create's default layout) and streamOptimized. See docs/formats/vmdk.md.
"""

from __future__ import annotations

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
from instar.sizes import round_up

# Here, not in layout, so that probing does not import the whole layout module.
SECTOR = 512
MAGIC = b"KDMV"  # hosted sparse extent ("VMDK4")
COWD_MAGIC = b"COWD"  # ESX VMFS sparse ("VMDK3"), refused

if TYPE_CHECKING:
    from instar.image import Driver


class VmdkFormat:
    name = "vmdk"
    create_options = OptionSchema(
        "vmdk",
        (
            Option("adapter_type", "str", "ide", "ide (default), lsilogic, buslogic or legacyESX"),
            Option("compat6", "bool", False, "virtual hardware version 6"),
            # "undefined" is qemu's default: version 4, or 6 with compat6.
            Option("hwversion", "str", "undefined", "virtual hardware version (4)"),
            Option("subformat", "str", "monolithicSparse",
                   "monolithicSparse (default) or streamOptimized"),
            Option("toolsversion", "str", "2147483647",
                   "the VMware tools version in the descriptor"),
            Option("zeroed_grain", "bool", False, "mark zero grains instead of leaving holes"),
        ),
        compress=True,  # streamOptimized only: the writer checks the subformat
    )

    def probe(self, header: bytes, filename: str) -> int:
        """qemu's vmdk_probe: a sparse magic, or a text descriptor's ``version=`` line."""
        if len(header) < 4:
            return 0
        if header.startswith((MAGIC, COWD_MAGIC)):
            return 100
        if header[:1] not in (b"#", b" ", b"v"):
            return 0  # a descriptor starts with a comment, a blank line or version=
        from instar.formats.vmdk.layout import looks_like_descriptor

        return 100 if looks_like_descriptor(header) else 0

    def open(self, file: InputFile, resolver: Resolver) -> Driver:
        from instar.formats.vmdk.reader import open_vmdk

        return open_vmdk(file, resolver)

    def describe(self, driver: Driver) -> FormatDetails:
        """What ``qemu-img info`` shows (`instar.formats.vmdk.info`)."""
        from instar.formats.vmdk.info import describe
        from instar.formats.vmdk.reader import VmdkDriver

        assert isinstance(driver, VmdkDriver)
        return describe(driver)

    def declared_size(self, length: int, options: ParsedOptions | None = None) -> int:
        return round_up(length, SECTOR)

    def create(self, out: OutputFile, virtual_size: int, options: ParsedOptions) -> Writer:
        from instar.formats.vmdk.writer import create_writer

        return create_writer(out, virtual_size, options)


FORMAT = VmdkFormat()
