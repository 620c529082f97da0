"""qcow2 ``check -r leaks|all``: qemu 7.2's repairs, on the check's own walk.

The check (`formats/qcow2/check.py`) finds what is wrong; this module makes
the changes it asks for (`Repairer`), in qemu's order and with its rules:

- refcounts: a leak (refcount on disk above what the metadata uses) is set
  to the right value with ``leaks`` or ``all``; a refcount too low, but not 0,
  with ``all``. Through `allocation.Refcounts`, each changed block written once.
- a used cluster whose refcount is 0, or a broken refcount block (reserved
  bits in its table entry, a refcount other than 1): ``all`` rebuilds the
  whole refcount structure from the expected refcounts as qemu's
  ``rebuild_refcount_structure`` does (the same first-fit placement, so the
  same clusters and the same "Image end offset"): new refcount blocks and a
  new table written where nothing is in use, then the header switched to
  them in one write, then the old structure (now leaked) freed; ``leaks``
  stops with qemu's "ERROR need to rebuild refcount structures".
- OFLAG_COPIED on active L1 and L2 entries, set to what the refcount says.
- the header's dirty bit is cleared (qemu clears it when it closes an image
  it opened read-write), the corrupt bit when nothing is left corrupt.

Every write goes through `mutate.ImageUpdate`: claims and new structures
first, then pointers, then the header, then what is freed; a crash at any
point leaves an image qemu reads, with at worst leaked clusters.

- a refcount block past the end of the file: ``all`` grows the file to
  hold it (zeros: its refcounts are 0, so a rebuild follows), as qemu does
  (refused past 16 TiB).
- an unaligned preallocated cluster: ``all`` makes it a zero cluster (the
  walk writes the entry through `_Fixer.fix_entry`).
- an incomplete snapshot table entry, or one with over 1 KiB of extra
  data (the check's walk cuts it): ``all`` writes the table anew after the
  refcounts (`_rewrite_snapshot_table`, qemu's first free clusters).
- refcounts past the refcount width: the repair walks in qemu's order
  (``exact``), as the read-only check does; images with a data file are
  repaired as others (nothing written to the data file).

Refused before anything is written: what qemu repairs in ways instar does
not yet, and what qemu's own repair makes worse (an unaligned L2 table: it
frees the guest's data; an unaligned or unreadable refcount block, reserved
bits with ``all``: it marks the image corrupt and fails; a table it would
write lying over other metadata: its overlap check stops it half way):
`unsupported`, `_tables_over_metadata`.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable

from instar.errors import FormatError, SnapshotError, UnsupportedError
from instar.findings import CheckResult
from instar.formats.qcow2 import info as I
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.allocation import Refcounts
from instar.formats.qcow2.check import FIX_ERRORS, FIX_LEAKS, _Restart, _Walk
from instar.formats.qcow2.reader import MAX_REFTABLE_BYTES, Qcow2Driver
from instar.formats.qcow2.refcounts import Expected, encode
from instar.formats.qcow2.snapshots import pack_table, read_snapshot_table
from instar.mutate import PHASES, ImageUpdate

MODES = {"leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}
_INCOMPAT_OFFSET = 72  # the header's incompatible feature bits (version 3)
_REFTABLE_FIELDS = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
_REFTABLE_OFFSET = 48
_SNAPSHOT_FIELDS = struct.Struct(">IQ")  # nb_snapshots, snapshots_offset
_SNAPSHOT_FIELDS_OFFSET = 60

# Findings whose repair instar does not make yet (qemu does): refused.
_NOT_YET = {
    "refcount-block-unaligned": "an unaligned refcount block",
    "refcount-unreadable": "an unreadable refcount block",
    "corrupt": "an unaligned refcount block",
    "l2-table-unaligned": "an unaligned L2 table",
}


# Findings whose repair qemu's ``-r all`` fails on, having marked the image
# corrupt (its rebuild's writes are stopped by its overlap check): refused with
# ``all``; with ``leaks`` qemu stops before writing ("need to rebuild"), as instar.
_NOT_YET_ALL = {
    "refcount-table-reserved-bits": "reserved bits in the refcount table",
    # qemu's -r all drops overhanging entries (the table over 64 MiB, over
    # 65536 of them); with leaks it fails reading the table, writing nothing
    "snapshot-table-invalid": "a broken snapshot table",
    "snapshot-table-unreadable": "a broken snapshot table",
}


def unsupported(result: CheckResult, mode: str = "all") -> str | None:
    """What in a read-only check's findings instar cannot repair yet with
    ``mode``, or None."""
    for finding in result.findings:
        what = _NOT_YET.get(finding.code)
        if what is None and mode == "all":
            what = _NOT_YET_ALL.get(finding.code)
        if what is not None:
            return what
    return None


def repair(driver: Qcow2Driver, fd: int, mode: str,
           reopen: Callable[[], Qcow2Driver]) -> CheckResult:
    """``check -r mode`` of the image ``driver`` read, open read-write as ``fd``;
    ``reopen`` opens it again (after its refcount structure changed). Returns
    the first check's result (with its *_fixed counters); refuses in one line,
    nothing written, what is not supported yet."""
    header = driver.header
    exact = False  # walked entry by entry, in qemu's order (refcounts reach the maximum)
    walk = _Walk(driver, exact=False)
    walk.drop_extra = mode == "all"
    try:
        preview = walk.run()
    except _Restart:
        exact = True
        walk = _Walk(driver, exact=True)
        walk.drop_extra = mode == "all"
        preview = walk.run()
    rewrite = mode == "all" and preview.failure is None and any(
        finding.code in _REWRITTEN for finding in preview.findings)
    if preview.failure is not None and mode == "all" and any(
            finding.code == "preallocated-cluster-unaligned" for finding in preview.findings):
        # qemu makes the zero clusters on its way, then fails: not followed yet
        raise UnsupportedError("check -r: repairing a qcow2 image with an unaligned "
                               "preallocated cluster and a check that fails is not "
                               "supported yet")
    what = (unsupported(preview, mode) or _tables_over_metadata(walk, preview, mode)
            or _grown_too_far(driver, preview, mode)
            or (_snapshot_rewrite_unsupported(walk) if rewrite else None))
    if what is not None:
        raise UnsupportedError(f"check -r: repairing a qcow2 image with {what} is not "
                               "supported yet")
    writer = _Writer(fd, driver.file.name)
    if preview.failure is not None or not (
            rewrite or preview.leaks or preview.corruptions or preview.check_errors):
        result = preview  # qemu finds the same, and changes nothing but the bits
    else:
        fixer = _Fixer(driver, writer, MODES[mode], reopen, exact)
        result = _Walk(driver, exact=exact).run(fixer)
        if rewrite and result.failure is None:
            _rewrite_snapshot_table(fixer.driver, writer)
    bits = header.incompatible_features & ~L.INCOMPAT_DIRTY
    if result.failure is None and not (result.check_errors or result.corruptions):
        bits &= ~L.INCOMPAT_CORRUPT
    if header.version >= 3 and bits != header.incompatible_features:
        writer.phase("header")
        writer.update.write(_INCOMPAT_OFFSET, bits.to_bytes(8, "big"))
    writer.update.finish()
    return result


# Findings for which ``-r all`` writes the snapshot table anew.
_REWRITTEN = frozenset({"snapshot-entry-incomplete", "snapshot-extra-dropped"})


def _ignore(index: int, size: int) -> None:
    """Extra data cut (the check's walk reported it)."""


def _snapshot_rewrite_unsupported(walk: _Walk) -> str | None:
    """Why the snapshot table rewrite (an incomplete entry) is not made yet:
    with a refcount rebuild (qemu allocates in the rebuilt structure), or
    where the new table could land in clusters no refcount block covers
    (qemu would allocate a refcount block first)."""
    if walk.rebuild:
        return "an incomplete snapshot table entry and a broken refcount structure"
    driver = walk.driver
    try:
        table = pack_table(read_snapshot_table(driver, _ignore)[0])
    except (FormatError, SnapshotError):
        return "a snapshot table that cannot be written back"
    cluster = driver.header.cluster_size
    end = -(-driver.file.size // cluster) + -(-len(table) // cluster)
    if not Refcounts(driver).covers(0, end):
        return "an incomplete snapshot table entry (a new refcount block needed)"
    return None


def _rewrite_snapshot_table(driver: Qcow2Driver, writer: _Writer) -> None:
    """qemu's ``qcow2_write_snapshots`` (check -r all, after the refcounts):
    the table as read (incomplete entries completed: disk size, no icount),
    written to the first free clusters, the header switched to it, the old
    table freed."""
    header = driver.header
    snapshots, length = read_snapshot_table(driver, _ignore)
    table = pack_table(snapshots)
    cluster = header.cluster_size
    refcounts = Refcounts(driver)
    count = -(-len(table) // cluster)
    first = refcounts.first_free_run(count)
    if not refcounts.covers(first, count):  # pragma: no cover - checked before writing
        raise UnsupportedError("check -r: the new snapshot table needs a new refcount block")
    refcounts.add(first, count, +1)
    writer.phase("data")
    refcounts.write_blocks(writer.update)
    writer.update.write(first * cluster, table)
    writer.phase("header")
    writer.update.write(_SNAPSHOT_FIELDS_OFFSET,
                        _SNAPSHOT_FIELDS.pack(len(snapshots), first * cluster))
    writer.phase("release")
    if length:
        start = header.snapshots_offset // cluster
        refcounts.add(start, (header.snapshots_offset + length - 1) // cluster - start + 1, -1)
        refcounts.write_blocks(writer.update)


# The longest file a repair grows to hold a refcount block past its end (qemu
# grows it whatever the length; most file systems refuse past 16 TiB).
MAX_GROWN_FILE = 1 << 44


def _grown_too_far(driver: Qcow2Driver, preview: CheckResult, mode: str) -> str | None:
    """A refcount block past the end of the file that ``all`` would grow the
    file to hold, past `MAX_GROWN_FILE`."""
    if mode != "all" or not any(finding.code == "refcount-block-outside-image"
                                for finding in preview.findings):
        return None
    header = driver.header
    cluster = header.cluster_size
    per_block = cluster * 8 >> header.refcount_order
    reftable = driver.file.pread(header.refcount_table_offset,
                                 header.refcount_table_clusters * cluster)
    for (entry,) in struct.iter_unpack(">Q", reftable[: len(reftable) // 8 * 8]):
        end = (entry & L.REFTABLE_OFFSET_MASK) + cluster
        if end > MAX_GROWN_FILE:
            return "a refcount block past 16 TiB"
        if -(-end // cluster) // per_block * 8 >= MAX_REFTABLE_BYTES:
            return "a refcount block past what a refcount table can cover"
    return None


def _tables_over_metadata(walk: _Walk, preview: CheckResult, mode: str) -> str | None:
    """An active L1 or L2 table that an OFLAG_COPIED repair would write while
    it lies over other metadata: the header, the refcount table or a refcount
    block, the snapshot table, a snapshot's L1 table, the bitmap directory,
    or (the L1 table) an active L2 table and (an L2 table) the active L1
    table. qemu's overlap check stops such a write half way through its
    repair, some of it written; instar refuses before writing anything.
    Spans are compared as sorted cluster intervals: bounded by the tables the
    check's walk read, whatever their number."""
    if not (preview.corruptions or preview.leaks):
        return None  # nothing to repair: nothing written but the header's bits
    driver = walk.driver
    header = driver.header
    bits = header.cluster_bits
    common: list[tuple[int, int]] = [(0, 1)]

    def span(offset: int, length: int) -> tuple[int, int]:
        return offset >> bits, ((offset + max(length, 1) - 1) >> bits) + 1

    common.append(span(header.refcount_table_offset, header.refcount_table_clusters << bits))
    if header.nb_snapshots:
        common.append(span(header.snapshots_offset, max(walk.snapshots_size, 1)))
    common.extend(span(entry & L.REFTABLE_OFFSET_MASK, 1) for entry in walk.on_disk.table
                  if entry & L.REFTABLE_OFFSET_MASK)
    try:
        bitmaps = I.bitmap_directory(driver)
    except FormatError:
        bitmaps = None
    if bitmaps is not None:
        common.append(span(bitmaps[1], bitmaps[2]))
    active = span(header.l1_table_offset, header.l1_size * 8) if header.l1_size else None
    common.extend(span(offset, size * 8) for offset, size in walk.snapshot_l1s if size)
    named = set(walk.active_l1)
    if mode == "all" and any(finding.code == "preallocated-cluster-unaligned"
                             for finding in preview.findings):
        named.update(walk.snapshot_l2_entries())  # their entries are fixed too
    l2 = [span(entry & L.L1E_OFFSET_MASK, 1 << bits) for entry in named
          if entry & L.L1E_OFFSET_MASK]
    if active is not None and _overlaps([active], common + l2):
        return "an L1 table over other metadata"
    if _overlaps(l2, common + ([active] if active is not None else [])):
        return "an L2 table over other metadata"
    return None


def _overlaps(tables: list[tuple[int, int]], others: list[tuple[int, int]]) -> bool:
    """Whether a ``[start, end)`` of ``tables`` meets one of ``others``."""
    if not tables or not others:
        return False
    merged: list[list[int]] = []
    for start, end in sorted(others):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts = [start for start, _ in merged]
    for start, end in tables:
        index = bisect_right(starts, end - 1) - 1
        if index >= 0 and merged[index][1] > start:
            return True
    return False


class _Writer:
    """One `ImageUpdate` at a time: a repair that must go back to an earlier
    phase (pointers after the rebuild's release) finishes the update and
    starts another, which carries on the count of changes (the crash hook)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.update = ImageUpdate(fd, name)
        self._phase = -1

    def phase(self, name: str) -> None:
        index = PHASES.index(name)
        if index < self._phase:
            changes = self.update.changes
            self.update.finish()
            self.update = ImageUpdate(self.fd, self.name)
            self.update.changes = changes
        self._phase = index
        self.update.phase(name)


class _Fixer:
    """The `Repairer` the check's walk calls."""

    def __init__(self, driver: Qcow2Driver, writer: _Writer, fix: int,
                 reopen: Callable[[], Qcow2Driver], exact: bool) -> None:
        self.fix = fix
        self.exact = exact
        self.driver = driver
        self.writer = writer
        self.reopen = reopen
        self.rebuilt = False
        self._refcounts: Refcounts | None = None

    def set_refcount(self, cluster: int, value: int) -> None:
        if self._refcounts is None:
            self._refcounts = Refcounts(self.driver)
        self._refcounts.set(cluster, value)

    def refcounts_done(self) -> None:
        if self._refcounts is None or not self._refcounts.changed:
            return
        # After a rebuild, what is fixed is the old structure, now unused: freed last.
        self.writer.phase("release" if self.rebuilt else "data")
        self._refcounts.write_blocks(self.writer.update)
        self.writer.update.flush()

    def fix_entry(self, offset: int, value: int) -> None:
        self.writer.phase("pointers")
        self.writer.update.write(offset, value.to_bytes(8, "big"))

    def grow(self, size: int) -> None:
        self.writer.phase("data")
        self.writer.update.truncate(size)

    def rebuild(self, walk: _Walk) -> _Walk:
        table, offset, clusters = plan_rebuild(walk.expected, walk.bits)
        update = self.writer
        update.phase("data")
        write_rebuilt(update.update, walk.expected, table, offset)
        update.phase("header")
        update.update.write(_REFTABLE_OFFSET, _REFTABLE_FIELDS.pack(offset, clusters))
        update.update.flush()
        self.driver = self.reopen()
        self._refcounts = None
        self.rebuilt = True
        return _Walk(self.driver, exact=self.exact)


def plan_rebuild(expected: Expected, cluster_bits: int) -> tuple[list[int], int, int]:
    """Where qemu's rebuild puts a refcount structure holding ``expected``
    (at ``expected``'s width, which need not be the image's: amend's
    refcount_bits change uses it too): (the table's entries, its offset, its
    clusters). The new blocks and table are claimed in ``expected``; they go
    only where ``expected`` has 0, so writing them first is crash safe."""
    return _Rebuild(expected, cluster_bits).run()


def write_rebuilt(update: ImageUpdate, expected: Expected, table: list[int],
                  offset: int, blocks: set[int] | None = None) -> None:
    """The refcount blocks `plan_rebuild` placed (only ``blocks``' indexes if
    given), encoded at ``expected``'s width, and, unless ``blocks`` is given,
    the table at ``offset``."""
    size = expected.block_size
    for index, block in enumerate(table):
        if block and (blocks is None or index in blocks):
            update.write(block, encode(expected.values(index, size), expected.order))
    if blocks is None:
        entries = array("Q", table)
        if sys.byteorder == "little":
            entries.byteswap()
        update.write(offset, entries.tobytes())


def _first_zero(counts: array[int], start: int) -> int:
    """The index of the first 0 in ``counts`` from ``start`` on, or -1 (a
    search of its bytes: C speed however many entries are in use)."""
    width = counts.itemsize
    raw = counts.tobytes()
    position = start * width
    zero = bytes(width)
    while (position := raw.find(zero, position)) >= 0:
        if position % width == 0:
            return position // width
        position += 1
    return -1


class _Rebuild:
    """qemu's rebuild_refcount_structure, in memory: where each new refcount
    block and the new refcount table go (first fit in the expected
    refcounts, which claim them), computed before anything is written."""

    def __init__(self, expected: Expected, cluster_bits: int) -> None:
        self.imrt = expected
        self.cluster = 1 << cluster_bits
        self.bits = cluster_bits
        self.table: list[int] = []  # refcount block offsets, by block index
        self._keys: list[int] = []  # the blocks of ``expected``, sorted

    def run(self) -> tuple[list[int], int, int]:
        """(the table's entries, its offset, its clusters)."""
        self._write_refblocks(0, self.imrt.clusters)
        while True:
            clusters = -(-len(self.table) * 8 // self.cluster)
            if len(self.table) * 8 > MAX_REFTABLE_BYTES:
                raise UnsupportedError("check -r: the rebuilt refcount table would be too "
                                       "large")
            first, _ = self._alloc(clusters, 0)
            if not self._write_refblocks(first, first + clusters):
                return self.table, first * self.cluster, clusters

    def _free(self, cluster: int) -> bool:
        return not self.imrt.get(cluster)

    def _next_free(self, cluster: int, end: int) -> int:
        """The first free cluster in ``[cluster, end)``, or ``end``."""
        imrt = self.imrt
        size = imrt.block_size
        while cluster < end:
            block, within = divmod(cluster, size)
            counts = imrt.blocks.get(block)
            if counts is None or within >= len(counts):
                return cluster
            found = _first_zero(counts, within)
            if found >= 0:
                return min(end, block * size + found)
            cluster = block * size + len(counts)
        return end

    def _next_used(self, cluster: int, end: int) -> int:
        """The first cluster in ``[cluster, end)`` with a refcount, or ``end``
        (blocks nothing claimed are skipped at once, however many)."""
        imrt = self.imrt
        size = imrt.block_size
        if len(self._keys) != len(imrt.blocks):
            self._keys = sorted(imrt.blocks)
        while cluster < end:
            block, within = divmod(cluster, size)
            counts = imrt.blocks.get(block)
            if counts is not None and within < len(counts):
                raw = counts[within:].tobytes()
                skipped = len(raw) - len(raw.lstrip(b"\0"))
                if skipped < len(raw):
                    return min(end, cluster + skipped // counts.itemsize)
            following = bisect_right(self._keys, block)
            if following == len(self._keys):
                return end
            cluster = self._keys[following] * size
        return end

    def _alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt: ``count`` free clusters in a row from
        ``first_free`` on (the table grows past its end if need be), claimed;
        returns the first one and the first gap seen."""
        cluster, run, gap_seen = first_free, 0, False
        while cluster < self.imrt.clusters and run < count:
            if self._free(cluster):
                if not gap_seen:
                    first_free, gap_seen = cluster, True
                run += 1
                cluster += 1
            else:
                run = 0
                cluster = self._next_free(cluster, self.imrt.clusters)
        if run < count:
            self.imrt.clusters = cluster + count - run
        cluster -= run
        for index in range(count):
            self.imrt.claim(cluster + index)
        return cluster, first_free

    def _write_refblocks(self, first: int, end: int) -> bool:
        """rebuild_refcounts_write_refblocks: a refcount block for every
        block of ``[first, end)`` with a cluster in use; True if the table
        had to grow."""
        size = self.imrt.block_size
        entries_per_cluster = self.cluster // 8
        grown = False
        first_free = 0
        cluster = first
        while (cluster := self._next_used(cluster, end)) < end:
            index = cluster // size
            start = index * size
            if not (index < len(self.table) and self.table[index]):
                first_free = max(first_free, start)
                block, first_free = self._alloc(1, first_free)
                end = max(end, block + 1)
                if len(self.table) <= index:
                    wanted = -(-(index + 1) // entries_per_cluster) * entries_per_cluster
                    if wanted * 8 > MAX_REFTABLE_BYTES:
                        raise UnsupportedError("check -r: the rebuilt refcount table would "
                                               "be too large")
                    self.table.extend([0] * (wanted - len(self.table)))
                    grown = True
                self.table[index] = block * self.cluster
            cluster = start + size
        return grown
