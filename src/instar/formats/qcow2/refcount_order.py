"""qcow2 refcount width change (``amend -o refcount_bits=N``), as qemu 7.2's
``qcow2_change_refcount_order`` does it, on the structures ``check -r all``
rebuilds with.

Every refcount on disk is read (`refcounts.decode`) into an `Expected` of
the new width; the new refcount blocks and table are placed where that has
0 (`repair.plan_rebuild`, qemu's first fit: in clusters nothing uses, so the
old structure stays valid while they are written) and count themselves.
Then, through `ImageUpdate`: the new blocks and table ("data",
`write_structure`); the caller's header write naming the new table and
order (amend writes the whole header as qemu's ``qcow2_update_header`` does,
with whatever else the command changes); last the old table and blocks freed
in the new structure ("release", `release`). A crash
leaves the old image or the new one, with at most the old structure leaked.

Everything is computed before the first write: a refcount the new width
cannot hold is refused in qemu's words (qemu finds it after allocating the
new blocks and leaks them; instar writes nothing). Memory is bounded by the
file: a refcount past the end of the file (which qemu would carry over) is
refused as not supported.
"""

from __future__ import annotations

from array import array

from instar.errors import AmendError, FormatError, UnsupportedError
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import Qcow2Driver
from instar.formats.qcow2.refcounts import Expected, decode, read_reftable
from instar.mutate import ImageUpdate


class RefcountOrderChange:
    """The new refcount structure at ``order``, planned in memory."""

    def __init__(self, driver: Qcow2Driver, order: int) -> None:
        from instar.formats.qcow2.repair import plan_rebuild

        header = driver.header
        file = driver.file
        self.cluster = cluster = header.cluster_size
        self.old_order = header.refcount_order
        self.order = order
        file_clusters = -(-file.size // cluster)
        self.expected = expected = Expected(header.cluster_bits, order, file_clusters)
        old_per_block = cluster * 8 >> self.old_order
        old_table = read_reftable(file, header)
        self.old_structure = [header.refcount_table_offset + i * cluster
                              for i in range(header.refcount_table_clusters)]
        decoded: dict[int, array[int]] = {}
        for index, entry in enumerate(old_table):
            offset = entry & L.REFTABLE_OFFSET_MASK
            if not offset:
                continue
            if offset % cluster or offset + cluster > file.size:
                raise FormatError(f"qcow2 refcount block {index} lies outside the image")
            if offset not in decoded:
                decoded[offset] = decode(file.pread(offset, cluster), self.old_order)
                self.old_structure.append(offset)
            self._carry(decoded[offset], index * old_per_block, file_clusters)
        self.table, self.table_offset, self.table_clusters = plan_rebuild(
            expected, header.cluster_bits)

    def _carry(self, values: array[int], first: int, file_clusters: int) -> None:
        """The refcounts of one old block, from cluster ``first`` on, into
        ``expected`` (refused: past the file's end, or too wide)."""
        expected = self.expected
        raw = values.tobytes()
        if not raw.strip(b"\0"):
            return
        used = -(-len(raw.rstrip(b"\0")) // values.itemsize)  # up to the last refcount
        if first + used > file_clusters:
            raise UnsupportedError("changing the refcount width of a qcow2 image with "
                                   "refcounts past its end is not supported yet")
        size = expected.block_size
        start = 0
        while start < used:
            cluster = first + start
            block, within = divmod(cluster, size)
            span = min(used - start, size - within)
            part = values[start : start + span]
            if max(part) > expected.maximum:
                over = next(i for i, value in enumerate(part) if value > expected.maximum)
                raise AmendError(f"Cannot decrease refcount entry width to "
                                 f"{1 << self.order} bits: Cluster at offset "
                                 f"{(cluster + over) * self.cluster:#x} has a refcount of "
                                 f"{part[over]}")
            counts = expected.blocks.get(block)
            if counts is None:
                counts = expected.blocks[block] = array(expected.typecode)
            if len(counts) < within + span:
                counts.extend(array(expected.typecode, bytes(
                    (within + span - len(counts)) * counts.itemsize)))
            counts[within : within + span] = array(expected.typecode, part)
            start += span

    def write_structure(self, update: ImageUpdate) -> None:
        """The new blocks and table, where nothing points yet ("data")."""
        from instar.formats.qcow2.repair import write_rebuilt

        update.phase("data")
        write_rebuilt(update, self.expected, self.table, self.table_offset)

    def release(self, update: ImageUpdate) -> None:
        """Once the header names the new table: the old structure's clusters
        freed in the new one ("release")."""
        from instar.formats.qcow2.repair import write_rebuilt

        expected = self.expected
        update.phase("release")
        released: set[int] = set()
        for offset in dict.fromkeys(self.old_structure):  # each cluster freed once
            cluster = offset // self.cluster
            value = expected.get(cluster)
            if value:
                block, within = divmod(cluster, expected.block_size)
                expected.blocks[block][within] = value - 1
                released.add(block)
        write_rebuilt(update, expected, self.table, self.table_offset, released)
