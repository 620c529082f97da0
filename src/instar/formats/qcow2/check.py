"""qcow2: the refcount walk of ``qemu-img check`` 7.2 (qemu's ``qcow2_co_check``).

qemu reads the snapshot table, then builds the refcount every cluster of the
file should have from everything that references it: the header, the active
L1 table, its L2 tables and their clusters (counting allocated, fragmented
and compressed clusters on the way), every snapshot's L1 and L2 tables, the
snapshot table, the refcount table, the bitmaps and the refcount blocks. It
compares that with the refcounts on disk (leaks, corruptions; both kinds of
refcount are kept in `refcounts`), checks the OFLAG_COPIED flag of every
active L1 and L2 entry against the on-disk refcount, and reports the image
end offset. Every line it prints while
doing so is a `Finding`, with the same text, in the same order.

With a `Repairer` (``check -r``, `formats/qcow2/repair.py`), the walk is
qemu's with its repair mode: it fixes leaks and refcounts in the comparison,
has the refcount structure rebuilt where qemu rebuilds it, and fixes
OFLAG_COPIED, through the repairer, in qemu's order.

Bounded by the file, whatever the header claims:

- expected refcounts are kept per refcount block, only where something is
  referenced, and never past the end of the file (a reference past it is
  reported, not counted, as qemu does): a sparse file of terabytes costs
  what it references;
- each distinct L2 table is read and walked once, however many L1 entries
  (active or snapshot) name it: its references are added times the number
  of visits, its lines replayed at each visit. Only when an expected
  refcount would reach the refcount maximum (qemu's "overflow", where the
  order of additions shows) is the walk done again visit by visit;
- every byte of metadata read counts against a budget of 4 times the file's
  size (an L1 entry, walked in Python, 8 times its bytes); an image whose
  tables would make the check read more (tables named again and again,
  overlapping) is refused in one line, and so is one whose overflowing
  refcounts would need a walk in qemu's order of over 2^19 L2 entries.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Callable, Iterator
from itertools import compress

from instar.errors import FormatError
from instar.files import InputFile, ReadWindow
from instar.findings import (
    CHECK_ERROR,
    CORRUPTION,
    LEAK,
    NOTE,
    REPAIRED,
    CheckResult,
    Finding,
)
from instar.formats.common import is_progression, unpack_table
from instar.formats.qcow2 import info as I
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import Qcow2Driver
from instar.formats.qcow2.refcounts import (
    UNALIGNED,
    Expected,
    OnDisk,
    Overflow,
    differences,
    fitted,
    last_nonzero,
)
from instar.runtime_types import NamedTuple, Protocol

INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
U64 = (1 << 64) - 1
BDRV_MAX_LENGTH = INT64_MAX - ((1 << 30) - 1)  # qemu refuses I/O reaching past it
QCOW_MAX_L1_SIZE = 32 << 20  # bytes of one L1 table (active or a snapshot's)
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE
REFT_RESERVED_MASK = 0x1FF
L2_BITMAP_ALL_ALLOC = 0xFFFF_FFFF
SNAPSHOT_EXTRA_MINIMUM = 16  # a version 3 entry has at least vm state and disk size
BITMAP_TABLE_MAX = 0x800_0000  # entries of one bitmap table
BITMAP_PHYS_MAX = 0x2000_0000  # bytes one bitmap may take on disk
BITMAP_RESERVED_FLAGS = 0xFFFF_FFFC
BITMAP_ENTRY_RESERVED = 0xFF00_0000_0000_01FE
BITMAP_ENTRY_OFFSET = 0x00FF_FFFF_FFFF_FE00
BITMAP_ENTRY_ALL_ONES = 1
BUDGET_BASE = 64 << 20  # work a check may do besides 4 times the file's size
L1_ENTRY_WEIGHT = 8  # an L1 entry is walked in Python: it costs 8 times its bytes
EXACT_WORK_LIMIT = 1 << 19  # L2 entries walked one by one where refcounts overflow

# qemu's cluster types (qcow2_get_cluster_type).
_UNALLOCATED, _ZERO_PLAIN, _ZERO_ALLOC, _NORMAL, _COMPRESSED = range(5)

EIO = "Input/output error"
EINVAL = "Invalid argument"
EFBIG = "File too large"
ENOMEM = "Cannot allocate memory"

# qemu's BdrvCheckMode bits: what ``check -r`` may repair.
FIX_LEAKS = 1
FIX_ERRORS = 2


def check(driver: Qcow2Driver) -> CheckResult:
    """qemu-img check's findings for an open qcow2 image (read only)."""
    try:
        return _Walk(driver, exact=False).run()
    except _Restart:
        return _Walk(driver, exact=True).run()


class Repairer(Protocol):
    """What ``check -r`` changes, as the walk finds it (`formats/qcow2/repair.py`).

    ``fix`` holds FIX_LEAKS and/or FIX_ERRORS."""

    fix: int

    def set_refcount(self, cluster: int, value: int) -> None:
        """The refcount on disk of ``cluster`` becomes ``value`` (at `refcounts_done`)."""

    def refcounts_done(self) -> None:
        """Write the refcounts set so far (the walk reads them back next)."""

    def rebuild(self, walk: _Walk) -> _Walk:
        """A new refcount structure from ``walk``'s expected refcounts, written
        and switched to; returns a walk of the image reopened with it."""
        ...

    def fix_entry(self, offset: int, value: int) -> None:
        """Write the L1 or L2 entry at file offset ``offset`` as ``value``."""

    def grow(self, size: int) -> None:
        """Make the file ``size`` bytes long (a refcount block past its end)."""


class _Restart(Exception):
    """An expected refcount reached the maximum: walk again in qemu's order."""


class _Failed(Exception):
    """qemu's check returned -errno here: "Check failed: REASON"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Sink(Protocol):
    def add(self, kind: str, code: str, message: str, prefixed: bool = False) -> None: ...


class _L2Stats:
    """What walking one L2 table adds: its lines, corruptions and cluster counts."""

    __slots__ = ("allocated", "compressed", "corruptions", "entries_fixed", "findings", "fixed",
                 "fragmented")

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.corruptions = self.allocated = self.fragmented = self.compressed = 0
        self.fixed = 0  # OFLAG_COPIED entries repaired
        self.entries_fixed = 0  # unaligned preallocated clusters made zero clusters

    def after_fixes(self) -> _L2Stats:
        """The table as a later visit finds it, once its entries were fixed
        (qemu's walk reads it again: the fixed entries are zero clusters)."""
        later = _L2Stats()
        later.findings = [finding for finding in self.findings if finding.kind != REPAIRED]
        later.corruptions, later.allocated = self.corruptions, self.allocated
        later.fragmented, later.compressed = self.fragmented, self.compressed
        return later

    def add(self, kind: str, code: str, message: str, prefixed: bool = False) -> None:
        if kind == CORRUPTION:
            self.corruptions += 1
        self.findings.append(Finding(kind, code, message, prefixed))


class _L1Table(NamedTuple):
    """One L1 table to walk: where, how big, and its entries that are not 0."""

    offset: int
    size: int
    active: bool  # the active table: its clusters count as allocated/fragmented
    indices: array[int]
    entries: array[int]
    failure: str | None  # reading it fails (after its own reference is counted)


def _counters(result: CheckResult) -> dict[str, int]:
    return {name: getattr(result, name) for name in CheckResult.COUNTERS}


def _set_counters(result: CheckResult, counters: dict[str, int]) -> None:
    for name, value in counters.items():
        setattr(result, name, value)


def _c_hex(value: int) -> str:
    """printf's ``%#x``: 0 prints as "0"."""
    return f"{value:#x}" if value else "0"


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _nonzero(table: array[int]) -> Iterator[int]:
    """The indices of the entries that are not 0, found at C speed."""
    return compress(range(len(table)), table)


class _Walk:
    """One check of one image: qemu's state (``s``), expected refcounts, budget."""

    def __init__(self, driver: Qcow2Driver, exact: bool) -> None:
        self.driver = driver
        self.file: InputFile = driver.file
        self.header = header = driver.header
        self.exact = exact
        self.bits = header.cluster_bits
        self.cluster = header.cluster_size
        self.file_len = self.file.size
        self.data_file = driver.data_file is not None
        self.extended = header.extended_l2
        self.l2_size = L.l2_entries(self.bits, self.extended)
        order = header.refcount_order if header.version >= 3 else 4
        self.order = order
        self.rb_bits = self.bits + 3 - order  # refcount entries per block, as a power of 2
        self.rb_size = 1 << self.rb_bits
        self.reftable_size = header.refcount_table_clusters << (self.bits - 3)
        self.expected = Expected(self.bits, order, 0)  # nb_clusters set once known
        self.snapshots_size = 0
        self._snapshot_window = ReadWindow(self._read, (_Failed,))
        self._l1_tables: dict[tuple[int, int], _L1Table] = {}
        self.active_indices: array[int] = array("Q")
        self.budget = 4 * self.file_len + BUDGET_BASE
        self.on_disk = OnDisk(array("Q"), 0, self.bits, order, self._read, _Failed)
        self.active_l1: array[int] = array("Q")
        self.snapshot_l1s: list[tuple[int, int]] = []  # (offset, entries) of those walked
        self.snapshot_corruptions = 0  # qemu counts them apart from the refcount check's
        self.drop_extra = False  # read the snapshot table as check -r all does
        self.signaled = False  # qcow2_signal_corruption printed (only once)
        self.rebuild = False  # qemu's "rebuild": the refcount structure needs rebuilding
        self.repair: Repairer | None = None  # check -r: what repairs, as the walk goes
        self.oflag_repair = False  # check_oflag_copied repairs what it finds
        self.fix_entry: Callable[[int, int], None] | None = None

    # -- reading as qemu reads: zeros past the end, EIO past qemu's limit

    def _spend(self, offset: int, length: int, weight: int = 1) -> None:
        """Count the work of reading ``[offset, +length)``: its bytes inside the
        file (zeros past the end cost nothing: they hold no entry)."""
        inside = max(0, min(offset + length, self.file_len) - offset)
        self.budget -= inside * weight
        if self.budget < 0:
            raise FormatError(
                f"checking '{self.file.name}' would read more metadata than 4 times the "
                "file holds (tables named over and over): the image is corrupt or "
                "hostile; refused"
            )

    def _read(self, offset: int, length: int) -> bytes:
        """bdrv_pread: ``length`` bytes, zeros past the end of the file."""
        if offset < 0 or offset > BDRV_MAX_LENGTH or length > BDRV_MAX_LENGTH - offset:
            raise _Failed(EIO)
        self._spend(offset, length)
        if offset >= self.file_len:
            return bytes(length)
        data = self.file.pread(offset, min(length, self.file_len - offset))
        return data + bytes(length - len(data))

    def _read_table(self, offset: int, entries: int) -> array[int]:
        """``entries`` big-endian u64 at ``offset``; only the part inside the file
        is read (the rest is zeros, which hold no entry): a shorter array."""
        if offset < 0 or offset > BDRV_MAX_LENGTH or entries * 8 > BDRV_MAX_LENGTH - offset:
            raise _Failed(EIO)
        inside = max(0, min(entries * 8, self.file_len - offset)) // 8
        self._spend(offset, inside * 8, L1_ENTRY_WEIGHT)
        if not inside:
            return array("Q")
        data = self.file.pread(offset, inside * 8)
        return unpack_table(data + bytes(inside * 8 - len(data)), 8, "big")

    # -- the run

    def run(self, repair: Repairer | None = None) -> CheckResult:
        """The check; with ``repair``, qemu's ``check -r``: what it may fix is
        fixed through ``repair`` as the walk finds it."""
        self.repair = repair
        result = CheckResult()
        try:
            snapshots = self._snapshot_table(result)
        except _Failed as failed:
            result.fail(failed.reason)
            return result
        nb = -(-self.file_len // self.cluster)
        if nb > INT_MAX:
            result.check_errors += 1
            result.fail(EFBIG)
            return result
        self.expected.clusters = nb
        result.total_clusters = -(-self.driver.virtual_size // self.cluster)
        try:
            self._calculate(result, snapshots)
            walk = self
            if repair is None:
                highest = self._compare(result)
            else:
                highest, walk = self._compare_and_fix(result, snapshots, repair)
            walk._oflag_copied(result, repair)
        except _Failed as failed:
            result.fail(failed.reason)
            return result
        result.image_end_offset = (highest + 1) * self.cluster
        return result

    def _compare_and_fix(self, result: CheckResult, snapshots: list[I.SnapshotEntry],
                         repair: Repairer) -> tuple[int, _Walk]:
        """qcow2_check_refcounts with ``fix``: compare; then rebuild the
        refcount structure (FIX_ERRORS, where a refcount on disk is 0 but
        the cluster is used, or a refcount block is broken), or compare again
        fixing what the mode allows. Returns the highest cluster in use and
        the walk of the image as it now is."""
        before = _counters(result)
        highest = self._compare(result)
        if self.rebuild and repair.fix & FIX_ERRORS:
            old = _counters(result)
            result.add(NOTE, "rebuild", "Rebuilding refcount structure")
            walk = repair.rebuild(self)
            result.corruptions = result.leaks = 0
            walk.snapshots_size = self.snapshots_size
            walk.expected.clusters = max(self.expected.clusters,
                                         -(-walk.file_len // walk.cluster))
            walk._calculate(result, snapshots)
            fresh = 0
            if repair.fix & FIX_LEAKS:
                saved = _counters(result)
                _set_counters(result, dict.fromkeys(saved, 0))
                highest = walk._compare(result, repair, FIX_LEAKS)
                repair.refcounts_done()
                walk.reload_refcounts()
                if walk.rebuild:
                    result.add(NOTE, "rebuild-failed",
                               "ERROR rebuilt refcount structure is still broken")
                fresh = result.leaks
                _set_counters(result, saved)
            if result.corruptions < old["corruptions"]:
                result.corruptions_fixed += old["corruptions"] - result.corruptions
            if result.leaks < old["leaks"]:
                result.leaks_fixed += old["leaks"] - result.leaks
            result.leaks += fresh
            return highest, walk
        if self.rebuild:
            result.add(CHECK_ERROR, "rebuild-needed", "ERROR need to rebuild refcount structures")
            raise _Failed(EIO)
        if result.leaks or result.corruptions:
            _set_counters(result, before)
            highest = self._compare(result, repair)
            repair.refcounts_done()
            self.reload_refcounts()
        return highest, self

    def snapshot_l2_entries(self) -> set[int]:
        """The L1 entries (L2 tables) of the snapshots' L1 tables walked."""
        named: set[int] = set()
        snapshots = set(self.snapshot_l1s)
        for table in self._l1_tables.values():
            if (table.offset, table.size) in snapshots:
                named.update(table.entries)
        return named

    def reload_refcounts(self) -> None:
        """Forget the refcount blocks read so far (they were just changed)."""
        self.on_disk = OnDisk(self.on_disk.table, self.on_disk.table_size, self.bits,
                              self.order, self._read, _Failed)

    # -- the snapshot table (qcow2_check_read_snapshot_table)

    def _snapshot_table(self, result: CheckResult) -> list[I.SnapshotEntry]:
        count, start = self.header.nb_snapshots, self.header.snapshots_offset
        problem = None
        if count > L.MAX_SNAPSHOTS:
            problem, reason = "snapshot table too large", EFBIG
        elif INT64_MAX - count * L.SNAPSHOT_HEADER_SIZE < start or start & (self.cluster - 1):
            problem, reason = "snapshot table offset invalid", EINVAL
        if problem is not None:
            result.add(CHECK_ERROR, "snapshot-table-invalid", f"ERROR {problem}", prefixed=True)
            if count > L.MAX_SNAPSHOTS:
                result.add(NOTE, "hint", f"You can force-remove all {count - L.MAX_SNAPSHOTS} "
                           "overhanging snapshots with qemu-img check -r all")
            raise _Failed(reason)
        snapshots: list[I.SnapshotEntry] = []

        def dropped(index: int, size: int) -> None:  # check -r all: cut, written anew
            result.add(REPAIRED, "snapshot-extra-dropped",
                       f"Discarding too much extra metadata in snapshot table entry {index} "
                       f"({size} > {I.MAX_SNAPSHOT_EXTRA_DATA})")
            result.corruptions_fixed += 1

        fixing = self.drop_extra or (self.repair is not None
                                     and bool(self.repair.fix & FIX_ERRORS))
        try:
            for end, entry in I.snapshot_entries(self._snapshot_read, start, count,
                                                 dropped if fixing else None):
                snapshots.append(entry)
                self.snapshots_size = end - start  # up to the last entry's end, for its refcount
        except (_SnapshotError, I.SnapshotTableError) as error:
            reason = error.reason if isinstance(error, _SnapshotError) else EFBIG
            result.add(CHECK_ERROR, "snapshot-table-unreadable",
                       f"ERROR failed to read the snapshot table: {error}", prefixed=True)
            if error.hint:
                result.add(NOTE, "hint", error.hint)
            raise _Failed(reason) from None
        if self.header.version >= 3:
            for index, snapshot in enumerate(snapshots):
                if len(snapshot.extra) >= SNAPSHOT_EXTRA_MINIMUM:
                    continue
                if fixing:  # the table is written anew after the refcounts (`repair.py`)
                    result.add(REPAIRED, "snapshot-entry-incomplete",
                               f"Repairing snapshot table entry {index} is incomplete")
                    result.corruptions_fixed += 1
                else:
                    result.add(CORRUPTION, "snapshot-entry-incomplete",
                               f"ERROR snapshot table entry {index} is incomplete")
                    self.snapshot_corruptions += 1
        return snapshots

    def _snapshot_read(self, offset: int, length: int) -> bytes:
        """A piece of the snapshot table (read a window at a time)."""
        try:
            return self._snapshot_window(offset, length)
        except _Failed as failed:
            raise _SnapshotError(f"Failed to read snapshot table: {failed.reason}",
                                 failed.reason) from None

    # -- expected refcounts (qcow2_inc_refcounts_imrt)

    def _ref(self, sink: _Sink, offset: int, size: int, times: int = 1) -> None:
        """Count a reference to the clusters of ``[offset, offset + size)``,
        ``times`` over; one reaching a cluster past the end of the file is
        reported instead."""
        if size <= 0:
            return
        signed = offset - (1 << 64) if offset > INT64_MAX else offset
        beyond = ((signed + size - self.file_len + (1 << 63)) & U64) - (1 << 63)  # int64 math
        if beyond >= self.cluster:
            sink.add(CORRUPTION, "reference-beyond-eof",
                     "ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {size:#x}")
            return
        if signed < 0:  # qemu sizes its array for a cluster index past 2^54: no memory
            raise _Failed(ENOMEM)
        first = offset >> self.bits
        self._bump(sink, first, ((offset + size - 1) >> self.bits) - first + 1, times)

    def _bump(self, sink: _Sink, first: int, count: int, times: int) -> None:
        """Add ``times`` to the expected refcount of ``count`` clusters from
        ``first``; past the maximum, qemu's overflow error (walking again in
        qemu's order first, where the additions were not made in it)."""
        try:
            overflowed = self.expected.add(first, count, times, strict=not self.exact)
        except Overflow:
            raise _Restart() from None
        for cluster in overflowed:
            sink.add(CORRUPTION, "refcount-overflow",
                     f"ERROR: overflow cluster offset={cluster << self.bits:#x}")
            sink.add(NOTE, "refcount-overflow",
                     "Use qemu-img amend to increase the refcount entry width or qemu-img "
                     "convert to create a clean copy if the image cannot be opened for writing")

    # -- calculate_refcounts

    def _calculate(self, result: CheckResult, snapshots: list[I.SnapshotEntry]) -> None:
        header = self.header
        self._ref(result, 0, self.cluster)
        # The L1 tables in qemu's order, with the lines that come between them.
        steps: list[_L1Table | Finding] = [self._l1_table(
            header.l1_table_offset, header.l1_size, active=True)]
        active = steps[0]
        assert isinstance(active, _L1Table)
        self.active_l1, self.active_indices = active.entries, active.indices
        if self.data_file and snapshots:
            steps.append(Finding(CORRUPTION, "snapshots-with-data-file",
                                 f"ERROR {len(snapshots)} snapshots in image with data file"))
        for snapshot in snapshots:
            where = f"ERROR snapshot {_c_string(snapshot.id)} ({_c_string(snapshot.name)})"
            if snapshot.l1_offset & (self.cluster - 1):
                steps.append(Finding(
                    CORRUPTION, "snapshot-l1-unaligned",
                    f"{where} l1_offset={_c_hex(snapshot.l1_offset)}: L1 table is not cluster "
                    "aligned; snapshot table entry corrupted"))
            elif snapshot.l1_size > QCOW_MAX_L1_SIZE // 8:
                steps.append(Finding(
                    CORRUPTION, "snapshot-l1-too-large",
                    f"{where} l1_size={_c_hex(snapshot.l1_size)}: L1 table is too large; "
                    "snapshot table entry corrupted"))
            else:
                self.snapshot_l1s.append((snapshot.l1_offset, snapshot.l1_size))
                steps.append(self._l1_table(snapshot.l1_offset, snapshot.l1_size, active=False))
        if self.exact:
            self._exact_work(steps)
        tables = {} if self.exact else self._tables_once(result, steps)
        for step in steps:
            if isinstance(step, Finding):
                result.add(*step)
            else:
                self._walk_l1(result, step, tables)
        self._ref(result, header.snapshots_offset, self.snapshots_size)
        self._ref(result, header.refcount_table_offset, self.reftable_size * 8)
        reftable = self._read_table(header.refcount_table_offset, self.reftable_size)
        self.on_disk = OnDisk(reftable, self.reftable_size, self.bits, self.order, self._read,
                              _Failed)
        self._bitmaps(result)
        self._refblocks(result)

    def _exact_work(self, steps: list[_L1Table | Finding]) -> None:
        """Refuse an image whose walk in qemu's order, entry by entry, would
        take too long (only an image whose refcounts overflow needs it)."""
        named = sum(len(step.entries) for step in steps if isinstance(step, _L1Table))
        if named * self.l2_size > EXACT_WORK_LIMIT:
            raise FormatError(
                f"checking '{self.file.name}': clusters are referenced more times than "
                f"{1 << self.order}-bit refcounts can count, and walking the {named} L2 "
                "tables named in qemu's order would take too long: the image is corrupt or "
                "hostile; refused"
            )

    def _l1_table(self, offset: int, size: int, active: bool) -> _L1Table:
        """Read an L1 table's entries that are not 0 (or note why it cannot be read)."""
        empty = array("Q")
        if not size:
            return _L1Table(offset, size, active, empty, empty, None)
        known = self._l1_tables.get((offset, size))
        if known is not None:  # snapshots sharing an L1 table: walked again, not read again
            self._spend(offset, len(known.entries) * 8, L1_ENTRY_WEIGHT)
            return known._replace(active=active)
        try:
            table = self._read_table(offset, size)
        except _Failed as failed:
            return _L1Table(offset, size, active, empty, empty, failed.reason)
        indices = array("Q", _nonzero(table))
        entries = array("Q", compress(table, table))
        found = self._l1_tables[offset, size] = _L1Table(offset, size, active, indices, entries,
                                                         None)
        return found

    def _tables_once(self, result: CheckResult,
                     steps: list[_L1Table | Finding]) -> dict[int, _L2Stats]:
        """Walk each L2 table the L1 tables name once, its references counted
        as many times as it is named (up to the first table qemu fails on)."""
        visits: dict[int, int] = {}
        for step in steps:
            if isinstance(step, Finding):
                continue
            if step.failure is not None:
                break
            for entry in step.entries:
                offset = entry & L.L1E_OFFSET_MASK
                visits[offset] = visits.get(offset, 0) + 1
        return {offset: self._l2_table(offset, times) for offset, times in visits.items()}

    def _walk_l1(self, result: CheckResult, table: _L1Table,
                 tables: dict[int, _L2Stats]) -> None:
        """check_refcounts_l1: the table's own clusters, then each entry."""
        if not table.size:
            return
        self._ref(result, table.offset, table.size * 8)
        if table.failure is not None:
            result.add(CHECK_ERROR, "io-error", "ERROR: I/O error in check_refcounts_l1")
            raise _Failed(table.failure)
        for entry in table.entries:
            if entry & L1E_RESERVED_MASK:
                result.add(CORRUPTION, "l1-reserved-bits",
                           f"ERROR found L1 entry with reserved bits set: {entry:x}")
            offset = entry & L.L1E_OFFSET_MASK
            self._ref(result, offset, self.cluster)
            if offset & (self.cluster - 1):
                result.add(CORRUPTION, "l2-table-unaligned",
                           f"ERROR l2_offset={offset:x}: Table is not cluster aligned; "
                           "L1 entry corrupted")
            stats = tables.get(offset) if not self.exact else None
            if stats is None:
                stats = self._l2_table(offset, 1)
            result.extend(stats.findings, corruptions=stats.corruptions)
            if stats.entries_fixed:
                result.corruptions_fixed += stats.entries_fixed
                tables[offset] = stats.after_fixes()
            if table.active:
                result.allocated_clusters += stats.allocated
                result.fragmented_clusters += stats.fragmented
                result.compressed_clusters += stats.compressed

    # -- check_refcounts_l2

    def _l2_entries(self, offset: int) -> tuple[array[int], array[int] | None]:
        """An L2 table's entries (and subcluster bitmaps, extended L2)."""
        table = unpack_table(self._read(offset, self.cluster), 8, "big")
        if self.extended:
            return table[::2], table[1::2]
        return table, None

    def _cluster_type(self, entry: int) -> int:
        if entry & L.OFLAG_COMPRESSED:
            return _COMPRESSED
        if entry & L.OFLAG_ZERO and not self.extended:
            return _ZERO_ALLOC if entry & L.L2E_OFFSET_MASK else _ZERO_PLAIN
        if not entry & L.L2E_OFFSET_MASK:
            return _NORMAL if self.data_file and entry & L.OFLAG_COPIED else _UNALLOCATED
        return _NORMAL

    def _l2_table(self, offset: int, times: int) -> _L2Stats:
        """Walk one L2 table: its lines and counts, its references added ``times``."""
        stats = _L2Stats()
        entries, bitmaps = self._l2_entries(offset)  # never past qemu's limit: 56 bits
        cluster, count = self.cluster, len(entries)
        shift = L.compressed_shift(self.bits)
        next_contiguous = 0
        skip_to = 0  # entries before it were counted with a run
        used = entries if bitmaps is None else map(operator.or_, entries, bitmaps)
        for index in compress(range(count), used):
            if index < skip_to:
                continue
            entry = entries[index]
            bitmap = bitmaps[index] if bitmaps is not None else 0
            kind = self._cluster_type(entry)
            host = entry & L.L2E_OFFSET_MASK
            run = self._plain_run(entries, index, entry) if bitmaps is None else 1
            if run > 1:  # clusters one after the other, all alike: counted at once
                stats.allocated += run
                if next_contiguous and host != next_contiguous:
                    stats.fragmented += 1
                next_contiguous = host + run * cluster
                if not self.data_file:
                    inside = max(0, min(run, -(-(self.file_len - host) // cluster)))
                    if inside:
                        self._bump(stats, host >> self.bits, inside, times)
                    for at in range(host + inside * cluster, host + run * cluster, cluster):
                        self._ref(stats, at, cluster, times)
                skip_to = index + run
                if skip_to == count:
                    break
                continue
            if kind != _COMPRESSED and entry & L2E_STD_RESERVED_MASK:
                stats.add(CORRUPTION, "l2-reserved-bits",
                          f"ERROR found l2 entry with reserved bits set: {entry:x}")
            if kind == _COMPRESSED:
                if entry & L.OFLAG_COPIED:
                    stats.add(CORRUPTION, "compressed-copied-flag",
                              f"ERROR: coffset={entry & ((1 << shift) - 1):#x}: copied flag "
                              "must never be set for compressed clusters")
                    entry &= ~L.OFLAG_COPIED
                if self.data_file:
                    stats.add(CORRUPTION, "compressed-with-data-file",
                              f"ERROR compressed cluster {index} with data file, "
                              f"entry={entry:#x}")
                elif bitmap:
                    stats.add(CORRUPTION, "compressed-subcluster-bitmap",
                              f"ERROR compressed cluster {index} with non-zero subcluster "
                              f"allocation bitmap, entry={entry:#x}")
                else:
                    coffset = entry & ((1 << shift) - 1)
                    sectors = ((entry >> shift) & ((1 << (self.bits - 8)) - 1)) + 1
                    self._ref(stats, coffset, sectors * 512 - (coffset & 511), times)
                    stats.allocated += 1
                    stats.compressed += 1
                    stats.fragmented += 1
            elif kind in (_NORMAL, _ZERO_ALLOC):
                if (bitmap >> 32) & bitmap:
                    stats.add(CORRUPTION, "subcluster-bitmap-corrupt",
                              f"ERROR offset={host:x}: Allocated cluster has corrupted "
                              "subcluster allocation bitmap")
                if host & (cluster - 1):
                    if bitmaps is not None:
                        has_data = bool(bitmap & L2_BITMAP_ALL_ALLOC)
                    else:
                        has_data = not entry & L.OFLAG_ZERO
                    if has_data:
                        stats.add(CORRUPTION, "data-cluster-unaligned",
                                  f"ERROR offset={host:x}: Data cluster is not properly "
                                  "aligned; L2 entry corrupted.")
                    elif self.repair is not None and self.repair.fix & FIX_ERRORS:
                        # qemu makes it a zero cluster (extended L2: its entry 0, the
                        # bitmap kept) and counts no reference to it
                        stats.add(REPAIRED, "preallocated-cluster-unaligned",
                                  f"Repairing offset={host:x}: Preallocated cluster is not "
                                  "properly aligned; L2 entry corrupted.")
                        stats.entries_fixed += 1
                        self.repair.fix_entry(offset + index * (16 if bitmaps is not None
                                                                else 8),
                                              0 if bitmaps is not None else L.OFLAG_ZERO)
                        continue
                    else:
                        stats.add(CORRUPTION, "preallocated-cluster-unaligned",
                                  f"ERROR offset={host:x}: Preallocated cluster is not "
                                  "properly aligned; L2 entry corrupted.")
                stats.allocated += 1
                if next_contiguous and host != next_contiguous:
                    stats.fragmented += 1
                next_contiguous = host + cluster
                if not self.data_file:
                    self._ref(stats, host, cluster, times)
            elif kind == _UNALLOCATED and bitmap & L2_BITMAP_ALL_ALLOC:
                stats.add(CORRUPTION, "unallocated-subcluster-bitmap",
                          "ERROR: Unallocated cluster has non-zero subcluster allocation map")
            index += 1
        return stats

    def _plain_run(self, entries: array[int], index: int, entry: int) -> int:
        """How many entries from ``index`` on are plain data clusters (no flag but
        OFLAG_COPIED, aligned) one after the other in the file: 1 if not a run."""
        if (
            entry & ~(L.L2E_OFFSET_MASK | L.OFLAG_COPIED)
            or not entry & L.L2E_OFFSET_MASK
            or entry & (self.cluster - 1)
            or index + 1 >= len(entries)
            or entries[index + 1] != entry + self.cluster
        ):
            return 1
        limit = len(entries) - index
        if is_progression(entries[index:], entry, self.cluster):  # the usual: to the end
            return limit
        good = 2  # entries[index:index + good] is a run
        while good < limit:
            trial = min(limit, 2 * good)
            if is_progression(entries[index : index + trial], entry, self.cluster):
                good = trial
                continue
            while trial - good > 1:  # entries[index:index + trial] is not a run
                middle = (good + trial) // 2
                if is_progression(entries[index : index + middle], entry, self.cluster):
                    good = middle
                else:
                    trial = middle
            break
        return good

    # -- the bitmaps (qcow2_check_bitmaps_refcounts)

    def _bitmaps(self, result: CheckResult) -> None:
        found = I.bitmap_directory(self.driver)
        if found is None:
            return
        count, offset, size = found
        self._ref(result, offset, size)
        bitmaps = self._bitmap_list(count, offset, size)
        if bitmaps is None:
            result.corruptions += 1
            raise _Failed(EINVAL)
        for table_offset, table_size in bitmaps:
            self._ref(result, table_offset, table_size * 8)
            table = unpack_table(self._read(table_offset, table_size * 8), 8, "big")
            if any(not self._bitmap_entry_valid(entry) for entry in table):
                result.corruptions += 1
                raise _Failed(EINVAL)
            for entry in compress(table, table):
                entry_offset = entry & BITMAP_ENTRY_OFFSET
                if entry_offset:
                    self._ref(result, entry_offset, self.cluster)

    def _bitmap_entry_valid(self, entry: int) -> bool:
        if entry & BITMAP_ENTRY_RESERVED:
            return False
        offset = entry & BITMAP_ENTRY_OFFSET
        return not offset or not (entry & BITMAP_ENTRY_ALL_ONES or offset & (self.cluster - 1))

    def _bitmap_list(self, count: int, offset: int, size: int) -> list[tuple[int, int]] | None:
        """(table offset, table entries) of each bitmap, as qemu's bitmap_list_load
        reads the directory; None where it fails."""
        if size == 0 or size > I.MAX_BITMAP_DIRECTORY_BYTES:
            return None
        try:
            directory = self._read(offset, size)
        except _Failed:
            return None
        bitmaps: list[tuple[int, int]] = []
        position = 0
        while position < size:
            if position + I.BITMAP_ENTRY.size > size or len(bitmaps) >= count:
                return None
            (table_offset, table_size, flags, kind, granularity, name_size,
             extra_size) = I.BITMAP_ENTRY.unpack_from(directory, position)
            length = (I.BITMAP_ENTRY.size + name_size + extra_size + 7) & ~7
            if position + length > size or extra_size:
                return None
            physical = table_size * self.cluster
            if (
                not table_size or not table_offset or table_offset & (self.cluster - 1)
                or table_size > BITMAP_TABLE_MAX
                or not I.MIN_GRANULARITY_BITS <= granularity <= I.MAX_GRANULARITY_BITS
                or flags & BITMAP_RESERVED_FLAGS or name_size > I.MAX_BITMAP_NAME
                or kind != I.BITMAP_TYPE_DIRTY_TRACKING
                or physical > BITMAP_PHYS_MAX
                or self.driver.virtual_size > (physical * 8) << granularity
            ):
                return None
            bitmaps.append((table_offset, table_size))
            position += length
        return bitmaps if len(bitmaps) == count else None

    # -- check_refblocks

    def _refblocks(self, result: CheckResult) -> None:
        table = self.on_disk.table
        for index in _nonzero(table):
            entry = table[index]
            offset = entry & L.REFTABLE_OFFSET_MASK
            if entry & REFT_RESERVED_MASK:
                result.add(CORRUPTION, "refcount-table-reserved-bits",
                           f"ERROR refcount table entry {index} has reserved bits set")
                self.rebuild = True
            elif offset & (self.cluster - 1):
                result.add(CORRUPTION, "refcount-block-unaligned",
                           f"ERROR refcount block {index} is not cluster aligned; refcount "
                           "table entry corrupted")
                self.rebuild = True
            elif offset >> self.bits >= self.expected.clusters:
                if self.repair is not None and self.repair.fix & FIX_ERRORS:
                    # qemu grows the file to hold the block (zeros), then counts it
                    result.add(REPAIRED, "refcount-block-outside-image",
                               f"Repairing refcount block {index} is outside image")
                    result.corruptions_fixed += 1
                    self.repair.grow(offset + self.cluster)
                    self.file_len = offset + self.cluster
                    self.expected.clusters = max(self.expected.clusters,
                                                 -(-self.file_len // self.cluster))
                    self._ref(result, offset, self.cluster)
                else:
                    result.add(CORRUPTION, "refcount-block-outside-image",
                               f"ERROR refcount block {index} is outside image")
            else:
                self._ref(result, offset, self.cluster)
                value = self.expected.get(offset >> self.bits)
                if value != 1:
                    result.add(CORRUPTION, "refcount-block-refcount",
                               f"ERROR refcount block {index} refcount={value}")
                    self.rebuild = True

    # -- the refcounts on disk (qcow2_get_refcount)

    def _block(self, sink: _Sink | None, index: int) -> array[int] | str | None:
        """A refcount block as qcow2_get_refcount finds it: its values, None
        (all 0) or the strerror of its failure; an unaligned one is signalled
        once, as qemu's qcow2_signal_corruption."""
        found = self.on_disk.block(index)
        if found == UNALIGNED:
            if not self.signaled and sink is not None:
                self.signaled = True
                sink.add(NOTE, "corrupt", (
                    f"qcow2: Image is corrupt: Refblock offset "
                    f"{self.on_disk.block_offset(index):#x} unaligned (reftable index: "
                    f"{_c_hex(index)}); further non-fatal corruption events will be suppressed"))
            return EIO
        return found

    def _on_disk(self, sink: _Sink, cluster: int) -> int | None:
        """The refcount on disk of ``cluster``; None if it cannot be read."""
        if cluster >> self.rb_bits >= self.reftable_size:
            return 0
        block = self._block(sink, cluster >> self.rb_bits)
        if isinstance(block, str):
            return None
        return 0 if block is None else block[cluster & (self.rb_size - 1)]

    # -- compare_refcounts

    def _compare(self, result: CheckResult, repair: Repairer | None = None,
                 fix: int | None = None) -> int:
        """Report every cluster whose refcount on disk is not the expected
        one (fixing it through ``repair`` where its mode allows: a leak with
        FIX_LEAKS, a refcount too low but not 0 with FIX_ERRORS; a used
        cluster whose refcount is 0 needs a rebuild); returns the highest
        cluster either says is in use. ``fix``: the mode, if not ``repair``'s."""
        if fix is None:
            fix = repair.fix if repair is not None else 0
        highest = 0
        size = self.rb_size
        nb = self.expected.clusters
        blocks = set(self.expected.blocks)
        blocks.update(index for index in _nonzero(self.on_disk.table) if index * size < nb)
        for block in sorted(blocks):
            low = block * size
            high = min(low + size, nb)
            if low >= high:
                continue
            on_disk = self._block(result, block) if block < self.reftable_size else None
            if isinstance(on_disk, str):
                for cluster in range(low, high):
                    result.add(CHECK_ERROR, "refcount-unreadable",
                               f"Can't get refcount for cluster {cluster}: {on_disk}")
                continue
            wanted = self.expected.values(block, high - low)
            found = fitted(on_disk, high - low, wanted.typecode)
            last = max(last_nonzero(found), last_nonzero(wanted))
            if last >= 0:
                highest = low + last
            if found == wanted:
                continue
            for position in differences(found, wanted):
                stored, counted = found[position], wanted[position]
                cluster = low + position
                if stored == 0:
                    self.rebuild = True
                elif repair is not None and (fix & FIX_LEAKS if stored > counted
                                             else fix & FIX_ERRORS):
                    result.add(REPAIRED, "leaked-cluster" if stored > counted
                               else "refcount-mismatch",
                               f"Repairing cluster {cluster} refcount={stored} "
                               f"reference={counted}")
                    repair.set_refcount(cluster, counted)
                    if stored > counted:
                        result.leaks_fixed += 1
                    else:
                        result.corruptions_fixed += 1
                    continue
                if stored < counted:
                    result.add(CORRUPTION, "refcount-mismatch",
                               f"ERROR cluster {cluster} refcount={stored} reference={counted}")
                else:
                    result.add(LEAK, "leaked-cluster",
                               f"Leaked cluster {cluster} refcount={stored} reference={counted}")
        return highest

    # -- check_oflag_copied

    def _oflag_copied(self, result: CheckResult, repair: Repairer | None = None) -> None:
        """check_oflag_copied; an L2 table named by several L1 entries is
        looked at once (its lines are the same each time) unless repairing.
        With ``repair``: FIX_ERRORS always repairs, FIX_LEAKS only when
        nothing else is wrong (qemu's rule)."""
        if repair is not None:
            self.fix_entry = repair.fix_entry
            self.oflag_repair = bool(repair.fix & FIX_ERRORS) or (
                bool(repair.fix & FIX_LEAKS)
                and not (result.check_errors or result.leaks
                         or result.corruptions > self.snapshot_corruptions))
        tables: dict[int, _L2Stats] = {}
        for index, entry in zip(self.active_indices, self.active_l1, strict=True):
            offset = entry & L.L1E_OFFSET_MASK
            if not offset:
                continue
            stored = self._on_disk(result, offset >> self.bits)
            if stored is None:
                continue
            if (stored == 1) != bool(entry & L.OFLAG_COPIED):
                message = (f"OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} "
                           f"refcount={stored}")
                if self.oflag_repair and self.fix_entry is not None:
                    result.add(REPAIRED, "oflag-copied-l2", f"Repairing {message}")
                    fixed = entry ^ L.OFLAG_COPIED
                    self.fix_entry(self.header.l1_table_offset + 8 * index, fixed)
                    result.corruptions_fixed += 1
                else:
                    result.add(CORRUPTION, "oflag-copied-l2", f"ERROR {message}")
            stats = None if self.oflag_repair else tables.get(offset)
            if stats is None:
                signaled = self.signaled
                stats = self._oflag_table(result, offset)
                if signaled == self.signaled:  # qemu's "Image is corrupt" line: only once
                    tables[offset] = stats
            result.extend(stats.findings, corruptions=stats.corruptions)
            result.corruptions_fixed += stats.fixed

    def _oflag_table(self, result: CheckResult, offset: int) -> _L2Stats:
        stats = _L2Stats()
        try:
            entries, _ = self._l2_entries(offset)
        except _Failed as failed:
            result.add(CHECK_ERROR, "io-error", f"ERROR: Could not read L2 table: {failed.reason}")
            raise
        skip_to = 0
        for position in _nonzero(entries):
            if position < skip_to:
                continue
            entry = entries[position]
            run = self._plain_run(entries, position, entry)
            if run == 1 or not (entry & L.OFLAG_COPIED and self._all_one(entry, run)):
                for number in range(run):
                    self._oflag_data(stats, entry + number * self.cluster,
                                     offset + (position + number) * (16 if self.extended else 8))
            skip_to = position + run
            if skip_to == len(entries):
                break
        return stats

    def _oflag_data(self, sink: _L2Stats, entry: int, where: int) -> None:
        """An active L2 entry (at file offset ``where``) its OFLAG_COPIED against
        its cluster's refcount on disk."""
        if self._cluster_type(entry) not in (_NORMAL, _ZERO_ALLOC):
            return
        if self.data_file:
            stored: int | None = 1
        else:
            stored = self._on_disk(sink, (entry & L.L2E_OFFSET_MASK) >> self.bits)
        if stored is not None and (stored == 1) != bool(entry & L.OFLAG_COPIED):
            message = f"OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={stored}"
            if self.oflag_repair and self.fix_entry is not None:
                sink.add(REPAIRED, "oflag-copied-data", f"Repairing {message}")
                self.fix_entry(where, entry ^ L.OFLAG_COPIED)
                sink.fixed += 1
            else:
                sink.add(CORRUPTION, "oflag-copied-data", f"ERROR {message}")

    def _all_one(self, entry: int, run: int) -> bool:
        """Whether the ``run`` clusters from ``entry``'s all have refcount 1 on
        disk (if not, or a block cannot be read, they are looked at one by one)."""
        if self.data_file:
            return True
        cluster = (entry & L.L2E_OFFSET_MASK) >> self.bits
        end = cluster + run
        while cluster < end:
            block, within = divmod(cluster, self.rb_size)
            span = min(end - cluster, self.rb_size - within)
            values = self.on_disk.block(block)
            if not isinstance(values, array) or (
                values[within : within + span] != array(values.typecode, [1]) * span
            ):
                return False
            cluster += span
        return True


class _SnapshotError(Exception):
    """qcow2_do_read_snapshots could not read the table: qemu's message and errno."""

    hint: str | None = None

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason



