"""What ``qemu-img info`` says about a qcow2 image (the `describe` hook).

The facts of qemu's ``qcow2_co_get_info``, ``qcow2_get_specific_info`` and
``qcow2_snapshot_list``, from metadata only: the header, its extensions, the
snapshot table and the bitmap directory. The two tables are read here and
not when opening, since only info needs them; each is bounded as qemu bounds
it (65536 snapshots, 1 KiB of extra data each, 64 MiB in all; 65535 bitmaps
in a 64 MiB directory) before anything is read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from instar.errors import FormatError
from instar.files import ReadWindow
from instar.formats.base import (
    ChildFile,
    FormatDetails,
    QValue,
    SnapshotDetails,
)
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import Qcow2Driver
from instar.runtime_types import NamedTuple

# qemu's limits (block/qcow2.h).
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20  # QCOW_MAX_SNAPSHOTS_SIZE
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
MAX_BITMAP_NAME = 1023
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
BITMAP_TYPE_DIRTY_TRACKING = 1
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
# qemu's snapshot list keeps id and name in fixed buffers (QEMUSnapshotInfo).
SNAPSHOT_ID_BYTES = 127
SNAPSHOT_NAME_BYTES = 255

# l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size.
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
# vm_state_size_large, disk_size, icount: each present if extra data reaches it.
SNAPSHOT_EXTRA_U64 = struct.Struct(">Q")
# nb_bitmaps, reserved, bitmap_directory_size, bitmap_directory_offset.
BITMAPS_EXTENSION = struct.Struct(">IIQQ")
# bitmap_table_offset, bitmap_table_size, flags, type, granularity_bits,
# name_size, extra_data_size.
BITMAP_ENTRY = struct.Struct(">QIIBBHI")


def describe(image: Qcow2Driver) -> FormatDetails:
    """qemu-img info's facts about an open qcow2 image."""
    header = image.header
    extensions = image.extensions
    children = []
    if image.data_file is not None:
        # qemu-img 7.2 counts the qcow2 file alone in "disk size".
        children.append(ChildFile.of("data-file", image.data_file, counts_in_disk_size=False))
    return FormatDetails(
        cluster_size=header.cluster_size,
        dirty=bool(header.incompatible_features & L.INCOMPAT_DIRTY),
        backing_filename=image.backing_name,
        backing_format=extensions.backing_format if image.backing_name else None,
        snapshots=read_snapshots(image),
        specific_type="qcow2",
        specific=specific_info(image),
        children=children,
    )


def specific_info(image: Qcow2Driver) -> dict[str, QValue]:
    """ImageInfoSpecificQCow2, members in the QAPI schema's order."""
    header = image.header
    compression = L.COMPRESSION_NAMES[header.compression_type]
    refcount_bits = 1 << header.refcount_order
    if header.version < 3:
        return {"compat": "0.10", "refcount-bits": refcount_bits,
                "compression-type": compression}
    data: dict[str, QValue] = {"compat": "1.1"}
    if image.extensions.data_file is not None:
        data["data-file"] = image.extensions.data_file
    if header.incompatible_features & L.INCOMPAT_DATA_FILE:
        data["data-file-raw"] = bool(header.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW)
    data["extended-l2"] = header.extended_l2
    data["lazy-refcounts"] = bool(header.compatible_features & L.COMPAT_LAZY_REFCOUNTS)
    data["corrupt"] = bool(header.incompatible_features & L.INCOMPAT_CORRUPT)
    data["refcount-bits"] = refcount_bits
    bitmaps = read_bitmaps(image)
    if bitmaps:
        data["bitmaps"] = bitmaps
    data["compression-type"] = compression
    return data


def _int64(value: int) -> int:
    """A uint64 as qemu's int64 QAPI members show it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _c_string(raw: bytes, limit: int) -> str:
    """Bytes as qemu's fixed C buffer keeps them: up to a NUL, at most ``limit``."""
    return raw.split(b"\0", 1)[0][:limit].decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# Snapshots


class SnapshotEntry(NamedTuple):
    """One snapshot table entry as qemu reads it; ``extra`` is its extra data."""

    l1_offset: int
    l1_size: int
    id: bytes
    name: bytes
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra: bytes


class SnapshotTableError(FormatError):
    """The snapshot table breaks one of qemu's limits; ``hint`` is qemu's advice."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


INT_MAX = (1 << 31) - 1  # qemu's limit on how far the entries reach (skipped extra data too)


def snapshot_entries(read: Callable[[int, int], bytes], start: int, count: int,
                     dropped: Callable[[int, int], None] | None = None,
                     ) -> Iterator[tuple[int, SnapshotEntry]]:
    """(offset past it, entry) for each entry of the table at ``start``, as
    qemu's ``qcow2_do_read_snapshots`` walks it (entries 8-byte aligned, extra
    data at most 1 KiB, 64 MiB in all); ``read(offset, length)`` reads the file.
    With ``dropped`` (``check -r all``), extra data over 1 KiB is cut to 1 KiB
    (``dropped(index, its size)`` told) and skipped over, as qemu's repair does."""
    offset = table_length = start
    for index in range(count):
        offset = (offset + 7) & ~7
        table_length = (table_length + 7) & ~7
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_size) = SNAPSHOT_HEADER.unpack(read(offset, SNAPSHOT_HEADER.size))
        skipped = 0
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA:
            if dropped is None:
                raise SnapshotTableError(
                    f"Too much extra metadata in snapshot table entry {index}",
                    "You can force-remove this extra metadata with qemu-img check -r all")
            dropped(index, extra_size)
            skipped = extra_size - MAX_SNAPSHOT_EXTRA_DATA
            extra_size = MAX_SNAPSHOT_EXTRA_DATA
        rest = read(offset + SNAPSHOT_HEADER.size, extra_size)
        if id_size or name_size:
            rest += read(offset + SNAPSHOT_HEADER.size + extra_size + skipped, id_size + name_size)
        length = extra_size + id_size + name_size
        offset += SNAPSHOT_HEADER.size + length + skipped
        table_length += SNAPSHOT_HEADER.size + length
        if table_length - start > MAX_SNAPSHOT_TABLE_BYTES or offset - start > INT_MAX:
            raise SnapshotTableError(
                "Snapshot table is too big",
                f"You can force-remove all {count - index} overhanging snapshots with "
                "qemu-img check -r all")
        yield offset, SnapshotEntry(
            l1_offset, l1_size, rest[extra_size : extra_size + id_size],
            rest[extra_size + id_size :], date_sec, date_nsec, vm_clock_nsec, vm_state_size,
            rest[:extra_size])


def read_snapshots(image: Qcow2Driver) -> list[SnapshotDetails]:
    """The snapshot table, as qemu's ``qcow2_read_snapshots`` reads it."""
    header = image.header
    if header.nb_snapshots > L.MAX_SNAPSHOTS:  # the reader checks this too
        raise FormatError("Too many snapshots")

    def read_exact(offset: int, length: int) -> bytes:
        return image.file.pread_exact(offset, length, "snapshot table entry")

    read = ReadWindow(read_exact, (FormatError,))
    snapshots = []
    for _, entry in snapshot_entries(read, header.snapshots_offset, header.nb_snapshots):
        extra, vm_state_size = entry.extra, entry.vm_state_size
        if len(extra) >= 8:
            vm_state_size = SNAPSHOT_EXTRA_U64.unpack_from(extra, 0)[0]
        icount = SNAPSHOT_EXTRA_U64.unpack_from(extra, 16)[0] if len(extra) >= 24 else None
        snapshots.append(SnapshotDetails(
            id=_c_string(entry.id, SNAPSHOT_ID_BYTES),
            name=_c_string(entry.name, SNAPSHOT_NAME_BYTES),
            vm_state_size=_int64(vm_state_size),
            date_sec=entry.date_sec,
            date_nsec=entry.date_nsec,
            vm_clock_nsec=entry.vm_clock_nsec,
            icount=None if icount is None or icount == (1 << 64) - 1 else _int64(icount),
        ))
    return snapshots


# ---------------------------------------------------------------------------
# Persistent dirty bitmaps


def read_bitmaps(image: Qcow2Driver) -> list[QValue]:
    """Qcow2BitmapInfo for each bitmap of the directory, in directory order."""
    found = bitmap_directory(image)
    if found is None:
        return []
    count, offset, size = found
    directory = image.file.pread_exact(offset, size, "bitmap directory")
    bitmaps = list(_bitmap_entries(directory))
    if len(bitmaps) != count:
        raise FormatError("Broken bitmap directory")
    return bitmaps


def bitmap_directory(image: Qcow2Driver) -> tuple[int, int, int] | None:
    """(bitmaps, offset, size) of the bitmap directory, checked as qemu's
    open checks the bitmaps extension; None without one.

    qemu ignores a bitmaps extension whose autoclear bit is clear (a program
    without bitmap support wrote the image), and so does this.
    """
    header = image.header
    payload = image.extensions.bitmaps_payload
    if not image.extensions.has_bitmaps:
        return None
    if len(payload) != BITMAPS_EXTENSION.size:
        raise FormatError("bitmaps_ext: Invalid extension length")
    if not header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        return None
    count, _reserved, size, offset = BITMAPS_EXTENSION.unpack(payload)
    if count > MAX_BITMAPS:
        raise FormatError(
            f"bitmaps_ext: Image has {count} bitmaps, exceeding the QEMU supported "
            f"maximum of {MAX_BITMAPS}"
        )
    if count == 0:
        raise FormatError("found bitmaps extension with zero bitmaps")
    if offset & (header.cluster_size - 1):
        raise FormatError("bitmaps_ext: invalid bitmap directory offset")
    if size > MAX_BITMAP_DIRECTORY_BYTES:
        raise FormatError(
            f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported "
            f"size ({MAX_BITMAP_DIRECTORY_BYTES})"
        )
    return count, offset, size


def _bitmap_entries(directory: bytes) -> list[QValue]:
    entries: list[QValue] = []
    position = 0
    while position < len(directory):
        if len(directory) - position < BITMAP_ENTRY.size:
            raise FormatError("Broken bitmap directory")
        (_table_offset, _table_size, flags, kind, granularity_bits, name_size,
         extra_size) = BITMAP_ENTRY.unpack_from(directory, position)
        length = BITMAP_ENTRY.size + extra_size + name_size
        if (
            length > len(directory) - position
            or kind != BITMAP_TYPE_DIRTY_TRACKING
            or not MIN_GRANULARITY_BITS <= granularity_bits <= MAX_GRANULARITY_BITS
            or not 0 < name_size <= MAX_BITMAP_NAME
        ):
            raise FormatError("Broken bitmap directory")
        name_at = position + BITMAP_ENTRY.size + extra_size
        raw_name = directory[name_at : name_at + name_size]
        entries.append({
            "name": raw_name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
            "granularity": 1 << granularity_bits,
            "flags": _bitmap_flags(flags),
        })
        position += (length + 7) & ~7
    return entries


def _bitmap_flags(flags: int) -> list[QValue]:
    """Qcow2BitmapInfoFlags, in qemu's order: in-use, then auto."""
    names: list[QValue] = []
    if flags & BME_FLAG_IN_USE:
        names.append("in-use")
    if flags & BME_FLAG_AUTO:
        names.append("auto")
    return names
