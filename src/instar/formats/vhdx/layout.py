"""VHDX on-disk structures (MS-VHDX 1.0): encoding, decoding and arithmetic.

Nothing here does I/O. Decoders take bytes already read and either return a
NamedTuple or raise `FormatError` naming the structure; encoders return bytes
with their CRC-32C filled in. All multi-byte fields are little-endian, GUIDs
are Microsoft GUIDs (the ``bytes_le`` form of a `uuid.UUID`).

The file starts with a 1 MiB header section::

    0       file type identifier ("vhdxfile" + UTF-16 creator)
    64 KiB  header 1            128 KiB header 2
    192 KiB region table 1      256 KiB region table 2

The region tables locate the BAT and the metadata region; the headers locate
the log. Payload blocks and sector bitmap blocks live anywhere after 1 MiB, at
1 MiB-aligned offsets the BAT gives.
"""

from __future__ import annotations

import struct

import google_crc32c

from instar.errors import FormatError
from instar.formats.vhdx import (
    FILE_SIGNATURE as FILE_SIGNATURE,  # re-exported: defined there for probing
)
from instar.runtime_types import NamedTuple

KiB = 1 << 10
MiB = 1 << 20
TiB = 1 << 40

FILE_ID_OFFSET = 0
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SECTION_SIZE = 1 * MiB
HEADER_SIZE = 4 * KiB  # the CRC covers this much of each 64 KiB header block
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB


HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
CREATOR_BYTES = 512  # UTF-16 characters 256

MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB  # the spec's limit, and qemu's
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_METADATA_ITEM = 1 * MiB
SECTOR_BITMAP_BLOCK = 1 * MiB
SECTORS_PER_BITMAP = 1 << 23  # sectors one sector bitmap block describes

# BAT entry: state in bits 0-2, file offset in MiB in bits 20-63.
STATE_MASK = 0x7
OFFSET_MASK = ~(MiB - 1) & ((1 << 64) - 1)

PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5  # the 0.95 draft's value; qemu reads it as zeros too
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6


def _mixed_endian(raw: bytes) -> bytes:
    """A GUID's bytes between the text order and Microsoft's (the first three
    fields little-endian): the same swap both ways. By hand, not with uuid,
    whose import (platform with it) costs more than a worker's whole job."""
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:16]


def _guid(text: str) -> bytes:
    """The bytes of the GUID written ``2DC27766-F623-...``."""
    return _mixed_endian(bytes.fromhex(text.replace("-", "")))


BAT_REGION = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
ZERO_GUID = bytes(16)

# Named layouts (little-endian, packed).
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
REGION_HEADER = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
METADATA_HEADER = struct.Struct("<8sHH20s")
METADATA_ENTRY = struct.Struct("<16sIIII")
FILE_PARAMETERS_ITEM = struct.Struct("<II")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
PARENT_LOCATOR_HEADER = struct.Struct("<16sHH")
PARENT_LOCATOR_ENTRY = struct.Struct("<IIHH")

REGION_REQUIRED = 0x1
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4
PARAM_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAM_HAS_PARENT = 0x2


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) as VHDX uses it: initial ~0, final xor ~0."""
    return int(google_crc32c.value(bytes(data)))


def crc32c_extend(crc: int, data: bytes | memoryview) -> int:
    """Continue a CRC-32C over more bytes (``crc32c_extend(0, data) == crc32c(data)``)."""
    return int(google_crc32c.extend(crc, bytes(data)))


def checksum_ok(buffer: bytes, crc_offset: int = 4) -> bool:
    """True if the CRC stored at ``crc_offset`` matches ``buffer`` with that field zeroed."""
    stored: int = U32.unpack_from(buffer, crc_offset)[0]
    zeroed = buffer[:crc_offset] + bytes(4) + buffer[crc_offset + 4 :]
    return crc32c(zeroed) == stored


def with_checksum(buffer: bytearray, crc_offset: int = 4) -> bytes:
    """``buffer`` with its CRC field (at ``crc_offset``) computed and filled in."""
    buffer[crc_offset : crc_offset + 4] = bytes(4)
    U32.pack_into(buffer, crc_offset, crc32c(buffer))
    return bytes(buffer)


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def guid_text(guid: bytes) -> str:
    """The text form of a GUID as uuid prints it: lower case, 8-4-4-4-12."""
    digits = _mixed_endian(guid).hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


# ---------------------------------------------------------------- file identifier


def encode_file_identifier(creator: str) -> bytes:
    """The file type identifier: signature and a UTF-16 creator (diagnostic only)."""
    name = creator.encode("utf-16-le")[:CREATOR_BYTES]
    return FILE_SIGNATURE + name


# ------------------------------------------------------------------------ headers


class Header(NamedTuple):
    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes = ZERO_GUID
    log_version: int = 0
    version: int = 1
    log_length: int = 1 * MiB
    log_offset: int = 1 * MiB

    def encode(self) -> bytes:
        """The 4 KiB header with its CRC-32C."""
        buffer = bytearray(HEADER_SIZE)
        HEADER.pack_into(
            buffer,
            0,
            HEADER_SIGNATURE,
            0,
            self.sequence_number,
            self.file_write_guid,
            self.data_write_guid,
            self.log_guid,
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        )
        return with_checksum(buffer)


def decode_header(buffer: bytes) -> Header | None:
    """A header if its signature, CRC and version are right, else None (it is ignored)."""
    if len(buffer) < HEADER_SIZE or buffer[:4] != HEADER_SIGNATURE:
        return None
    if not checksum_ok(buffer[:HEADER_SIZE]):
        return None
    (_, _, seq, file_guid, data_guid, log_guid, log_version, version, log_length, log_offset) = (
        HEADER.unpack_from(buffer)
    )
    if version != 1:
        return None
    return Header(seq, file_guid, data_guid, log_guid, log_version, version, log_length, log_offset)


def choose_header(first: Header | None, second: Header | None) -> Header:
    """The current header: the valid one with the higher sequence number.

    Two valid headers with the same number are accepted only if identical
    (Disk2VHD writes such pairs), as qemu does.
    """
    if first is None and second is None:
        raise FormatError("No valid VHDX header found")
    if first is None or second is None:
        chosen = first if second is None else second
        assert chosen is not None
        return chosen
    if first.sequence_number == second.sequence_number and first != second:
        raise FormatError("the two VHDX headers have the same sequence number but differ")
    return first if first.sequence_number >= second.sequence_number else second


# ------------------------------------------------------------------ region table


class RegionEntry(NamedTuple):
    guid: bytes
    file_offset: int
    length: int
    required: bool = True

    @property
    def end(self) -> int:
        return self.file_offset + self.length


def encode_region_table(entries: list[RegionEntry]) -> bytes:
    """The 64 KiB region table with its CRC-32C."""
    buffer = bytearray(REGION_TABLE_SIZE)
    REGION_HEADER.pack_into(buffer, 0, REGION_SIGNATURE, 0, len(entries), 0)
    for i, entry in enumerate(entries):
        flags = REGION_REQUIRED if entry.required else 0
        REGION_ENTRY.pack_into(
            buffer,
            REGION_HEADER.size + i * REGION_ENTRY.size,
            entry.guid,
            entry.file_offset,
            entry.length,
            flags,
        )
    return with_checksum(buffer)


def decode_region_table(buffer: bytes) -> list[RegionEntry]:
    """Region table entries; FormatError if the signature, CRC or count is wrong."""
    if len(buffer) < REGION_TABLE_SIZE or buffer[:4] != REGION_SIGNATURE:
        raise FormatError("region table signature is wrong")
    if not checksum_ok(buffer[:REGION_TABLE_SIZE]):
        raise FormatError("region table checksum is wrong")
    count = REGION_HEADER.unpack_from(buffer)[2]
    if count > MAX_REGION_ENTRIES:
        raise FormatError(f"region table has {count} entries (at most {MAX_REGION_ENTRIES})")
    entries = []
    for i in range(count):
        guid, offset, length, flags = REGION_ENTRY.unpack_from(
            buffer, REGION_HEADER.size + i * REGION_ENTRY.size
        )
        entries.append(RegionEntry(guid, offset, length, bool(flags & REGION_REQUIRED)))
    return entries


# ---------------------------------------------------------------------- metadata


class MetadataEntry(NamedTuple):
    item_id: bytes
    offset: int  # from the start of the metadata region
    length: int
    flags: int

    @property
    def required(self) -> bool:
        return bool(self.flags & META_IS_REQUIRED)


def encode_metadata(items: list[tuple[bytes, int, bytes]]) -> tuple[bytes, bytes]:
    """The metadata table (64 KiB) and the item bytes that follow it at 64 KiB.

    ``items`` are (item id, flags, value); values are packed back to back,
    as qemu lays them out.
    """
    table = bytearray(METADATA_TABLE_SIZE)
    METADATA_HEADER.pack_into(table, 0, METADATA_SIGNATURE, 0, len(items), bytes(20))
    values = bytearray()
    for i, (item_id, flags, value) in enumerate(items):
        offset = METADATA_TABLE_SIZE + len(values)
        METADATA_ENTRY.pack_into(
            table,
            METADATA_HEADER.size + i * METADATA_ENTRY.size,
            item_id,
            offset,
            len(value),
            flags,
            0,
        )
        values += value
    return bytes(table), bytes(values)


def decode_metadata_table(buffer: bytes, region_length: int) -> list[MetadataEntry]:
    """Metadata table entries, each checked to lie inside the metadata region."""
    if len(buffer) < METADATA_TABLE_SIZE or buffer[:8] != METADATA_SIGNATURE:
        raise FormatError("metadata table signature is wrong")
    count = METADATA_HEADER.unpack_from(buffer)[2]
    if count > MAX_METADATA_ENTRIES:
        raise FormatError(f"metadata table has {count} entries (at most {MAX_METADATA_ENTRIES})")
    entries = []
    for i in range(count):
        item_id, offset, length, flags, _ = METADATA_ENTRY.unpack_from(
            buffer, METADATA_HEADER.size + i * METADATA_ENTRY.size
        )
        if length == 0:
            continue  # an empty item: nothing to read (the spec makes its offset 0)
        if length > MAX_METADATA_ITEM:
            raise FormatError(f"metadata item {guid_text(item_id)} is {length} bytes (max 1 MiB)")
        if offset < METADATA_TABLE_SIZE or offset + length > region_length:
            raise FormatError(
                f"metadata item {guid_text(item_id)} at [{offset}, {offset + length}) "
                f"lies outside the metadata region of {region_length} bytes"
            )
        entries.append(MetadataEntry(item_id, offset, length, flags))
    return entries


class FileParameters(NamedTuple):
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool


def encode_file_parameters(params: FileParameters) -> bytes:
    flags = (PARAM_LEAVE_BLOCKS_ALLOCATED if params.leave_blocks_allocated else 0) | (
        PARAM_HAS_PARENT if params.has_parent else 0
    )
    return FILE_PARAMETERS_ITEM.pack(params.block_size, flags)


def decode_file_parameters(value: bytes) -> FileParameters:
    block_size, flags = FILE_PARAMETERS_ITEM.unpack_from(value)
    if not is_power_of_two(block_size) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise FormatError(
            f"block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )
    return FileParameters(
        block_size, bool(flags & PARAM_LEAVE_BLOCKS_ALLOCATED), bool(flags & PARAM_HAS_PARENT)
    )


class ParentLocator(NamedTuple):
    locator_type: bytes
    entries: dict[str, str]


def encode_parent_locator(entries: dict[str, str]) -> bytes:
    """A VHDX parent locator item: header, key/value table, then UTF-16 strings."""
    table_size = PARENT_LOCATOR_HEADER.size + PARENT_LOCATOR_ENTRY.size * len(entries)
    table = bytearray(PARENT_LOCATOR_HEADER.pack(VHDX_PARENT_LOCATOR_TYPE, 0, len(entries)))
    strings = bytearray()
    for key, value in entries.items():
        key_bytes, value_bytes = key.encode("utf-16-le"), value.encode("utf-16-le")
        key_offset = table_size + len(strings)
        strings += key_bytes
        value_offset = table_size + len(strings)
        strings += value_bytes
        table += PARENT_LOCATOR_ENTRY.pack(
            key_offset, value_offset, len(key_bytes), len(value_bytes)
        )
    return bytes(table + strings)


def decode_parent_locator(value: bytes) -> ParentLocator:
    """Key/value pairs of a parent locator; every string must lie inside the item."""
    if len(value) < PARENT_LOCATOR_HEADER.size:
        raise FormatError("parent locator is too short")
    locator_type, _, count = PARENT_LOCATOR_HEADER.unpack_from(value)
    if PARENT_LOCATOR_HEADER.size + count * PARENT_LOCATOR_ENTRY.size > len(value):
        raise FormatError(f"parent locator's {count} entries do not fit in the item")
    entries: dict[str, str] = {}
    for i in range(count):
        key_offset, value_offset, key_length, value_length = PARENT_LOCATOR_ENTRY.unpack_from(
            value, PARENT_LOCATOR_HEADER.size + i * PARENT_LOCATOR_ENTRY.size
        )
        key = _utf16(value, key_offset, key_length, "key")
        entries[key] = _utf16(value, value_offset, value_length, f"value of {key}")
    return ParentLocator(locator_type, entries)


def _utf16(item: bytes, offset: int, length: int, what: str) -> str:
    if length == 0 or length % 2 or offset + length > len(item):
        raise FormatError(f"parent locator {what} lies outside the item or is malformed")
    try:
        return item[offset : offset + length].decode("utf-16-le")
    except UnicodeDecodeError:
        raise FormatError(f"parent locator {what} is not valid UTF-16") from None


# ---------------------------------------------------------------- BAT arithmetic


class Geometry(NamedTuple):
    """Block arithmetic for one image: how virtual offsets map to BAT entries."""

    virtual_size: int
    block_size: int
    logical_sector_size: int

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block (2**23 sectors per chunk)."""
        return SECTORS_PER_BITMAP * self.logical_sector_size // self.block_size

    @property
    def payload_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bitmap_blocks(self) -> int:
        return -(-self.payload_blocks // self.chunk_ratio)

    def bat_entries(self, differencing: bool) -> int:
        """Entries the BAT must hold: payload entries with interleaved bitmap entries.

        A dynamic or fixed BAT ends at the last payload entry; a differencing
        one also holds the bitmap entry of the last chunk (MS-VHDX 2.5).
        """
        if differencing:
            return self.bitmap_blocks * (self.chunk_ratio + 1)
        blocks = self.payload_blocks
        return blocks + (blocks - 1) // self.chunk_ratio if blocks else 0

    def payload_index(self, block: int) -> int:
        """BAT index of payload block ``block``."""
        return block + block // self.chunk_ratio

    def bitmap_index(self, block: int) -> int:
        """BAT index of the sector bitmap entry covering payload block ``block``."""
        chunk = block // self.chunk_ratio
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def block_length(self, block: int) -> int:
        """Bytes of the virtual disk payload block ``block`` holds (the last may be short)."""
        return min(self.block_size, self.virtual_size - block * self.block_size)


def bat_entry(file_offset: int, state: int) -> int:
    return (file_offset & OFFSET_MASK) | (state & STATE_MASK)
