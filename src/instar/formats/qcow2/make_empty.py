"""A qcow2 image emptied in place, as qemu 7.2's ``bdrv_make_empty`` leaves it
after ``qemu-img commit`` (used by `instar.commit`).

qemu empties a version 3 image without snapshots, bitmaps, encryption or an
external data file "completely": the header stays in cluster 0, the refcount
table (one cluster) in cluster 1 holds one refcount block, in cluster 2, the
L1 table (zeroed) follows in cluster 3, and the file ends right after it;
only those clusters have a refcount (1). Every other image qemu empties by
discarding each cluster: instar does that for images without snapshots
(version 2: every L2 entry set to 0, then the references dropped), and
refuses the others before the commit writes anything.

qemu rewrites those clusters in an order that a crash can leave broken.
instar reaches the same image in place, for an image already laid out that
way (every image qemu-img creates, until its L1 or refcount table grows),
through one `ImageUpdate`, each step leaving at worst leaked clusters:

1. ``pointers``: the L1 table zeroed: the image holds nothing any more (its
   backing file answers everywhere; commit wrote the same data there);
2. ``release``: the refcount table keeps only its first block (the clusters
   the others counted are no longer used); that block then counts only the
   four areas above; the file is cut after the L1 table.
"""

from __future__ import annotations

from array import array

from instar.errors import FormatError, UnsupportedError
from instar.formats.common import read_table
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.allocation import Refcounts
from instar.formats.qcow2.reader import Qcow2Driver
from instar.mutate import ImageUpdate


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
        if (header.nb_snapshots or driver.extensions.has_bitmaps or header.crypt_method
                or header.incompatible_features & L.INCOMPAT_DATA_FILE):
            raise UnsupportedError("emptying a qcow2 image with snapshots, bitmaps, "
                                   "encryption or a data file after the commit is not "
                                   "supported yet; use -d to keep its data")
        return  # discarded cluster by cluster (version 2)
    first_block = driver.file.pread(header.refcount_table_offset, 8)
    if (header.refcount_table_offset != cluster or header.refcount_table_clusters != 1
            or int.from_bytes(first_block, "big") & L.REFTABLE_OFFSET_MASK != 2 * cluster
            or header.l1_table_offset != 3 * cluster):
        raise UnsupportedError("emptying a qcow2 image whose tables have moved (not at "
                               "clusters 1, 2 and 3) is not supported yet; use -d to keep "
                               "its data")


def _l1_clusters(driver: Qcow2Driver) -> int:
    return -(-driver.header.l1_size * 8 // driver.header.cluster_size)


def make_empty(driver: Qcow2Driver, update: ImageUpdate) -> None:
    """Empty the image (checked by `check_emptiable`) as the module says."""
    check_emptiable(driver)
    if not _completely(driver):
        _discard_all(driver, update)
        return
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


def _discard_all(driver: Qcow2Driver, update: ImageUpdate) -> None:
    """qemu's other way (a full discard of the whole disk, for an image
    without snapshots here): every L2 entry set to 0 and the references of the
    clusters they named dropped; the L2 tables and the file's length stay.
    Every reference is counted before anything is written, so an image whose
    refcounts do not match its tables is refused untouched."""
    header = driver.header
    cluster = header.cluster_size
    refcounts = Refcounts(driver)
    l1 = (read_table(driver.file, header.l1_table_offset, header.l1_size, 8, "big",
                     "L1 table") if header.l1_size else array("Q"))
    tables: list[int] = []
    for index, l1_entry in enumerate(l1):
        offset = l1_entry & L.L1E_OFFSET_MASK
        if not offset:
            continue
        if offset % cluster or offset + cluster > driver.file.size:
            raise FormatError(f"qcow2 L2 table {index} lies outside the image")
        if refcounts.get(offset // cluster) != 1:
            raise FormatError(f"qcow2 refcount of L2 table {index} is not 1; run "
                              "'qemu-img check -r all' first")
        entries = read_table(driver.file, offset, cluster // 8, 8, "big", "L2 table")
        if not any(entries):
            continue
        tables.append(offset)
        for entry in entries:
            if entry & L.OFLAG_COMPRESSED:
                start, length = driver.compressed_range(entry)
                first, last = start // cluster, (start + length - 1) // cluster
                refcounts.add(first, last - first + 1, -1)
            elif entry & L.L2E_OFFSET_MASK:
                refcounts.add((entry & L.L2E_OFFSET_MASK) // cluster, 1, -1)
    update.phase("pointers")
    for offset in tables:
        update.write(offset, bytes(cluster))
    update.phase("release")
    refcounts.write_blocks(update)
