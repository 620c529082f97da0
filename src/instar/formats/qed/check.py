"""QED: what ``qemu-img check`` 7.2 checks (qemu's ``bdrv_qed_co_check``).

Every entry of the L1 table, not only those the image size needs, names an
L2 table or nothing; every entry of a valid table names a data cluster, a
zero cluster (1) or nothing. An offset qemu would not accept (unaligned, in
the header, past the end of the file) is a corruption; so is a cluster
referenced twice (its second reference; an L2 table referenced twice is
counted and not read again). The clusters after the header that nothing
references are leaks, counted only if every table could be read. qemu
prints no line of its own: only the counts, and the allocation figures
(every entry that names a cluster, valid or not, is allocated; one that does
not follow the previous one of its table is fragmented).

qemu numbers clusters by dividing a byte offset, rounded up to a cluster,
by the cluster size less one (``qed_bytes_to_clusters``): up to cluster
``C - 1`` the numbers are right, past it they drift by one every ``C - 1``
clusters, so a cluster may take its neighbour's number and the file's
length counts a little more than its clusters. instar numbers them as qemu
does (`qemu_cluster`): the counts are qemu's, drift and all.

Memory and time: one bit per cluster number (`HostClaims`, anonymous
memory); the L1 table (up to 1 GiB) is read a piece at a time, only where
the file holds data (holes are empty entries), empty stretches of what is
read skipped at memory speed.
"""

from __future__ import annotations

from instar.findings import CheckResult
from instar.formats.common import HostClaims, first_other, unpack_table
from instar.formats.qed import layout as L
from instar.formats.qed.reader import QedDriver, read_padded
from instar.image import file_layout

_L1_PIECE = 1 << 16  # L1 entries read at once


def qemu_cluster(offset: int, cluster: int) -> int:
    """qemu's number for the cluster at ``offset`` (its ``qed_bytes_to_clusters``)."""
    return -(-offset // cluster) * cluster // (cluster - 1)


def check(driver: QedDriver) -> CheckResult:
    header = driver.header
    cluster = header.cluster_size
    length = L.qemu_length(driver.file.size)
    clusters = qemu_cluster(length // cluster * cluster, cluster)  # qemu's count of the file
    result = CheckResult()
    result.total_clusters = -(-header.image_size // cluster)
    used = HostClaims(clusters, 1)  # one unit per cluster number
    try:
        _mark(used, result, header.l1_table_offset, header.table_size, cluster)
        for offset in _l1_pieces(driver):
            count = min(_L1_PIECE, header.table_entries - (offset - header.l1_table_offset) // 8)
            piece = unpack_table(read_padded(driver.file, offset, count * 8), 8, "little")
            index = 0
            while (index := first_other(piece, index, count, 0)) < count:
                _check_table(driver, used, result, piece[index], length)
                index += 1
        after_header = max(0, clusters - header.header_size)
        result.leaks += after_header - used.count(header.header_size, after_header)
    finally:
        used.close()
    return result


def _l1_pieces(driver: QedDriver) -> list[int]:
    """Where the pieces of the L1 table that may hold entries begin, in order:
    the file's holes read as zeros, entries of no table."""
    header = driver.header
    start, size = header.l1_table_offset, header.table_entries * 8
    piece = _L1_PIECE * 8
    offsets: list[int] = []
    for offset, length, has_data in file_layout(driver.file, start, size):
        if has_data:
            first = start + (offset - start) // piece * piece
            for at in range(first, offset + length, piece):
                if not offsets or at > offsets[-1]:
                    offsets.append(at)
    return offsets


def _mark(used: HostClaims, result: CheckResult, offset: int, count: int, cluster: int) -> bool:
    """qemu's ``qed_set_used_clusters``: ``count`` cluster numbers from the
    one of ``offset``; each seen before is a corruption; False if any was."""
    first = qemu_cluster(offset, cluster)
    if used.claim(first, count):
        return True
    for number in range(first, first + count):  # which ones: the error path
        if used.claimed(number, 1):
            result.corruptions += 1
        else:
            used.claim(number, 1)
    return False


def _check_table(driver: QedDriver, used: HostClaims, result: CheckResult, offset: int,
                 length: int) -> None:
    """One L1 entry's L2 table and the clusters it names."""
    header = driver.header
    cluster = header.cluster_size
    if not L.table_offset_valid(offset, header, length):
        result.corruptions += 1
        return
    table_bytes = header.table_size * cluster
    if not _mark(used, result, offset, header.table_size, cluster):
        return  # a table referenced twice: not read again
    table = unpack_table(read_padded(driver.file, offset, table_bytes), 8, "little")
    size, last, index = len(table), 0, 0
    while (index := first_other(table, index, size, 0)) < size:
        entry = table[index]
        index += 1
        if entry == L.ZERO_CLUSTER:
            continue
        result.allocated_clusters += 1
        if last and last + cluster != entry:
            result.fragmented_clusters += 1
        last = entry
        if not L.cluster_offset_valid(entry, header, length):
            result.corruptions += 1
            continue
        _mark(used, result, entry, 1, cluster)
