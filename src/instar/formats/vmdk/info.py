"""What qemu says about a VMDK: ``qemu-img info`` (the `describe` hook) and
block status (for ``instar compare``).

The facts of qemu's ``vmdk_co_get_info`` and ``vmdk_get_specific_info``:
the create type, the content ids, the parent hint as backing file, and one
entry per extent. Only what opening already parsed is used.
"""

from __future__ import annotations

from collections.abc import Iterator

from instar.errors import FormatError
from instar.formats.base import (
    DATA,
    OFFSET_VALID,
    ZERO,
    ChildFile,
    FormatDetails,
    QValue,
    StatusRun,
)
from instar.formats.vmdk.layout import GTE_ZEROED
from instar.formats.vmdk.reader import DiskExtent, FlatExtent, SparseExtent, VmdkImage
from instar.image import Extent, ExtentKind, merge_extents

NO_PARENT_CID = 0xFFFFFFFF


def describe(image: VmdkImage) -> FormatDetails:
    """qemu-img info's facts about an open VMDK."""
    extents = image.disk_extents
    descriptor = image.descriptor
    cid = descriptor.cid("CID") if descriptor is not None else None
    parent_cid = descriptor.cid("parentCID") if descriptor is not None else None
    if cid is None or parent_cid is None:
        # qemu reads both from the descriptor when opening, and fails without
        # them with no message of its own (EINVAL).
        raise FormatError(f"Could not open '{image.name}': Invalid argument")
    hint = descriptor.parent_hint if descriptor is not None else None
    details = FormatDetails(
        backing_filename=hint,
        backing_format="vmdk" if hint else None,
        specific_type="vmdk",
        specific={
            "create-type": create_type(image),
            "cid": cid,
            "parent-cid": parent_cid,
            "extents": [extent_info(extent) for extent in extents],
        },
        # A monolithic file is its own only extent; other extent files are
        # children, which qemu's vmdk driver counts in "disk size".
        children=[
            ChildFile(f"extents.{index}", extent.file, counts_in_disk_size=True)
            for index, extent in enumerate(extents)
            if extent.kind
        ],
    )
    if all(_same_kind(extents[0], extent) for extent in extents[1:]):
        first = extents[0]
        details.cluster_size = first.grain_bytes if isinstance(first, SparseExtent) else None
    else:
        details.dirty = None  # qemu's get_info fails: no cluster size, no dirty flag
    return details


def create_type(image: VmdkImage) -> str:
    """qemu's create type: the descriptor's for a descriptor file; for a
    monolithic file "monolithicSparse" whatever its descriptor says; and
    "streamOptimized" once a compressed extent is seen."""
    descriptor = image.descriptor
    name = "monolithicSparse"
    if image.disk_extents[0].kind and descriptor is not None and descriptor.create_type:
        name = descriptor.create_type
    for extent in image.disk_extents:
        if isinstance(extent, SparseExtent) and extent.header.compressed:
            name = "streamOptimized"
    return name


def extent_info(extent: DiskExtent) -> dict[str, QValue]:
    """VmdkExtentInfo: the extent file's name as opened, its type and size."""
    info: dict[str, QValue] = {
        "filename": extent.file.name,
        "format": extent.kind,
        "virtual-size": extent.length,
    }
    if isinstance(extent, SparseExtent):
        info["cluster-size"] = extent.grain_bytes
        if extent.header.compressed:
            info["compressed"] = True
    return info


def _same_kind(a: DiskExtent, b: DiskExtent) -> bool:
    """qemu's ``vmdk_extents_type_eq``: flat alike, compression and grain alike."""
    if isinstance(a, SparseExtent) and isinstance(b, SparseExtent):
        return a.header.compressed == b.header.compressed and a.grain_bytes == b.grain_bytes
    return not isinstance(a, SparseExtent) and not isinstance(b, SparseExtent)


# ---------------------------------------------------------------------------
# Block status, as qemu's vmdk_co_block_status answers (instar compare)


def block_status(image: VmdkImage) -> Iterator[StatusRun]:
    """qemu's answers over the whole disk: a sparse extent answers grain by
    grain; a flat extent answers for the rest of the extent, cut where its
    file has data or holes (qemu asks the file, and adds ZERO over a hole;
    the RECURSE flag that makes it ask does not reach the caller)."""
    start = 0
    for extent in image.disk_extents:
        if isinstance(extent, SparseExtent):
            yield from _sparse_status(extent, start)
        else:
            yield from _flat_status(extent, start)
        start += extent.length


def _sparse_status(extent: SparseExtent, disk_start: int) -> Iterator[StatusRun]:
    grain = extent.grain_bytes
    per_table = extent.header.gtes_per_gt
    span = grain * per_table
    stored = DATA if extent.header.compressed else DATA | OFFSET_VALID
    pending: StatusRun | None = None
    for index in range(-(-extent.length // span)):
        table = extent.table(index)
        base = index * span
        if table is None or table.tobytes() == bytes(4 * len(table)):
            pieces = [(base, min(extent.length, base + span), 0)]
        else:
            pieces = []
            for entry_index in range(min(per_table, -(-(extent.length - base) // grain))):
                entry = table[entry_index]
                if entry == 0:
                    flags = 0
                elif entry == GTE_ZEROED and extent.zero_grains:
                    flags = ZERO
                else:
                    flags = stored
                first = base + entry_index * grain
                pieces.append((first, min(extent.length, first + grain), flags))
        for first, end, flags in pieces:
            if pending is not None and pending.flags == flags and pending.end == disk_start + first:
                pending = pending._replace(end=disk_start + end)
                continue
            if pending is not None:
                yield pending
            pending = StatusRun(disk_start + first, disk_start + end, flags, grain,
                                disk_start)
    if pending is not None:
        yield pending


def _flat_status(extent: FlatExtent, disk_start: int) -> Iterator[StatusRun]:
    flags = DATA | OFFSET_VALID
    raw = extent.raw
    inside = max(0, min(extent.length, raw.virtual_size - extent.start))
    end = disk_start + extent.length
    runs = merge_extents(
        Extent(e.offset, e.length, ExtentKind.DATA if e.kind is ExtentKind.DATA
               else ExtentKind.ZERO)
        for e in raw.extents(extent.start, inside)
    ) if inside else iter(())
    for run in runs:
        start = disk_start + run.offset - extent.start
        if run.kind is ExtentKind.DATA:
            yield StatusRun(start, start + run.length, flags)
        elif run.end == raw.virtual_size:
            # A hole up to the end of the file: qemu's answer runs on to the
            # end of the extent.
            yield StatusRun(start, end, flags | ZERO)
            return
        else:
            yield StatusRun(start, start + run.length, flags | ZERO)
    if inside < extent.length:
        yield StatusRun(disk_start + inside, end, flags | ZERO)
