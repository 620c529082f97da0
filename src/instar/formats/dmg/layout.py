"""UDIF (dmg) structures as qemu 7.2 finds and parses them.

A dmg ends with a 512-byte "koly" trailer naming the data fork, the resource
fork and the XML property list, and the disk's sector count. The chunk table
lives in "mish" blocks (BLKX resources): in the resource fork when it has a
length, else base64 in the plist's ``<data>`` elements. Each chunk maps a
run of guest sectors to a byte range of the data fork: raw, zeros, ignored
(zeros), zlib, bzip2, lzfse or ADC.

The plist is never parsed as XML: like qemu, instar looks only for
``<data>`` ... ``</data>`` pairs and decodes each as base64, so entities,
DTDs and the rest of the document are never interpreted (no entity
expansion, no external references), and the plist is at most 16 MiB (qemu's
bound). Every count read here is bounded before it sizes anything.
"""

from __future__ import annotations

import binascii
import re
import struct
from array import array
from collections.abc import Iterator

from instar.errors import DriverError, FormatError
from instar.files import InputFile
from instar.runtime_types import NamedTuple
from instar.safety import MAX_TABLE_BYTES

SECTOR = 512
KOLY = b"koly"
TRAILER_SIZE = 512
MAX_XML_BYTES = 16 << 20  # qemu's bound on the plist
MAX_LENGTH = 64 << 20  # qemu's DMG_LENGTHS_MAX: one chunk's bytes in the file
MAX_SECTOR_COUNT = MAX_LENGTH // SECTOR  # qemu's DMG_SECTORCOUNTS_MAX (not for zeros)
MAX_CHUNKS = 1 << 20  # instar's: chunk entries in all mish blocks together
MASK64 = (1 << 64) - 1

# Chunk types.
ZEROES, RAW, IGNORE = 0, 1, 2
ADC, ZLIB, BZIP2, LZFSE = 0x80000004, 0x80000005, 0x80000006, 0x80000007
COMMENT, LAST = 0x7FFFFFFE, 0xFFFFFFFF
# What instar reads (qemu too, bzip2 when built with its dmg-bz2 module).
KNOWN = frozenset((ZEROES, RAW, IGNORE, ZLIB, BZIP2))
TYPE_NAMES = {ZEROES: "zero", RAW: "raw", IGNORE: "ignore", ADC: "ADC", ZLIB: "zlib",
              BZIP2: "bzip2", LZFSE: "lzfse"}

MISH = b"mish"
MISH_HEADER = 204  # bytes before the first chunk entry
MISH_MIN = 244  # qemu skips a smaller block: a header and one entry
CHUNK = struct.Struct(">IIQQQQ")  # type, comment, sector, sectors, offset, length
INVALID = "Invalid argument"  # what qemu's dmg says when it fails without a message


class Trailer(NamedTuple):
    """The koly trailer's fields qemu uses; ``at`` is where it begins."""

    at: int
    data_fork: int
    rsrc_offset: int
    rsrc_length: int
    xml_offset: int
    xml_length: int
    sectors: int


class Chunks:
    """The chunk table, in the order qemu builds it (mish block by mish block),
    as parallel arrays; ``unreadable`` keeps the chunks of types qemu drops
    (lzfse without its module, ADC, unknown) as (sector, sectors, type), for
    the message a read of them gives."""

    def __init__(self) -> None:
        self.types = array("I")
        self.sectors = array("Q")
        self.counts = array("Q")
        self.offsets = array("Q")
        self.lengths = array("Q")
        self.unreadable: list[tuple[int, int, int]] = []

    def __len__(self) -> int:
        return len(self.types)


def find_trailer(file: InputFile) -> Trailer:
    """qemu's search: the last 1023 bytes of the file, its size rounded up to
    a sector (what lies past the end reads as zeros), the first "koly" in
    515 of them; then the fields, checked as qemu checks them."""
    length = -(-file.size // SECTOR) * SECTOR
    if length < SECTOR:
        raise FormatError("dmg file must be at least 512 bytes long")
    start = length - 511 - 512 if length > 511 + 512 else 0
    window = min(length, 515)
    found = file.pread(start, window).ljust(window, b"\0").find(KOLY)
    if found < 0:
        raise FormatError("Could not locate UDIF trailer in dmg file")
    at = start + found
    data = file.pread(at, TRAILER_SIZE).ljust(TRAILER_SIZE, b"\0")

    def u64(offset: int) -> int:
        value: int = struct.unpack_from(">Q", data, offset)[0]
        return value

    trailer = Trailer(at, u64(0x18), u64(0x28), u64(0x30), u64(0xD8), u64(0xE0), u64(0x1EC))
    if trailer.data_fork > at:
        raise DriverError(INVALID)
    if trailer.rsrc_offset >= at or trailer.rsrc_length > at - trailer.rsrc_offset:
        raise DriverError(INVALID)
    if trailer.xml_offset >= at or trailer.xml_length > at - trailer.xml_offset:
        raise DriverError(INVALID)
    if trailer.sectors >> 63:  # negative as qemu's signed count
        raise DriverError(INVALID)
    return trailer


def read_chunks(file: InputFile, trailer: Trailer) -> Chunks:
    """The chunk table from the resource fork if it has a length, else from
    the plist (qemu's choice); neither: qemu's EINVAL."""
    chunks = Chunks()
    if trailer.rsrc_length:
        for block in resource_blocks(file, trailer.rsrc_offset, trailer.rsrc_length):
            add_mish(chunks, block, trailer.data_fork)
    elif trailer.xml_length:
        if trailer.xml_length > MAX_XML_BYTES:
            raise DriverError(INVALID)
        text = file.pread_exact(trailer.xml_offset, trailer.xml_length, "property list")
        for block in plist_blocks(text):
            add_mish(chunks, block, trailer.data_fork)
    else:
        raise DriverError(INVALID)
    return chunks


def resource_blocks(file: InputFile, begin: int, length: int) -> Iterator[bytes]:
    """The resources of the resource fork's data, as qemu walks it: the data's
    offset (at 0) and length (at 8), then resources of a 32-bit length each.
    qemu's EINVAL where it fails; a resource over `MAX_TABLE_BYTES` is instar's
    refusal (qemu reads any size the fork holds)."""

    def u32(offset: int) -> int:
        return int.from_bytes(file.pread(offset, 4).ljust(4, b"\0"), "big")

    data_offset = u32(begin)
    if data_offset > length:
        raise DriverError(INVALID)
    count = u32(begin + 8)
    if count == 0 or data_offset + count > length:
        raise DriverError(INVALID)
    offset = begin + data_offset
    end = offset + count
    while offset < end:
        size = u32(offset)
        if size == 0 or size > end - offset:
            raise DriverError(INVALID)
        if size > MAX_TABLE_BYTES:
            raise FormatError(
                f"resource of {size} bytes at offset {offset} is over instar's limit of "
                f"{MAX_TABLE_BYTES} bytes"
            )
        yield file.pread(offset + 4, size).ljust(size, b"\0")
        offset += 4 + size


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")


def plist_blocks(text: bytes) -> list[bytes]:
    """What qemu finds in the plist: every ``<data>`` element, up to the first
    NUL (qemu's strings end there), base64-decoded as glib decodes it.
    An element opened and never closed is qemu's EINVAL."""
    text = text.split(b"\0", 1)[0]
    blocks = []
    position = 0
    while (begin := text.find(b"<data>", position)) >= 0:
        end = text.find(b"</data>", begin + 6)
        if end < 0:
            raise DriverError(INVALID)
        blocks.append(glib_base64(text[begin + 6 : end]))
        position = end + 1
    return blocks


def glib_base64(text: bytes) -> bytes:
    """g_base64_decode: characters outside the alphabet are skipped, '=' counts
    as a zero digit, a partial last group is dropped, and each '=' among the
    last two digits drops one byte of output."""
    digits = _NOT_BASE64.sub(b"", text)
    whole = len(digits) // 4 * 4
    out = binascii.a2b_base64(digits[:whole].replace(b"=", b"A"))
    drop = digits[-2:].count(b"=")
    return out[: max(0, len(out) - drop)]


def add_mish(chunks: Chunks, block: bytes, data_fork: int) -> None:
    """The chunks of one mish block, appended as qemu appends them: types qemu
    drops are kept aside, sizes checked with qemu's messages (numbered as
    qemu numbers the chunks it keeps). A block that is no mish block is
    skipped, as qemu skips it."""
    if len(block) < MISH_MIN or block[:4] != MISH:
        return
    first_sector, data_offset = struct.unpack_from(">8xQ8xQ", block)
    base = data_fork + data_offset
    entries = (len(block) - MISH_HEADER) // CHUNK.size
    if len(chunks) + len(chunks.unreadable) + entries > MAX_CHUNKS:
        raise FormatError(f"the chunk table has more than {MAX_CHUNKS} entries (instar's limit)")
    area = block[MISH_HEADER : MISH_HEADER + entries * CHUNK.size]
    for kind, _, sector, count, offset, length in CHUNK.iter_unpack(area):
        sector = (sector + first_sector) & MASK64
        if kind not in KNOWN:
            if kind not in (COMMENT, LAST):
                chunks.unreadable.append((sector, count, kind))
            continue
        index = len(chunks)
        if kind not in (ZEROES, IGNORE) and count > MAX_SECTOR_COUNT:
            raise FormatError(
                f"sector count {count} for chunk {index} is larger than max ({MAX_SECTOR_COUNT})"
            )
        if length > MAX_LENGTH:
            raise FormatError(
                f"length {length} for chunk {index} is larger than max ({MAX_LENGTH})"
            )
        chunks.types.append(kind)
        chunks.sectors.append(sector)
        chunks.counts.append(count)
        chunks.offsets.append((offset + base) & MASK64)
        chunks.lengths.append(length)


def type_name(kind: int) -> str:
    """A chunk type as messages name it."""
    return TYPE_NAMES.get(kind, f"{kind:#x}")
