"""What ``qemu-img info`` says about a VMDK (the `describe` hook).

The facts of qemu's ``vmdk_co_get_info`` and ``vmdk_get_specific_info``:
the create type, the content ids, the parent hint as backing file, and one
entry per extent. Only what opening already parsed is used.
"""

from __future__ import annotations

from instar.errors import DriverError
from instar.formats.base import ChildFile, FormatDetails, QValue
from instar.formats.vmdk.reader import DiskExtent, SparseExtent, VmdkDriver

NO_PARENT_CID = 0xFFFFFFFF


def describe(image: VmdkDriver) -> FormatDetails:
    """qemu-img info's facts about an open VMDK."""
    extents = image.disk_extents
    descriptor = image.descriptor
    cid = descriptor.cid("CID") if descriptor is not None else None
    parent_cid = descriptor.cid("parentCID") if descriptor is not None else None
    if cid is None or parent_cid is None:
        # qemu reads both from the descriptor when opening, and fails without
        # them with no message of its own (EINVAL).
        raise DriverError("Invalid argument")
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
            ChildFile.of(f"extents.{index}", extent.file, counts_in_disk_size=True)
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


def create_type(image: VmdkDriver) -> str:
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
