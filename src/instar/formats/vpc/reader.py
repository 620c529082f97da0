"""Reading VHD images: fixed, dynamic and differencing.

How the footer is found and the size computed follows qemu 7.2: the footer
copy at offset 0 means a dynamic (or differencing) disk; without it the
footer at the end means a fixed disk. The size is C*H*S*512 from the footer
geometry unless the creator application is one that sizes disks by the
footer's current size, or the geometry is the CHS maximum.

Where instar differs from qemu, it is stricter or follows the specification:
- the dynamic header checksum is checked (qemu checks only the footer's);
- a block size must be a power of two from 4 KiB to 256 MiB (qemu: >= 512);
- a footer found only at the end must say "fixed" (qemu reads any such file
  as a fixed disk);
- a differencing disk reads through to its parent per the sector bitmaps
  (qemu ignores the parent and the bitmaps, reading unallocated blocks as
  zeros). Dynamic disks are read as qemu reads them: every sector of an
  allocated block comes from the file, whatever its bitmap bit says.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from urllib.parse import unquote

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.raw import RawImage
from instar.formats.vpc.layout import (
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    DISK_FIXED,
    DYNAMIC_COOKIE,
    DYNAMIC_HEADER_SIZE,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    MAX_SECTORS,
    SECTOR,
    UNALLOCATED,
    DynamicHeader,
    Footer,
    ParentLocator,
    bitmap_size,
)
from instar.image import Extent, ExtentKind, Image, check_range, merge_extents
from instar.safety import MAX_METADATA_CACHE_BYTES, MAX_NAME_BYTES, MAX_TABLE_BYTES

MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 256 << 20
_BITMAP_CACHE_BYTES = min(8 << 20, MAX_METADATA_CACHE_BYTES)

# Parent locator platform codes instar follows, in the order it tries them.
_LOCATOR_ORDER = (b"W2ru", b"MacX", b"W2ku")


def open_vpc(file: InputFile, resolver: Resolver) -> Image:
    """Open a VHD of any type qemu reads; raise FormatError if it is malformed."""
    footer, at_start = _read_footer(file)
    size = footer.virtual_size()
    if size > MAX_SECTORS * SECTOR:
        raise FormatError(f"disk size {size} is larger than the VHD maximum of 2040 GiB")
    if not at_start:
        if footer.disk_type != DISK_FIXED:
            raise FormatError(
                f"the footer copy at offset 0 of this type {footer.disk_type} disk is missing"
            )
        return FixedVpcImage(file, size)
    if footer.disk_type == DISK_FIXED and file.size == FOOTER_SIZE:
        return FixedVpcImage(file, size)  # an empty fixed disk: the footer is all there is
    if footer.disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
        raise FormatError(f"unsupported VHD disk type {footer.disk_type}")
    header = _read_dynamic_header(file, footer.data_offset)
    bat = _read_bat(file, header, size)
    parent = None
    if footer.disk_type == DISK_DIFFERENCING:
        parent = _open_parent(file, header, resolver)
    return DynamicVpcImage(file, size, header.block_size, bat, parent)


def _read_footer(file: InputFile) -> tuple[Footer, bool]:
    """The footer, and whether it came from offset 0 (qemu's dynamic disk test)."""
    data = file.pread(0, FOOTER_SIZE)
    at_start = data[: len(FOOTER_COOKIE)] == FOOTER_COOKIE and len(data) == FOOTER_SIZE
    if not at_start:
        if file.size == 0:
            raise FormatError("File too small for a VHD header")
        if file.size < FOOTER_SIZE:  # qemu pads the file to a sector: no footer there
            raise FormatError("invalid VPC image")
        data = file.pread_exact(file.size - FOOTER_SIZE, FOOTER_SIZE, "VHD footer")
        if data[: len(FOOTER_COOKIE)] != FOOTER_COOKIE:
            raise FormatError("invalid VPC image")
    if not Footer.checksum_matches(data):
        raise FormatError("Incorrect header checksum")
    return Footer.parse(data), at_start


def _read_dynamic_header(file: InputFile, offset: int) -> DynamicHeader:
    data = file.pread_exact(offset, DYNAMIC_HEADER_SIZE, "dynamic disk header")
    if data[: len(DYNAMIC_COOKIE)] != DYNAMIC_COOKIE:
        raise FormatError("Invalid header magic")
    if not DynamicHeader.checksum_matches(data):
        raise FormatError("Incorrect dynamic disk header checksum")
    header = DynamicHeader.parse(data)
    block_size = header.block_size
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise FormatError(
            f"Invalid block size {block_size} (instar reads powers of two "
            f"from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE})"
        )
    return header


def _read_bat(file: InputFile, header: DynamicHeader, size: int) -> array[int]:
    """The BAT entries that cover the disk, each checked to lie inside the file."""
    block_size = header.block_size
    needed = -(-size // block_size)
    if needed > 0xFFFFFFFF:
        raise FormatError("Too many blocks")
    if header.max_table_entries < needed:
        raise FormatError("Page table too small")
    if needed * 4 > MAX_TABLE_BYTES:
        raise FormatError(
            f"block allocation table of {needed} entries is over instar's "
            f"limit of {MAX_TABLE_BYTES} bytes"
        )
    data = file.pread_exact(header.table_offset, needed * 4, "block allocation table")
    bat = array("I")
    assert bat.itemsize == 4
    bat.frombytes(data)
    if sys.byteorder == "little":
        bat.byteswap()
    block_span = bitmap_size(block_size) + block_size
    last = max((entry for entry in bat if entry != UNALLOCATED), default=None)
    if last is not None and last * SECTOR + block_span > file.size:
        index = bat.index(last)
        raise FormatError(
            f"block allocation table entry {index} points beyond the end of the file "
            "(the image is truncated or corrupt)"
        )
    return bat


# --- differencing disks: finding the parent ---------------------------------------------------


def _open_parent(file: InputFile, header: DynamicHeader, resolver: Resolver) -> Image:
    """Open the parent through the host's resolver, trying each name the child gives."""
    names = _parent_names(file, header)
    if not names:
        raise FormatError("differencing disk names no parent instar can locate")
    errors: list[str] = []
    for name in names:
        try:
            return resolver.open_backing(name, None, file)
        except FormatError as error:
            errors.append(str(error))
    raise FormatError(f"cannot open the parent disk: {errors[0]}")


def _parent_names(file: InputFile, header: DynamicHeader) -> list[str]:
    """Candidate parent paths: W2ru, MacX, W2ku locators, then the parent name."""
    names: list[str] = []
    by_platform: dict[bytes, list[ParentLocator]] = {}
    for locator in header.locators:
        by_platform.setdefault(locator.platform, []).append(locator)
    for platform in _LOCATOR_ORDER:
        for locator in by_platform.get(platform, []):
            name = _locator_path(file, locator)
            if name and name not in names:
                names.append(name)
    unicode_name = _decode(header.parent_name, "utf-16-be", "parent name")
    unicode_name = _from_windows(unicode_name)
    if unicode_name and unicode_name not in names:
        names.append(unicode_name)
    return names


def _locator_path(file: InputFile, locator: ParentLocator) -> str:
    """The POSIX path a W2ru/W2ku/MacX locator holds ('' when it has none usable)."""
    if locator.data_length == 0:
        return ""
    if locator.data_length > 2 * MAX_NAME_BYTES:
        raise FormatError(f"parent locator of {locator.data_length} bytes is too long")
    data = file.pread_exact(locator.data_offset, locator.data_length, "parent locator")
    if locator.platform == b"MacX":
        url = _decode(data, "utf-8", "MacX parent locator")
        for prefix in ("file://localhost/", "file:///"):
            if url.startswith(prefix):
                return unquote("/" + url[len(prefix) :])
        return ""
    return _from_windows(_decode(data, "utf-16-le", "parent locator"))


def _decode(data: bytes, encoding: str, what: str) -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not valid {encoding}") from None
    return text.split("\0", 1)[0]


def _from_windows(name: str) -> str:
    """A Windows path as a relative POSIX one; '' for a drive or UNC path (not here)."""
    path = name.replace("\\", "/")
    if path.startswith("//") or (len(path) >= 2 and path[1] == ":"):
        return ""
    while path.startswith("./"):
        path = path[2:]
    return path


# --- images -------------------------------------------------------------------------------------


class FixedVpcImage:
    """A fixed disk: the data is the file up to its footer."""

    def __init__(self, file: InputFile, size: int) -> None:
        self.file = file
        self._size = size
        self._data_end = max(0, file.size - FOOTER_SIZE)
        self._raw = RawImage(file)  # for SEEK_DATA/SEEK_HOLE extents

    @property
    def virtual_size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        inside = max(0, min(length, self._data_end - offset))
        data = self.file.pread(offset, inside) if inside else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        inside = max(0, min(length, self._data_end - offset))
        if inside:
            yield from self._raw.extents(offset, inside)
        if inside < length:
            yield Extent(offset + inside, length - inside, ExtentKind.ZERO)

    def close(self) -> None:
        self.file.close()


class DynamicVpcImage:
    """A dynamic or differencing disk (``parent`` set) over its BAT.

    Reads go block by block: one ``preadv`` per allocated stretch, straight
    into the result; a differencing disk splits a block by its sector bitmap.
    """

    def __init__(
        self, file: InputFile, size: int, block_size: int, bat: array[int], parent: Image | None
    ) -> None:
        self.file = file
        self._size = size
        self._block_size = block_size
        self._bitmap_size = bitmap_size(block_size)
        self._sectors_per_block = block_size // SECTOR
        self._bat = bat
        self.parent = parent
        self._bitmaps: OrderedDict[int, int] = OrderedDict()
        self._bitmap_cache_entries = max(1, _BITMAP_CACHE_BYTES // self._bitmap_size)

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    def block_allocated(self, index: int) -> bool:
        """Whether the BAT maps block ``index`` (for block status)."""
        return self._bat[index] != UNALLOCATED

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(block index, offset in block, disk offset, length) for each block touched."""
        end = offset + length
        while offset < end:
            index, within = divmod(offset, self._block_size)
            step = min(end - offset, self._block_size - within)
            yield index, within, offset, step
            offset += step

    def _data_offset(self, index: int, within: int) -> int:
        return self._bat[index] * SECTOR + self._bitmap_size + within

    # -- read --

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of ``[offset, offset + length)``: neighbouring stored sectors are
        read with one pread, the rest comes from the parent (or is zeros), and
        the pieces are joined once (a single piece is returned as it is)."""
        check_range(self, offset, length)
        parts: list[bytes] = []
        run_start = run_length = 0  # a pending run of adjacent bytes in the file
        for position, size, file_offset in self._segments(offset, length):
            if file_offset is not None and run_length and run_start + run_length == file_offset:
                run_length += size
                continue
            if run_length:
                parts.append(self._read_file(run_start, run_length))
                run_length = 0
            if file_offset is None:
                parts.append(self._read_parent(position, size))
            else:
                run_start, run_length = file_offset, size
        if run_length:
            parts.append(self._read_file(run_start, run_length))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int | None]]:
        """(guest offset, length, file offset or None when not stored here)."""
        for index, within, position, step in self._pieces(offset, length):
            if self._bat[index] == UNALLOCATED:
                yield position, step, None
            elif self.parent is None:
                yield position, step, self._data_offset(index, within)
            else:
                for start, stop, present in self._runs(index, within, step):
                    at = position + start - within
                    yield at, stop - start, self._data_offset(index, start) if present else None

    def _read_file(self, offset: int, length: int) -> bytes:
        """Stored bytes; what lies past the end of the file reads as zeros."""
        data = self.file.pread(offset, length)
        return data if len(data) == length else data + bytes(length - len(data))

    def _read_parent(self, position: int, length: int) -> bytes:
        """Bytes from the parent (zeros without one, or past its end)."""
        parent = self.parent
        inside = 0 if parent is None else max(0, min(length, parent.virtual_size - position))
        if parent is None or not inside:
            return bytes(length)
        data = parent.read(position, inside)
        return data if inside == length else data + bytes(length - inside)

    # -- extents --

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        return merge_extents(self._raw_extents(offset, length))

    def _raw_extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = offset + length
        last_index = (end - 1) // self._block_size
        position = offset
        while position < end:
            index, within = divmod(position, self._block_size)
            allocated = self._bat[index] != UNALLOCATED
            if allocated and self.parent is not None:
                step = min(end - position, self._block_size - within)
                for start, stop, present in self._runs(index, within, step):
                    at = position + start - within
                    if present:
                        yield Extent(at, stop - start, ExtentKind.DATA)
                    else:
                        yield from self._parent_extents(at, stop - start)
                position += step
                continue
            # A run of blocks alike (all allocated, or all not): one extent, no bitmaps.
            following = index + 1
            while following <= last_index and (self._bat[following] != UNALLOCATED) == allocated:
                following += 1
            run_end = min(end, following * self._block_size)
            if allocated:
                yield Extent(position, run_end - position, ExtentKind.DATA)
            else:
                yield from self._parent_extents(position, run_end - position)
            position = run_end

    def _parent_extents(self, position: int, length: int) -> Iterator[Extent]:
        inside = 0
        if self.parent is not None:
            inside = max(0, min(length, self.parent.virtual_size - position))
            if inside:
                yield from self.parent.extents(position, inside)
        if inside < length:
            yield Extent(position + inside, length - inside, ExtentKind.UNALLOCATED)

    # -- sector bitmaps (differencing disks only) --

    def _runs(self, index: int, within: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Byte ranges ``[start, stop)`` inside block ``index`` with their bitmap bit."""
        first = within // SECTOR
        last = -(-(within + length) // SECTOR)
        for run_first, run_last, present in bitmap_runs(
            self._bitmap(index), self._sectors_per_block, first, last
        ):
            start = max(within, run_first * SECTOR)
            stop = min(within + length, run_last * SECTOR)
            yield start, stop, present

    def _bitmap(self, index: int) -> int:
        """Block ``index``'s bitmap as an integer (bit ``n - 1 - i`` is sector i)."""
        bits = self._bitmaps.get(index)
        if bits is not None:
            self._bitmaps.move_to_end(index)
            return bits
        data = self.file.pread_exact(
            self._bat[index] * SECTOR, self._sectors_per_block // 8, "sector bitmap"
        )
        bits = int.from_bytes(data, "big")
        self._bitmaps[index] = bits
        if len(self._bitmaps) > self._bitmap_cache_entries:
            self._bitmaps.popitem(last=False)
        return bits

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close()
        self.file.close()


def bitmap_runs(bits: int, width: int, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
    """Runs ``(start, stop, set)`` of equal bits over sectors ``[first, last)``.

    ``bits`` holds ``width`` bits, the most significant for sector 0 (the VHD
    order). Each run costs a few big-integer operations, not one per sector.
    """
    span = last - first
    window = (bits >> (width - last)) & ((1 << span) - 1)  # top bit: sector `first`
    done = 0
    while done < span:
        remaining = span - done
        mask = (1 << remaining) - 1
        rest = window & mask
        is_set = bool(rest >> (remaining - 1))
        other = (~rest & mask) if is_set else rest  # its top bit: the run's end
        run = remaining - other.bit_length() if other else remaining
        yield first + done, first + done + run, is_set
        done += run
