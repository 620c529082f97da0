"""cloop: the compressed loopback images of Knoppix (``create_compressed_fs``).

Read only, as in qemu: a V2.0 header (a shell script), a table of block
offsets, then zlib-compressed blocks of one size. The reader is imported only
when used, so probing stays cheap.
"""

from __future__ import annotations

from instar.formats.base import ReadOnlyFormat

# The whole script qemu compares (its probe takes a shorter file's first bytes).
MAGIC = (
    b"#!/bin/sh\n#V2.0 Format\n"
    b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


class CloopFormat(ReadOnlyFormat):
    name = "cloop"
    reader = "instar.formats.cloop.reader:open_cloop"

    def probe(self, header: bytes, filename: str) -> int:
        """qemu's score 2 (above raw's 1) when the file begins with the script;
        qemu probes a 2048-byte buffer, so a shorter file matches when it is
        a prefix followed by zeros (what qemu reads past the end)."""
        return 2 if header.ljust(len(MAGIC), b"\0")[: len(MAGIC)] == MAGIC else 0


FORMAT = CloopFormat()
