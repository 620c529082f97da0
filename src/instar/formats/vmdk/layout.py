"""VMDK on-disk structures: the sparse extent header, stream markers, the descriptor.

Facts from VMware's "Virtual Disk Format 5.0" specification and qemu's
block/vmdk.c (which is what instar must agree with). Everything is
little-endian; offsets and sizes in the header count 512-byte sectors.

A hosted sparse extent ("KDMV") starts with a 512-byte header, usually
followed by an embedded text descriptor, the redundant and primary grain
directories (GD: one uint32 sector offset per grain table) and grain tables
(GT: one uint32 sector offset per grain), then the grains. A stream-optimized
extent puts the GD at the end (``gd_offset == GD_AT_END``), stores every grain
deflate-compressed behind a grain marker, and ends with a footer (a copy of the
header holding the real GD offset) and an end-of-stream marker.
"""

from __future__ import annotations

import struct

from instar.errors import FormatError

# Defined in the package, for cheap probing; re-exported here with the rest of the layout.
from instar.formats.vmdk import COWD_MAGIC as COWD_MAGIC
from instar.formats.vmdk import MAGIC as MAGIC
from instar.formats.vmdk import SECTOR as SECTOR
from instar.formats.vmdk import looks_like_descriptor as looks_like_descriptor
from instar.record import Record
from instar.runtime_types import NamedTuple

SESPARSE_MAGIC = b"\xbe\xba\xfe\xca\x00\x00\x00\x00"  # 0xcafebabe little-endian

FLAG_NL_DETECT = 1 << 0  # the four line-ending check bytes are valid
FLAG_RGD = 1 << 1  # a redundant grain directory exists
FLAG_ZERO_GRAIN = 1 << 2  # a grain table entry of 1 means "zeros"
FLAG_COMPRESSED = 1 << 16  # grains are compressed
FLAG_MARKERS = 1 << 17  # grains and metadata are preceded by markers
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
GTE_ZEROED = 1  # grain table entry meaning "zero grain" when FLAG_ZERO_GRAIN is set

MARKER_EOS = 0
MARKER_GRAIN_TABLE = 1
MARKER_GRAIN_DIRECTORY = 2
MARKER_FOOTER = 3

# qemu's limits, kept so instar refuses what qemu refuses.
MAX_VERSION = 3
MAX_GTES_PER_GT = 512  # qemu: "L2 table size too big"
MAX_GRAIN_SECTORS = 0x200000  # qemu: "Invalid granularity, image may be corrupt"
MAX_GD_ENTRIES = 32 << 20  # qemu: "L1 size too big"
MAX_DESCRIPTOR_BYTES = (1 << 20) - 1  # qemu reads at most this much of a descriptor
MAX_EXTENT_SECTORS = 1 << 32  # grain offsets are uint32 sectors

# What qemu-img create writes, and instar copies.
DEFAULT_GRAIN_SECTORS = 128  # 64 KiB grains
DEFAULT_GTES_PER_GT = 512
DEFAULT_DESC_SECTORS = 20
DEFAULT_TOOLS_VERSION = "2147483647"
CHECK_BYTES = b"\n \r\n"

# magic, version, flags, capacity, grain size, descriptor offset and size,
# GTEs per GT, redundant GD offset, GD offset, overhead (first grain),
# unclean shutdown, the four line-ending check bytes, compression algorithm.
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
# A grain marker: the grain's first sector (LBA) and the compressed size.
GRAIN_MARKER = struct.Struct("<QI")
# A metadata marker: a sector count, size 0, the marker type, then padding.
_METADATA_MARKER = struct.Struct("<QII")


class SparseHeader(NamedTuple):
    """The 512-byte header of a hosted sparse extent (also its stream footer)."""

    version: int
    flags: int
    capacity: int  # sectors
    grain_sectors: int
    desc_offset: int  # sectors
    desc_sectors: int
    gtes_per_gt: int
    rgd_offset: int  # sectors
    gd_offset: int  # sectors, or GD_AT_END
    overhead: int  # sectors before the first grain
    unclean_shutdown: int = 0
    check_bytes: bytes = CHECK_BYTES
    compression: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> SparseHeader:
        """Parse a header; the caller has checked the magic."""
        fields = _HEADER.unpack_from(data)
        return cls(*fields[1:])

    def pack(self) -> bytes:
        """The header sector, zero padded to 512 bytes."""
        raw = _HEADER.pack(
            MAGIC,
            self.version,
            self.flags,
            self.capacity,
            self.grain_sectors,
            self.desc_offset,
            self.desc_sectors,
            self.gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.overhead,
            self.unclean_shutdown,
            self.check_bytes,
            self.compression,
        )
        return raw.ljust(SECTOR, b"\0")

    def with_gd_offset(self, gd_offset: int) -> SparseHeader:
        return self._replace(gd_offset=gd_offset)

    @property
    def compressed(self) -> bool:
        return self.compression == COMPRESSION_DEFLATE

    @property
    def has_markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def has_zero_grain(self) -> bool:
        return bool(self.flags & FLAG_ZERO_GRAIN)


def metadata_marker(sectors: int, kind: int) -> bytes:
    """A one-sector stream marker announcing ``sectors`` sectors of metadata."""
    return _METADATA_MARKER.pack(sectors, 0, kind).ljust(SECTOR, b"\0")


def parse_metadata_marker(data: bytes) -> tuple[int, int, int]:
    """(value, size, type) of a metadata marker sector."""
    value, size, kind = _METADATA_MARKER.unpack_from(data)
    return value, size, kind


def gd_entries(capacity: int, grain_sectors: int, gtes_per_gt: int) -> int:
    """How many grain tables cover ``capacity`` sectors (qemu's l1_size)."""
    per_gt = grain_sectors * gtes_per_gt
    return (capacity + per_gt - 1) // per_gt


def sectors_for(length: int) -> int:
    return (length + SECTOR - 1) // SECTOR


# --------------------------------------------------------------------------
# The text descriptor

EXTENT_ACCESS = ("RW", "RDONLY", "NOACCESS")

# The descriptor's grammar is scanned by hand, not with regular expressions:
# importing re (and enum with it) would cost every job that reads a VMDK more
# than reading it does. "Space" is what str.isspace() says (re's \s); digits
# are what str.isdecimal() says (re's \d), as int() reads them.
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_KEY_FIRST = _ASCII_LETTERS | {"_"}
_KEY_REST = _KEY_FIRST | frozenset("0123456789.")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _skip(line: str, position: int, wanted: frozenset[str] | None = None) -> int:
    """The end of the run of characters from ``position`` that are in
    ``wanted`` (None: spaces)."""
    end = len(line)
    while position < end and (line[position].isspace() if wanted is None
                              else line[position] in wanted):
        position += 1
    return position


def _digits_end(line: str, position: int) -> int:
    end = len(line)
    while position < end and line[position].isdecimal():
        position += 1
    return position


def _parse_extent_line(line: str) -> ExtentLine | None:
    """``ACCESS SECTORS TYPE "NAME" [OFFSET]`` (spaces between), or None."""
    access = next((word for word in EXTENT_ACCESS if line.startswith(word)), None)
    if access is None:
        return None
    fields: list[str] = []
    position = len(access)
    for wanted in ("digits", "letters"):
        start = _skip(line, position)
        if start == position:
            return None  # no space before the field
        position = (_digits_end(line, start) if wanted == "digits"
                    else _skip(line, start, _ASCII_LETTERS))
        if position == start:
            return None
        fields.append(line[start:position])
    start = _skip(line, position)
    if start == position or not line.startswith('"', start):
        return None
    close = line.find('"', start + 1)
    if close < 0:
        return None
    name, position = line[start + 1:close], close + 1
    offset = None
    if position < len(line):
        start = _skip(line, position)
        position = _digits_end(line, start)
        if start == close + 1 or position == start or position != len(line):
            return None
        offset = int(line[start:position])
    return ExtentLine(access, int(fields[0]), fields[1], name, offset)


def _parse_field(line: str) -> tuple[str, str] | None:
    """``KEY = VALUE`` (spaces optional around ``=``), or None; the value
    keeps everything after the spaces that follow ``=``."""
    if not line or line[0] not in _KEY_FIRST:
        return None
    key_end = _skip(line, 1, _KEY_REST)
    equals = _skip(line, key_end)
    if not line.startswith("=", equals):
        return None
    return line[:key_end], line[equals + 1:]


def _unquoted(value: str) -> str | None:
    """The text inside ``"..."`` when that is the whole value (no quote
    inside), else None."""
    if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1]:
        return value[1:-1]
    return None


def _is_hex32(value: str) -> bool:
    return 1 <= len(value) <= 8 and all(char in _HEX_DIGITS for char in value)


class ExtentLine(NamedTuple):
    """One extent of a descriptor: ``ACCESS SECTORS TYPE "NAME" [OFFSET]``."""

    access: str
    sectors: int
    kind: str  # SPARSE, FLAT, VMFS, VMFSSPARSE, SESPARSE, ...
    name: str
    offset: int | None  # sectors into the file (FLAT only)


class Descriptor(Record):
    """A parsed descriptor: ``key=value`` fields (quotes removed) and extent lines."""

    __slots__ = ("extents", "fields")

    def __init__(
        self,
        fields: dict[str, str] | None = None,
        extents: list[ExtentLine] | None = None,
    ) -> None:
        self.fields: dict[str, str] = {} if fields is None else fields
        self.extents: list[ExtentLine] = [] if extents is None else extents

    @property
    def create_type(self) -> str | None:
        return self.fields.get("createType")

    @property
    def parent_hint(self) -> str | None:
        return self.fields.get("parentFileNameHint")

    def cid(self, key: str = "CID") -> int | None:
        """The content id ``key`` (CID or parentCID), checked to be 32-bit hex."""
        value = self.fields.get(key)
        if value is None:
            return None
        if not _is_hex32(value):
            raise FormatError(f"descriptor {key} '{_shorten(value)}' is not a 32-bit hex number")
        return int(value, 16)


def descriptor_text(data: bytes) -> str:
    """The descriptor's text: bytes up to the first NUL (as qemu's C string).

    Names keep their exact bytes through surrogateescape, so an extent named
    in any encoding is opened as written.
    """
    end = data.find(b"\0")
    if end >= 0:
        data = data[:end]
    return data.decode("utf-8", "surrogateescape")


def parse_descriptor(text: str) -> Descriptor:
    """Parse a descriptor strictly: every line is blank, a comment, a field or an extent.

    qemu searches the text with strstr and sscanf, accepting nearly anything;
    instar refuses lines it does not understand rather than guess.
    """
    descriptor = Descriptor()
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        extent = _parse_extent_line(line)
        if extent is not None:
            descriptor.extents.append(extent)
            continue
        pair = _parse_field(line)
        if pair is None:
            raise FormatError(f"invalid line {number} in VMDK descriptor: '{_shorten(line)}'")
        key, value = pair[0], pair[1].strip()
        quoted = _unquoted(value)
        if quoted is not None:
            value = quoted
        elif '"' in value:
            raise FormatError(f"invalid value on line {number} in VMDK descriptor")
        if key in descriptor.fields:
            raise FormatError(f"VMDK descriptor sets '{_shorten(key)}' twice")
        descriptor.fields[key] = value
    return descriptor


def _shorten(text: str, limit: int = 60) -> str:
    """Text from an image, made safe and short for a one-line message."""
    clean = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    clean = "".join(c if c.isprintable() else "?" for c in clean)
    return clean if len(clean) <= limit else clean[:limit] + "..."


class DescriptorSpec(NamedTuple):
    """What instar writes into a new descriptor (qemu-img create's template)."""

    cid: int
    create_type: str
    extents: tuple[ExtentLine, ...]
    hw_version: str
    cylinders: int
    heads: int
    adapter_type: str
    tools_version: str
    parent_cid: int = 0xFFFFFFFF
    parent_hint: str | None = None


def build_descriptor(spec: DescriptorSpec) -> bytes:
    """The descriptor text, laid out line for line as qemu writes it."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={spec.cid:x}",
        f"parentCID={spec.parent_cid:x}",
        f'createType="{spec.create_type}"',
    ]
    # qemu's template has one line here: the parent's name hint, or nothing.
    hint = spec.parent_hint
    lines.append("" if hint is None else f'parentFileNameHint="{hint}"')
    lines.append("# Extent description")
    for extent in spec.extents:
        text = f'{extent.access} {extent.sectors} {extent.kind} "{extent.name}"'
        lines.append(text if extent.offset is None else f"{text} {extent.offset}")
    lines += [
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        f'ddb.virtualHWVersion = "{spec.hw_version}"',
        f'ddb.geometry.cylinders = "{spec.cylinders}"',
        f'ddb.geometry.heads = "{spec.heads}"',
        'ddb.geometry.sectors = "63"',
        f'ddb.adapterType = "{spec.adapter_type}"',
        f'ddb.toolsVersion = "{spec.tools_version}"',
    ]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def safe_extent_name(name: str) -> str:
    """An extent file name that cannot break the descriptor's quoting or lines."""
    return "".join("_" if c in '"\n\r\0' else c for c in name)
