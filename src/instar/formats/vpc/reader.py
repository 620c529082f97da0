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

import itertools
import sys
from array import array
from collections.abc import Iterator

from instar.errors import DriverError, FormatError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import (
    HostClaims,
    TableCache,
    alias_message,
    first_other,
    metadata_alias_message,
)
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
from instar.image import DATA, OFFSET_VALID, ZERO, Driver, Image, Run, file_runs
from instar.safety import MAX_METADATA_CACHE_BYTES, MAX_NAME_BYTES, MAX_TABLE_BYTES

MAX_BLOCK_SIZE = 256 << 20
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4  # qemu's bound: INT_MAX / 4
_BITMAP_CACHE_BYTES = min(8 << 20, MAX_METADATA_CACHE_BYTES)

# Parent locator platform codes instar follows, in the order it tries them.
_LOCATOR_ORDER = (b"W2ru", b"MacX", b"W2ku")


def open_vpc(file: InputFile, resolver: Resolver) -> Driver:
    """Open a VHD of any type qemu reads; raise FormatError if it is malformed."""
    footer, at_start = _read_footer(file)
    size = footer.virtual_size()
    if size > MAX_SECTORS * SECTOR:
        # qemu's vpc fails with EFBIG and no message of its own: larger than 2040 GiB.
        raise DriverError("File too large")
    if not at_start:
        if footer.disk_type != DISK_FIXED:
            raise FormatError(
                f"the footer copy at offset 0 of this type {footer.disk_type} disk is missing"
            )
        return FixedVpcDriver(file, size)
    if footer.disk_type == DISK_FIXED and file.size == FOOTER_SIZE:
        return FixedVpcDriver(file, size)  # an empty fixed disk: the footer is all there is
    if footer.disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
        raise FormatError(f"unsupported VHD disk type {footer.disk_type}")
    header = _read_dynamic_header(file, footer.data_offset, size)
    bat = _read_bat(file, header, size)
    corruption = _check_blocks(file, footer.data_offset, header, bat)
    parent = None
    if footer.disk_type == DISK_DIFFERENCING:
        parent = _open_parent(file, header, resolver)
    driver = DynamicVpcDriver(file, size, header.block_size, bat, parent)
    driver.corruption = corruption
    return driver


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


def _read_dynamic_header(file: InputFile, offset: int, size: int) -> DynamicHeader:
    """The dynamic disk header, checked in qemu's order so a bad image gets
    qemu's message; bytes past the end of the file read as zeros, as qemu
    reads them. The header checksum, which qemu ignores, is checked last."""
    if offset >= file.size:
        raise FormatError(f"dynamic disk header at offset {offset} lies beyond the end of the file")
    data = file.pread(offset, DYNAMIC_HEADER_SIZE).ljust(DYNAMIC_HEADER_SIZE, b"\0")
    if data[: len(DYNAMIC_COOKIE)] != DYNAMIC_COOKIE:
        raise FormatError("Invalid header magic")
    header = DynamicHeader.parse(data)
    block_size = header.block_size
    if block_size & (block_size - 1) or block_size < SECTOR:
        raise FormatError(f"Invalid block size {block_size}")
    if block_size > MAX_BLOCK_SIZE:
        raise FormatError(
            f"Invalid block size {block_size} (instar reads blocks of up to {MAX_BLOCK_SIZE})")
    if size // block_size > 0xFFFFFFFF:
        raise FormatError("Too many blocks")
    if header.max_table_entries * block_size < size:
        raise FormatError("Page table too small")
    if header.max_table_entries > MAX_TABLE_ENTRIES:
        raise FormatError(f"Max Table Entries too large ({header.max_table_entries})")
    if not DynamicHeader.checksum_matches(data):
        raise FormatError("Incorrect dynamic disk header checksum")
    return header


def _read_bat(file: InputFile, header: DynamicHeader, size: int) -> array[int]:
    """The BAT entries that cover the disk, each checked to lie inside the file."""
    needed = -(-size // header.block_size)
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
    return bat


def _check_blocks(
    file: InputFile, header_offset: int, header: DynamicHeader, bat: array[int]
) -> str | None:
    """Every allocated block lies in the file (or FormatError), clear of the
    footer copy, the dynamic header, the BAT and every other block: a block
    mapped twice is corruption, returned as the message reading will give
    (info describes such a disk, as qemu-img info does). One pass over the
    allocated entries (unallocated stretches skipped at memory speed), with a
    bit per sector of the file."""
    block_size = header.block_size
    span = bitmap_size(block_size) + block_size
    claims = HostClaims(file.size, SECTOR)
    try:
        regions = [(0, FOOTER_SIZE, "the footer copy"),
                   (header_offset, DYNAMIC_HEADER_SIZE, "the dynamic disk header"),
                   (header.table_offset, len(bat) * 4, "the block allocation table")]
        for start, length, _what in regions:
            if not claims.claim(start, length):  # regions that overlap: claim what is left
                for sector in range(start, start + length, SECTOR):
                    claims.claim(sector, SECTOR)
        index, count = 0, len(bat)
        while (index := first_other(bat, index, count, UNALLOCATED)) < count:
            host = bat[index] * SECTOR
            if host + span > file.size:
                raise FormatError(
                    f"block allocation table entry {index} points beyond the end of the file "
                    "(the image is truncated or corrupt)"
                )
            if not claims.claim(host, span):
                return _alias(bat, index, block_size, span, regions)
            index += 1
        return None
    finally:
        claims.close()


def _alias(
    bat: array[int], index: int, block_size: int, span: int, regions: list[tuple[int, int, str]]
) -> str:
    """The message for block ``index``, which overlaps a region or another block."""
    host = bat[index] * SECTOR
    guest = index * block_size
    for start, length, what in regions:
        if start < host + span and host < start + length:
            return metadata_alias_message(max(host, start), guest, what)
    first = bat.index(bat[index])  # an identical entry before it: found in C
    for other in itertools.chain([first] if first != index else [], range(len(bat))):
        entry = bat[other]
        start = entry * SECTOR
        if entry != UNALLOCATED and other != index and start < host + span and host < start + span:
            # The blocks' guest offsets, and where the second begins to overlap the first.
            return alias_message(max(host, start), guest, other * block_size)
    raise AssertionError("an overlap without a second block")  # pragma: no cover


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
                from urllib.parse import unquote  # a differencing image's only

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


class FixedVpcDriver(Driver):
    """A fixed disk: the data is the file up to its footer. qemu answers
    data at a valid offset and asks the file, which adds ZERO over holes."""

    def __init__(self, file: InputFile, size: int) -> None:
        self.file = file
        self.name = file.name
        self.virtual_size = size
        self._data_end = max(0, file.size - FOOTER_SIZE)

    def map(self, offset: int, length: int) -> Iterator[Run]:
        return file_runs(self.file, offset, length, offset, DATA, self._data_end)

    def close(self) -> None:
        self.file.close()


class DynamicVpcDriver(Driver):
    """A dynamic or differencing disk (``parent`` set) over its BAT.

    qemu answers block by block where blocks are allocated, and for a whole
    stretch of unallocated blocks at once (zeros: qemu's vpc has no backing
    file). A differencing disk splits a block by its sector bitmap, and what
    it does not hold comes from the parent (qemu ignores the parent).
    """

    def __init__(
        self, file: InputFile, size: int, block_size: int, bat: array[int], parent: Image | None
    ) -> None:
        self.file = file
        self.name = file.name
        self.virtual_size = size
        self.block_size = block_size
        self._bitmap_size = bitmap_size(block_size)
        self._sectors_per_block = block_size // SECTOR
        self._bat = bat
        self.parent = parent
        self._bitmaps: TableCache[int] = TableCache(
            self._load_bitmap, _BITMAP_CACHE_BYTES // self._bitmap_size
        )
        # What the disk does not hold: the parent's, or zeros.
        self._absent = 0 if parent is not None else ZERO
        self.corruption: str | None = None  # a block mapped twice: reading fails

    @property
    def backing(self) -> Image | None:
        return self.parent

    @property
    def bat(self) -> array[int]:
        """The BAT entries that cover the disk (block numbers in sectors)."""
        return self._bat

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if self.corruption is not None:
            raise FormatError(self.corruption)
        end = offset + length
        block_size = self.block_size
        position = offset
        while position < end:
            index, within = divmod(position, block_size)
            if self._bat[index] == UNALLOCATED:
                last = -(-end // block_size)  # the BAT entries the range needs
                following = first_other(self._bat, index + 1, last, UNALLOCATED)
                stop = min(end, following * block_size)
                yield Run(position, stop, self._absent)
                position = stop
                continue
            step = min(end - position, block_size - within)
            data = self._bat[index] * SECTOR + self._bitmap_size
            if self.parent is None:
                yield Run(position, position + step, DATA | OFFSET_VALID, self.file, data + within)
            else:
                for start, stop, present in self._bitmap_runs(index, within, step):
                    at = position + start - within
                    if present:
                        yield Run(at, at + stop - start, DATA | OFFSET_VALID, self.file,
                                  data + start)
                    else:
                        yield Run(at, at + stop - start, 0)
            position += step

    # -- sector bitmaps (differencing disks only) --

    def _bitmap_runs(self, index: int, within: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Byte ranges ``[start, stop)`` inside block ``index`` with their bitmap bit."""
        first = within // SECTOR
        last = -(-(within + length) // SECTOR)
        for run_first, run_last, present in bitmap_runs(
            self._bitmaps.get(index), self._sectors_per_block, first, last
        ):
            start = max(within, run_first * SECTOR)
            stop = min(within + length, run_last * SECTOR)
            yield start, stop, present

    def _load_bitmap(self, index: int) -> int:
        """Block ``index``'s bitmap as an integer (bit ``n - 1 - i`` is sector i)."""
        data = self.file.pread_exact(
            self._bat[index] * SECTOR, self._sectors_per_block // 8, "sector bitmap"
        )
        return int.from_bytes(data, "big")

    def close(self) -> None:
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
