"""qcow2 resize: qemu 7.2's ``qcow2_co_truncate`` for what instar supports.

Growing writes the new size into the header; when the active L1 table is too
small for it, a new one (the old entries, zeros after) is written into free
clusters past the end of the file, claimed in the refcounts first (with new
refcount blocks where none covers them, and a larger refcount table when the
old one cannot name them), then the header is switched to both in one write,
then the old table's clusters are freed: a crash at any point leaves the old
image or the new one, at worst with leaked clusters.

Shrinking (``--shrink``) drops the clusters past the new end as qemu's full
discard does: their L2 entries and the L1 entries past the new table size are
cleared first, then the header's size, then the refcounts of what they held
are lowered, then the file's tail past the last cluster in use is cut.

Growing with ``--preallocation`` (`GrowPreallocation`) maps every cluster
from the one the old size ends in to the new end, as qemu's truncate does:
``metadata`` puts each new L2 table before the data clusters it maps (qemu's
``preallocate_co``), writes zeros over the part of a newly mapped cluster
before the old end (qemu's copy-on-write of it) and extends the file over the
rest; ``falloc`` and ``full`` place the data in one run first, then the new
L2 tables, and reserve it or write it with zeros. The data, tables and
claims are written before any table points at them, as for the L1 table.

An L2 table shared with an internal snapshot is copied first (the copy is
written and claimed before the L1 table points at it), as qemu copies it.

Refused (one line, nothing written): images with persistent bitmaps, an
external data file, the corrupt bit (a dirty image is repaired when it
is opened: `writable.repair_if_dirty`), preallocation with a backing
file, extended L2 entries or a compressed or zero cluster where the old size
ends, and refcounts that do not match what is being freed.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from array import array

from instar.errors import FormatError, ResizeError, UnsupportedError
from instar.formats.common import read_table
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.allocation import Refcounts
from instar.formats.qcow2.reader import MAX_REFTABLE_BYTES, Qcow2Driver
from instar.mutate import ImageUpdate
from instar.safety import MAX_TABLE_BYTES

_SIZE_OFFSET = 24  # header: size (8), crypt_method (4), l1_size (4), l1_table_offset (8),
_HEADER_FIELDS = struct.Struct(">QIIQQI")  # ... refcount_table_offset (8), clusters (4)
QCOW_MAX_L1_ENTRIES = (32 << 20) // 8  # qemu's QCOW_MAX_L1_SIZE


def check_resize(driver: Qcow2Driver, new_size: int, preallocation: str,
                 zero_fill: bool = False, version: int | None = None) -> None:
    """qemu's refusals in its order, then instar's own, before anything is
    written; ``version``: the image's by the time it is resized (amend
    upgrades first), when that is not its version now."""
    header = driver.header
    version = header.version if version is None else version
    if new_size % L.SECTOR:
        raise ResizeError("The new size must be a multiple of 512", errno.EINVAL)
    if header.nb_snapshots and version < 3:
        raise ResizeError("Can't resize a v2 image which has snapshots", errno.ENOTSUP)
    if header.incompatible_features & L.INCOMPAT_CORRUPT:
        raise ResizeError("qcow2: Image is corrupt; cannot be opened read/write")
    if driver.extensions.has_bitmaps or header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        raise UnsupportedError("resizing a qcow2 image with persistent bitmaps is not "
                               "supported yet")
    if header.incompatible_features & L.INCOMPAT_DATA_FILE:
        raise UnsupportedError("resizing a qcow2 image with an external data file is not "
                               "supported yet")
    if preallocation != "off" and (header.backing_file_offset or header.extended_l2):
        what = "a backing file" if header.backing_file_offset else "extended L2 entries"
        raise UnsupportedError(f"preallocation={preallocation} is not supported yet for "
                               f"resizing a qcow2 image with {what}")
    if header.refcount_table_clusters * header.cluster_size > MAX_REFTABLE_BYTES:
        raise FormatError("Reference count table too large")
    end = header.refcount_table_offset + header.refcount_table_clusters * header.cluster_size
    if end > driver.file.size:
        raise FormatError("qcow2 refcount table lies outside the image")
    cluster = header.cluster_size
    if zero_fill and version < 3 and new_size > -(-driver.virtual_size // cluster) * cluster:
        # v2 has no zero clusters; explicit zeros inside the old end's cluster it can write
        raise ResizeError("Failed to zero out new clusters: Operation not supported",
                          errno.ENOTSUP)
    new_l1_size = L.l1_entries_for(new_size, header.cluster_bits, header.extended_l2)
    if new_size >= driver.virtual_size and (new_l1_size > QCOW_MAX_L1_ENTRIES
                                            or new_l1_size * 8 > MAX_TABLE_BYTES):
        raise ResizeError("Failed to grow the L1 table: File too large", errno.EFBIG)


def read_active_l1(driver: Qcow2Driver) -> array[int]:
    """The whole active L1 table, which must lie in the file."""
    header = driver.header
    if not header.l1_size:
        return array("Q")
    if header.l1_table_offset + header.l1_size * 8 > driver.file.size:
        raise FormatError("qcow2 L1 table lies outside the image")
    return read_table(driver.file, header.l1_table_offset, header.l1_size, 8, "big", "L1 table")


def resize_qcow2(driver: Qcow2Driver, update: ImageUpdate, new_size: int,
                 preallocation: str, zero_fill: bool = False) -> None:
    """Give the image the virtual size ``new_size`` (checked by the caller to
    be positive and within qemu's bounds). ``zero_fill``: the part added must
    read as zeros, not as the (longer) backing file."""
    check_resize(driver, new_size, preallocation, zero_fill)
    header = driver.header
    l1 = read_active_l1(driver)
    refcounts = Refcounts(driver)
    new_l1_size = L.l1_entries_for(new_size, header.cluster_bits, header.extended_l2)
    if new_size < driver.virtual_size:
        _shrink(driver, update, refcounts, l1, new_size, new_l1_size)
        return
    _grow(driver, update, refcounts, l1, new_size, new_l1_size, zero_fill, preallocation)


class GrowPreallocation:
    """Every cluster from the one holding the old end (unless the image holds
    it already) to the new end mapped to a new data cluster, as qemu 7.2's
    preallocating truncate maps them (see the module docstring)."""

    def __init__(self, driver: Qcow2Driver, refcounts: Refcounts, l1: array[int],
                 old: int, new: int, mode: str, extra: int) -> None:
        """``extra`` clusters (a new L1 table) are claimed after the rest, in
        the same allocation (`extra_offset`): one call to the allocator, so
        its refcount table moves at most once."""
        header = driver.header
        self.mode = mode
        self.extra_offset = 0
        self.cluster = cluster = header.cluster_size
        entries = L.l2_entries(header.cluster_bits, False)
        first, end = old // cluster, -(-new // cluster)
        self.head: tuple[int, int] | None = None  # (host offset, length) of zeros
        self.new_tables: list[tuple[int, int]] = []  # (L1 index, offset), contents later
        self.in_place: list[tuple[int, bytes]] = []  # existing L2 tables, changed
        self.data_runs: list[tuple[int, int]] = []  # (host offset, clusters)
        self.mapping: dict[int, int] = {}  # guest cluster -> host offset
        if first >= end:
            self._claim(refcounts, 0, extra)
            return
        tables: dict[int, bytearray | None] = {}
        for index in range(first // entries, (end - 1) // entries + 1):
            offset = l1[index] & L.L1E_OFFSET_MASK if index < len(l1) else 0
            if not offset:
                tables[index] = None
                continue
            if offset % cluster or offset + cluster > driver.file.size:
                raise FormatError(f"qcow2 L2 table {index} lies outside the image")
            if refcounts.get(offset // cluster) != 1:
                raise UnsupportedError("preallocating in a qcow2 L2 table shared with a "
                                       "snapshot is not supported yet")
            tables[index] = bytearray(driver.file.pread(offset, cluster))
        start = first
        table = tables[first // entries]
        head_entry = 0 if table is None else int.from_bytes(
            table[(first % entries) * 8 : (first % entries) * 8 + 8], "big")
        if old % cluster and head_entry:
            stored = head_entry & L.L2E_OFFSET_MASK and not head_entry & (
                L.OFLAG_COMPRESSED | L.OFLAG_ZERO)
            if not stored or not head_entry & L.OFLAG_COPIED:
                raise UnsupportedError("preallocating after a qcow2 image's end inside a "
                                       "compressed, zero or shared cluster is not supported yet")
            start = first + 1  # held already: qemu leaves it as it is
        for guest in range(start, end):
            table = tables[guest // entries]
            at = (guest % entries) * 8
            if table is not None and int.from_bytes(table[at : at + 8], "big"):
                raise FormatError("qcow2 image maps data past its end")
        if start >= end:
            self._claim(refcounts, 0, extra)
            return
        self._place(refcounts, tables, start, end, entries, extra)
        if old % cluster and start == first:  # qemu's copy-on-write of the head: zeros
            self.head = (self.mapping[first], old % cluster)
        for index, content in tables.items():
            if content is None:
                continue
            self._fill(content, index, entries)
            offset = l1[index] & L.L1E_OFFSET_MASK
            self.in_place.append((offset, bytes(content)))

    def _claim(self, refcounts: Refcounts, count: int, extra: int) -> int:
        """Claim ``count`` clusters and the extra ones after them; the first's offset."""
        if not count + extra:
            return 0
        base = refcounts.allocate_at_end(count + extra)
        if extra:
            self.extra_offset = base + count * self.cluster
        return base

    def _place(self, refcounts: Refcounts, tables: dict[int, bytearray | None],
               start: int, end: int, entries: int, extra: int) -> None:
        """Claim the new tables and data clusters in qemu's order, in one run."""
        cluster = self.cluster
        new = sorted(index for index, table in tables.items() if table is None)
        at = self._claim(refcounts, len(new) + end - start, extra)
        if self.mode == "metadata":  # each new table, then the data it maps
            for index in sorted(tables):
                if tables[index] is None:
                    self.new_tables.append((index, at))
                    at += cluster
                low, high = max(start, index * entries), min(end, (index + 1) * entries)
                self.data_runs.append((at, high - low))
                for number in range(high - low):
                    self.mapping[low + number] = at + number * cluster
                at += (high - low) * cluster
            return
        self.data_runs.append((at, end - start))  # the data in one run, then tables
        for number in range(end - start):
            self.mapping[start + number] = at + number * cluster
        at += (end - start) * cluster
        for index in new:
            self.new_tables.append((index, at))
            at += cluster

    def _fill(self, table: bytearray, index: int, entries: int) -> None:
        for guest, host in self.mapping.items():
            if guest // entries == index:
                at = (guest % entries) * 8
                table[at : at + 8] = (host | L.OFLAG_COPIED).to_bytes(8, "big")

    def table(self, index: int) -> bytes:
        """The content of new L2 table ``index``."""
        table = bytearray(self.cluster)
        self._fill(table, index, len(table) // 8)
        return bytes(table)

    def write_data(self, update: ImageUpdate) -> None:
        """The new tables, the head's zeros, the data space as the mode asks."""
        for index, offset in self.new_tables:
            update.write(offset, self.table(index))
        for base, count in self.data_runs:
            length = count * self.cluster
            if self.mode == "full":
                update.zeros(base, length)
            elif self.mode == "falloc":
                update.allocate(base, length)
        if self.head is not None:
            update.zeros(*self.head)
        if self.mode == "metadata" and self.data_runs:
            end = max(base + count * self.cluster for base, count in self.data_runs)
            if os.fstat(update.fd).st_size < end:
                update.truncate(end)


class ZeroFill:
    """qemu's zero-fill of the part an image grows by (over a longer backing
    file): the clusters from the old size's next (sub)cluster on become zero
    clusters, in new L2 tables where the L1 names none; the rest of a partial
    last (sub)cluster gets explicit zeros, where the image holds it itself.
    Anything already mapped there (past the old end) is refused."""

    def __init__(self, driver: Qcow2Driver, refcounts: Refcounts, l1: array[int],
                 old: int, new: int) -> None:
        header = driver.header
        self.cluster = cluster = header.cluster_size
        self.extended = header.extended_l2
        self.entry_bytes = 16 if self.extended else 8
        self.entries = L.l2_entries(header.cluster_bits, self.extended)
        sub = cluster // (L.SUBCLUSTERS if self.extended else 1)
        zero_start = -(-old // sub) * sub
        self.first, self.end = zero_start, new
        self.head: tuple[int, int] | None = None
        self.new_tables: list[int] = []  # L1 indexes that get a new table
        self.in_place: list[tuple[int, bytes]] = []
        if zero_start > old:
            self._head(driver, l1, old, min(zero_start, new) - old)
        if zero_start >= new:
            return
        first_cluster, end_cluster = zero_start // cluster, -(-new // cluster)
        for index in range(first_cluster // self.entries, (end_cluster - 1) // self.entries + 1):
            offset = l1[index] & L.L1E_OFFSET_MASK if index < len(l1) else 0
            if not offset:
                self.new_tables.append(index)
                continue
            if offset % cluster or offset + cluster > driver.file.size:
                raise FormatError(f"qcow2 L2 table {index} lies outside the image")
            if refcounts.get(offset // cluster) != 1:
                raise UnsupportedError("growing a qcow2 image whose last L2 table is shared "
                                       "with a snapshot over a longer backing file is not "
                                       "supported yet")
            table = bytearray(driver.file.pread(offset, cluster))
            self._zero(table, index, check=True)
            self.in_place.append((offset, bytes(table)))

    def _head(self, driver: Qcow2Driver, l1: array[int], old: int, length: int) -> None:
        """Explicit zeros after the old end inside its (sub)cluster, which must
        be a data cluster of this image."""
        cluster = self.cluster
        index, slot = divmod(old // cluster, self.entries)
        l2 = l1[index] & L.L1E_OFFSET_MASK if index < len(l1) else 0
        entry = bitmap = 0
        if l2 and not l2 % cluster and l2 + cluster <= driver.file.size:
            raw = driver.file.pread(l2 + slot * self.entry_bytes, self.entry_bytes)
            entry = int.from_bytes(raw[:8], "big")
            bitmap = int.from_bytes(raw[8:16], "big") if self.extended else 0
        host = entry & L.L2E_OFFSET_MASK
        if self.extended:
            bit = (old % cluster) // (cluster // L.SUBCLUSTERS)
            stored = bool(bitmap >> bit & 1) and host and not entry & L.OFLAG_COMPRESSED
            zeros = bool(bitmap >> (32 + bit) & 1)
        else:
            stored = bool(host) and not entry & (L.OFLAG_COMPRESSED | L.OFLAG_ZERO)
            zeros = bool(entry & L.OFLAG_ZERO)
        if zeros:
            return  # reads as zeros already
        if not stored or not entry & L.OFLAG_COPIED or host + cluster > driver.file.size:
            raise UnsupportedError("growing a qcow2 image over a longer backing file from a "
                                   "size inside a cluster it does not hold is not supported yet")
        self.head = (host + old % cluster, length)

    def _zero(self, table: bytearray, index: int, check: bool) -> None:
        """Mark the clusters (and subclusters) of the range in L2 table ``index`` as zeros."""
        cluster, size = self.cluster, self.entries * self.cluster
        start = max(self.first, index * size)
        stop = min(-(-self.end // cluster) * cluster, (index + 1) * size)
        position = start
        while position < stop:
            slot = (position - index * size) // cluster
            at = slot * self.entry_bytes
            entry = int.from_bytes(table[at : at + 8], "big")
            if self.extended:
                bitmap = int.from_bytes(table[at + 8 : at + 16], "big")
                first_sub = (position % cluster) // (cluster // L.SUBCLUSTERS)
                mask = ((1 << L.SUBCLUSTERS) - 1) >> first_sub << first_sub
                if check and (bitmap & mask or (not first_sub and entry)):
                    raise FormatError("qcow2 image maps data past its end")
                bitmap = (bitmap & ~mask) | (mask << 32)
                table[at + 8 : at + 16] = bitmap.to_bytes(8, "big")
            else:
                if check and entry:
                    raise FormatError("qcow2 image maps data past its end")
                table[at : at + 8] = L.OFLAG_ZERO.to_bytes(8, "big")
            position = (position // cluster + 1) * cluster

    def new_table(self, index: int) -> bytes:
        table = bytearray(self.cluster)
        self._zero(table, index, check=False)
        return bytes(table)


def _grow(driver: Qcow2Driver, update: ImageUpdate, refcounts: Refcounts, l1: array[int],
          new_size: int, new_l1_size: int, zero_fill: bool, preallocation: str = "off") -> None:
    """Grow: new L1 table if needed, zero clusters if asked, then the header."""
    header = driver.header
    cluster = header.cluster_size
    grows = new_l1_size > header.l1_size
    old_clusters = -(-header.l1_size * 8 // cluster)
    old_first = header.l1_table_offset // cluster
    if grows:
        for index in range(old_first, old_first + old_clusters):  # freed later: in use now
            if refcounts.get(index) == 0:
                raise FormatError("qcow2 refcount of the L1 table is 0; run "
                                  "'qemu-img check -r all' first")
    table = array("Q", l1)
    table.extend([0] * (max(new_l1_size, header.l1_size) - len(table)))
    fill = ZeroFill(driver, refcounts, table, driver.virtual_size, new_size) \
        if zero_fill else None
    placed: list[tuple[int, int]] = []  # (L1 index, new L2 table offset)
    l1_clusters = -(-new_l1_size * 8 // cluster) if grows else 0
    prealloc = GrowPreallocation(driver, refcounts, table, driver.virtual_size, new_size,
                                 preallocation, l1_clusters) if preallocation != "off" else None
    if prealloc is not None:
        for index, offset in prealloc.new_tables:
            placed.append((index, offset))
            table[index] = offset | L.OFLAG_COPIED
    if fill is not None and fill.new_tables:
        base = refcounts.allocate_at_end(len(fill.new_tables))
        for number, index in enumerate(fill.new_tables):
            placed.append((index, base + number * cluster))
            table[index] = (base + number * cluster) | L.OFLAG_COPIED
    l1_size, l1_offset = header.l1_size, header.l1_table_offset
    data = b""
    if grows:
        l1_size = new_l1_size
        packed = array("Q", table)
        if sys.byteorder == "little":
            packed.byteswap()
        data = packed.tobytes()
        l1_offset = prealloc.extra_offset if prealloc is not None else \
            refcounts.allocate_at_end(-(-len(data) // cluster))
    # 1. data: the claims and the new tables, where nothing points yet.
    update.phase("data")
    refcounts.write_blocks(update)
    refcounts.write_new_table(update)
    if fill is not None:
        for index, offset in placed:
            update.write(offset, fill.new_table(index))
        if fill.head is not None:
            update.zeros(*fill.head)
    if prealloc is not None:
        prealloc.write_data(update)
    if grows:
        update.write(l1_offset, data)
    # 2. pointers: the refcount table to new blocks, L2 and L1 entries past the
    # old end (nothing reads them before the header's new size).
    update.phase("pointers")
    refcounts.write_table_entries(update)
    for offset, content in [*(fill.in_place if fill else ()),
                            *(prealloc.in_place if prealloc else ())]:
        update.write(offset, content)
    if not grows:
        for index, offset in placed:
            entry = offset | L.OFLAG_COPIED
            update.write(l1_offset + 8 * index, entry.to_bytes(8, "big"))
    # 3. header: size and the new tables in one write of one sector.
    update.phase("header")
    write_sizes(update, header, refcounts, new_size, l1_size, l1_offset)
    # 4. release: the old tables' clusters.
    update.phase("release")
    if grows and header.l1_size:
        refcounts.add(old_first, old_clusters, -1)
    refcounts.release_old_table()
    refcounts.write_blocks(update)


def write_sizes(update: ImageUpdate, header: L.Header, refcounts: Refcounts, size: int,
                  l1_size: int, l1_offset: int) -> None:
    """The header's size, L1 table and refcount table fields: one write of
    36 bytes inside the first sector, so a crash leaves all old or all new."""
    table_offset, table_clusters = refcounts.table_fields()
    update.write(_SIZE_OFFSET, _HEADER_FIELDS.pack(size, header.crypt_method, l1_size,
                                                   l1_offset, table_offset, table_clusters))


def _shrink(driver: Qcow2Driver, update: ImageUpdate, refcounts: Refcounts, l1: array[int],
            new_size: int, new_l1_size: int) -> None:
    """Drop what lies past ``new_size``. An L2 table the active L1 shares
    with a snapshot (refcount above 1) is copied, as qemu copies it before
    changing it: the copy, cleared past the end, takes its place."""
    header = driver.header
    cluster, bits = header.cluster_size, header.cluster_bits
    entries = L.l2_entries(header.cluster_bits, header.extended_l2)
    entry_bytes = 16 if header.extended_l2 else 8
    first_dropped = -(-new_size // cluster)  # qemu keeps the cluster the size ends in
    shift = L.compressed_shift(bits)
    lowered: dict[int, int] = {}  # cluster -> how much its refcount goes down
    in_place: list[tuple[int, bytes]] = []  # tables changed where they are
    copies: list[tuple[int, bytes]] = []  # (L1 index, the shared table's new copy)
    cleared: list[int] = []  # L1 entries past the new table size

    def lower(first: int, count: int) -> None:
        for number in range(first, first + count):
            lowered[number] = lowered.get(number, 0) + 1

    for l1_index in range(first_dropped // entries, len(l1)):
        l2_offset = l1[l1_index] & L.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset % cluster or l2_offset + cluster > driver.file.size:
            raise FormatError(f"qcow2 L2 table {l1_index} lies outside the image")
        table = bytearray(driver.file.pread(l2_offset, cluster))
        start = max(0, first_dropped - l1_index * entries)
        for slot in range(start, entries):
            position = slot * entry_bytes
            held = L.held_clusters(int.from_bytes(table[position : position + 8], "big"),
                                     cluster, shift)
            if held is not None:
                lower(*held)
            table[position : position + entry_bytes] = bytes(entry_bytes)
        if l1_index >= new_l1_size:
            lower(l2_offset // cluster, 1)
            cleared.append(l1_index)
        elif refcounts.get(l2_offset // cluster) > 1:
            lower(l2_offset // cluster, 1)
            copies.append((l1_index, bytes(table)))
        else:
            in_place.append((l2_offset, bytes(table)))
    for number, count in lowered.items():  # refused before anything is written
        if refcounts.get(number) < count:
            raise FormatError(f"qcow2 refcount of cluster {number:#x} does not match the "
                              "image's tables; run 'qemu-img check -r all' first")
    # 1. data: the copies of shared tables, claimed, where nothing points yet.
    placed = [(index, refcounts.allocate_at_end(1), data) for index, data in copies]
    update.phase("data")
    refcounts.write_blocks(update)
    refcounts.write_new_table(update)
    for _, offset, data in placed:
        update.write(offset, data)
    # 2. pointers: L2 entries past the new end cleared, the L1 pointed at the
    # copies (which only it uses: COPIED) and cleared past the new table size.
    update.phase("pointers")
    refcounts.write_table_entries(update)
    for offset, data in in_place:
        update.write(offset, data)
    for index, offset, _ in placed:
        entry = offset | L.OFLAG_COPIED
        update.write(header.l1_table_offset + 8 * index, entry.to_bytes(8, "big"))
    for index in cleared:
        update.write(header.l1_table_offset + 8 * index, bytes(8))
    # 3. header: the new size (and refcount table, if it grew).
    update.phase("header")
    write_sizes(update, header, refcounts, new_size, header.l1_size, header.l1_table_offset)
    # 4. release: the refcounts of what was dropped, then the file's unused tail.
    update.phase("release")
    for number, count in sorted(lowered.items()):
        refcounts.add(number, 1, -count)
    refcounts.release_old_table()
    refcounts.write_blocks(update)
    end = (refcounts.last_in_use() + 1) * cluster
    if end < driver.file.size:
        update.flush()
        update.truncate(end)
