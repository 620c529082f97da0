"""VMDK: VMware's virtual disk format, as qemu reads and writes it.

Reads monolithicSparse (header versions 1-3), streamOptimized, monolithicFlat,
twoGbMaxExtentSparse/Flat and parent chains; writes monolithicSparse (qemu-img
create's default layout) and streamOptimized; writes guest data into every one
of those in place (commit's base: `guest_writes`). See docs/formats/vmdk.md.
"""

from __future__ import annotations

from instar.formats.base import FormatBase, OptionSchema
from instar.formats.options import Option
from instar.formats.preallocation import FILE_OPTION

# Here, not in layout, so that probing does not import the whole layout module.
SECTOR = 512
MAGIC = b"KDMV"  # hosted sparse extent ("VMDK4")
COWD_MAGIC = b"COWD"  # ESX VMFS sparse ("VMDK3"), refused


def looks_like_descriptor(header: bytes) -> bool:
    """qemu's text probe: comments and blank lines, then ``version=1|2|3``."""
    position, end = 0, len(header)
    while position < end:
        char = header[position : position + 1]
        if char == b"#":
            newline = header.find(b"\n", position)
            if newline < 0:
                return False
            position = newline + 1
            continue
        if char == b" ":
            while position < end and header[position : position + 1] == b" ":
                position += 1
            if header[position : position + 1] == b"\r":
                position += 1
            if position >= end or header[position : position + 1] != b"\n":
                return False
            position += 1
            continue
        rest = header[position:]
        return any(
            rest.startswith(f"version={v}{eol}".encode()) for v in "123" for eol in ("\n", "\r\n")
        )
    return False


class VmdkFormat(FormatBase):
    name = "vmdk"
    reader = "instar.formats.vmdk.reader:open_vmdk"
    writer = "instar.formats.vmdk.writer:create_writer"
    describer = "instar.formats.vmdk.info:describe"
    checker = "instar.formats.vmdk.check:check"
    measurer = "instar.formats.vmdk.writer:measure"
    updater = "instar.formats.vmdk.guest_writes:VmdkWriter"
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
            FILE_OPTION,
        ),
        compress=True,  # streamOptimized only: the writer checks the subformat
        backing=True,  # a vmdk parent only (create checks it and reads its CID)
    )
    checks_preallocation = True  # after the subformat, adapter and hwversion, as qemu

    def probe(self, header: bytes, filename: str) -> int:
        """qemu's vmdk_probe: a sparse magic, or a text descriptor's ``version=`` line."""
        if len(header) < 4:
            return 0
        if header.startswith((MAGIC, COWD_MAGIC)):
            return 100
        if header[:1] not in (b"#", b" ", b"v"):
            return 0  # a descriptor starts with a comment, a blank line or version=
        return 100 if looks_like_descriptor(header) else 0


FORMAT = VmdkFormat()
