"""Reading VHDX images: dynamic, fixed and differencing.

Opening checks every structure before anything is used: the CRC-32C of the
headers and region tables, the bounds of every region and metadata item, the
block and sector sizes, the BAT's size against the virtual size, and every
allocated BAT entry against the end of the file and the other regions. A
pending metadata log is replayed in memory first (`log.replay`).

Payload block states read as qemu reads them: FULLY_PRESENT from the file;
ZERO, UNDEFINED and UNMAPPED as zeros; NOT_PRESENT as zeros, or from the
parent in a differencing image; PARTIALLY_PRESENT (differencing only) sector
by sector as the chunk's sector bitmap says.
"""

from __future__ import annotations

import itertools
import sys
from array import array
from collections.abc import Iterator

from instar.errors import DriverError, FormatError, UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import (
    HostClaims,
    TableCache,
    alias_message,
    first_unlike,
)
from instar.formats.vhdx import layout
from instar.formats.vhdx.layout import Geometry, MiB, RegionEntry
from instar.formats.vhdx.log import LogOverlay, replay
from instar.image import DATA, OFFSET_VALID, ZERO, BlockImage, Driver, Image, Run
from instar.runtime_types import TYPE_CHECKING, NamedTuple
from instar.safety import MAX_TABLE_BYTES

if TYPE_CHECKING:
    import uuid

Source = InputFile | LogOverlay

_ZERO_STATES = frozenset(
    {
        layout.PAYLOAD_UNDEFINED,
        layout.PAYLOAD_ZERO,
        layout.PAYLOAD_UNMAPPED,
        layout.PAYLOAD_UNMAPPED_V095,
    }
)
_PAYLOAD_STATES = _ZERO_STATES | {layout.PAYLOAD_NOT_PRESENT, layout.PAYLOAD_FULLY_PRESENT}
_SKIPPED_STATES = _ZERO_STATES | {layout.PAYLOAD_NOT_PRESENT}  # payload states that need no check
_ITEM_SIZES = {
    layout.FILE_PARAMETERS: 8,
    layout.VIRTUAL_DISK_SIZE: 8,
    layout.PAGE83_DATA: 16,
    layout.LOGICAL_SECTOR_SIZE: 4,
    layout.PHYSICAL_SECTOR_SIZE: 4,
}
_BITMAP_CACHE = 64  # sector bitmaps of payload blocks kept decoded

# Segment kinds: where the bytes of a piece of the virtual disk come from.
_FILE, _ZEROS, _NOTHING, _PARENT = range(4)


class Metadata(NamedTuple):
    """What the metadata region says about the virtual disk."""

    params: layout.FileParameters
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: layout.ParentLocator | None


# ------------------------------------------------------------------ opening


def open_vhdx(file: InputFile, resolver: Resolver) -> VhdxDriver:
    """Parse and check everything; raise FormatError/UnsupportedError naming the problem."""
    if file.pread(0, 8) != layout.FILE_SIGNATURE:
        # qemu's words: its vhdx driver fails with EINVAL and no message of its own.
        raise DriverError("Invalid argument")
    headers = [
        layout.decode_header(file.pread(offset, layout.HEADER_SIZE))
        for offset in layout.HEADER_OFFSETS
    ]
    header = layout.choose_header(headers[0], headers[1])
    _check_log_location(header, file.size)
    source = replay(file, header)
    checking = getattr(resolver, "checking", False)
    if checking and isinstance(source, LogOverlay):
        # qemu-img check opens read-only and cannot replay; instar's reads
        # replay in memory, but a check reports the file as it is, as qemu's.
        refused = FormatError(f"VHDX image file '{file.name}' opened read-only, "
                              "but contains a log that needs to be replayed")
        refused.hint = f"To replay the log, run:\nqemu-img check -r all '{file.name}'"
        raise refused
    regions = _read_region_table(source)
    fixed_regions = [RegionEntry(b"header", 0, layout.HEADER_SECTION_SIZE)]
    if header.log_length:
        fixed_regions.append(RegionEntry(b"log", header.log_offset, header.log_length))
    _check_regions(regions, source.size)
    if header.log_guid != layout.ZERO_GUID:
        _check_regions(fixed_regions[1:], source.size)
    _check_overlaps(fixed_regions + regions)
    bat_region = _unique(regions, layout.BAT_REGION, "BAT")
    metadata_region = _unique(regions, layout.METADATA_REGION, "metadata")
    metadata = _read_metadata(source, metadata_region)
    geometry = Geometry(
        metadata.virtual_size, metadata.params.block_size, metadata.logical_sector_size
    )
    differencing = metadata.params.has_parent
    bat = _read_bat(source, bat_region, geometry, differencing)
    # Opened for check, the BAT is the check's to report (qemu skips its BAT
    # checks at open then); the driver is never asked to map.
    corruption = None if checking else _check_bat(
        bat, geometry, differencing, fixed_regions + regions, source.size)
    image = VhdxDriver(source, header, geometry, bat, differencing)
    image.corruption = corruption
    image.regions = regions
    image.log_replayed = source is not file
    if differencing:
        assert metadata.parent_locator is not None
        image.parent = _open_parent(metadata.parent_locator, file, resolver)
    return image


def _check_log_location(header: layout.Header, file_size: int) -> None:
    if header.log_version != 0:
        raise UnsupportedError(f"log version {header.log_version} is not supported")
    if header.log_offset < layout.HEADER_SECTION_SIZE or header.log_offset % MiB:
        raise FormatError(f"log offset {header.log_offset} is not a 1 MiB multiple past 1 MiB")
    if header.log_length % MiB:
        raise FormatError(f"log length {header.log_length} is not a multiple of 1 MiB")
    if header.log_guid != layout.ZERO_GUID and header.log_offset + header.log_length > file_size:
        raise FormatError("the log lies beyond the end of the file")


def _read_region_table(source: Source) -> list[RegionEntry]:
    """The first region table, or the second if the first is damaged."""
    first_error: FormatError | None = None
    for offset in layout.REGION_TABLE_OFFSETS:
        try:
            buffer = source.pread_exact(offset, layout.REGION_TABLE_SIZE, "region table")
            entries = layout.decode_region_table(buffer)
        except FormatError as error:
            first_error = first_error or error
            continue
        for entry in entries:
            known = entry.guid in (layout.BAT_REGION, layout.METADATA_REGION)
            if entry.required and not known:
                raise UnsupportedError(
                    f"required region {layout.guid_text(entry.guid)} is not supported"
                )
        return entries
    assert first_error is not None
    raise first_error


def _describe(region: RegionEntry) -> str:
    names = {layout.BAT_REGION: "BAT", layout.METADATA_REGION: "metadata"}
    if region.guid in (b"header", b"log"):
        return f"{region.guid.decode()} region"
    return names.get(region.guid, layout.guid_text(region.guid)) + " region"


def _check_regions(regions: list[RegionEntry], file_size: int) -> None:
    """Regions are 1 MiB aligned and inside the file."""
    for region in regions:
        name = _describe(region)
        if region.file_offset % MiB or region.length % MiB or region.length == 0:
            raise FormatError(
                f"{name} at {region.file_offset} ({region.length} bytes) is not 1 MiB aligned"
            )
        if region.end > file_size:
            raise FormatError(
                f"{name} at [{region.file_offset}, {region.end}) lies beyond the end "
                f"of the file ({file_size} bytes)"
            )


def _check_overlaps(regions: list[RegionEntry]) -> None:
    """No two regions (the header section and log included) share a byte."""
    ordered = sorted(regions, key=lambda r: r.file_offset)
    for before, after in itertools.pairwise(ordered):
        if after.file_offset < before.end:
            raise FormatError(f"{_describe(before)} and {_describe(after)} overlap")


def _unique(regions: list[RegionEntry], guid: bytes, name: str) -> RegionEntry:
    found = [r for r in regions if r.guid == guid]
    if len(found) != 1:
        raise FormatError(f"the region table has {len(found)} {name} regions (needs one)")
    return found[0]


def _read_metadata(source: Source, region: RegionEntry) -> Metadata:
    table = source.pread_exact(region.file_offset, layout.METADATA_TABLE_SIZE, "metadata table")
    entries = layout.decode_metadata_table(table, region.length)
    items: dict[bytes, bytes] = {}
    for entry in entries:
        known = entry.item_id in _ITEM_SIZES or entry.item_id == layout.PARENT_LOCATOR
        if not known:
            if entry.required:
                raise UnsupportedError(
                    f"required metadata item {layout.guid_text(entry.item_id)} is not supported"
                )
            continue
        if entry.item_id in items:
            raise FormatError(f"metadata item {layout.guid_text(entry.item_id)} appears twice")
        expected = _ITEM_SIZES.get(entry.item_id)
        if expected is not None and entry.length != expected:
            raise FormatError(
                f"metadata item {layout.guid_text(entry.item_id)} is {entry.length} bytes, "
                f"not {expected}"
            )
        items[entry.item_id] = source.pread_exact(
            region.file_offset + entry.offset, entry.length, "metadata item"
        )
    missing = [layout.guid_text(g) for g in _ITEM_SIZES if g not in items]
    if missing:
        raise FormatError(f"required metadata items are missing: {', '.join(missing)}")
    params = layout.decode_file_parameters(items[layout.FILE_PARAMETERS])
    virtual_size = layout.U64.unpack(items[layout.VIRTUAL_DISK_SIZE])[0]
    logical = layout.U32.unpack(items[layout.LOGICAL_SECTOR_SIZE])[0]
    physical = layout.U32.unpack(items[layout.PHYSICAL_SECTOR_SIZE])[0]
    if logical not in (512, 4096):
        raise FormatError(f"logical sector size {logical} is not 512 or 4096")
    if physical not in (512, 4096):
        raise FormatError(f"physical sector size {physical} is not 512 or 4096")
    if virtual_size > layout.MAX_VIRTUAL_SIZE:
        # qemu's vhdx fails with EINVAL and no message of its own: larger than 64 TiB.
        raise DriverError("Invalid argument")
    if virtual_size % logical:
        raise FormatError(
            f"virtual disk size {virtual_size} is not a multiple of the {logical}-byte sector"
        )
    locator = None
    if params.has_parent:
        if layout.PARENT_LOCATOR not in items:
            raise FormatError("a differencing image without a parent locator")
        locator = layout.decode_parent_locator(items[layout.PARENT_LOCATOR])
    return Metadata(params, virtual_size, logical, physical, locator)


def _read_bat(
    source: Source, region: RegionEntry, geometry: Geometry, differencing: bool
) -> array[int]:
    """The BAT entries the virtual size needs (never more), as 64-bit integers."""
    count = geometry.bat_entries(differencing)
    if count * 8 > region.length:
        raise FormatError(
            f"the BAT region ({region.length} bytes) is too small for the {count} entries "
            f"a {geometry.virtual_size}-byte disk in {geometry.block_size}-byte blocks needs"
        )
    if count * 8 > MAX_TABLE_BYTES:
        raise UnsupportedError(
            f"the BAT has {count} entries, more than instar's limit of {MAX_TABLE_BYTES // 8}"
        )
    bat = array("Q", source.pread_exact(region.file_offset, count * 8, "BAT"))
    if sys.byteorder == "big":
        bat.byteswap()
    return bat


def _check_bat(
    bat: array[int],
    geometry: Geometry,
    differencing: bool,
    regions: list[RegionEntry],
    file_size: int,
) -> str | None:
    """Every state is known, every allocated block lies in the file, clear of
    the regions (or FormatError) and of every other block: a block mapped
    twice is corruption, returned as the message reading will give (info
    describes such an image, as qemu-img info does).

    Entries of 0 (a block or sector bitmap not present) need no check and
    are skipped at memory speed: an empty 64 TiB disk has two million. The
    allocated ones claim their megabytes in a bit per MiB of the file."""
    ratio = geometry.chunk_ratio
    payload_states = _PAYLOAD_STATES | (
        {layout.PAYLOAD_PARTIALLY_PRESENT} if differencing else set()
    )
    claims = HostClaims(file_size, MiB)
    corruption: list[str] = []  # the first block mapped twice
    try:
        for region in regions:
            claims.claim(region.file_offset, region.length)  # apart: _check_overlaps
        index, count = 0, len(bat)
        while index < count:
            entry = bat[index]
            state = entry & layout.STATE_MASK
            bitmap_entry = index % (ratio + 1) == ratio
            if entry == state and not bitmap_entry and state in _SKIPPED_STATES:
                # A run of unallocated payload blocks, their sector bitmaps absent.
                index = first_unlike(bat, index, count, entry, ratio + 1, layout.SB_NOT_PRESENT)
                continue
            if bitmap_entry:  # a sector bitmap entry
                if differencing and state != layout.SB_NOT_PRESENT:
                    if state != layout.SB_PRESENT:
                        raise FormatError(
                            f"BAT entry {index} has an invalid sector bitmap state {state}"
                        )
                    _check_block(bat, geometry, index, MiB, regions, file_size, claims,
                                 corruption)
                # dynamic and fixed images never use them (qemu ignores them)
                index += 1
                continue
            if state not in payload_states:
                raise FormatError(f"BAT entry {index} has an invalid block state {state}")
            if state >= layout.PAYLOAD_FULLY_PRESENT:
                block = index - index // (ratio + 1)
                length = geometry.block_length(block)
                _check_block(bat, geometry, index, length, regions, file_size, claims,
                             corruption)
                if (
                    state == layout.PAYLOAD_PARTIALLY_PRESENT
                    and bat[geometry.bitmap_index(block)] & layout.STATE_MASK != layout.SB_PRESENT
                ):
                    raise FormatError(
                        f"BAT entry {index} is partially present but its sector bitmap is not"
                    )
            index += 1
            if corruption:
                break  # the image cannot be read: no need to claim the rest
        return corruption[0] if corruption else None
    finally:
        claims.close()


def _check_block(
    bat: array[int],
    geometry: Geometry,
    index: int,
    length: int,
    regions: list[RegionEntry],
    file_size: int,
    claims: HostClaims,
    corruption: list[str],
) -> None:
    offset = bat[index] & layout.OFFSET_MASK
    if offset + length > file_size:
        raise FormatError(
            f"BAT entry {index} points to [{offset}, {offset + length}), beyond the end "
            f"of the file ({file_size} bytes); the image has probably been truncated"
        )
    if claims.claim(offset, length):
        return
    for region in regions:
        if offset < region.end and region.file_offset < offset + length:
            raise FormatError(
                f"BAT entry {index} points to [{offset}, {offset + length}), "
                f"inside the VHDX metadata at [{region.file_offset}, {region.end})"
            )
    if not corruption:
        corruption.append(_alias(bat, geometry, index, offset, length))


def _alias(bat: array[int], geometry: Geometry, index: int, offset: int, length: int) -> str:
    """The message for BAT entry ``index``, whose block another entry's overlaps."""
    ratio = geometry.chunk_ratio

    def describe(position: int) -> tuple[int, int, str]:
        """(file offset, length, what) of the block a BAT entry allocates; or (0, 0, "")."""
        entry = bat[position]
        state = entry & layout.STATE_MASK
        if position % (ratio + 1) == ratio:
            if state != layout.SB_PRESENT:
                return 0, 0, ""
            first = position // (ratio + 1) * ratio * geometry.block_size
            return entry & layout.OFFSET_MASK, MiB, f"the sector bitmap of guest offset {first:#x}"
        if state < layout.PAYLOAD_FULLY_PRESENT:
            return 0, 0, ""
        block = position - position // (ratio + 1)
        start = entry & layout.OFFSET_MASK
        return start, geometry.block_length(block), f"{block * geometry.block_size:#x}"

    _, _, this = describe(index)
    first = bat.index(bat[index])  # an identical entry before it: found in C
    for other in itertools.chain([first] if first != index else [], range(len(bat))):
        start, size, what = describe(other)
        if other == index or not size or not (start < offset + length and offset < start + size):
            continue
        host = max(start, offset)
        if this.startswith("0x") and what.startswith("0x"):
            return alias_message(host, int(this, 16), int(what, 16))
        return (
            f"host offset {host:#x} is both {_named(this)} and {_named(what)} "
            "(a host unit mapped twice: the image is corrupt)"
        )
    raise AssertionError("an overlap without a second block")  # pragma: no cover


def _named(what: str) -> str:
    return f"the block of guest offset {what}" if what.startswith("0x") else what


def _open_parent(locator: layout.ParentLocator, file: InputFile, resolver: Resolver) -> Image:
    """Open the parent a differencing image names and check it is the right one.

    Paths are tried in the specification's order, relative_path first; a
    Windows drive or volume path cannot name a file here and is skipped. The
    parent's data write GUID must equal parent_linkage (or parent_linkage2).
    """
    if locator.locator_type != layout.VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedError(
            f"parent locator type {layout.guid_text(locator.locator_type)} is not supported"
        )
    entries = locator.entries
    keys = [key for key in ("parent_linkage", "parent_linkage2") if key in entries]
    linkages = [_parse_guid(entries[key], key) for key in keys]
    if "parent_linkage" not in entries:
        raise FormatError("the parent locator has no parent_linkage")
    names = [
        name
        for key in ("relative_path", "volume_path", "absolute_win32_path")
        if (name := _local_path(entries.get(key, ""))) is not None
    ]
    if not names:
        raise FormatError("the parent locator names no parent file usable here")
    first_error: FormatError | None = None
    for name in names:
        try:
            parent = resolver.open_backing(name, None, file)
        except FormatError as error:
            first_error = first_error or error
            continue
        _check_linkage(parent, linkages, name)
        return parent
    assert first_error is not None
    raise first_error


def _parse_guid(text: str, key: str) -> uuid.UUID:
    import uuid  # only for a differencing image: its import is not cheap

    try:
        return uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        raise FormatError(f"parent locator {key} '{text}' is not a GUID") from None


def _local_path(path: str) -> str | None:
    """A locator path as a path on this system, or None for drive and volume paths."""
    if not path or "\0" in path:
        return None
    converted = path.replace("\\", "/")
    if converted.startswith("//") or (len(converted) > 1 and converted[1] == ":"):
        return None  # \\?\C:\..., \\?\Volume{...}\..., C:\...
    return converted


def _check_linkage(parent: Image, linkages: list[uuid.UUID], name: str) -> None:
    if not isinstance(parent, BlockImage):
        return  # the parent was left unopened (info reads no backing file)
    driver = parent.driver
    if not isinstance(driver, VhdxDriver):
        parent.close()
        raise FormatError(f"parent '{name}' is not a VHDX image")
    import uuid

    found = uuid.UUID(bytes_le=driver.data_write_guid)
    if found not in linkages:
        parent.close()
        raise FormatError(
            f"parent '{name}' has data write GUID {{{found}}}, not the "
            f"{{{linkages[0]}}} this image was made from: it has changed since"
        )


# ------------------------------------------------------------------ the image


class VhdxDriver(Driver):
    """A VHDX image's layer; a differencing image reads through to ``parent``.

    qemu 7.2's vhdx driver has no block-status callback, so qemu's generic
    answer applies to compare: the whole image is data, in one answer, at no
    known offset, whatever the BAT says (``generic_status``).
    """

    generic_status = True

    def __init__(
        self,
        source: Source,
        header: layout.Header,
        geometry: Geometry,
        bat: array[int],
        differencing: bool,
    ) -> None:
        self._source = source
        self.name = source.name
        self.header = header
        self.geometry = geometry
        self._bat = bat
        self.differencing = differencing
        self.parent: Image | None = None
        self._bitmaps: TableCache[int] = TableCache(self._load_bitmap, _BITMAP_CACHE)
        self.virtual_size = geometry.virtual_size
        self.corruption: str | None = None  # a block mapped twice: reading fails
        self.regions: list[RegionEntry] = []  # the region table's entries, in table order
        # The log held writes not yet in place (a crash): instar read them from
        # the log, qemu refuses such a file read-only (inspect reports it).
        self.log_replayed = False

    @property
    def backing(self) -> Image | None:
        return self.parent

    @property
    def source(self) -> InputFile | LogOverlay:
        """The file, or with a replayed log, the view of it with the log applied."""
        return self._source

    @property
    def data_write_guid(self) -> bytes:
        return self.header.data_write_guid

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def bat(self) -> array[int]:
        """The BAT entries the virtual size needs (what qemu-img check walks)."""
        return self._bat

    @property
    def file_size(self) -> int:
        return self._source.size

    # -- mapping virtual ranges to where their bytes are

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if self.corruption is not None:
            raise FormatError(self.corruption)
        for kind, position, size, file_offset in self._segments(offset, length):
            if kind == _FILE:
                yield Run(position, position + size, DATA | OFFSET_VALID, self._source,
                          file_offset)
            else:
                yield Run(position, position + size, ZERO if kind == _ZEROS else 0)

    def _segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(kind, virtual offset, length, file offset) pieces covering the range, in order."""
        block_size = self.geometry.block_size
        end = offset + length
        while offset < end:
            block, within = divmod(offset, block_size)
            step = min(end - offset, block_size - within)
            entry = self._bat[self.geometry.payload_index(block)]
            state = entry & layout.STATE_MASK
            if state < layout.PAYLOAD_FULLY_PRESENT:
                # Blocks with the same entry read alike: as one piece.
                step = min(end, self._same_until(block, entry, end) * block_size) - offset
            file_offset = (entry & layout.OFFSET_MASK) + within
            if state == layout.PAYLOAD_FULLY_PRESENT:
                yield _FILE, offset, step, file_offset
            elif state == layout.PAYLOAD_PARTIALLY_PRESENT:
                yield from self._partial(block, offset, step, file_offset)
            elif state == layout.PAYLOAD_NOT_PRESENT:
                yield (_PARENT if self.differencing else _NOTHING), offset, step, 0
            else:
                yield _ZEROS, offset, step, 0
            offset += step

    def _same_until(self, block: int, entry: int, end: int) -> int:
        """The first payload block after ``block`` (before the one holding
        ``end``) whose BAT entry is not ``entry``: found with a memcmp over the
        BAT, stepping over sector bitmap entries, so an empty 64 TiB disk
        maps in one piece."""
        geometry, bat = self.geometry, self._bat
        ratio = geometry.chunk_ratio
        last = min(len(bat), geometry.payload_index(-(-end // geometry.block_size)))
        index = geometry.payload_index(block) + 1
        while True:
            index = first_unlike(bat, index, last, entry, ratio + 1, layout.SB_NOT_PRESENT)
            if index < last and index % (ratio + 1) == ratio:
                index += 1  # a sector bitmap entry: it does not end the run
                continue
            break
        if index >= last:
            return -(-end // geometry.block_size)
        return index - index // (ratio + 1)

    def _partial(
        self, block: int, offset: int, length: int, file_offset: int
    ) -> Iterator[tuple[int, int, int, int]]:
        """Runs of a partially present block: sectors here, or in the parent."""
        sector = self.geometry.logical_sector_size
        bits = self._bitmaps.get(block)
        within = offset % self.geometry.block_size
        first, last = within // sector, -(-(within + length) // sector)
        bits >>= first
        position, end = offset, offset + length
        index = first
        while index < last:
            present = bool(bits & 1)
            run = _trailing(bits if not present else ~bits)
            run = max(1, min(run, last - index))
            run_end = min(end, offset - within + (index + run) * sector)
            kind = _FILE if present else _PARENT
            yield kind, position, run_end - position, file_offset + (position - offset)
            bits >>= run
            index += run
            position = run_end

    def _load_bitmap(self, block: int) -> int:
        """The sector bitmap bits of payload block ``block``, as an integer (bit 0 first)."""
        geometry = self.geometry
        entry = self._bat[geometry.bitmap_index(block)]
        if entry & layout.STATE_MASK != layout.SB_PRESENT:
            raise FormatError(
                f"payload block {block} is partially present but its sector bitmap is not"
            )
        sectors = geometry.block_size // geometry.logical_sector_size
        start = (block % geometry.chunk_ratio) * sectors // 8
        raw = self._source.pread_exact(
            (entry & layout.OFFSET_MASK) + start, sectors // 8, "sector bitmap"
        )
        return int.from_bytes(raw, "little")

    def close(self) -> None:
        self._source.close()


def _trailing(bits: int) -> int:
    """How many low bits of ``bits`` are zero (``bits`` != 0), or a large number if none."""
    if bits == 0:
        return 1 << 62
    return (bits & -bits).bit_length() - 1
