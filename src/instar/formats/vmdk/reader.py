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
from instar.formats.common import (
    ZLIB,
    HostClaims,
    TableCache,
    alias_message,
    first_other,
    inflate,
    is_progression,
    metadata_alias_message,
)
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
    MAX_VIRTUAL_SIZE,
    OFFSET_VALID,
    ZERO,
    BlockImage,
    Driver,
    Image,
    Run,
    file_runs,
    next_data,
)
from instar.safety import MAX_METADATA_CACHE_BYTES, MAX_TABLE_BYTES

MAX_EXTENTS = 1024  # extent files one disk may name (each is an open file)
MAX_DISK_BYTES = (1 << 63) - 1  # qemu's largest image; file offsets are signed 64-bit
MAX_COMPRESSED_GRAIN_BYTES = 16 << 20  # a compressed grain is inflated in memory
GT_CACHE_TABLES = 16  # grain tables kept per extent (qemu keeps 16 too)
EMPTY_SCAN_TABLES = 8192  # grain tables tested for emptiness at once (16 MiB of 512-entry tables)
QEMU_DESC_FALLBACK = 20 * SECTOR  # qemu reads CID and parent hint from 0x200, this much
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


def u32_table(data: bytes) -> array[int]:
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
        self._laid_out = False  # the grain tables lie end to end, in GD order
        self._gd = self._read_gd(entries)
        self._tables: TableCache[array[int]] = TableCache(self._load_table, GT_CACHE_TABLES)
        self.zero_grains = header.has_zero_grain
        self._stored = DATA | (COMPRESSED if header.compressed else OFFSET_VALID)
        self.metadata_bytes = entries * 4
        self.disk_start = 0  # where the extent begins in the disk (for messages)
        # GD indices [low, high) whose grain tables are known to be empty,
        # and the last one found to map something.
        self._empty = (0, 0)
        self._mapping = -1
        # The aliasing check: sectors claimed by the header, descriptor and
        # grain directory (before the first mapping), then by each grain
        # table and the grains it maps, when the table is first loaded.
        self._claims = HostClaims(file.size, SECTOR)
        self._checked = HostClaims(entries, 1)  # GD indices whose table was claimed
        self._metadata: list[tuple[int, int, str]] = []
        self._metadata_claimed = False
        self.corruption: str | None = None  # the aliasing found: every mapping fails

    def _read_gd(self, entries: int) -> array[int]:
        if entries == 0:
            return array("I")
        data = self.file.pread_exact(
            self.header.gd_offset * SECTOR, entries * 4, f"grain directory of '{self.file.name}'"
        )
        gd = u32_table(data)
        step = self._gt_bytes // SECTOR if self._gt_bytes % SECTOR == 0 else 0
        # Tables laid end to end (qemu's layout): the last is the highest,
        # found without a Python object per entry.
        self._laid_out = bool(gd[0] and step and is_progression(gd, gd[0], step))
        highest = gd[-1] if self._laid_out else max(gd)
        if highest and highest * SECTOR + self._gt_bytes > self.file.size:
            raise FormatError(
                f"grain table at sector {highest} of '{self.file.name}' "
                "lies beyond the end of the file"
            )
        return gd

    def _load_table(self, index: int) -> array[int]:
        table = self._read_table(index)
        if self._checked.claim(index, 1):  # the first load of this table
            try:
                self._claim_table(table, index)
            except FormatError as error:
                # It stays: a table is claimed once, so a retry would not find it again.
                self.corruption = str(error)
                raise
        return table

    @property
    def grain_directory(self) -> array[int]:
        return self._gd

    def grain_table(self, index: int) -> array[int]:
        """Grain table ``index`` as the file holds it, without the aliasing
        claims of a mapping (``check`` walks every table once)."""
        return self._read_table(index)

    def _read_table(self, index: int) -> array[int]:
        data = self.file.pread_exact(
            self._gd[index] * SECTOR, self._gt_bytes, f"grain table of '{self.file.name}'"
        )
        return u32_table(data)

    # -- empty grain tables, skipped at memory speed

    def _next_table(self, index: int, limit: int) -> int:
        """The first GD index in ``[index, limit)`` whose grain table may map
        a grain, or ``limit``. Zero GD entries (a stream's empty directory)
        are skipped with a memcmp; so are runs of tables laid end to end in
        the file that are all zeros (qemu preallocates every grain table of
        a monolithicSparse disk): found by the file's holes (SEEK_DATA), or
        read a megabyte at a time, never one table at a time."""
        gd = self._gd
        while index < limit:
            low, high = self._empty
            if low <= index < high:
                index = high
                continue
            index = first_other(gd, index, limit, 0)
            if index >= limit:
                break
            skipped = self._skip_empty_tables(index, limit)
            if skipped == index:
                return index
            self._empty = (index, skipped)
            index = skipped
        return limit

    def _skip_empty_tables(self, index: int, limit: int) -> int:
        """Past the grain tables from ``index`` on that hold only zeros, a
        block of tables laid end to end at a time (``index`` itself if its
        table maps something)."""
        gd, step = self._gd, self._gt_bytes // SECTOR
        if self._gt_bytes % SECTOR or index in self._tables or index == self._mapping:
            return index
        while index < limit:
            first = gd[index]
            if first == 0:
                return index
            stop = min(limit, index + EMPTY_SCAN_TABLES)
            if not self._laid_out and not is_progression(gd[index:stop], first, step):
                stop = index + 1
            start = first * SECTOR
            index += self._hole_prefix(start, start + (stop - index) * self._gt_bytes) \
                // self._gt_bytes
            if index == stop:
                continue
            # Not a hole: the first table is read as it would be to map it,
            # the rest of the block (if the first is empty) in one read.
            table = self._tables.get(index)
            if first_other(table, 0, len(table), 0) < len(table):
                self._mapping = index
                return index
            index += 1
            per_read = len(_ZERO_SCAN) // self._gt_bytes
            while index < stop:
                chunk = min(stop, index + per_read)
                data = self.file.pread(gd[index] * SECTOR, (chunk - index) * self._gt_bytes)
                zeros = len(data) if _ZERO_SCAN.startswith(data) else _zero_bytes(data)
                index += zeros // self._gt_bytes
                if index < chunk:
                    return index
        return index

    def _hole_prefix(self, start: int, end: int) -> int:
        """How many bytes from ``start`` on (up to ``end``) lie in a hole of
        the file (0 if the file system cannot say)."""
        file_end = min(end, self.file.size)
        if start >= file_end:
            return 0
        data_at = next_data(self.file, start, file_end)
        if data_at is None or data_at == start:
            return 0
        return data_at - start if data_at < file_end else end - start

    # -- the aliasing check

    def claim_metadata(self) -> None:
        """Claim the header, the descriptor and the grain directory: a grain
        table or grain in them is corruption."""
        self._metadata_claimed = True
        header = self.header
        self._claim_metadata(0, SECTOR, "the header")
        if header.desc_offset and header.desc_sectors:
            self._claim_metadata(header.desc_offset * SECTOR, header.desc_sectors * SECTOR,
                                 "the descriptor")
        if len(self._gd):
            self._claim_metadata(header.gd_offset * SECTOR, len(self._gd) * 4,
                                 "the grain directory")

    def _claim_metadata(self, offset: int, length: int, what: str) -> None:
        if offset >= self.file.size:
            return
        if not self._claims.claim(offset, length):
            raise FormatError(
                f"{what} at host offset {offset:#x} of '{self.file.name}' overlaps "
                f"{self._claimant(offset, length)} (a host unit mapped twice: the image is corrupt)"
            )
        self._metadata.append((offset, offset + length, what))

    def _claimant(self, host: int, length: int) -> str:
        """What claimed part of ``[host, host + length)`` already: metadata, or a grain."""
        for start, stop, what in self._metadata:
            if start < host + length and host < stop:
                return what
        found = self._grain_over(host, length, -1)
        return "another structure" if found is None else f"the grain of guest offset {found[0]:#x}"

    def _grain_over(self, host: int, length: int, guest: int) -> tuple[int, int] | None:
        """(guest offset, host offset) of a grain other than ``guest``'s that
        overlaps ``[host, host + length)``: every allocated grain table is
        read again, on the error path only."""
        grain_bytes, per_table = self.grain_bytes, self.header.gtes_per_gt
        other_length = SECTOR if self._stored & COMPRESSED else grain_bytes
        for index, table_sector in enumerate(self._gd):
            if not table_sector:
                continue
            try:
                table = self._read_table(index)
            except FormatError:
                continue
            for position, entry in enumerate(table):
                if entry == 0 or (entry == GTE_ZEROED and self.zero_grains):
                    continue
                other = self.disk_start + (index * per_table + position) * grain_bytes
                start = entry * SECTOR
                if other != guest and start < host + length and host < start + other_length:
                    return other, start
        return None

    def _claim_table(self, table: array[int], index: int) -> None:
        """Claim a grain table's sectors and the grains it maps, once:
        consecutive grains in one step."""
        if not self._metadata_claimed:
            self.claim_metadata()
        grain_bytes, per_table = self.grain_bytes, self.header.gtes_per_gt
        guest_base = self.disk_start + index * per_table * grain_bytes
        self._claim_metadata(self._gd[index] * SECTOR, self._gt_bytes,
                             f"the grain table of guest offset {guest_base:#x}")
        compressed = bool(self._stored & COMPRESSED)
        sectors = self.header.grain_sectors
        length = SECTOR if compressed else grain_bytes  # a compressed grain: its first sector
        file_size = self.file.size
        run_start = run_count = run_guest = 0
        follow = follow_index = -1
        for position, entry in enumerate(table):
            if entry == 0 or (entry == GTE_ZEROED and self.zero_grains):
                continue
            if entry == follow and position == follow_index and not compressed:
                run_count += 1
                follow += sectors
                follow_index += 1
                continue
            if entry * SECTOR >= file_size:
                continue  # reading that grain reports it
            if run_count:
                self._claim_grains(run_start, run_count, length, run_guest)
            run_start, run_count = entry, 1
            run_guest = guest_base + position * grain_bytes
            follow, follow_index = entry + sectors, position + 1
        if run_count:
            self._claim_grains(run_start, run_count, length, run_guest)

    def _claim_grains(self, sector: int, count: int, length: int, guest: int) -> None:
        """Claim ``count`` grains stored from ``sector`` on, mapped from ``guest`` on."""
        start = sector * SECTOR
        if self._claims.claim(start, (count - 1) * self.grain_bytes + length):
            return
        for number in range(count):  # which grain: the error path only
            host = start + number * self.grain_bytes
            at = guest + number * self.grain_bytes
            if not self._claims.claim(host, length):
                raise self._alias_error(host, length, at)
        raise AssertionError("a failed claim without a claimed grain")  # pragma: no cover

    def _alias_error(self, host: int, length: int, guest: int) -> FormatError:
        """Who else maps the sectors of the grain of ``guest``: metadata, or another grain."""
        for start, stop, what in self._metadata:
            if start < host + length and host < stop:
                overlap = max(host, start)
                return FormatError(metadata_alias_message(overlap, guest + overlap - host, what))
        found = self._grain_over(host, length, guest)
        if found is None:  # pragma: no cover - a claim always has a claimant
            return FormatError(f"host offset {host:#x} at guest offset {guest:#x} is mapped twice")
        other, start = found
        overlap = max(host, start)
        return FormatError(alias_message(overlap, guest + overlap - host, other + overlap - start))

    def runs(self, offset: int, length: int, disk_start: int) -> Iterator[Run]:
        """qemu's answers for ``[offset, offset + length)`` of the extent, at
        disk offsets: grain by grain (pieces of a grain), stored grains merged
        where they continue each other in the file, compressed ones alone."""
        if self.corruption is not None:
            raise FormatError(self.corruption)
        grain_bytes = self.grain_bytes
        per_table = self.header.gtes_per_gt
        end = offset + length
        pending: Run | None = None
        position = offset
        table_span = per_table * grain_bytes
        last_table = (end - 1) // table_span + 1 if end else 0
        table, current = None, -1  # the grain table of ``current``, once looked up
        while position < end:
            grain, within = divmod(position, grain_bytes)
            table_index, entry_index = divmod(grain, per_table)
            if table_index != current:
                following = self._next_table(table_index, last_table)
                if following == table_index:
                    table, current = self._tables.get(table_index), table_index
            if table_index != current:  # whole grain tables' worth are unallocated
                step = min(end, following * table_span) - position
                flags, host, unit = 0, 0, None
            else:
                assert table is not None
                entry = table[entry_index]
                if entry == 0:  # unallocated grains, up to the next entry that is not
                    stop = first_other(table, entry_index + 1, per_table, 0)
                    step = min(end, table_index * table_span + stop * grain_bytes) - position
                    flags, host, unit = 0, 0, None
                else:
                    step = min(end - position, grain_bytes - within)
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
        self._claims.close()
        self._checked.close()


_ZERO_SCAN = bytes(1 << 20)  # grain tables read at once when the file has no holes


def _zero_bytes(data: bytes) -> int:
    """How many bytes at the start of ``data`` (not all zeros) are zeros, by halving."""
    low, high = 0, len(data)  # the first nonzero byte lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if _ZERO_SCAN.startswith(data[low:middle]):
            low = middle
        else:
            high = middle
    return low


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
            if isinstance(extent, SparseExtent):
                extent.disk_start = total
            total += extent.length
        self.virtual_size = total
        self.descriptor = descriptor
        self.cid = descriptor.cid("CID") if descriptor is not None else None
        self.parent: Image | None = None
        self._parent_problem: str | None = None
        # The descriptor file and its resolver (None: a monolithic file),
        # kept for the in-place writer, which opens the extents again for
        # writing through the same resolver (`instar.formats.vmdk.guest_writes`).
        self.descriptor_file: InputFile | None = None
        self.resolver: Resolver | None = None

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
    descriptor = embedded_descriptor(file, SparseHeader.unpack(first))
    return VmdkDriver(file.name, [extent], descriptor)


def embedded_descriptor(file: InputFile, header: SparseHeader) -> Descriptor | None:
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
    driver = VmdkDriver(file.name, extents, descriptor)
    driver.descriptor_file, driver.resolver = file, resolver
    return driver


def _check_extent_sizes(lines: list[ExtentLine]) -> None:
    """The disk is no larger than qemu's largest (qemu's words for it), and
    every extent ends inside a file, before any extent is opened: offsets
    past 2^63 bytes cannot be read (qemu wraps them around and reads the
    start of the file)."""
    if sum(line.sectors for line in lines) * SECTOR > MAX_VIRTUAL_SIZE:
        raise FormatError("Could not refresh total sector count: File too large")
    for line in lines:
        end = ((line.offset or 0) + line.sectors) * SECTOR
        if end > MAX_DISK_BYTES:
            raise FormatError(
                f"Invalid extent line: extent '{line.name}' ends {end} bytes into its file, "
                "past the largest file offset"
            )


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
