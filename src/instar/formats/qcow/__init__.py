"""qcow, version 1: qemu's first copy-on-write format (reading and writing).

`layout` holds the header and qemu's checks, `reader` maps guest offsets
through the L1 and L2 tables (the shared `ClusterTableDriver`), `writer`
creates images sequentially, compressed clusters included (``-c``).
docs/formats/qcow.md says what is read, written and refused.
"""

from __future__ import annotations

from instar.formats.base import FormatBase, FormatDetails, OptionSchema
from instar.formats.options import refused
from instar.formats.preallocation import FILE_OPTION
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.image import Driver

# Here, not in layout, so that probing does not import the layout module.
MAGIC = b"QFI\xfb"
VERSION = 1


class QcowFormat(FormatBase):
    name = "qcow"
    reader = "instar.formats.qcow.reader:open_qcow"
    writer = "instar.formats.qcow.writer:create_writer"
    measurer = "instar.formats.qcow.writer:measure"
    updater = "instar.formats.qcow.guest_writes:GuestWriter"
    create_options = OptionSchema(
        "qcow",
        (
            FILE_OPTION,
            # qemu-img's other qcow options, with qemu's types.
            refused("backing_file", "str"),
            refused("backing_fmt", "str"),
            refused("encrypt.format", "str"),
            refused("encrypt.key-secret", "str"),
            refused("encryption", "bool"),
            refused("size", "size"),
        ),
        compress=True,
        backing=True,
    )

    def probe(self, header: bytes, filename: str) -> int:
        """qcow's magic with version 1 (qcow2 takes the other versions), as qemu."""
        version = int.from_bytes(header[4:8].ljust(4, b"\0"), "big")
        return 100 if header[:4] == MAGIC and version == VERSION else 0

    def describe(self, driver: Driver) -> FormatDetails:
        """``qcow_get_info``: the cluster size; encryption; the backing file
        (qcow stores no backing format)."""
        from instar.formats.qcow.reader import QcowDriver

        assert isinstance(driver, QcowDriver)
        return FormatDetails(
            cluster_size=driver.header.cluster_size,
            encrypted=driver.encrypted,
            backing_filename=driver.backing_name,
        )


FORMAT = QcowFormat()
