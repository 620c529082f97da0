"""dmg: Apple's UDIF disk images (``hdiutil``).

Read only, as in qemu: the koly trailer at the end names the chunk table
(mish blocks, in the resource fork or base64 in the XML property list);
chunks are raw, zeros, zlib or bzip2. Probed by the file name, as qemu does:
a dmg has no magic at its start. `layout` holds the structures, `reader`
the mapping; both are imported only when used.
"""

from __future__ import annotations

from instar.formats.base import ReadOnlyFormat


class DmgFormat(ReadOnlyFormat):
    name = "dmg"
    reader = "instar.formats.dmg.reader:open_dmg"

    def probe(self, header: bytes, filename: str) -> int:
        """qemu's score 2 (above raw's 1) for a name ending in ``.dmg`` (and
        longer than that), whatever the file holds."""
        return 2 if len(filename) > 4 and filename.endswith(".dmg") else 0


FORMAT = DmgFormat()
