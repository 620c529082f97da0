"""bochs: the "growing" redolog disks of the Bochs emulator (``bximage``).

Read only, as in qemu: a 512-byte header, a catalog of extents, then each
allocated extent as a sector bitmap followed by its sectors. The reader is
imported only when used, so probing stays cheap.
"""

from __future__ import annotations

from instar.formats.base import ReadOnlyFormat

HEADER_SIZE = 512
MAGIC = b"Bochs Virtual HD Image"
REDOLOG = b"Redolog"
GROWING = b"Growing"
VERSION_1, VERSION_2 = 0x00010000, 0x00020000


def is_bochs_header(header: bytes) -> bool:
    """qemu's test (its probe's and its open's): the three NUL-terminated names
    at 0, 32 and 48, and version 1 or 2 at 64 (little-endian); bytes past the
    end of a short file count as zeros, as qemu reads them."""
    data = header.ljust(HEADER_SIZE, b"\0")
    return (
        data[: len(MAGIC) + 1] == MAGIC + b"\0"
        and data[32 : 32 + len(REDOLOG) + 1] == REDOLOG + b"\0"
        and data[48 : 48 + len(GROWING) + 1] == GROWING + b"\0"
        and int.from_bytes(data[64:68], "little") in (VERSION_1, VERSION_2)
    )


class BochsFormat(ReadOnlyFormat):
    name = "bochs"
    reader = "instar.formats.bochs.reader:open_bochs"

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if is_bochs_header(header) else 0


FORMAT = BochsFormat()
