"""VDI (VirtualBox Disk Image): reading and writing dynamic and static images.

The modules: `layout` (the header, qemu 7.2's checks and messages, the block
map's special entries), `reader` (one mapping Driver over the block map),
`writer` (images as ``qemu-img create -f vdi`` lays them out). Reader and
writer are imported only when used, so probing stays cheap.
"""

from __future__ import annotations

from instar.formats.base import FormatBase, FormatDetails, OptionSchema
from instar.formats.options import Option
from instar.formats.preallocation import FILE_OPTION
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.image import Driver

# Here, not in layout, so that probing does not import the layout module.
SIGNATURE_AT = 64
SIGNATURE = b"\x7f\x10\xda\xbe"  # 0xbeda107f, little-endian
HEADER_SIZE = 512  # what qemu reads of the header; qemu's probe wants that much


class VdiFormat(FormatBase):
    name = "vdi"
    reader = "instar.formats.vdi.reader:open_vdi"
    checker = "instar.formats.vdi.check:check"
    writer = "instar.formats.vdi.writer:create_writer"
    measurer = "instar.formats.vdi.writer:measure"
    updater = "instar.formats.vdi.guest_writes:GuestWriter"
    create_options = OptionSchema(
        "vdi",
        (Option("static", "bool", False, "static (pre-allocated) image: every block mapped"),
         FILE_OPTION),
    )

    def probe(self, header: bytes, filename: str) -> int:
        """qemu's vdi_probe: the signature at offset 64. qemu pads the probe
        buffer of a short file with zeros, so a file too short to hold the
        whole header still probes as vdi (and then fails to open)."""
        return 100 if header[SIGNATURE_AT : SIGNATURE_AT + 4] == SIGNATURE else 0

    def describe(self, driver: Driver) -> FormatDetails:
        """``vdi_get_info``: the block size as cluster size, nothing format-specific."""
        from instar.formats.vdi.reader import VdiDriver

        assert isinstance(driver, VdiDriver)
        return FormatDetails(cluster_size=driver.block_size)


FORMAT = VdiFormat()
