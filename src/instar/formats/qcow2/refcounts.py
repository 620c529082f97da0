"""qcow2 refcounts: the ones the metadata implies and the ones on disk, for
``check``; and qemu's guess, for reading, that an image was preallocated with
metadata only.

`Expected` holds the refcount every cluster should have, built up by the
check's walk: per refcount block, only where something was referenced, as
qemu's in-memory table is (entries of the image's refcount width, saturating
at its maximum). `OnDisk` reads the refcount blocks the refcount table names,
as qemu's ``qcow2_get_refcount`` finds them. `differences` compares the two a
block at a time, by memcmp.

qemu's qcow2 driver guesses (``qcow2_detect_metadata_preallocation``) the
first time it is asked for block status whether the file has at least a ninth
more clusters in use, by its refcounts, than the file system holds for it (and
at least two more). Then the clusters it maps are mostly holes in the file,
and its block status asks the file where, so holes inside data clusters are
reported as zeros (``BDRV_BLOCK_RECURSE``). The reader does the same
(`metadata_preallocated`).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterator

from instar.files import InputFile
from instar.formats.common import TableCache, first_other
from instar.formats.qcow2 import layout as L

# The array type of one refcount entry of each order (orders 0 to 3 in bytes).
_TYPECODES = {4: "H", 5: "I" if array("I").itemsize == 4 else "L", 6: "Q"}
UNALIGNED = "unaligned"  # OnDisk.block's answer for a block at an unaligned offset


def typecode(order: int) -> str:
    return _TYPECODES.get(order, "B")


class Overflow(Exception):
    """A refcount would pass the maximum the width holds (qemu's "overflow")."""


class Expected:
    """The refcounts the metadata implies, a refcount block's worth at a time.

    ``clusters`` is qemu's ``nb_clusters``: the file's clusters, grown to
    cover a reference that ends in the cluster the file ends in.
    """

    def __init__(self, cluster_bits: int, order: int, clusters: int) -> None:
        self.order = order
        self.maximum = (1 << (1 << order)) - 1
        self.typecode = typecode(order)
        self.block_bits = cluster_bits + 3 - order  # entries per refcount block, a power of 2
        self.block_size = 1 << self.block_bits
        self.clusters = clusters
        self.blocks: dict[int, array[int]] = {}
        self._zeros = array(self.typecode, bytes(self.block_size * array(self.typecode).itemsize))

    def add(self, first: int, count: int, times: int, strict: bool) -> list[int]:
        """Add ``times`` to ``count`` clusters from ``first``; returns the clusters
        (in order, one per addition) that would pass the maximum and stay at it,
        or raises Overflow if ``strict``."""
        self.clusters = max(self.clusters, first + count)
        ceiling, size = self.maximum, self.block_size
        overflowed: list[int] = []
        cluster, end = first, first + count
        while cluster < end:
            block, within = divmod(cluster, size)
            stop = min(end, (block + 1) * size)
            counts = self.blocks.get(block)
            if counts is None:  # never past the last cluster a reference may reach
                length = min(size, self.clusters + 1 - block * size)
                counts = self.blocks[block] = self._zeros[:length]
            span = stop - cluster
            if times <= ceiling and span > 8 and counts[within : within + span] == \
                    self._zeros[:span]:  # untouched clusters: set at once
                counts[within : within + span] = array(self.typecode, [times]) * span
                cluster = stop
                continue
            for index in range(within, within + span):
                value = counts[index]
                if value + times > ceiling:
                    if strict:
                        raise Overflow()
                    overflowed.append(block * size + index)
                    continue
                counts[index] = value + times
            cluster = stop
        return overflowed

    def claim(self, cluster: int) -> None:
        """Give a free ``cluster`` the refcount 1 (``check -r``'s rebuild
        allocating in this table), growing ``clusters`` to cover it."""
        self.clusters = max(self.clusters, cluster + 1)
        block, within = divmod(cluster, self.block_size)
        counts = self.blocks.get(block)
        if counts is None:
            counts = self.blocks[block] = self._zeros[:0]
        if len(counts) <= within:
            counts.extend(self._zeros[: within + 1 - len(counts)])
        counts[within] = 1

    def get(self, cluster: int) -> int:
        counts = self.blocks.get(cluster >> self.block_bits)
        within = cluster & (self.block_size - 1)
        return counts[within] if counts is not None and within < len(counts) else 0

    def values(self, block: int, length: int) -> array[int]:
        """``length`` expected refcounts from the start of refcount block ``block``."""
        return fitted(self.blocks.get(block), length, self.typecode)


class OnDisk:
    """The refcounts on disk: the refcount table, its blocks decoded on demand.

    ``read(offset, length)`` reads the file as qemu does (zeros past the end);
    it raises ``failure`` with a strerror where qemu's read fails.
    """

    def __init__(self, table: array[int], table_size: int, cluster_bits: int, order: int,
                 read: Callable[[int, int], bytes], failure: type[Exception]) -> None:
        self.table = table  # the entries inside the file (the rest are 0)
        self.table_size = table_size  # qemu's refcount_table_size
        self.cluster = 1 << cluster_bits
        self.order = order
        self.block_bits = cluster_bits + 3 - order
        self.block_size = 1 << self.block_bits
        self._read = read
        self._failure = failure
        self._blocks: TableCache[array[int] | str | None] = TableCache(self._load, 64)

    def block(self, index: int) -> array[int] | str | None:
        """Refcount block ``index`` decoded, None if the table names none (all
        0), "unaligned" or why qemu cannot read it (a strerror)."""
        return self._blocks.get(index)

    def block_offset(self, index: int) -> int:
        return self.table[index] & L.REFTABLE_OFFSET_MASK if index < len(self.table) else 0

    def _load(self, index: int) -> array[int] | str | None:
        if index >= self.table_size:
            return None
        offset = self.block_offset(index)
        if not offset:
            return None
        if offset & (self.cluster - 1):
            return UNALIGNED
        try:
            data = self._read(offset, self.cluster)
        except self._failure as failed:
            return str(failed)
        return decode(data, self.order)


def decode(data: bytes, order: int) -> array[int]:
    """A refcount block's entries; those narrower than a byte unpacked at C speed."""
    if order >= 3:
        values = array(typecode(order), data)
        if order > 3 and sys.byteorder == "little":
            values.byteswap()
        return values
    width = 4  # a byte holds two 4-bit entries, each two 2-bit ones, each two bits
    while width >= 1 << order:
        data = _split(data, width)
        width //= 2
    return array("B", data)


def encode(values: array[int], order: int) -> bytes:
    """Refcount entries as a refcount block holds them (`decode`'s inverse)."""
    if order >= 3:
        out = array(typecode(order), values)
        if order > 3 and sys.byteorder == "little":
            out.byteswap()
        return out.tobytes()
    data = bytes(values)
    width = 1 << order
    while width < 8:  # two fields of ``width`` bits make one of twice the width
        low, high = data[0::2], data[1::2]
        joined = (int.from_bytes(high, "big") << width) | int.from_bytes(low, "big")
        data = joined.to_bytes(len(low), "big")
        width *= 2
    return data


def _split(values: bytes, width: int) -> bytes:
    """Each byte of ``values`` (two fields of ``width`` bits) as two bytes, the
    low field first."""
    out = bytearray(2 * len(values))
    out[0::2] = values.translate(_LOW[width])
    out[1::2] = values.translate(_HIGH[width])
    return bytes(out)


_LOW = {w: bytes(x & ((1 << w) - 1) for x in range(256)) for w in (1, 2, 4)}
_HIGH = {w: bytes((x >> w) & ((1 << w) - 1) for x in range(256)) for w in (1, 2, 4)}


def fitted(values: array[int] | None, length: int, code: str) -> array[int]:
    """``length`` refcounts from ``values`` (zeros where it has none) as ``code``."""
    width = array(code).itemsize
    if values is None:
        return array(code, bytes(length * width))
    part = values[:length]
    if part.typecode != code:
        part = array(code, part)
    if len(part) < length:
        part.frombytes(bytes((length - len(part)) * width))
    return part


def last_nonzero(values: array[int]) -> int:
    """The index of the last entry that is not 0, or -1."""
    kept = len(values.tobytes().rstrip(b"\0"))
    return (kept - 1) // values.itemsize if kept else -1


def differences(found: array[int], wanted: array[int]) -> Iterator[int]:
    """The positions where two arrays differ, found by halving (memcmp)."""
    pending = [(0, len(found))]
    while pending:
        low, high = pending.pop()
        if found[low:high] == wanted[low:high]:
            continue
        if high - low <= 64:
            for position in range(low, high):
                if found[position] != wanted[position]:
                    yield position
            continue
        middle = (low + high) // 2
        pending.append((middle, high))
        pending.append((low, middle))


def nonzero_entries(block: bytes, order: int, count: int) -> int:
    """How many of the first ``count`` refcounts of ``block`` (entries of
    ``1 << order`` bits) are not zero."""
    values = decode(block[: -(-count << order >> 3)], order)[:count]
    return len(values) - values.count(0)


def read_reftable(file: InputFile, header: L.Header) -> array[int]:
    """The refcount table (zeros where it lies past the end of the file, as
    qemu reads them); its size was checked at open."""
    size = header.refcount_table_clusters * header.cluster_size
    offset = header.refcount_table_offset
    data = file.pread(offset, size) if offset < file.size else b""
    table = array("Q", data.ljust(size, b"\0"))
    if sys.byteorder == "little":
        table.byteswap()
    return table


def metadata_preallocated(file: InputFile, header: L.Header, reftable: array[int]) -> bool:
    """qemu's guess: True when the refcounts name at least
    ``max(real * 10 / 9, real + 2)`` clusters of the file, ``real`` being the
    clusters the file system allocated for it. Counting stops there, as
    qemu's; a refcount block qemu could not use (unaligned) means no."""
    cluster = header.cluster_size
    real = file.allocated_size() // cluster
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-file.size // cluster)
    width = 1 << header.refcount_order
    per_block = cluster * 8 // width
    blocks = min(-(-end_cluster // per_block), len(reftable))
    counted, index = 0, 0
    while counted < threshold and (index := first_other(reftable, index, blocks, 0)) < blocks:
        offset = reftable[index] & L.REFTABLE_OFFSET_MASK
        if offset & (cluster - 1):
            return False  # qemu's corruption error: the guess fails
        if offset:
            block = file.pread(offset, cluster).ljust(cluster, b"\0")
            counted += nonzero_entries(block, header.refcount_order,
                                       min(per_block, end_cluster - index * per_block))
        index += 1
    return counted >= threshold
