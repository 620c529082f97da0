"""A qcow2 image emptied in place, as qemu 7.2's ``bdrv_make_empty`` leaves it
after ``qemu-img commit`` (used by `instar.commit`).

qemu empties a version 3 image without snapshots, bitmaps, encryption or an
external data file "completely": the header stays in cluster 0, the refcount
table (one cluster) in cluster 1 holds one refcount block, in cluster 2, the
L1 table (zeroed) follows in cluster 3, and the file ends right after it;
only those clusters have a refcount (1). instar reaches the same image in
place, for an image already laid out that way (every image qemu-img creates,
until its L1 or refcount table grows), through one `ImageUpdate`, each step
leaving at worst leaked clusters (qemu's own order can leave it broken):

1. ``pointers``: the L1 table zeroed: the image holds nothing any more (its
   backing file answers everywhere; commit wrote the same data there);
2. ``release``: the refcount table keeps only its first block (the clusters
   the others counted are no longer used); that block then counts only the
   four areas above; the file is cut after the L1 table.

Every other image (internal snapshots, version 2, an external data file, an
L1 table too large for one refcount block) qemu empties by discarding every
active cluster (`_plan_discard` says how, in qemu's order and with qemu's
cluster placement, so ``qemu-img check`` reports the same image end): the
clusters a snapshot holds stay. instar writes that through one update too
(`_discard_all`): new L2 tables where nothing points yet, then the cleared
tables, then tables placed in clusters the discard freed (once nothing on
disk points into them), the L1 entries, the data file's clusters zeroed
(qemu punches holes there: both read zeros), the refcounts last. Refused
before the commit writes anything: persistent bitmaps (qemu rewrites them
as it closes the image: not supported yet), an image whose refcounts
qemu-img check finds wrong, and a discard that would need a larger
refcount table (not supported yet).
"""

from __future__ import annotations

import os
from array import array

from instar.errors import FormatError, UnsupportedError
from instar.formats.common import read_table
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.allocation import Refcounts
from instar.formats.qcow2.check import check
from instar.formats.qcow2.reader import Qcow2Driver
from instar.mutate import ImageUpdate
from instar.runtime_types import NamedTuple


def _completely(driver: Qcow2Driver) -> bool:
    """Whether qemu rebuilds the image completely empty (else it discards)."""
    header = driver.header
    return (header.version >= 3 and not header.nb_snapshots
            and not driver.extensions.has_bitmaps and not header.crypt_method
            and not header.incompatible_features & L.INCOMPAT_DATA_FILE
            and 3 + _l1_clusters(driver)
            <= header.cluster_size * 8 // (1 << header.refcount_order))


def check_emptiable(driver: Qcow2Driver) -> None:
    """Refuse, before anything is written, an image `make_empty` cannot empty
    as qemu does."""
    header = driver.header
    cluster = header.cluster_size
    if not _completely(driver):
        _plan_discard(driver)  # refuses what it cannot discard, writes nothing
        return
    first_block = driver.file.pread(header.refcount_table_offset, 8)
    if (header.refcount_table_offset != cluster or header.refcount_table_clusters != 1
            or int.from_bytes(first_block, "big") & L.REFTABLE_OFFSET_MASK != 2 * cluster
            or header.l1_table_offset != 3 * cluster):
        raise UnsupportedError("emptying a qcow2 image whose tables have moved (not at "
                               "clusters 1, 2 and 3) is not supported yet; use -d to keep "
                               "its data")


def _l1_clusters(driver: Qcow2Driver) -> int:
    return -(-driver.header.l1_size * 8 // driver.header.cluster_size)


def make_empty(driver: Qcow2Driver, update: ImageUpdate,
               data_update: ImageUpdate | None = None) -> None:
    """Empty the image (checked by `check_emptiable`) as the module says;
    ``data_update`` writes its external data file, if it has one."""
    if not _completely(driver):
        _discard_all(driver, update, data_update)
        return
    check_emptiable(driver)
    header = driver.header
    cluster = header.cluster_size
    l1_clusters = _l1_clusters(driver)
    used = 3 + l1_clusters
    update.phase("pointers")
    if l1_clusters:
        update.write(3 * cluster, bytes(l1_clusters * cluster))
    update.phase("release")
    table = bytearray(cluster)
    table[:8] = (2 * cluster).to_bytes(8, "big")
    update.write(cluster, bytes(table))
    update.flush()  # the other blocks unnamed before the first forgets their clusters
    block = bytearray(cluster)
    width = 1 << header.refcount_order
    for index in range(used):
        if width >= 8:
            size = width // 8
            block[index * size : (index + 1) * size] = (1).to_bytes(size, "big")
        else:
            bit = index * width
            block[bit // 8] |= 1 << (bit % 8)
    update.write(2 * cluster, bytes(block))
    update.flush()
    update.truncate(used * cluster)


class _Table(NamedTuple):
    """One L2 table of the discard: ``l1_index``, the table it had
    (``old``: 0 for none), the cluster it gets (``new``: None when it is
    cleared in place) and its content afterwards (None: all zeros)."""

    l1_index: int
    old: int
    new: int | None
    content: bytes | None


class _Plan(NamedTuple):
    """qemu's full discard worked out before anything is written."""

    tables: list[_Table]
    claimed: list[int]  # clusters of new tables and blocks that had no refcount before
    refcounts: Refcounts  # every refcount as it is afterwards
    data_clusters: list[int]  # host offsets in the external data file to zero


class _Allocator:
    """qemu's cluster allocation during the discard (``qcow2_alloc_clusters``):
    the lowest cluster without a refcount (every cluster below ``hint`` has
    one; a freed cluster lowers it), and where no refcount block counts it
    yet, a new block at the next free cluster (describing itself, or counted
    by a block made the same way), as ``alloc_refcount_block`` does."""

    def __init__(self, refcounts: Refcounts) -> None:
        self.refcounts = refcounts
        self.hint = 0
        self.claimed: list[int] = []  # clusters that had no refcount on disk
        self.freed: set[int] = set()  # clusters whose last reference was dropped

    def _next_free(self) -> int:
        refcounts = self.refcounts
        cluster = self.hint
        while refcounts.has_block(cluster // refcounts.per_block) \
                and refcounts.get(cluster):
            cluster += 1
        self.hint = cluster + 1
        return cluster

    def allocate(self) -> int:
        """One cluster, claimed (refcount 1); its number."""
        number = self._next_free()
        self._claim(number)
        return number

    def _claim(self, number: int) -> None:
        refcounts = self.refcounts
        index = number // refcounts.per_block
        if not refcounts.has_block(index):
            if index >= refcounts.capacity():
                raise UnsupportedError("emptying this qcow2 image after the commit needs a "
                                       "larger refcount table, which is not supported yet; "
                                       "use -d to keep its data")
            block = self._next_free()
            if block in self.freed:  # (a refcount table with holes) written too early
                raise UnsupportedError("emptying this qcow2 image after the commit needs a "
                                       "refcount block in a freed cluster, which is not "
                                       "supported yet; use -d to keep its data")
            if block // refcounts.per_block != index:
                self._claim(block)  # counted by the block of its own region
                refcounts.add_block(index, block * refcounts.cluster)
            else:
                refcounts.add_block(index, block * refcounts.cluster)
                refcounts.set(block, 1)
                self.claimed.append(block)
        refcounts.set(number, 1)
        if number not in self.freed:
            self.claimed.append(number)

    def drop(self, number: int) -> None:
        """One reference to cluster ``number`` dropped."""
        self.refcounts.add(number, 1, -1)
        if self.refcounts.get(number) == 0:
            self.freed.add(number)
            self.hint = min(self.hint, number)


def _plan_discard(driver: Qcow2Driver) -> _Plan:
    """qemu's ``qcow2_cluster_discard`` of the whole disk (full discard), in
    its order: for each L2 table the disk's size spans, a table the active
    L1 does not own (no COPIED flag: shared with a snapshot, or none yet)
    is replaced by a new one at the lowest free cluster (its content kept,
    the old one's reference dropped); then each of its entries is cleared and
    the reference it held dropped (in an external data file, the cluster is
    discarded instead). Clusters freed on the way are reused by the next
    allocations, as qemu's are. Refused untouched: an image whose refcounts
    qemu-img check finds wrong (reusing a cluster relies on them)."""
    header = driver.header
    cluster = header.cluster_size
    if driver.extensions.has_bitmaps or header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        raise UnsupportedError("emptying a qcow2 image with persistent bitmaps after the "
                               "commit is not supported yet; use -d to keep its data")
    result = check(driver)
    if result.failure or result.corruptions or result.check_errors:
        raise FormatError("qcow2 image has errors; run 'qemu-img check -r all' first")
    refcounts = Refcounts(driver)
    extended = header.extended_l2
    entry_bytes = 16 if extended else 8
    per_table = L.l2_entries(header.cluster_bits, extended)
    clusters = -(-driver.virtual_size // cluster)
    count = -(-clusters // per_table)
    if count > header.l1_size:
        raise FormatError("qcow2 L1 table is too small for the image's size")
    l1 = (read_table(driver.file, header.l1_table_offset, header.l1_size, 8, "big",
                     "L1 table") if header.l1_size else array("Q"))
    data_file = header.incompatible_features & L.INCOMPAT_DATA_FILE
    tables: list[_Table] = []
    data_clusters: list[int] = []
    allocator = _Allocator(refcounts)
    drop = allocator.drop

    for index in range(count):
        l1_entry = l1[index]
        old = l1_entry & L.L1E_OFFSET_MASK
        new: int | None = None
        if not l1_entry & L.OFLAG_COPIED:
            new = allocator.allocate() * cluster
            if old:
                drop(old // cluster)
        raw = bytearray(driver.file.pread(old, cluster)) if old else bytearray(cluster)
        if len(raw) != cluster:
            raise FormatError(f"qcow2 L2 table {index} lies outside the image")
        slots = min(per_table, clusters - index * per_table)
        changed = False
        for slot in range(slots):
            at = slot * entry_bytes
            piece = raw[at : at + entry_bytes]
            if not any(piece):
                continue
            changed = True
            raw[at : at + entry_bytes] = bytes(entry_bytes)
            entry = int.from_bytes(piece[:8], "big")
            host = entry & L.L2E_OFFSET_MASK
            if entry & L.OFLAG_COMPRESSED:
                start, length = driver.compressed_range(entry)
                for number in range(start // cluster, (start + length - 1) // cluster + 1):
                    drop(number)
            elif data_file:
                if host or entry & L.OFLAG_COPIED:
                    data_clusters.append(host)
            elif host:
                drop(host // cluster)
        if new is not None or changed:
            tables.append(_Table(index, old, new, bytes(raw) if any(raw) else None))
    return _Plan(tables, allocator.claimed, refcounts, data_clusters)


def _discard_all(driver: Qcow2Driver, update: ImageUpdate,
                 data_update: ImageUpdate | None) -> None:
    """Carry out `_plan_discard` crash safe: new tables first where nothing
    points (claimed), then the cleared tables in place, the new tables that
    reuse freed clusters once nothing on disk points into those, the L1
    entries, the data file's clusters zeroed, and the refcounts last."""
    plan = _plan_discard(driver)
    cluster = driver.header.cluster_size
    claimed = set(plan.claimed)
    update.phase("data")
    claims = Refcounts(driver)  # the claims alone, written before anything points there
    for index, offset in sorted(plan.refcounts.new.items()):
        claims.add_block(index, offset)
    for number in plan.claimed:
        claims.set(number, 1)
    for table in plan.tables:
        if table.new is not None and table.new // cluster in claimed:
            update.write(table.new, table.content or bytes(cluster))
    claims.write_blocks(update)
    update.phase("pointers")
    claims.write_table_entries(update)
    update.flush()
    for table in plan.tables:
        if table.new is None:
            update.write(table.old, table.content or bytes(cluster))
    update.flush()  # nothing points into the clusters freed now: they may be reused
    for table in plan.tables:
        if table.new is not None and table.new // cluster not in claimed:
            update.write(table.new, table.content or bytes(cluster))
    update.flush()
    l1_offset = driver.header.l1_table_offset
    for table in plan.tables:
        if table.new is not None:
            entry = table.new | L.OFLAG_COPIED
            update.write(l1_offset + 8 * table.l1_index, entry.to_bytes(8, "big"))
    update.flush()
    if data_update is not None and plan.data_clusters:
        size = os.fstat(data_update.fd).st_size
        data_update.phase("data")
        for host in plan.data_clusters:
            if host < size:
                data_update.write(host, bytes(min(cluster, size - host)))
        data_update.finish()
    update.phase("release")
    plan.refcounts.write_blocks(update)
