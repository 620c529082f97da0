"""VHDX (Hyper-V virtual hard disk v2): reading and writing.

``layout`` holds the on-disk structures, ``writer`` creates dynamic and fixed
images the way ``qemu-img create -f vhdx`` lays them out, ``reader`` opens
dynamic, fixed and differencing images (``log`` replays a pending metadata
log in memory, never touching the file).
"""

from __future__ import annotations

from instar.formats.base import FormatBase, FormatDetails, OptionSchema
from instar.formats.options import Option
from instar.formats.preallocation import FILE_OPTION
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.image import Driver

# Here, not in layout, so that probing does not import the whole layout module.
FILE_SIGNATURE = b"vhdxfile"


class VhdxFormat(FormatBase):
    name = "vhdx"
    reader = "instar.formats.vhdx.reader:open_vhdx"
    checker = "instar.formats.vhdx.check:check"
    writer = "instar.formats.vhdx.writer:create"
    measurer = "instar.formats.vhdx.writer:measure"
    updater = "instar.formats.vhdx.guest_writes:GuestWriter"
    create_options = OptionSchema(
        "vhdx",
        (
            Option("block_size", "size", 0, "block size, 1M to 256M; 0 chooses by image size"),
            Option("block_state_zero", "bool", True, "mark zero blocks ZERO (default on)"),
            Option("log_size", "size", 1 << 20, "log size, at least 1M (1M)"),
            Option("subformat", "str", "dynamic", "dynamic (default) or fixed"),
            FILE_OPTION,
        ),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if header.startswith(FILE_SIGNATURE) else 0

    def describe(self, driver: Driver) -> FormatDetails:
        """``vhdx_get_info``: the block size as cluster size (fixed images
        included), no format-specific data, the dirty flag left false."""
        from instar.formats.vhdx.reader import VhdxDriver

        assert isinstance(driver, VhdxDriver)
        return FormatDetails(cluster_size=driver.block_size)


FORMAT = VhdxFormat()
