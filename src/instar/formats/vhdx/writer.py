"""Writing VHDX images sequentially, laid out as ``qemu-img create -f vhdx`` does.

Layout (offsets in MiB, for the default 1 MiB log and a BAT up to 1 MiB)::

    0  header section (identifier, 2 headers, 2 region tables)
    1  log (empty: log GUID zero)
    2  BAT                 3  metadata region (1 MiB)
    8  payload blocks, allocated in the order data arrives

Dynamic images allocate a block the first time data lands in it; blocks that
only ever see zeros stay unallocated, in the ZERO state (qemu's default
``block_state_zero=on``) or NOT_PRESENT (``block_state_zero=off``). Fixed
images place block i at ``data start + i * block size`` and mark every block
FULLY_PRESENT. All metadata is written by ``close``; memory is the BAT, 8 bytes
per block, capped by `MAX_TABLE_BYTES`.
"""

from __future__ import annotations

import os
from array import array

from instar.errors import UsageError
from instar.files import pwrite_all, write_zeros
from instar.formats.base import SECTOR, Measurement, MeasureSource, OutputFile, ParsedOptions
from instar.formats.common import pack_table, unit_spans
from instar.formats.vhdx import layout
from instar.formats.vhdx.layout import Geometry, MiB
from instar.runtime_types import NamedTuple
from instar.safety import MAX_TABLE_BYTES
from instar.sizes import round_up

_UINT32_MAX = (1 << 32) - 1

PHYSICAL_SECTOR = 512  # what qemu-img writes (Hyper-V itself uses 4096)


class VhdxOptions(NamedTuple):
    """Creation options after qemu's silent rounding (sizes up to whole MiB)."""

    block_size: int | None  # None: chosen by virtual size
    log_size: int
    block_state_zero: bool
    fixed: bool


def check_options(options: ParsedOptions) -> VhdxOptions:
    """What the parsed ``-o`` options mean, checked as qemu's vhdx driver checks
    them, with its messages."""
    rounded = min(round_up(options.number("block_size"), MiB), layout.MAX_BLOCK_SIZE)
    block_size = rounded or None  # 0 means "by size"
    if block_size is not None and not layout.is_power_of_two(block_size):
        raise UsageError("Block size must be a power of two")
    log_size = round_up(options.number("log_size"), MiB)
    if log_size > _UINT32_MAX:
        raise UsageError("Log size must be smaller than 4 GB")
    if log_size < MiB:
        raise UsageError("Log size must be a multiple of 1 MB")
    zero = options.flag("block_state_zero")
    subformat = options.text("subformat")
    if subformat not in ("dynamic", "fixed"):
        raise UsageError(f"Parameter 'subformat' does not accept value '{subformat}'")
    return VhdxOptions(block_size, log_size, zero, subformat == "fixed")


def default_block_size(virtual_size: int) -> int:
    """qemu's choice, made to keep the BAT small: 8, 16, 32 or 64 MiB."""
    if virtual_size > 32 * layout.TiB:
        return 64 * MiB
    if virtual_size > 100 * (1 << 30):
        return 32 * MiB
    if virtual_size > 1 << 30:
        return 16 * MiB
    return 8 * MiB


class Plan(NamedTuple):
    """Where every structure of a new image goes."""

    geometry: Geometry
    log_offset: int
    log_length: int
    bat_offset: int
    bat_length: int
    metadata_offset: int
    metadata_length: int
    data_start: int
    fixed: bool
    block_state_zero: bool

    @property
    def metadata_end(self) -> int:
        return self.metadata_offset + self.metadata_length

    def allocated_length(self, block: int) -> int:
        """File bytes payload block ``block`` takes once allocated (whole MiBs)."""
        return round_up(self.geometry.block_length(block), MiB)

    def file_size(self, allocated: int) -> int:
        """The file's length with ``allocated`` bytes of payload blocks in it.

        A fixed image holds every block, allocated or not; a dynamic one its
        metadata, then its blocks from ``data_start`` on."""
        if self.fixed and self.geometry.virtual_size:
            return self.data_start + round_up(self.geometry.virtual_size, MiB)
        return max(self.metadata_end, self.data_start + allocated if allocated else 0)


def plan_layout(virtual_size: int, opts: VhdxOptions) -> Plan:
    """The layout qemu-img would write, except for an empty disk.

    qemu sizes the BAT of a 0-byte disk from an unsigned underflow (64 MiB of
    BAT written out, a 74 MB file) and refuses to open a disk whose BAT region
    is smaller than that underflow asks (it also refuses 4096-byte logical
    sectors). instar gives such a disk 1 MiB blocks (whatever was asked: an
    empty disk has no blocks), where the underflow asks for just under 8 MiB of BAT, and leaves that
    region a hole: an 11 MiB sparse file qemu opens and checks clean.
    """
    if virtual_size > layout.MAX_VIRTUAL_SIZE:
        raise UsageError("Image size too large; max of 64TB")
    if virtual_size == 0:
        geometry = Geometry(0, layout.MIN_BLOCK_SIZE, 512)
        qemu_entries = 0xFFFFFFFF >> (geometry.chunk_ratio.bit_length() - 1)
        bat_bytes = qemu_entries * 8
    else:
        block_size = opts.block_size or default_block_size(virtual_size)
        geometry = Geometry(virtual_size, block_size, 512)
        bat_bytes = geometry.bat_entries(differencing=False) * 8
    if bat_bytes > MAX_TABLE_BYTES:
        raise UsageError(
            f"the BAT for {virtual_size} bytes in {geometry.block_size}-byte blocks would be "
            f"{bat_bytes} bytes, over instar's limit of {MAX_TABLE_BYTES}; use a larger block_size"
        )
    log_offset = layout.HEADER_SECTION_SIZE
    bat_offset = round_up(log_offset + opts.log_size, MiB)
    bat_length = max(MiB, round_up(bat_bytes, MiB))
    metadata_offset = bat_offset + bat_length
    return Plan(
        geometry=geometry,
        log_offset=log_offset,
        log_length=opts.log_size,
        bat_offset=bat_offset,
        bat_length=bat_length,
        metadata_offset=metadata_offset,
        metadata_length=MiB,
        data_start=metadata_offset + 5 * MiB,  # qemu leaves 4 MiB for metadata to grow
        fixed=opts.fixed,
        block_state_zero=opts.block_state_zero,
    )


class VhdxWriter:
    """Writes one VHDX image from data arriving in increasing offsets."""

    def __init__(self, out: OutputFile, plan: Plan, creator: str) -> None:
        self._out = out
        self._plan = plan
        self._geometry = plan.geometry
        self._creator = creator
        blocks = plan.geometry.payload_blocks
        self._payload = array("Q", bytes(8)) * blocks  # BAT entries of payload blocks
        if plan.fixed:
            size = plan.geometry.block_size
            for block in range(blocks):
                offset = plan.data_start + block * size
                self._payload[block] = layout.bat_entry(offset, layout.PAYLOAD_FULLY_PRESENT)
        elif plan.block_state_zero and blocks:
            self._payload = array("Q", [layout.PAYLOAD_ZERO]) * blocks
        self._next_free = plan.data_start  # where the next block goes

    # -- data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for block, within, start, step in unit_spans(offset, len(data), self._geometry.block_size):
            self._pwrite(self._block_offset(block, within) + within, view[start : start + step])

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to do in a new file; a block device needs the zeros written."""
        if not self._out.in_place:
            return
        length = min(offset + length, self._geometry.virtual_size) - offset
        for block, within, _, step in unit_spans(offset, length, self._geometry.block_size):
            entry = self._payload[block]
            if entry & layout.STATE_MASK == layout.PAYLOAD_FULLY_PRESENT:
                self._zero_fill(entry & layout.OFFSET_MASK, within, step)

    def _block_offset(self, block: int, first_write: int) -> int:
        """File offset of ``block``, allocating it at the end of the file if new."""
        entry = self._payload[block]
        if entry & layout.STATE_MASK == layout.PAYLOAD_FULLY_PRESENT:
            return int(entry & layout.OFFSET_MASK)
        file_offset = self._next_free
        self._next_free += self._plan.allocated_length(block)
        self._payload[block] = layout.bat_entry(file_offset, layout.PAYLOAD_FULLY_PRESENT)
        if self._out.in_place and first_write:
            # Earlier zeros of this block were declared before it existed.
            self._zero_fill(file_offset, 0, first_write)
        return file_offset

    def _zero_fill(self, block_offset: int, within: int, length: int) -> None:
        write_zeros(self._out.fd, block_offset + within, length)

    def _pwrite(self, offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self._out.fd, data, offset)

    # -- metadata

    def close(self) -> None:
        plan = self._plan
        self._pwrite(layout.FILE_ID_OFFSET, layout.encode_file_identifier(self._creator))
        header = layout.Header(
            sequence_number=1,
            file_write_guid=os.urandom(16),
            data_write_guid=os.urandom(16),
            log_length=plan.log_length,
            log_offset=plan.log_offset,
        )
        self._pwrite(layout.HEADER_OFFSETS[0], header.encode())
        second = layout.Header(
            2,
            header.file_write_guid,
            header.data_write_guid,
            log_length=plan.log_length,
            log_offset=plan.log_offset,
        )
        self._pwrite(layout.HEADER_OFFSETS[1], second.encode())
        table = layout.encode_region_table(
            [
                layout.RegionEntry(layout.BAT_REGION, plan.bat_offset, plan.bat_length),
                layout.RegionEntry(
                    layout.METADATA_REGION, plan.metadata_offset, plan.metadata_length
                ),
            ]
        )
        for offset in layout.REGION_TABLE_OFFSETS:
            self._pwrite(offset, table)
        self._pwrite(plan.bat_offset, self._bat_bytes())
        metadata_table, items = layout.encode_metadata(self._metadata_items())
        self._pwrite(plan.metadata_offset, metadata_table)
        self._pwrite(plan.metadata_offset + layout.METADATA_TABLE_SIZE, items)
        if not self._out.in_place:
            os.ftruncate(self._out.fd, self._file_size())

    def _bat_bytes(self) -> bytes:
        """The BAT with a (not present) sector bitmap entry after every chunk."""
        geometry = self._geometry
        total = geometry.bat_entries(differencing=False)
        bat = array("Q", bytes(8)) * total
        ratio = geometry.chunk_ratio
        for start in range(0, len(self._payload), ratio):
            chunk = self._payload[start : start + ratio]
            index = geometry.payload_index(start)
            bat[index : index + len(chunk)] = chunk
        return pack_table(bat, 8, "little")

    def _metadata_items(self) -> list[tuple[bytes, int, bytes]]:
        geometry = self._geometry
        params = layout.FileParameters(
            geometry.block_size, leave_blocks_allocated=self._plan.fixed, has_parent=False
        )
        required = layout.META_IS_REQUIRED
        disk = layout.META_IS_REQUIRED | layout.META_IS_VIRTUAL_DISK
        return [
            (layout.FILE_PARAMETERS, required, layout.encode_file_parameters(params)),
            (layout.VIRTUAL_DISK_SIZE, disk, layout.U64.pack(geometry.virtual_size)),
            (layout.PAGE83_DATA, disk, os.urandom(16)),
            (layout.LOGICAL_SECTOR_SIZE, disk, layout.U32.pack(geometry.logical_sector_size)),
            (layout.PHYSICAL_SECTOR_SIZE, disk, layout.U32.pack(PHYSICAL_SECTOR)),
        ]

    def _file_size(self) -> int:
        return self._plan.file_size(self._next_free - self._plan.data_start)

    def abort(self) -> None:
        pass


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """What ``measure -O vhdx`` answers (qemu 7.2 has no figures for vhdx), by
    the writer's own `Plan`: a dynamic image holds its metadata and each block
    with data (the last one to whole MiBs), a fixed one every block, allocated
    or not (as qemu counts raw)."""
    length = source.virtual_size if source is not None else size
    plan = plan_layout(round_up(length, SECTOR), check_options(options))
    block_size = plan.geometry.block_size
    blocks = plan.geometry.payload_blocks
    if not blocks:
        return Measurement(plan.file_size(0), plan.file_size(0))
    # Every block but the last is whole; the last one may be short.
    last = (blocks - 1) * block_size
    fully = plan.file_size(last + plan.allocated_length(blocks - 1))
    if plan.fixed or source is None:
        return Measurement(fully if plan.fixed else plan.file_size(0), fully)
    used = source.data_units(block_size, 0, last) * block_size
    if source.data_units(block_size, last):
        used += plan.allocated_length(blocks - 1)
    return Measurement(plan.file_size(used), fully)


def create(out: OutputFile, virtual_size: int, options: ParsedOptions) -> VhdxWriter:
    """Check the options, plan the layout and return a writer (nothing written yet)."""
    from instar import __version__

    plan = plan_layout(virtual_size, check_options(options))
    return VhdxWriter(out, plan, f"instar v{__version__}")
