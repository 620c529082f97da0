"""Writing VMDK: monolithicSparse (as qemu-img creates it) and streamOptimized.

Both writers take data in increasing offsets and allocate grains in that
order, so only one grain table lives in memory at a time. All-zero grains are
never allocated (grain table entry 0): a new image reads them as zeros.

monolithicSparse lays the file out as qemu does: header, embedded descriptor
(20 sectors), redundant GD and GTs, primary GD and GTs, padding to a grain
boundary, then grains. Every GT has a fixed place, so each is written once
when the copy moves past it.

streamOptimized follows VMware's stream layout, which qemu reads through the
footer: header (``gd_offset = GD_AT_END``), descriptor, then compressed grains
each behind a grain marker, each non-empty GT behind a GT marker once its
grains are written, the GD behind a GD marker, a footer marker and footer
(the header with the real GD offset), and an end-of-stream marker. Grains are
deflated (zlib format, as qemu's ``compress()``) on a small thread pool and
written in order.
"""

from __future__ import annotations

import os
import zlib
from array import array

from instar.errors import OutputError, UnsupportedError, UsageError
from instar.files import pwrite_all, write_zeros
from instar.formats.base import Measurement, MeasureSource, OutputFile, ParsedOptions
from instar.formats.common import CompressionPool, UnitSequencer, pack_table
from instar.formats.preallocation import file_mode
from instar.formats.vmdk.layout import (
    COMPRESSION_DEFLATE,
    DEFAULT_DESC_SECTORS,
    DEFAULT_GRAIN_SECTORS,
    DEFAULT_GTES_PER_GT,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_DETECT,
    FLAG_RGD,
    FLAG_ZERO_GRAIN,
    GD_AT_END,
    GRAIN_MARKER,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GRAIN_DIRECTORY,
    MARKER_GRAIN_TABLE,
    MAX_EXTENT_SECTORS,
    SECTOR,
    DescriptorSpec,
    ExtentLine,
    SparseHeader,
    build_descriptor,
    gd_entries,
    metadata_marker,
    safe_extent_name,
    sectors_for,
)
from instar.runtime_types import NamedTuple
from instar.safety import MAX_TABLE_BYTES

SUBFORMATS_WRITTEN = ("monolithicSparse", "streamOptimized")
SUBFORMATS_NOT_YET = ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")

GRAIN_BYTES = DEFAULT_GRAIN_SECTORS * SECTOR
GT_BYTES = DEFAULT_GTES_PER_GT * 4
GT_SECTORS = sectors_for(GT_BYTES)
GT_COVERS = GRAIN_BYTES * DEFAULT_GTES_PER_GT  # bytes of disk one grain table maps
# The GD is kept in memory by the stream writer: cap it like any metadata table.
MAX_VIRTUAL_SIZE = (MAX_TABLE_BYTES // 4) * GT_COVERS
_WRITE_BUFFER = 1 << 20  # stream output is gathered into writes of about this size
COMPRESS_LEVEL = zlib.Z_DEFAULT_COMPRESSION  # what qemu's compress() uses
# zlib's compressBound: no grain deflates to more, however random its bytes.
MAX_COMPRESSED_GRAIN = (GRAIN_BYTES + (GRAIN_BYTES >> 12) + (GRAIN_BYTES >> 14)
                        + (GRAIN_BYTES >> 25) + 13)
NAME_MAX = 255  # the longest file name, for a descriptor measured before its file exists


class VmdkCreateOptions(NamedTuple):
    """Validated ``-o`` options (and ``-c``) for a new VMDK."""

    subformat: str
    adapter_type: str
    hw_version: str
    tools_version: str
    zeroed_grain: bool
    parent_cid: int = 0xFFFFFFFF  # qemu's "no parent"
    parent_hint: str | None = None  # the backing file's name, as given

    @property
    def stream(self) -> bool:
        return self.subformat == "streamOptimized"


def check_options(options: ParsedOptions) -> VmdkCreateOptions:
    """What the parsed options (and ``-c``) mean for a new VMDK, checked before
    anything is written; qemu's wording where it has one."""
    subformat = options.text("subformat")
    if subformat not in SUBFORMATS_WRITTEN + SUBFORMATS_NOT_YET:
        raise UsageError(f"invalid parameter value: {subformat}")
    if subformat in SUBFORMATS_NOT_YET:
        raise UnsupportedError(
            f"vmdk subformat '{subformat}' is not supported yet "
            f"(instar writes {' and '.join(SUBFORMATS_WRITTEN)})"
        )
    if options.compress:
        if "subformat" in options.given and subformat != "streamOptimized":
            raise UsageError("compression (-c) needs vmdk subformat=streamOptimized")
        subformat = "streamOptimized"
    adapter = options.text("adapter_type")
    if adapter not in ADAPTER_TYPES:
        raise UsageError(f"invalid parameter value: {adapter}")
    hw_version = options.text("hwversion")
    if options.flag("compat6"):
        if hw_version != "undefined":
            raise UsageError("compat6 cannot be enabled with hwversion set")
        hw_version = "6"
    file_mode(options)  # qemu then creates the file: its mode checked, then rewritten
    backing = options.backing  # a vmdk whose CID create read (`create._vmdk_parent`)
    return VmdkCreateOptions(
        subformat=subformat,
        adapter_type=adapter,
        hw_version="4" if hw_version == "undefined" else hw_version,
        tools_version=options.text("toolsversion"),
        zeroed_grain=options.flag("zeroed_grain"),
        parent_cid=0xFFFFFFFF if backing is None else backing.cid or 0,
        parent_hint=None if backing is None else backing.name,
    )


def check_size(virtual_size: int) -> None:
    """Refuse sizes whose metadata would not fit (qemu creates files it cannot open)."""
    if virtual_size > MAX_VIRTUAL_SIZE:
        raise UsageError(
            f"Image size too large for vmdk: at most {MAX_VIRTUAL_SIZE} bytes "
            f"({MAX_VIRTUAL_SIZE >> 40} TiB)"
        )


def descriptor_for(target: str, capacity: int, opts: VmdkCreateOptions) -> bytes:
    """The embedded descriptor qemu-img create would write for an image named ``target``."""
    heads = 16 if opts.adapter_type == "ide" else 255
    name = safe_extent_name(os.path.basename(target))
    return build_descriptor(
        DescriptorSpec(
            cid=int.from_bytes(os.urandom(4), "little"),  # random, as qemu's
            create_type=opts.subformat,
            extents=(ExtentLine("RW", capacity, "SPARSE", name, None),),
            hw_version=opts.hw_version,
            cylinders=capacity * SECTOR // (63 * heads * SECTOR),
            heads=heads,
            adapter_type=opts.adapter_type,
            tools_version=opts.tools_version,
            parent_cid=opts.parent_cid,
            parent_hint=opts.parent_hint,
        )
    )


def stream_overhead(descriptor: bytes) -> int:
    """Sectors before a stream's first grain: header and descriptor, to a grain."""
    desc_sectors = max(DEFAULT_DESC_SECTORS, sectors_for(len(descriptor)))
    return -(-(1 + desc_sectors) // DEFAULT_GRAIN_SECTORS) * DEFAULT_GRAIN_SECTORS


def stream_size(overhead: int, grains: int, tables: int, gt_count: int) -> int:
    """The most a stream file holding ``grains`` grains in ``tables`` grain tables
    takes: each grain behind its marker at its worst compression, each table
    behind its marker, then the GD, footer and end-of-stream markers (`StreamWriter`)."""
    grain_sectors = sectors_for(GRAIN_MARKER.size + MAX_COMPRESSED_GRAIN)
    table_sectors = 1 + GT_SECTORS
    tail = 1 + sectors_for(4 * gt_count) + 1 + 1 + 1  # GD marker, GD, footer marker, footer, EOS
    return (overhead + grains * grain_sectors + tables * table_sectors + tail) * SECTOR


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """What ``measure -O vmdk`` answers (qemu 7.2 has no figures for vmdk),
    from the writers' own layouts: monolithicSparse's metadata (`SparseLayout`)
    and one grain per grain with data; streamOptimized's header, each grain at
    zlib's worst and each grain table with data (`stream_size`). Fully
    allocated: every grain (and table) stored."""
    opts = check_options(options)
    length = source.virtual_size if source is not None else size
    virtual_size = -(-length // SECTOR) * SECTOR
    check_size(virtual_size)
    capacity = sectors_for(virtual_size)
    descriptor = descriptor_for("x" * NAME_MAX, capacity, opts)
    grains = -(-capacity // DEFAULT_GRAIN_SECTORS)
    used = source.data_units(GRAIN_BYTES) if source is not None else 0
    if opts.stream:
        gt_count = gd_entries(capacity, DEFAULT_GRAIN_SECTORS, DEFAULT_GTES_PER_GT)
        overhead = stream_overhead(descriptor)
        tables = source.data_units(GT_COVERS) if source is not None else 0
        return Measurement(stream_size(overhead, used, tables, gt_count),
                           stream_size(overhead, grains, gt_count, gt_count))
    layout = SparseLayout.compute(capacity, len(descriptor))
    return Measurement((layout.overhead + used * DEFAULT_GRAIN_SECTORS) * SECTOR,
                       (layout.overhead + grains * DEFAULT_GRAIN_SECTORS) * SECTOR)


class _FileOut:
    """Positioned writes into the output, plus explicit zeros for block devices."""

    def __init__(self, out: OutputFile) -> None:
        self.out = out

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        pwrite_all(self.out.fd, data, offset)

    def zero_fill(self, start: int, end: int) -> None:
        """Zeros over [start, end) where a fresh file would not have them already."""
        if self.out.in_place:
            write_zeros(self.out.fd, start, end - start)


class _GrainWriter:
    """What both writers share: the descriptor, one grain table in memory, and
    writes turned into runs of whole, non-zero grains.

    Subclasses allocate: ``_emit_run(first_grain, data)`` gets whole grains,
    contiguous in the disk (see `UnitSequencer` for how long ``data`` lives).
    """

    def __init__(self, out: OutputFile, virtual_size: int, opts: VmdkCreateOptions) -> None:
        self._grains = UnitSequencer(GRAIN_BYTES, virtual_size, self._emit_run)
        self._file = _FileOut(out)
        self._capacity = sectors_for(virtual_size)
        self._descriptor = descriptor_for(out.name, self._capacity, opts)
        self._gt_index = 0  # the grain table in memory
        self._gt = array("I", bytes(GT_BYTES))
        self._gt_dirty = False

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._grains.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to store: a new image reads as zeros (grain table entry 0)."""
        self._grains.write_zeroes(offset, length)

    def _emit_run(self, first: int, data: memoryview) -> None:
        raise NotImplementedError


class SparseLayout(NamedTuple):
    """Where each structure of a qemu-style monolithicSparse file goes (in sectors)."""

    capacity: int
    gt_count: int
    gd_sectors: int
    desc_offset: int
    desc_sectors: int
    rgd_offset: int
    gd_offset: int
    overhead: int

    @classmethod
    def compute(cls, capacity: int, descriptor_bytes: int) -> SparseLayout:
        gt_count = gd_entries(capacity, DEFAULT_GRAIN_SECTORS, DEFAULT_GTES_PER_GT)
        gd_sectors = sectors_for(gt_count * 4)
        desc_sectors = max(DEFAULT_DESC_SECTORS, sectors_for(descriptor_bytes))
        rgd_offset = 1 + desc_sectors
        gd_offset = rgd_offset + gd_sectors + GT_SECTORS * gt_count
        end = gd_offset + gd_sectors + GT_SECTORS * gt_count
        overhead = -(-end // DEFAULT_GRAIN_SECTORS) * DEFAULT_GRAIN_SECTORS
        return cls(capacity, gt_count, gd_sectors, 1, desc_sectors, rgd_offset, gd_offset, overhead)

    def gt_sector(self, directory: int, index: int) -> int:
        """Sector of grain table ``index`` behind the GD at ``directory``."""
        return directory + self.gd_sectors + index * GT_SECTORS


def _header_descriptor_fields(capacity: int, desc_sectors: int) -> tuple[int, int]:
    """(desc_offset, desc_sectors) for the header.

    qemu reads a header with capacity 0 and a descriptor offset as a text
    descriptor and then refuses it ("Unsupported image type"); with offset 0
    it opens the empty disk, still finding the descriptor at sector 1 as it
    always does. So an empty image records no descriptor offset.
    """
    return (0, 0) if capacity == 0 else (1, desc_sectors)


class SparseWriter(_GrainWriter):
    """monolithicSparse, laid out exactly as ``qemu-img create -f vmdk`` does."""

    def __init__(self, out: OutputFile, virtual_size: int, opts: VmdkCreateOptions) -> None:
        super().__init__(out, virtual_size, opts)
        capacity, descriptor = self._capacity, self._descriptor
        self._layout = layout = SparseLayout.compute(capacity, len(descriptor))
        desc_offset, desc_sectors = _header_descriptor_fields(capacity, layout.desc_sectors)
        flags = FLAG_NL_DETECT | FLAG_RGD | (FLAG_ZERO_GRAIN if opts.zeroed_grain else 0)
        header = SparseHeader(
            version=2 if opts.zeroed_grain else 1,
            flags=flags,
            capacity=capacity,
            grain_sectors=DEFAULT_GRAIN_SECTORS,
            desc_offset=desc_offset,
            desc_sectors=desc_sectors,
            gtes_per_gt=DEFAULT_GTES_PER_GT,
            rgd_offset=layout.rgd_offset,
            gd_offset=layout.gd_offset,
            overhead=layout.overhead,
        )
        self._next_sector = layout.overhead  # where the next grain goes
        self._gts_done = 0  # grain tables before this one are on disk
        self._write_metadata(header, descriptor)

    def _write_metadata(self, header: SparseHeader, descriptor: bytes) -> None:
        layout = self._layout
        region = bytearray(header.pack())
        region += descriptor.ljust(layout.desc_sectors * SECTOR, b"\0")
        self._file.pwrite(0, region)
        for directory in (layout.rgd_offset, layout.gd_offset):
            self._write_directory(directory)
        end = layout.overhead * SECTOR
        if not self._file.out.in_place:
            os.ftruncate(self._file.out.fd, end)
        gd_end = (layout.gd_offset + layout.gd_sectors + GT_SECTORS * layout.gt_count) * SECTOR
        self._file.zero_fill(gd_end, end)

    def _write_directory(self, directory: int) -> None:
        """A grain directory: entries are computable, so write it in bounded chunks."""
        layout = self._layout
        per_chunk = 1 << 18
        for first in range(0, layout.gt_count, per_chunk):
            count = min(per_chunk, layout.gt_count - first)
            start = layout.gt_sector(directory, first)
            last = first + count == layout.gt_count  # pad the last chunk to whole sectors
            data = pack_table(
                range(start, start + count * GT_SECTORS, GT_SECTORS), 4, "little",
                size=layout.gd_sectors * SECTOR - first * 4 if last else 0,
            )
            self._file.pwrite(directory * SECTOR + first * 4, data)

    def _emit_run(self, first: int, data: memoryview) -> None:
        count = len(data) // GRAIN_BYTES
        if self._next_sector + count * DEFAULT_GRAIN_SECTORS > MAX_EXTENT_SECTORS:
            raise OutputError("vmdk image is full: grain offsets are limited to 2 TiB of data")
        self._file.pwrite(self._next_sector * SECTOR, data)
        for grain in range(first, first + count):
            self._set_entry(grain, self._next_sector)
            self._next_sector += DEFAULT_GRAIN_SECTORS

    def _set_entry(self, grain: int, sector: int) -> None:
        table, index = divmod(grain, DEFAULT_GTES_PER_GT)
        if table != self._gt_index:
            self._flush_gt()
            self._gt_index = table
        self._gt[index] = sector
        self._gt_dirty = True

    def _flush_gt(self) -> None:
        """Write the table in memory to both directories' places, then start afresh."""
        layout = self._layout
        if self._file.out.in_place:
            self._zero_gts(self._gts_done, self._gt_index)
        if self._gt_dirty:
            data = pack_table(self._gt, 4, "little")
            for directory in (layout.rgd_offset, layout.gd_offset):
                self._file.pwrite(layout.gt_sector(directory, self._gt_index) * SECTOR, data)
        elif self._file.out.in_place:
            self._zero_gts(self._gt_index, self._gt_index + 1)
        self._gts_done = self._gt_index + 1
        self._gt = array("I", bytes(GT_BYTES))
        self._gt_dirty = False

    def _zero_gts(self, first: int, end: int) -> None:
        layout = self._layout
        for directory in (layout.rgd_offset, layout.gd_offset):
            self._file.zero_fill(
                layout.gt_sector(directory, first) * SECTOR,
                layout.gt_sector(directory, end) * SECTOR,
            )

    def close(self) -> None:
        self._grains.flush()
        if self._layout.gt_count:
            self._flush_gt()
            if self._file.out.in_place:
                self._zero_gts(self._gts_done, self._layout.gt_count)

    def abort(self) -> None:
        pass


def _compress(grain: memoryview) -> bytes:
    return zlib.compress(grain, COMPRESS_LEVEL)


class StreamWriter(_GrainWriter):
    """streamOptimized in VMware's stream layout (footer and end-of-stream marker)."""

    def __init__(self, out: OutputFile, virtual_size: int, opts: VmdkCreateOptions) -> None:
        super().__init__(out, virtual_size, opts)
        capacity, descriptor = self._capacity, self._descriptor
        desc_sectors = max(DEFAULT_DESC_SECTORS, sectors_for(len(descriptor)))
        overhead = stream_overhead(descriptor)
        desc_offset, header_desc_sectors = _header_descriptor_fields(capacity, desc_sectors)
        self._header = SparseHeader(
            version=3,
            flags=FLAG_NL_DETECT
            | FLAG_COMPRESSED
            | FLAG_MARKERS
            | (FLAG_ZERO_GRAIN if opts.zeroed_grain else 0),
            capacity=capacity,
            grain_sectors=DEFAULT_GRAIN_SECTORS,
            desc_offset=desc_offset,
            desc_sectors=header_desc_sectors,
            gtes_per_gt=DEFAULT_GTES_PER_GT,
            rgd_offset=0,
            gd_offset=GD_AT_END,
            overhead=overhead,
            compression=COMPRESSION_DEFLATE,
        )
        self._gt_count = gd_entries(capacity, DEFAULT_GRAIN_SECTORS, DEFAULT_GTES_PER_GT)
        self._gd = array("I", bytes(4 * self._gt_count))
        self._offset = overhead * SECTOR  # where the buffered bytes start
        self._buffer = bytearray()
        self._pool = CompressionPool(
            GRAIN_BYTES, lambda: _compress, self._store_grain, name="instar-vmdk"
        )
        region = self._header.pack() + descriptor.ljust(desc_sectors * SECTOR, b"\0")
        self._file.pwrite(0, region)
        self._file.zero_fill(len(region), overhead * SECTOR)

    def _emit_run(self, first: int, data: memoryview) -> None:
        self._pool.submit(first, data)

    def _store_grain(self, index: int, grain: memoryview, compressed: bytes) -> None:
        """Write a compressed grain, in grain order: marker, data, padding to a sector."""
        table, entry = divmod(index, DEFAULT_GTES_PER_GT)
        if table != self._gt_index:
            self._emit_gt()
            self._gt_index = table
        sector = self._sector()
        if sector + sectors_for(GRAIN_MARKER.size + len(compressed)) > MAX_EXTENT_SECTORS:
            raise OutputError("vmdk image is full: grain offsets are limited to 2 TiB of data")
        self._gt[entry] = sector
        self._gt_dirty = True
        record = GRAIN_MARKER.pack(index * DEFAULT_GRAIN_SECTORS, len(compressed)) + compressed
        self._append(record)

    def _sector(self) -> int:
        return (self._offset + len(self._buffer)) // SECTOR

    def _append(self, record: bytes) -> None:
        """Buffer ``record`` padded to a sector; write out once the buffer is large."""
        self._buffer += record
        padding = -len(record) % SECTOR
        if padding:
            self._buffer += bytes(padding)
        if len(self._buffer) >= _WRITE_BUFFER:
            self._drain()

    def _drain(self) -> None:
        if self._buffer:
            self._file.pwrite(self._offset, self._buffer)
            self._offset += len(self._buffer)
            self._buffer = bytearray()

    def _emit_gt(self) -> None:
        """The grain table in memory behind a GT marker (skipped when it maps nothing)."""
        if self._gt_dirty:
            self._append(metadata_marker(GT_SECTORS, MARKER_GRAIN_TABLE))
            self._gd[self._gt_index] = self._sector()
            self._append(pack_table(self._gt, 4, "little"))
        self._gt = array("I", bytes(GT_BYTES))
        self._gt_dirty = False

    def close(self) -> None:
        self._grains.flush()
        self._pool.finish()
        self._pool.close()
        self._emit_gt()
        gd_bytes = pack_table(self._gd, 4, "little")
        self._append(metadata_marker(sectors_for(len(gd_bytes)), MARKER_GRAIN_DIRECTORY))
        gd_sector = self._sector()
        if gd_bytes:
            self._append(gd_bytes)
        self._append(metadata_marker(1, MARKER_FOOTER))
        self._append(self._header.with_gd_offset(gd_sector).pack())
        self._append(metadata_marker(0, MARKER_EOS))
        self._drain()

    def abort(self) -> None:
        self._pool.close()


def create_writer(
    out: OutputFile, virtual_size: int, options: ParsedOptions
) -> SparseWriter | StreamWriter:
    """Validate everything first, then start the writer (which writes the header)."""
    opts = check_options(options)
    check_size(virtual_size)
    if opts.stream and out.in_place:
        raise UnsupportedError(
            "a streamOptimized vmdk cannot be written to a block device: "
            "its footer must end the file"
        )
    if opts.stream:
        return StreamWriter(out, virtual_size, opts)
    return SparseWriter(out, virtual_size, opts)
