"""qcow2 internal snapshots changed in place: qemu 7.2's snapshot create,
goto (``snapshot -a``) and delete, for ``instar snapshot -c/-a/-d``.

qemu's accounting, which ``qemu-img check`` verifies: every L1 table (the
active one and each snapshot's) counts once for each L2 table it names, and
each time an L2 table is reached it counts once for every cluster it names.
So a snapshot is an L1 table and one more reference to everything it
reaches; QCOW_OFLAG_COPIED marks, in the active tables only, an L2 table or
a data cluster whose refcount is exactly 1 (it may be written in place).

The order of the writes (`instar.mutate.ImageUpdate`'s phases):

create
    data: the refcounts (+1 for everything the active L1 reaches, the claims
    of the new clusters), the copy of the active L1, the new snapshot table;
    pointers: COPIED cleared in the active L2 and L1 tables; header: the
    snapshot count and table offset (and refcount table, if it grew) in one
    write; release: the old snapshot table freed.
delete
    data: the new snapshot table (claimed); header: count and offset;
    release: COPIED set in the active tables where the refcount goes back to
    1, flushed, then the lowered refcounts (-1 for everything the snapshot's
    L1 reaches, its L1 and the old table freed).
goto
    data: the refcounts (+1 for everything the snapshot reaches, the claims),
    a new active L1 (the snapshot's entries, COPIED as they end up), COPIED
    cleared in the snapshot's L2 tables (which become active and shared);
    header: size, L1 size and offset, refcount table in one write; release:
    -1 for everything the old active L1 reached, the old L1 freed. qemu
    overwrites the active L1 in place; a new one switched by the header makes
    a crash leave the old or the new image, never a mix.

A crash leaves the old or the new image with leaked clusters at most; a
COPIED flag may then disagree with a leaked (too high) refcount until
``qemu-img check -r leaks`` repairs the leak, never with a refcount that is
right. Every check (each refcount within its width, every table inside the
file) is made before the first write.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from itertools import compress

from instar.errors import FormatError, SnapshotError, UnsupportedError
from instar.files import ReadWindow
from instar.formats.common import read_table
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.allocation import Refcounts
from instar.formats.qcow2.info import (
    SNAPSHOT_EXTRA_U64,
    SNAPSHOT_HEADER,
    SNAPSHOT_ID_BYTES,
    SNAPSHOT_NAME_BYTES,
    snapshot_entries,
)
from instar.formats.qcow2.reader import MAX_REFTABLE_BYTES, Qcow2Driver
from instar.formats.qcow2.resize import QCOW_MAX_L1_ENTRIES, read_active_l1, write_sizes
from instar.mutate import ImageUpdate

MAX_TABLE_BYTES = 64 << 20  # qemu's QCOW_MAX_SNAPSHOTS_SIZE
EXTRA_BYTES = 24  # vm_state_size_large, disk_size, icount: what qemu 7.2 writes
NO_ICOUNT = (1 << 64) - 1  # an entry written before icount existed
_SNAPSHOTS_FIELD = 48  # refcount table offset (8), clusters (4), nb_snapshots (4), offset (8)
_TABLE_FIELDS = struct.Struct(">QIIQ")
_EXTRA = struct.Struct(">QQQ")


class Snapshot:
    """One snapshot table entry as qemu keeps it in memory (and writes it back)."""

    __slots__ = ("date_nsec", "date_sec", "disk_size", "extra_size", "icount", "id",
                 "l1_offset", "l1_size", "name", "unknown_extra", "vm_clock_nsec",
                 "vm_state_size")

    def __init__(self, l1_offset: int, l1_size: int, id: bytes, name: bytes, date_sec: int,
                 date_nsec: int, vm_clock_nsec: int, vm_state_size: int, disk_size: int,
                 icount: int, extra_size: int = EXTRA_BYTES,
                 unknown_extra: bytes = b"") -> None:
        self.l1_offset = l1_offset
        self.l1_size = l1_size
        self.id = id  # C strings: up to the first NUL, as qemu reads them
        self.name = name
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.disk_size = disk_size
        self.icount = icount
        self.extra_size = extra_size
        self.unknown_extra = unknown_extra  # extra data past what qemu knows, kept


def read_snapshot_table(driver: Qcow2Driver, dropped: Callable[[int, int], None] | None = None,
                        ) -> tuple[list[Snapshot], int]:
    """The snapshot table as qemu's ``qcow2_read_snapshots`` reads it, and its
    length in the file (up to the last entry's end); ``dropped``: extra data
    over 1 KiB is cut, as ``check -r all`` does (`info.snapshot_entries`)."""
    header = driver.header
    if header.nb_snapshots > L.MAX_SNAPSHOTS:
        raise FormatError("Too many snapshots")
    if not header.nb_snapshots:
        return [], 0

    def read_exact(offset: int, length: int) -> bytes:
        return driver.file.pread_exact(offset, length, "snapshot table entry")

    read = ReadWindow(read_exact, (FormatError,))
    snapshots = []
    end = header.snapshots_offset
    for entry_end, entry in snapshot_entries(read, header.snapshots_offset,
                                             header.nb_snapshots, dropped):
        end = entry_end
        extra = entry.extra
        vm_state_size = entry.vm_state_size
        if len(extra) >= 8:
            vm_state_size = SNAPSHOT_EXTRA_U64.unpack_from(extra, 0)[0]
        disk_size = (SNAPSHOT_EXTRA_U64.unpack_from(extra, 8)[0] if len(extra) >= 16
                     else driver.virtual_size)
        icount = SNAPSHOT_EXTRA_U64.unpack_from(extra, 16)[0] if len(extra) >= 24 else NO_ICOUNT
        snapshots.append(Snapshot(
            entry.l1_offset, entry.l1_size, entry.id.split(b"\0", 1)[0],
            entry.name.split(b"\0", 1)[0], entry.date_sec, entry.date_nsec,
            entry.vm_clock_nsec, vm_state_size, disk_size, icount,
            max(EXTRA_BYTES, len(extra)), extra[EXTRA_BYTES:]))
    return snapshots, end - header.snapshots_offset


def pack_table(snapshots: Sequence[Snapshot]) -> bytes:
    """The table as qemu's ``qcow2_write_snapshots`` writes it: entries 8-byte
    aligned, each with at least qemu 7.2's 24 bytes of extra data."""
    parts: list[bytes] = []
    length = 0
    for snapshot in snapshots:
        padding = -length % 8
        vm_state = snapshot.vm_state_size if snapshot.vm_state_size <= 0xFFFF_FFFF else 0
        entry = (bytes(padding) + SNAPSHOT_HEADER.pack(
            snapshot.l1_offset, snapshot.l1_size, len(snapshot.id), len(snapshot.name),
            snapshot.date_sec, snapshot.date_nsec, snapshot.vm_clock_nsec, vm_state,
            snapshot.extra_size)
            + _EXTRA.pack(snapshot.vm_state_size, snapshot.disk_size, snapshot.icount)
            + snapshot.unknown_extra + snapshot.id + snapshot.name)
        parts.append(entry)
        length += len(entry)
        if length > MAX_TABLE_BYTES:
            raise _errno_error(errno.EFBIG)
    return b"".join(parts)


def new_id(snapshots: Sequence[Snapshot]) -> bytes:
    """qemu's ``find_new_snapshot_id``: one more than the largest id read as
    C's strtoul reads it (unsigned long arithmetic)."""
    largest = max((_strtoul(snapshot.id) for snapshot in snapshots), default=0)
    return str((largest + 1) % (1 << 64)).encode()


def _strtoul(text: bytes) -> int:
    """C's ``strtoul(text, NULL, 10)`` on a 64-bit system."""
    text = text.lstrip(b" \t\n\v\f\r")
    negative = text[:1] == b"-"
    if text[:1] in (b"-", b"+"):
        text = text[1:]
    digits = len(text) - len(text.lstrip(b"0123456789"))
    if not digits:
        return 0
    number = text[:digits].lstrip(b"0")  # no int() of 65535 digits
    value = min(int(number or b"0"), (1 << 64) - 1) if len(number) <= 20 else (1 << 64) - 1
    return (-value) % (1 << 64) if negative else value


def find_for_goto(snapshots: Sequence[Snapshot], name: bytes) -> int:
    """qemu's ``find_snapshot_by_id_or_name``: an id first, then a name (-1: none)."""
    for field in ("id", "name"):
        for index, snapshot in enumerate(snapshots):
            if getattr(snapshot, field) == name:
                return index
    return -1


def find_for_delete(snapshots: Sequence[Snapshot], name: bytes) -> int:
    """qemu-img's delete: ``bdrv_snapshot_find`` looks for the tag only (as
    the listing cuts it, to 255 bytes), then the entry with that one's id and
    tag is deleted. -1: no such tag ("snapshot not found"); -2: the second
    search fails (a tag longer than the listing keeps)."""
    found = next((snapshot for snapshot in snapshots
                  if snapshot.name[:SNAPSHOT_NAME_BYTES] == name), None)
    if found is None:
        return -1
    wanted = (found.id[:SNAPSHOT_ID_BYTES], found.name[:SNAPSHOT_NAME_BYTES])
    for index, snapshot in enumerate(snapshots):
        if (snapshot.id, snapshot.name) == wanted:
            return index
    return -2


def _errno_error(number: int) -> SnapshotError:
    """qemu-img's "-N (strerror)" for a failed create; the caller adds the name."""
    return SnapshotError(f"-{number} ({os.strerror(number)})", number)


# --- the refcount walk -----------------------------------------------------------------------


class TableWalk:
    """The tables of one qcow2 image and the walks over them."""

    def __init__(self, driver: Qcow2Driver) -> None:
        header = driver.header
        self.driver = driver
        self.file = driver.file
        self.cluster = header.cluster_size
        self.extended = header.extended_l2
        self.entries = L.l2_entries(header.cluster_bits, self.extended)
        self.shift = L.compressed_shift(header.cluster_bits)

    def l2_tables(self, l1: Sequence[int]) -> dict[int, int]:
        """The L2 tables ``l1`` names, each with how many entries name it;
        every one a whole cluster inside the file."""
        tables: dict[int, int] = {}
        for index in _nonzero(l1):
            offset = l1[index] & L.L1E_OFFSET_MASK
            if not offset:
                continue
            if offset % self.cluster or offset + self.cluster > self.file.size:
                raise FormatError(f"qcow2 L2 table {index} lies outside the image")
            tables[offset] = tables.get(offset, 0) + 1
        return tables

    def read_l2(self, offset: int) -> array[int]:
        return read_table(self.file, offset, self.cluster // 8, 8, "big", "L2 table")

    def add(self, refcounts: Refcounts, l1: Sequence[int], addend: int) -> None:
        """Add ``addend`` to the refcount of every cluster ``l1`` reaches, as
        qemu's ``qcow2_update_snapshot_refcount`` does (in memory). A refcount
        past its width's maximum is qemu's EINVAL; below 0, or a reference to
        a cluster whose refcount is 0, is an image whose refcounts are wrong."""
        step = 2 if self.extended else 1
        for offset, times in self.l2_tables(l1).items():
            table = self.read_l2(offset)
            for slot in _nonzero(table, step):
                held = L.held_clusters(table[slot], self.cluster, self.shift)
                if held is not None:
                    _add(refcounts, held[0], held[1], addend * times)
            _add(refcounts, offset // self.cluster, 1, addend * times)

    def copied_tables(self, l1: Sequence[int],
                      refcounts: Refcounts) -> Iterator[tuple[int, bytes]]:
        """(offset, new content) of each L2 table ``l1`` names whose COPIED
        flags differ from what ``refcounts`` says (set where a data cluster's
        refcount is 1, clear elsewhere)."""
        step = 2 if self.extended else 1
        for offset in self.l2_tables(l1):
            table = self.read_l2(offset)
            changed = False
            for slot in _nonzero(table, step):
                entry = table[slot]
                wanted = entry & ~L.OFLAG_COPIED
                if (not entry & L.OFLAG_COMPRESSED and entry & L.L2E_OFFSET_MASK
                        and refcounts.get((entry & L.L2E_OFFSET_MASK) // self.cluster) == 1):
                    wanted |= L.OFLAG_COPIED
                if wanted != entry:
                    table[slot] = wanted
                    changed = True
            if changed:
                yield offset, pack_entries(table)

    def copied_l1(self, l1: Sequence[int], refcounts: Refcounts) -> array[int]:
        """``l1`` with COPIED set exactly where its L2 table's refcount is 1."""
        result = array("Q", l1)
        for index in _nonzero(l1):
            entry = l1[index]
            offset = entry & L.L1E_OFFSET_MASK
            copied = bool(offset) and refcounts.get(offset // self.cluster) == 1
            result[index] = (entry & ~L.OFLAG_COPIED) | (L.OFLAG_COPIED if copied else 0)
        return result

    def read_l1(self, offset: int, size: int, what: str) -> array[int]:
        """A snapshot's L1 table, checked as qemu's ``qcow2_validate_table``
        checks it, and inside the file."""
        if size > QCOW_MAX_L1_ENTRIES:
            raise FormatError(f"{what} too large")
        if (1 << 63) - 1 - size * 8 < offset or offset % self.cluster:
            raise FormatError(f"{what} offset invalid")
        if not size:
            return array("Q")
        if offset + size * 8 > self.file.size:
            raise FormatError(f"qcow2 {what.lower()} lies outside the image")
        return read_table(self.file, offset, size, 8, "big", what)


def _nonzero(table: Sequence[int], step: int = 1) -> Iterator[int]:
    """The indices (every ``step``-th) of the entries that are not 0, found at C speed."""
    indices = range(0, len(table), step)
    return compress(indices, table[::step] if step > 1 else table)


def _add(refcounts: Refcounts, first: int, count: int, delta: int) -> None:
    ceiling = (1 << refcounts.width) - 1
    for cluster in range(first, first + count):
        value = refcounts.get(cluster)
        if not value or value + delta < 0:
            raise FormatError(f"qcow2 refcount of cluster {cluster:#x} does not match the "
                              "image's tables; run 'qemu-img check -r all' first")
        if value + delta > ceiling:
            raise _errno_error(errno.EINVAL)
        refcounts.set(cluster, value + delta)


def pack_entries(entries: array[int]) -> bytes:
    """A table of 64-bit entries as the file holds them (big-endian)."""
    packed = array("Q", entries)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes()


def _clusters(length: int, cluster: int) -> int:
    return -(-length // cluster)


def _free(refcounts: Refcounts, offset: int, length: int) -> None:
    """qemu's ``qcow2_free_clusters``: -1 for each cluster ``[offset, +length)`` touches."""
    if length:
        first = offset // refcounts.cluster
        _add(refcounts, first, (offset + length - 1) // refcounts.cluster - first + 1, -1)


def _has_bitmaps(driver: Qcow2Driver) -> bool:
    return bool(driver.extensions.has_bitmaps
                or driver.header.autoclear_features & L.AUTOCLEAR_BITMAPS)


def _check_supported(driver: Qcow2Driver) -> None:
    """instar's refusals, before anything is read or written. Persistent
    bitmaps are left as they are (qemu's snapshot commands do not change
    them either; the consistency check counts their clusters)."""
    header = driver.header
    if header.refcount_table_clusters * header.cluster_size > MAX_REFTABLE_BYTES:
        raise FormatError("Reference count table too large")
    end = header.refcount_table_offset + header.refcount_table_clusters * header.cluster_size
    if end > driver.file.size:
        raise FormatError("qcow2 refcount table lies outside the image")
    _check_consistent(driver)


def _check_consistent(driver: Qcow2Driver) -> None:
    """Refuse an image ``qemu-img check`` finds corrupt: changing refcounts
    that already disagree with the tables could free a cluster still in use.
    Leaks are fine, and so is a COPIED flag that disagrees (every change here
    sets the flags of the tables it touches again)."""
    from instar.findings import CORRUPTION
    from instar.formats.qcow2.check import check

    result = check(driver)
    harmless = sum(1 for finding in result.findings if finding.kind == CORRUPTION
                   and finding.code.startswith("oflag-copied-"))
    if result.check_errors or result.failure or (
            result.corruptions and (result.findings_dropped or result.corruptions > harmless)):
        raise FormatError("qemu-img check finds the image corrupt; repair it with "
                          "'qemu-img check -r all' first")


def _has_data_file(driver: Qcow2Driver) -> bool:
    return bool(driver.header.incompatible_features & L.INCOMPAT_DATA_FILE)


def _write_table_fields(update: ImageUpdate, refcounts: Refcounts, count: int,
                        offset: int) -> None:
    """The refcount table and snapshot table fields: one 24-byte write in the
    first sector, so a crash leaves all old or all new."""
    table_offset, table_clusters = refcounts.table_fields()
    update.write(_SNAPSHOTS_FIELD, _TABLE_FIELDS.pack(table_offset, table_clusters, count,
                                                      offset))


# --- the three commands ----------------------------------------------------------------------


def create(driver: Qcow2Driver, update: ImageUpdate, name: bytes, date_sec: int,
           date_nsec: int) -> None:
    """qemu's ``qcow2_snapshot_create`` with qemu-img's snapshot info: the
    name (at most 255 bytes), the date, no VM state, no VM clock. Raises
    SnapshotError with qemu's "-errno (reason)" where qemu fails."""
    header = driver.header
    if header.nb_snapshots >= L.MAX_SNAPSHOTS:
        raise _errno_error(errno.EFBIG)
    if _has_data_file(driver):
        raise _errno_error(errno.ENOTSUP)
    _check_supported(driver)
    walk = TableWalk(driver)
    snapshots, table_length = read_snapshot_table(driver)
    l1 = read_active_l1(driver)
    refcounts = Refcounts(driver)
    walk.add(refcounts, l1, +1)
    if table_length:
        _free(Refcounts(driver), header.snapshots_offset, table_length)  # checked only
    cluster = header.cluster_size
    l1_offset = refcounts.allocate_at_end(_clusters(len(l1) * 8, cluster)) if l1 else 0
    snapshot = Snapshot(l1_offset, len(l1), new_id(snapshots), name[:SNAPSHOT_NAME_BYTES],
                        date_sec, date_nsec, 0, 0, driver.virtual_size, 0)
    table = pack_table([*snapshots, snapshot])
    table_offset = refcounts.allocate_at_end(_clusters(len(table), cluster))
    # 1. data: refcounts up, the snapshot's L1 (as the active one is now) and the table.
    update.phase("data")
    refcounts.write_blocks(update)
    refcounts.write_new_table(update)
    if l1:
        update.write(l1_offset, pack_entries(l1))
    update.write(table_offset, table)
    # 2. pointers: what the active tables share is no longer theirs alone.
    update.phase("pointers")
    refcounts.write_table_entries(update)
    for offset, content in walk.copied_tables(l1, refcounts):
        update.write(offset, content)
    active = walk.copied_l1(l1, refcounts)
    if active != l1:
        update.write(header.l1_table_offset, pack_entries(active))
    # 3. header: the new table.
    update.phase("header")
    _write_table_fields(update, refcounts, len(snapshots) + 1, table_offset)
    # 4. release: the old table.
    update.phase("release")
    if table_length:
        _free(refcounts, header.snapshots_offset, table_length)
    refcounts.release_old_table()
    refcounts.write_blocks(update)


def delete(driver: Qcow2Driver, update: ImageUpdate, name: bytes) -> None:
    """qemu-img's snapshot delete: the entry found as qemu finds it, out of
    the table, and every reference its L1 table held dropped."""
    snapshots, table_length = read_snapshot_table(driver)
    index = find_for_delete(snapshots, name)
    if index == -1:
        raise SnapshotError("snapshot not found", errno.ENOENT)
    if _has_data_file(driver):
        raise UnsupportedError("deleting a snapshot of a qcow2 image with an external data "
                               "file is not supported")
    if index < 0:
        raise SnapshotError("Can't find the snapshot", errno.ENOENT)
    _check_supported(driver)
    header = driver.header
    walk = TableWalk(driver)
    snapshot = snapshots[index]
    try:
        l1 = walk.read_l1(snapshot.l1_offset, snapshot.l1_size, "Snapshot L1 table")
    except FormatError as error:
        raise SnapshotError(str(error), errno.EINVAL) from None
    _separate(header, snapshot)
    active = read_active_l1(driver)
    # Everything the release will do, checked first on refcounts of their own.
    final = Refcounts(driver)
    walk.add(final, l1, -1)
    _free(final, snapshot.l1_offset, snapshot.l1_size * 8)
    _free(final, header.snapshots_offset, table_length)
    remaining = snapshots[:index] + snapshots[index + 1 :]
    refcounts = Refcounts(driver)
    table = pack_table(remaining)
    table_offset = 0
    if remaining:
        table_offset = refcounts.allocate_at_end(_clusters(len(table), header.cluster_size))
    # 1. data: the new table, claimed.
    update.phase("data")
    refcounts.write_blocks(update)
    refcounts.write_new_table(update)
    if remaining:
        update.write(table_offset, table)
    update.phase("pointers")
    refcounts.write_table_entries(update)
    # 3. header: the snapshot is gone.
    update.phase("header")
    _write_table_fields(update, refcounts, len(remaining), table_offset)
    # 4. release: COPIED where the active tables become the only user, then the
    # refcounts that make it so (a crash between leaves a leak, never a
    # cluster shared and marked COPIED).
    update.phase("release")
    walk.add(refcounts, l1, -1)
    _free(refcounts, snapshot.l1_offset, snapshot.l1_size * 8)
    _free(refcounts, header.snapshots_offset, table_length)
    refcounts.release_old_table()
    for offset, content in walk.copied_tables(active, refcounts):
        update.write(offset, content)
    copied = walk.copied_l1(active, refcounts)
    if copied != active:
        update.write(header.l1_table_offset, pack_entries(copied))
    update.flush()
    refcounts.write_blocks(update)


def goto(driver: Qcow2Driver, update: ImageUpdate, name: bytes) -> None:
    """qemu's ``qcow2_snapshot_goto``: the active image becomes the snapshot's
    (its L1 table, its disk size), the old active image's references dropped."""
    from instar.formats.qcow2.info import bitmap_directory

    if bitmap_directory(driver) is not None:  # qemu's block layer, before the driver
        raise SnapshotError("Device has active dirty bitmaps", errno.EBUSY)
    if _has_data_file(driver):
        raise SnapshotError("Failed to load snapshot: Operation not supported", errno.ENOTSUP)
    snapshots, _ = read_snapshot_table(driver)
    index = find_for_goto(snapshots, name)
    if index < 0:
        raise SnapshotError("Failed to load snapshot: No such file or directory",
                            errno.ENOENT)
    header = driver.header
    walk = TableWalk(driver)
    snapshot = snapshots[index]
    try:
        target = walk.read_l1(snapshot.l1_offset, snapshot.l1_size, "Snapshot L1 table")
    except FormatError as error:
        raise SnapshotError(str(error), errno.EINVAL) from None
    size = driver.virtual_size
    if snapshot.disk_size != size:
        if header.version < 3:
            refusal = SnapshotError("Failed to load snapshot: Operation not supported",
                                    errno.ENOTSUP)
            refusal.before = "Can't resize a v2 image which has snapshots"
            raise refusal
        if snapshot.disk_size % L.SECTOR or not 0 < snapshot.disk_size <= 1 << 62:
            raise FormatError("qcow2 snapshot has an invalid disk size")
        if _has_bitmaps(driver):  # bitmaps qemu does not load (autoclear bit clear)
            raise UnsupportedError("applying a snapshot of another size to a qcow2 image "
                                   "with persistent bitmaps is not supported yet")
        size = snapshot.disk_size
    _check_supported(driver)
    _separate(header, snapshot)
    old = read_active_l1(driver)
    l1_size = max(len(target), len(old), L.l1_entries_for(size, header.cluster_bits,
                                                          header.extended_l2))
    if l1_size > QCOW_MAX_L1_ENTRIES:
        raise FormatError("Snapshot L1 table too large")
    # The final refcounts, checked before anything is written; they also say
    # which flags the new active tables carry.
    final = Refcounts(driver)
    try:
        walk.add(final, target, +1)  # first, as qemu: a refcount at its width's maximum fails
    except SnapshotError as error:
        raise SnapshotError(f"Failed to load snapshot: {os.strerror(error.errno)}",
                            error.errno) from None
    walk.add(final, old, -1)
    _free(final, header.l1_table_offset, len(old) * 8)
    refcounts = Refcounts(driver)
    walk.add(refcounts, target, +1)
    padded = array("Q", target)
    padded.extend([0] * (l1_size - len(target)))
    new_l1 = walk.copied_l1(padded, final)
    cluster = header.cluster_size
    l1_offset = refcounts.allocate_at_end(_clusters(l1_size * 8, cluster)) if l1_size else 0
    # 1. data: refcounts up, the new active L1, the snapshot's tables unmarked.
    update.phase("data")
    refcounts.write_blocks(update)
    refcounts.write_new_table(update)
    if l1_size:
        update.write(l1_offset, pack_entries(new_l1))
    for offset, content in walk.copied_tables(target, final):
        update.write(offset, content)
    update.phase("pointers")
    refcounts.write_table_entries(update)
    # 3. header: size and active L1 in one write.
    update.phase("header")
    write_sizes(update, header, refcounts, size, l1_size, l1_offset)
    # 4. release: the old active image's references.
    update.phase("release")
    walk.add(refcounts, old, -1)
    _free(refcounts, header.l1_table_offset, len(old) * 8)
    refcounts.release_old_table()
    refcounts.write_blocks(update)


def _separate(header: L.Header, snapshot: Snapshot) -> None:
    """A snapshot's L1 table must not be the active one (freeing one would free both)."""
    active = (header.l1_table_offset, header.l1_table_offset + header.l1_size * 8)
    own = (snapshot.l1_offset, snapshot.l1_offset + snapshot.l1_size * 8)
    if own[0] < active[1] and active[0] < own[1]:
        raise FormatError("qcow2 snapshot L1 table overlaps the active L1 table")
