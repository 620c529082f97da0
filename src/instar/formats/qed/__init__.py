"""QED, the QEMU Enhanced Disk format: reading and writing.

`layout` holds the header and qemu's rules for it, `reader` maps guest
offsets through the L1 and L2 tables (the shared `ClusterTableDriver`),
`writer` creates images sequentially, `check` counts what ``qemu-img check``
counts. docs/formats/qed.md says what is read, written and refused.
"""

from __future__ import annotations

from instar.formats.base import FormatBase, FormatDetails, OptionSchema
from instar.formats.options import Option, refused
from instar.formats.preallocation import FILE_OPTION
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.image import Driver

# Here, not in layout, so that probing does not import the layout module.
MAGIC = b"QED\0"


class QedFormat(FormatBase):
    name = "qed"
    reader = "instar.formats.qed.reader:open_qed"
    writer = "instar.formats.qed.writer:create_writer"
    checker = "instar.formats.qed.check:check"
    measurer = "instar.formats.qed.writer:measure"
    updater = "instar.formats.qed.guest_writes:GuestWriter"
    create_options = OptionSchema(
        "qed",
        (
            Option("cluster_size", "size", 64 << 10,
                   "cluster size, a power of two from 4k to 64M (64k)"),
            Option("table_size", "size", 4, "clusters per L1 or L2 table: 1, 2, 4, 8 or 16 (4)"),
            FILE_OPTION,
            # qemu-img's other qed options, with qemu's types.
            refused("backing_file", "str"),
            refused("backing_fmt", "str"),
            refused("size", "size"),
        ),
        backing=True,
    )

    def probe(self, header: bytes, filename: str) -> int:
        """The magic alone (qemu reads a whole probe buffer, zeros past the end)."""
        return 100 if header[: len(MAGIC)] == MAGIC else 0

    def describe(self, driver: Driver) -> FormatDetails:
        """``bdrv_qed_get_info``: the cluster size; qemu reports no dirty flag
        (the need-check feature is not one) and no format-specific data."""
        from instar.formats.qed.reader import QedDriver

        assert isinstance(driver, QedDriver)
        name = driver.backing_name
        return FormatDetails(
            cluster_size=driver.header.cluster_size,
            backing_filename=name,
            backing_format=driver.backing_format if name else None,
        )


FORMAT = QedFormat()
