"""A qcow2 image emptied in place, as qemu 7.2's ``bdrv_make_empty`` leaves it
after ``qemu-img commit`` (used by `instar.commit`).

qemu empties a version 3 image without snapshots, bitmaps, encryption or an
external data file "completely": the header stays in cluster 0, the refcount
table (one cluster) in cluster 1 holds one refcount block, in cluster 2, the
L1 table (zeroed) follows in cluster 3, and the file ends right after it;
only those clusters have a refcount (1). Every other image qemu empties by
discarding each cluster, which instar does not do yet (refused before the
commit writes anything).

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

from instar.errors import UnsupportedError
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import Qcow2Driver
from instar.mutate import ImageUpdate


def check_emptiable(driver: Qcow2Driver) -> None:
    """Refuse, before anything is written, an image `make_empty` cannot empty
    as qemu does."""
    header = driver.header
    cluster = header.cluster_size
    qemu_empties_completely = (
        header.version >= 3 and not header.nb_snapshots
        and not driver.extensions.has_bitmaps and not header.crypt_method
        and not header.incompatible_features & L.INCOMPAT_DATA_FILE
        and 3 + _l1_clusters(driver) <= cluster * 8 // (1 << header.refcount_order))
    if not qemu_empties_completely:
        raise UnsupportedError("emptying this qcow2 image after the commit (version 2, "
                               "snapshots, bitmaps, encryption or a data file) is not "
                               "supported yet; use -d to keep its data")
    if header.incompatible_features & L.INCOMPAT_DIRTY:
        raise UnsupportedError("the qcow2 image is dirty (lazy refcounts); instar does not "
                               "repair it before a commit yet: run 'qemu-img check -r all'")
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
