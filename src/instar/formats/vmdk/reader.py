"""Reading VMDK: every layout qemu reads except VMFS sparse (COWD) and SESparse.

A disk is a list of extents laid end to end. A file starting with ``KDMV`` is
one sparse extent (monolithicSparse or streamOptimized) with its descriptor
embedded; any other file is a text descriptor naming extent files (FLAT/VMFS:
raw bytes at an offset; SPARSE: a hosted sparse extent), which the host side
opens through the resolver's allowlist. A ``parentFileNameHint`` makes the
disk a child: grains a sparse extent does not map read from the parent.

Grain tables are read on demand (a small cache per extent); `VmdkDriver.map`
answers grain by grain as qemu does, and the read core coalesces grains
that are adjacent in the file into one ``pread``.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Iterator

from instar.errors import FormatError, UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import ZLIB, TableCache, inflate
from instar.formats.vmdk.layout import (
    COMPRESSION_DEFLATE,
    COWD_MAGIC,
    GD_AT_END,
    GRAIN_MARKER,
    GTE_ZEROED,
    MAGIC,
    MARKER_EOS,
    MARKER_FOOTER,
    MAX_DESCRIPTOR_BYTES,
    MAX_GD_ENTRIES,
    MAX_GRAIN_SECTORS,
    MAX_GTES_PER_GT,
    MAX_VERSION,
    SECTOR,
    Descriptor,
    ExtentLine,
    SparseHeader,
    descriptor_text,
    gd_entries,
    looks_like_descriptor,
    parse_descriptor,
    parse_metadata_marker,
)
from instar.image import (
    COMPRESSED,
    DATA,
    OFFSET_VALID,
    ZERO,
    BlockImage,
    Driver,
    Image,
    Run,
    file_runs,
)
from instar.safety import MAX_METADATA_CACHE_BYTES, MAX_TABLE_BYTES

MAX_EXTENTS = 1024  # extent files one disk may name (each is an open file)
MAX_DISK_BYTES = (1 << 63) - 1  # qemu's largest image; file offsets are signed 64-bit
MAX_COMPRESSED_GRAIN_BYTES = 16 << 20  # a compressed grain is inflated in memory
GT_CACHE_TABLES = 16  # grain tables kept per extent (qemu keeps 16 too)
QEMU_DESC_FALLBACK = 20 * SECTOR  # qemu reads CID and parent hint from 0x200, this much
_GD_BLOCK = 8192  # grain directory entries tested for zero at once
_ZERO_GD_BLOCK = bytes(4 * _GD_BLOCK)
READ_CREATE_TYPES = ("monolithicFlat", "vmfs", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
REFUSED_CREATE_TYPES = (
    "vmfsSparse",
    "seSparse",
    "vmfsRaw",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
    "fullDevice",
    "partitionedDevice",
)


def _u32_table(data: bytes) -> array[int]:
    table = array("I")
    table.frombytes(data)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        table.byteswap()
    return table


# --------------------------------------------------------------------------
# Sparse extents


def read_sparse_header(file: InputFile) -> SparseHeader:
    """The header that counts: the footer's when the GD is at the end (stream)."""
    first = file.pread_exact(0, SECTOR, "VMDK header")
    if first[:4] == COWD_MAGIC:
        raise UnsupportedError("VMFS sparse (COWD) vmdk extents are not supported")
    if first[:4] != MAGIC:
        raise FormatError("Image not in VMDK format")
    header = SparseHeader.unpack(first)
    if header.gd_offset == GD_AT_END:
        header = _read_footer(file)
    return header


def _read_footer(file: InputFile) -> SparseHeader:
    """Footer marker, footer (a header), end-of-stream marker: the file's last 3 sectors."""
    if file.size < 3 * SECTOR:
        raise FormatError("Invalid footer")
    tail = file.pread_exact(file.size - 3 * SECTOR, 3 * SECTOR, "VMDK footer")
    _, marker_size, marker_type = parse_metadata_marker(tail[:SECTOR])
    eos = parse_metadata_marker(tail[2 * SECTOR :])
    if (
        tail[SECTOR : SECTOR + 4] != MAGIC
        or marker_size != 0
        or marker_type != MARKER_FOOTER
        or eos != (0, 0, MARKER_EOS)
    ):
        raise FormatError("Invalid footer")
    footer = SparseHeader.unpack(tail[SECTOR : 2 * SECTOR])
    if footer.gd_offset == GD_AT_END:
        raise FormatError("Invalid footer: it has no grain directory offset either")
    return footer


def check_sparse_header(header: SparseHeader, file: InputFile) -> int:
    """qemu's checks on a sparse header, plus instar's limits; returns the GD length."""
    if header.version > MAX_VERSION:
        raise UnsupportedError(f"Unsupported VMDK version {header.version}")
    if header.gtes_per_gt > MAX_GTES_PER_GT:
        raise FormatError("L2 table size too big")
    if header.gtes_per_gt * header.grain_sectors == 0:
        raise FormatError("L1 entry size is invalid")
    if header.grain_sectors > MAX_GRAIN_SECTORS:
        raise FormatError("Invalid granularity, image may be corrupt")
    if header.compression not in (0, COMPRESSION_DEFLATE):
        raise UnsupportedError(f"unknown VMDK compression algorithm {header.compression}")
    if header.compressed and header.grain_sectors * SECTOR > MAX_COMPRESSED_GRAIN_BYTES:
        raise UnsupportedError(
            f"compressed grains of {header.grain_sectors * SECTOR} bytes are larger than "
            f"instar's limit of {MAX_COMPRESSED_GRAIN_BYTES}"
        )
    entries = gd_entries(header.capacity, header.grain_sectors, header.gtes_per_gt)
    if entries > MAX_GD_ENTRIES:
        raise FormatError("L1 size too big")
    if entries * 4 > MAX_TABLE_BYTES:
        raise FormatError(
            f"grain directory of {entries * 4} bytes exceeds instar's limit of {MAX_TABLE_BYTES}"
        )
    if file.size < header.overhead * SECTOR:
        raise FormatError(f"File truncated, expecting at least {header.overhead * SECTOR} bytes")
    return entries


class SparseExtent:
    """A hosted sparse extent: grain directory in memory, grain tables cached."""

    def __init__(self, file: InputFile, header: SparseHeader, kind: str = "") -> None:
        self.file = file
        self.header = header
        self.kind = kind  # the descriptor's extent type; "" for a monolithic file
        entries = check_sparse_header(header, file)
        self.length = header.capacity * SECTOR
        self.grain_bytes = header.grain_sectors * SECTOR
        self._gt_bytes = header.gtes_per_gt * 4
        self._gd = self._read_gd(entries)
        self._tables: TableCache[array[int]] = TableCache(self._load_table, GT_CACHE_TABLES)
        self.zero_grains = header.has_zero_grain
        self._stored = DATA | (COMPRESSED if header.compressed else OFFSET_VALID)
        self.metadata_bytes = entries * 4

    def _read_gd(self, entries: int) -> array[int]:
        if entries == 0:
            return array("I")
        data = self.file.pread_exact(
            self.header.gd_offset * SECTOR, entries * 4, f"grain directory of '{self.file.name}'"
        )
        gd = _u32_table(data)
        highest = max(gd)
        if highest and highest * SECTOR + self._gt_bytes > self.file.size:
            raise FormatError(
                f"grain table at sector {highest} of '{self.file.name}' "
                "lies beyond the end of the file"
            )
        return gd

    def _load_table(self, index: int) -> array[int]:
        data = self.file.pread_exact(
            self._gd[index] * SECTOR, self._gt_bytes, f"grain table of '{self.file.name}'"
        )
        return _u32_table(data)

    def runs(self, offset: int, length: int, disk_start: int) -> Iterator[Run]:
        """qemu's answers for ``[offset, offset + length)`` of the extent, at
        disk offsets: grain by grain (pieces of a grain), stored grains merged
        where they continue each other in the file, compressed ones alone."""
        grain_bytes = self.grain_bytes
        per_table = self.header.gtes_per_gt
        end = offset + length
        pending: Run | None = None
        position = offset
        while position < end:
            grain, within = divmod(position, grain_bytes)
            table_index, entry_index = divmod(grain, per_table)
            if self._gd[table_index] == 0:  # whole grain tables' worth are unallocated
                following = self._next_table(table_index + 1)
                step = min(end, following * per_table * grain_bytes) - position
                flags, host, unit = 0, 0, None
            else:
                step = min(end - position, grain_bytes - within)
                entry = self._tables.get(table_index)[entry_index]
                flags, host, unit = self._grain(entry, within)
            at = disk_start + position
            if pending is not None and pending.flags == flags and not flags & COMPRESSED and (
                not flags & OFFSET_VALID or pending.host + (at - pending.start) == host
            ):
                pending = pending._replace(end=at + step)
            else:
                if pending is not None:
                    yield pending
                pending = Run(at, at + step, flags, self.file if flags & DATA else None,
                              host, unit, grain_bytes, disk_start)
            position += step
        if pending is not None:
            yield pending

    def _next_table(self, index: int) -> int:
        """The first grain directory entry from ``index`` on that names a grain
        table (or the directory's end). Empty stretches are skipped a block of
        entries at a time with a memcmp: an empty 256 TiB disk has 8 million."""
        gd, size = self._gd, len(self._gd)
        while index < size:
            stop = min(size, (index // _GD_BLOCK + 1) * _GD_BLOCK)
            if not _ZERO_GD_BLOCK.startswith(gd[index:stop].tobytes()):
                for position in range(index, stop):
                    if gd[position]:
                        return position
            index = stop
        return size

    def _grain(self, entry: int, within: int) -> tuple[int, int, object]:
        """(flags, host offset or offset in the grain, compressed unit) of a grain."""
        if entry == 0:
            return 0, 0, None
        if entry == GTE_ZEROED and self.zero_grains:
            return ZERO, 0, None
        if entry * SECTOR >= self.file.size:
            raise FormatError(
                f"grain at sector {entry} of '{self.file.name}' lies beyond the end of the file"
            )
        if self._stored & COMPRESSED:
            return self._stored, within, (self, entry)
        return self._stored, entry * SECTOR + within, None

    def inflate(self, sector: int) -> bytes:
        """The compressed grain at ``sector``, inflated (bounded by the grain size)."""
        start = sector * SECTOR
        where = f"compressed grain at sector {sector} of '{self.file.name}'"
        if self.header.has_markers:
            marker = self.file.pread_exact(start, GRAIN_MARKER.size, "grain marker")
            _, size = GRAIN_MARKER.unpack(marker)
            start += GRAIN_MARKER.size
            if size == 0 or size > 2 * self.grain_bytes:
                raise FormatError(f"{where} has an invalid size {size}")
            data = self.file.pread_exact(start, size, "compressed grain")
        else:
            data = self.file.pread(start, 2 * self.grain_bytes)
        return inflate(data, self.grain_bytes, ZLIB, where)

    def close(self) -> None:
        self.file.close()


class FlatExtent:
    """Raw bytes of a file from ``start``; holes in the file read as zeros."""

    def __init__(self, file: InputFile, sectors: int, start_sector: int, kind: str) -> None:
        self.file = file
        self.kind = kind  # FLAT or VMFS
        self.length = sectors * SECTOR
        self.start = start_sector * SECTOR
        self.metadata_bytes = 0

    def runs(self, offset: int, length: int, disk_start: int) -> Iterator[Run]:
        """qemu's answers: data, at a valid offset, for the rest of the extent,
        cut where the file has data or holes (qemu asks the file and adds ZERO
        over a hole); past the end of the file is a hole. A flat extent maps
        every byte, so nothing falls through to a parent."""
        return file_runs(self.file, self.start + offset, length, disk_start + offset, DATA)

    def close(self) -> None:
        self.file.close()


DiskExtent = SparseExtent | FlatExtent


# --------------------------------------------------------------------------
# The disk


class VmdkDriver(Driver):
    """Extents end to end, over an optional parent."""

    def __init__(self, name: str, extents: list[DiskExtent], descriptor: Descriptor | None) -> None:
        self.name = name
        self._extents = extents
        self._starts: list[int] = []
        total = 0
        for extent in extents:
            self._starts.append(total)
            total += extent.length
        self.virtual_size = total
        self.descriptor = descriptor
        self.cid = descriptor.cid("CID") if descriptor is not None else None
        self.parent: Image | None = None
        self._parent_problem: str | None = None

    @property
    def backing(self) -> Image | None:
        return self.parent

    @property
    def disk_extents(self) -> tuple[DiskExtent, ...]:
        """The extents in disk order (what instar info lists)."""
        return tuple(self._extents)

    def set_parent(self, parent: Image, problem: str | None) -> None:
        """Attach the parent; ``problem`` (a CID mismatch) fails reads that need it, as qemu."""
        self.parent = parent
        self._parent_problem = problem

    def check_backing_read(self) -> None:
        if self._parent_problem is not None:
            raise FormatError(self._parent_problem)

    def map(self, offset: int, length: int) -> Iterator[Run]:
        end = offset + length
        index = bisect.bisect_right(self._starts, offset) - 1
        position = offset
        while position < end:
            extent, start = self._extents[index], self._starts[index]
            step = min(end, start + extent.length) - position
            yield from extent.runs(position - start, step, start)
            position += step
            index += 1

    def decompress(self, run: Run) -> bytes:
        unit = run.unit
        assert isinstance(unit, tuple)
        extent, sector = unit
        assert isinstance(extent, SparseExtent) and isinstance(sector, int)
        return extent.inflate(sector)

    def close(self) -> None:
        for extent in self._extents:
            extent.close()


# --------------------------------------------------------------------------
# Opening


def open_vmdk(file: InputFile, resolver: Resolver) -> VmdkDriver:
    """Open ``file`` as qemu's vmdk driver would: a sparse extent or a descriptor."""
    if file.size == 0:  # qemu sees whole sectors: 1 to 3 bytes read as a descriptor
        raise FormatError("File is too small, not a valid image")
    magic = file.pread(0, 4)
    if magic in (MAGIC, COWD_MAGIC):
        image = _open_monolithic(file)
    else:
        image = _open_descriptor_file(file, resolver)
    _attach_parent(image, file, resolver)
    return image


def _open_monolithic(file: InputFile) -> VmdkDriver:
    """monolithicSparse or streamOptimized: one sparse extent with its descriptor inside."""
    first = file.pread_exact(0, SECTOR, "VMDK header")
    if first[:4] == MAGIC:
        raw = SparseHeader.unpack(first)
        if raw.capacity == 0 and raw.desc_offset != 0:
            # qemu then reads the embedded text as a descriptor file and refuses
            # every type that could be embedded; instar says so plainly.
            raise UnsupportedError(
                "sparse vmdk header with capacity 0 and a descriptor offset "
                "(qemu treats it as a descriptor file)"
            )
    header = read_sparse_header(file)
    extent = SparseExtent(file, header)
    descriptor = _embedded_descriptor(file, SparseHeader.unpack(first))
    return VmdkDriver(file.name, [extent], descriptor)


def _embedded_descriptor(file: InputFile, header: SparseHeader) -> Descriptor | None:
    """The descriptor inside a sparse file, parsed strictly; None if there is none.

    A header without a descriptor offset still gets sector 1 looked at: qemu
    always reads CID and parent hint from there.
    """
    if header.desc_offset and header.desc_sectors:
        length = min(header.desc_sectors * SECTOR, MAX_DESCRIPTOR_BYTES)
        data = file.pread_exact(header.desc_offset * SECTOR, length, "VMDK descriptor")
        return _parse(descriptor_text(data))
    text = descriptor_text(file.pread(SECTOR, QEMU_DESC_FALLBACK))
    if not text.startswith("# Disk DescriptorFile"):
        return None
    return _parse(text)


def _parse(text: str) -> Descriptor:
    try:
        return parse_descriptor(text)
    except FormatError as error:
        raise FormatError(f"invalid VMDK image descriptor: {error}") from None


def _open_descriptor_file(file: InputFile, resolver: Resolver) -> VmdkDriver:
    """A text descriptor naming extent files (monolithicFlat, twoGbMaxExtent*, vmfs)."""
    if not looks_like_descriptor(file.pread(0, 2048)):
        # Not a descriptor at all (``-f vmdk`` on another format): qemu's words, no detail.
        raise FormatError("invalid VMDK image descriptor")
    if file.size > MAX_DESCRIPTOR_BYTES:
        raise FormatError(
            f"invalid VMDK image descriptor: larger than {MAX_DESCRIPTOR_BYTES + 1} bytes"
        )
    data = file.pread(0, file.size)
    try:
        text = data.decode("utf-8", "surrogateescape")
        descriptor = parse_descriptor(text.split("\0", 1)[0])
    except FormatError as error:
        raise FormatError(f"invalid VMDK image descriptor: {error}") from None
    create_type = descriptor.create_type
    if create_type is None:
        raise FormatError("invalid VMDK image descriptor")
    if create_type in REFUSED_CREATE_TYPES:
        raise UnsupportedError(f"vmdk images of type '{create_type}' are not supported")
    if create_type not in READ_CREATE_TYPES:
        raise UnsupportedError(f"Unsupported image type '{create_type}'")
    if not descriptor.extents:
        raise FormatError("invalid VMDK image descriptor: it names no extents")
    if len(descriptor.extents) > MAX_EXTENTS:
        raise UnsupportedError(f"vmdk descriptor names more than {MAX_EXTENTS} extents")
    _check_extent_sizes(descriptor.extents)
    extents: list[DiskExtent] = []
    metadata = 0
    try:
        for line in descriptor.extents:
            extent = _open_extent(line, file, resolver)
            extents.append(extent)
            metadata += extent.metadata_bytes
            if metadata > MAX_METADATA_CACHE_BYTES:
                raise FormatError(
                    f"grain directories of all extents exceed instar's limit of "
                    f"{MAX_METADATA_CACHE_BYTES} bytes"
                )
    except BaseException:
        for extent in extents:
            extent.close()
        raise
    return VmdkDriver(file.name, extents, descriptor)


def _check_extent_sizes(lines: list[ExtentLine]) -> None:
    """Every extent ends inside a file, and the disk is no larger than qemu's
    largest, before any extent is opened: offsets past 2^63 bytes cannot be
    read (qemu wraps them around and reads the start of the file)."""
    total = 0
    for line in lines:
        end = ((line.offset or 0) + line.sectors) * SECTOR
        if end > MAX_DISK_BYTES:
            raise FormatError(
                f"Invalid extent line: extent '{line.name}' ends {end} bytes into its file, "
                "past the largest file offset"
            )
        total += line.sectors * SECTOR
    if total > MAX_DISK_BYTES:
        raise FormatError(f"the extents add up to {total} bytes, more than any disk can hold")


def _open_extent(line: ExtentLine, file: InputFile, resolver: Resolver) -> DiskExtent:
    """One extent line: check it, open its file through the resolver, read its header."""
    if line.access != "RW":
        raise UnsupportedError(f"vmdk extents with access '{line.access}' are not supported")
    if line.sectors == 0:
        raise FormatError("invalid VMDK image descriptor: an extent has 0 sectors")
    kind = line.kind
    if kind == "FLAT":
        if line.offset is None:
            raise FormatError(f"Invalid extent line: flat extent '{line.name}' has no offset")
    elif line.offset is not None:
        raise FormatError(f"Invalid extent line: {kind} extent '{line.name}' has an offset")
    if kind not in ("FLAT", "VMFS", "SPARSE"):
        raise UnsupportedError(f"vmdk extents of type '{kind}' are not supported")
    extent_file = resolver.open_file(line.name, file, "extent")
    if not (extent_file.is_regular or extent_file.is_block_device):
        # A directory opens, then fails every read (EISDIR); a device or pipe
        # has no size to speak of. qemu's file driver says this of both.
        raise FormatError(
            f"Could not open extent '{extent_file.name}': 'file' driver requires "
            f"'{extent_file.name}' to be a regular file"
        )
    if kind in ("FLAT", "VMFS"):
        return FlatExtent(extent_file, line.sectors, line.offset or 0, kind)
    header = read_sparse_header(extent_file)
    if header.capacity != line.sectors:
        raise FormatError(
            f"sparse extent '{line.name}' holds {header.capacity} sectors, "
            f"the descriptor says {line.sectors}"
        )
    return SparseExtent(extent_file, header, kind)


def _attach_parent(image: VmdkDriver, file: InputFile, resolver: Resolver) -> None:
    """Open the parent a ``parentFileNameHint`` names (as vmdk, as qemu does)."""
    descriptor = image.descriptor
    hint = descriptor.parent_hint if descriptor is not None else None
    if hint is None:
        return
    parent = resolver.open_backing(hint, "vmdk", file)
    problem = None
    assert descriptor is not None
    parent_cid = descriptor.cid("parentCID")
    parent_driver = parent.driver if isinstance(parent, BlockImage) else None
    if isinstance(parent_driver, VmdkDriver) and parent_driver.cid != parent_cid:
        problem = (
            f"'{file.name}': parent CID {parent_cid if parent_cid is None else hex(parent_cid)} "
            f"does not match the CID of its parent '{hint}'"
        )
    image.set_parent(parent, problem)
