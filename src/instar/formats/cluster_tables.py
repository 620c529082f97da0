"""Images mapped by two levels of cluster tables: qcow2, qcow (version 1) and QED.

The three formats differ in their headers and in the bits of their entries,
not in shape: an L1 table, kept in memory, names L2 tables; each L2 entry
maps one guest cluster to a host cluster, or says it reads as zeros, is
compressed, or is not here (the backing file answers). What they share lives
here once, in `ClusterTableDriver`:

- the mapping loop over L1 entries: stretches without an L2 table are
  skipped at memory speed (an empty petabyte image has millions of them),
  L2 tables come through a `TableCache`;
- the mapping of one L2 table for formats whose entries map whole clusters
  (qcow, QED; qcow2 maps subclusters and has its own);
- the aliasing check (`HostClaims`, docs/architecture.md): the metadata the
  format names before the first mapping, each L2 table's clusters when that
  table is first loaded, compressed clusters by the sectors strictly inside
  them, and the search for the other claimant when a claim fails;
- the backing file name, a C string in the image (`backing_name`).

A format subclasses the driver, sets its entry bits and geometry, and
supplies its metadata regions, its compressed ranges and decompression.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.common import (
    HostClaims,
    TableCache,
    alias_message,
    first_other,
    is_progression,
    metadata_alias_message,
    unpack_table,
)
from instar.image import COMPRESSED, DATA, OFFSET_VALID, ZERO, Driver, Image, Run
from instar.runtime_types import TYPE_CHECKING
from instar.safety import MAX_METADATA_CACHE_BYTES

if TYPE_CHECKING:
    from typing import Literal

SECTOR = 512
Region = tuple[int, int, str]  # (host offset, bytes, what it is: for messages)


def backing_name(raw: bytes) -> str | None:
    """A backing file name as qemu keeps it: a C string, so it ends at the
    first NUL; None when that leaves nothing (qemu then opens no backing
    file). Names must be UTF-8 (qemu takes any bytes; instar names files by
    text)."""
    text = raw.split(b"\0", 1)[0]
    if not text:
        return None
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("backing file name is not valid UTF-8") from None


def merged_regions(regions: list[Region], unit: int) -> list[Region]:
    """``regions`` rounded out to whole units, those that share a unit
    joined (their names too): for structures a format packs into one
    cluster (qcow's header, backing file name and L1 table)."""
    spans = sorted((start // unit * unit, -(-(start + length) // unit) * unit, what)
                   for start, length, what in regions if length > 0)
    merged: list[Region] = []
    for start, end, what in spans:
        if merged and start < merged[-1][0] + merged[-1][1]:
            first, length, names = merged[-1]
            merged[-1] = (first, max(length, end - first), f"{names} and {what}")
        else:
            merged.append((start, end - start, what))
    return merged


class ClusterTableDriver(Driver):
    """A layer mapped by an L1 table in memory and L2 tables of cluster entries.

    Subclasses set the entry bits below, call ``__init__`` with the geometry,
    and implement `metadata_regions` and, where they have compressed
    clusters, `compressed_range` and `decompress`.
    """

    L1_OFFSET_MASK = (1 << 64) - 1  # an L2 table's host offset in an L1 entry
    L2_OFFSET_MASK = (1 << 64) - 1  # a data cluster's host offset in an L2 entry
    COMPRESSED_FLAG = 0  # the bit of a compressed cluster's L2 entry (0: none)
    ZERO_ENTRY = -1  # the L2 entry of a cluster that reads as zeros (QED's 1; -1: none)
    # qemu answers block status one cluster at a time (qcow), not in runs.
    ANSWERS_PER_CLUSTER = False

    def __init__(
        self,
        file: InputFile,
        l1: array[int],
        *,
        cluster_bits: int,
        l2_entries: int,
        table_bytes: int,
        byteorder: Literal["big", "little"],
        data_file: InputFile | None = None,
    ) -> None:
        self.file = file
        self.name = file.name
        self.data_file = data_file
        self.backing_image: Image | None = None
        self._host = data_file if data_file is not None else file
        self._l1 = l1
        self._bits = cluster_bits
        self._cluster = 1 << cluster_bits
        self._l2_entries = l2_entries  # guest clusters one L2 table maps
        self._l2_span = l2_entries << cluster_bits
        self._table_bytes = table_bytes  # one L2 table on disk
        self._byteorder: Literal["big", "little"] = byteorder
        self._tables: TableCache[array[int]] = TableCache(
            self._load_l2, MAX_METADATA_CACHE_BYTES // table_bytes
        )
        # An entry with no host offset that still names a cluster (qcow2's
        # COPIED flag in an image with an external data file: host offset 0).
        self._allocated_at_zero = 0
        # The aliasing check: host clusters claimed by the metadata (before
        # the first mapping) and by each L2 table's entries (on its first load).
        self._claims = HostClaims(file.size, self._cluster)
        self._data_claims = (
            HostClaims(data_file.size, self._cluster) if data_file is not None else self._claims
        )
        self._compressed: HostClaims | None = None  # clusters holding compressed data
        self._compressed_sectors: HostClaims | None = None  # sectors inside compressed ranges
        self._checked = HostClaims(len(l1), 1)  # L1 indices whose L2 table was claimed
        self._metadata: list[tuple[int, int, str]] = []  # (start, end, what), for messages
        self._metadata_claimed = False  # done by the first mapping, so info never pays
        self.corruption: str | None = None  # the aliasing found: every mapping fails

    @property
    def backing(self) -> Image | None:
        return self.backing_image

    # --- what a format supplies ------------------------------------------------------------

    def metadata_regions(self) -> Iterator[Region]:
        """The host regions of the image's own structures besides its L2
        tables (header, L1 table...), in the order they are claimed."""
        raise NotImplementedError

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes at most) of a compressed cluster's data."""
        raise NotImplementedError(f"{type(self).__name__} has no compressed clusters")

    # --- the mapping function ----------------------------------------------------------------

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if not self._metadata_claimed:
            self._metadata_claimed = True
            self.first_mapping()
        if self.corruption is not None:
            raise FormatError(self.corruption)
        end = offset + length
        span = self._l2_span
        position = offset
        while position < end:
            l1_index = position // span
            stop = min(end, (l1_index + 1) * span)
            if self._l1[l1_index] & self.L1_OFFSET_MASK == 0:
                # qemu answers one L2 table's range at a time (qcow: one cluster).
                stop = min(end, self._next_allocated_table(l1_index + 1) * span)
                step, anchor = self._answers(l1_index)
                yield Run(position, stop, 0, step=step, anchor=anchor)
            else:
                yield from self._table_runs(self._tables.get(l1_index), l1_index, position, stop)
            position = stop

    def first_mapping(self) -> None:
        """What the first mapping does once (info never pays for it): claim
        the metadata."""
        self._checking(self.claim_metadata)

    def _answers(self, l1_index: int) -> tuple[int, int]:
        """(step, anchor) of qemu's answers over unallocated L2 tables."""
        if self.ANSWERS_PER_CLUSTER:
            return self._cluster, 0
        return self._l2_span, l1_index * self._l2_span

    def _next_allocated_table(self, index: int) -> int:
        """The first L1 index from ``index`` on with an L2 table (or the L1's
        end), skipping empty stretches at memory speed (`first_other`)."""
        l1, size = self._l1, len(self._l1)
        while index < size:
            index = first_other(l1, index, size, 0)
            if index == size or l1[index] & self.L1_OFFSET_MASK:
                return index
            index += 1  # flag bits without an offset: no table
        return size

    def _load_l2(self, l1_index: int) -> array[int]:
        table = self.read_l2(l1_index)
        if self._checked.claim(l1_index, 1):  # the first load of this table
            self._checking(lambda: self._claim_table(table, l1_index))
        return table

    def _checking(self, claim: Callable[[], None]) -> None:
        """Run a claim; aliasing it finds stays: every later mapping fails too
        (a table is claimed once, so a retry would not find it again)."""
        try:
            claim()
        except FormatError as error:
            self.corruption = str(error)
            raise

    def read_l2(self, l1_index: int) -> array[int]:
        """The L2 table an L1 entry names, which must be cluster-aligned and
        lie inside the file."""
        offset = self._l1[l1_index] & self.L1_OFFSET_MASK
        if offset & (self._cluster - 1):
            raise FormatError(f"L2 table offset {offset:#x} unaligned (L1 index {l1_index:#x})")
        data = self.file.pread_exact(offset, self._table_bytes, "L2 table")
        return unpack_table(data, 8, self._byteorder)

    def _table_runs(
        self, table: array[int], l1_index: int, position: int, stop: int
    ) -> Iterator[Run]:
        """The runs of ``[position, stop)`` inside one L2 table's range, for
        entries that map whole clusters: stretches of unallocated or zero
        entries, host-contiguous data clusters, compressed clusters one by one."""
        bits, cluster = self._bits, self._cluster
        step = cluster if self.ANSWERS_PER_CLUSTER else 0
        first_guest = l1_index * self._l2_span
        index = (position - first_guest) >> bits
        last = ((stop - 1 - first_guest) >> bits) + 1  # the entries the range needs
        mask, compressed, zero = self.L2_OFFSET_MASK, self.COMPRESSED_FLAG, self.ZERO_ENTRY
        host_size = self._host.size
        while index < last:
            entry = table[index]
            guest = first_guest + (index << bits)
            start = max(position, guest)
            if entry == 0 or entry == zero:
                following = first_other(table, index + 1, last, entry)
                end = min(stop, first_guest + (following << bits))
                yield Run(start, end, ZERO if entry == zero else 0, step=step)
                index = following
                continue
            if entry & compressed:
                end = min(stop, guest + cluster)
                yield Run(start, end, DATA | COMPRESSED, self.file, start - guest, entry, step)
                index += 1
                continue
            host = self.checked_host(entry & mask, guest)
            following, expected = index + 1, entry + cluster
            while following < last and table[following] == expected and (
                expected & mask < host_size
            ):
                following, expected = following + 1, expected + cluster
            end = min(stop, first_guest + (following << bits))
            yield Run(start, end, DATA | OFFSET_VALID, self._host, host + start - guest,
                      step=step)
            index = following

    def checked_host(self, host: int, guest: int) -> int:
        """A data cluster's host offset, checked against alignment and the file."""
        if host & (self._cluster - 1):
            raise FormatError(
                f"cluster allocation offset {host:#x} unaligned (guest offset {guest:#x})"
            )
        if host >= self._host.size:
            where = "data file" if self.data_file is not None else "file"
            raise FormatError(
                f"cluster at guest offset {guest:#x} points to {host:#x}, "
                f"beyond the end of the {where}"
            )
        return host

    def table_entries(self, table: array[int]) -> array[int]:
        """The cluster entries of an L2 table (qcow2's extended entries have
        a bitmap word after each)."""
        return table

    # --- the aliasing check ------------------------------------------------------------------

    def claim_metadata(self) -> None:
        """Claim the host clusters of the format's structures, then of every
        L2 table the L1 names: two of them in one cluster, or a data cluster
        among them later, is corruption (qemu-img check reports it). Done
        before the first mapping, not at open: info describes a corrupt image
        as qemu-img info does."""
        for offset, length, what in self.metadata_regions():
            self.claim_region(offset, length, what)
        l1, index, cluster = self._l1, 0, self._cluster
        while (index := self._next_allocated_table(index)) < len(l1):
            offset = l1[index] & self.L1_OFFSET_MASK
            if not offset & (cluster - 1):  # an unaligned table fails when it is read
                guest = index * self._l2_span
                self.claim_region(offset, self._table_bytes,
                                  f"the L2 table of guest offset {guest:#x}")
            index += 1

    def claim_region(self, offset: int, length: int, what: str) -> None:
        """Claim one structure of the image's own; refuse one that overlaps another."""
        if offset >= self.file.size:
            return  # nothing there to alias; reading it fails on its own
        if not self._claims.claim(offset, length):
            end = offset + length
            other = next(
                (name for start, stop, name in self._metadata if start < end and offset < stop),
                "another structure",
            )
            raise FormatError(
                f"{what} at host offset {offset:#x} overlaps {other} "
                "(a host unit mapped twice: the image is corrupt)"
            )
        self._metadata.append((offset, offset + length, what))

    def _claim_table(self, table: array[int], l1_index: int) -> None:
        """Claim the host clusters one L2 table maps, once per table: runs of
        consecutive clusters are claimed at once, a table that is one run in
        one step (the usual layout of a written image)."""
        entries = self.table_entries(table)
        count, cluster = len(entries), self._cluster
        mask, flag = self.L2_OFFSET_MASK, self.COMPRESSED_FLAG
        guest_base = l1_index * self._l2_span
        first = entries[0] if entries else 0
        start = first & mask
        if (
            start
            and not first & flag
            and not start & (cluster - 1)
            and is_progression(entries, first, cluster)
        ):
            self._claim_data(start, count, guest_base)
            return
        data_file = self.data_file
        file_size = self._host.size
        compressed: dict[int, int] = {}  # this table's compressed clusters: start -> guest
        run_host = run_count = run_guest = 0
        follow, follow_index = -1, -1  # the entry and index that would extend the run
        for index, entry in enumerate(entries):
            if not entry:
                continue
            if entry == follow and index == follow_index:  # the next cluster of the run
                run_count += 1
                follow += cluster
                follow_index += 1
                continue
            guest = guest_base + index * cluster
            if entry & flag:
                if data_file is None:
                    # One compressed cluster named twice in a table: its sectors
                    # inside may be none (a small one), so compare starts too.
                    start = self.compressed_range(entry)[0]
                    if start in compressed:
                        raise FormatError(alias_message(start, compressed[start], guest))
                    compressed[start] = guest
                    self._claim_compressed(entry, guest)
                continue
            host = entry & mask
            if not host and not entry & self._allocated_at_zero:
                continue  # no host cluster (a zero or unallocated entry with flags)
            if host & (cluster - 1) or host >= file_size:
                continue  # reading that cluster reports it (QED's zero entry, 1, too)
            if run_count:
                self._claim_data(run_host, run_count, run_guest)
            run_host, run_count, run_guest = host, 1, guest
            follow, follow_index = entry + cluster, index + 1
        if run_count:
            self._claim_data(run_host, run_count, run_guest)

    def _claim_data(self, host: int, count: int, guest: int) -> None:
        """Claim ``count`` data clusters from ``host``, mapped from ``guest`` on."""
        cluster = self._cluster
        end = min(host + count * cluster, self._host.size)
        if end <= host:
            return
        compressed = self._compressed
        clash = compressed is not None and compressed.claimed(host, end - host)
        if not clash and self._data_claims.claim(host, end - host):
            return
        for at in range(host, end, cluster):  # which cluster: the error path only
            if compressed is not None and compressed.claimed(at, cluster):
                raise self._alias_error(at, guest + at - host)
            if not self._data_claims.claim(at, cluster):
                raise self._alias_error(at, guest + at - host)
        raise AssertionError("a failed claim without a claimed cluster")  # pragma: no cover

    def _claim_compressed(self, entry: int, guest: int) -> None:
        """Compressed clusters may share host clusters and even sectors (qemu
        packs them byte after byte), but not with data clusters or metadata;
        and the sectors strictly inside one's range (neither its first nor
        its last, which the previous and next may share) are its alone."""
        host, size = self.compressed_range(entry)
        if host >= self.file.size:
            return  # reading it reports it
        cluster = self._cluster
        if self._claims.claimed(host, size):
            for at in range(host & ~(cluster - 1), host + size, cluster):
                if self._claims.claimed(at, cluster):
                    raise self._alias_error(at, guest)
        if self._compressed is None or self._compressed_sectors is None:
            self._compressed = HostClaims(self.file.size, cluster)
            self._compressed_sectors = HostClaims(self.file.size, SECTOR)
        for at in range(host & ~(cluster - 1), host + size, cluster):
            self._compressed.claim(at, cluster)
        sectors = self._compressed_sectors
        inside = (host // SECTOR + 1) * SECTOR  # the second sector of the range
        end = host + size - SECTOR  # the start of its last sector
        if inside < end and not sectors.claim(inside, end - inside):
            for at in range(inside, end, SECTOR):
                if not sectors.claim(at, SECTOR):
                    raise self._compressed_alias_error(at, guest)

    def _compressed_alias_error(self, sector: int, guest: int) -> FormatError:
        """Which other compressed cluster holds ``sector`` inside its range
        (every L2 table is read again: the error path only)."""
        for other, entry in self._every_entry():
            if other == guest or not entry & self.COMPRESSED_FLAG:
                continue
            start, size = self.compressed_range(entry)
            if (start // SECTOR + 1) * SECTOR <= sector < start + size - SECTOR:
                return FormatError(alias_message(sector, guest, other))
        return FormatError(  # pragma: no cover - a claim always has a claimant
            f"host offset {sector:#x}, mapped at guest offset {guest:#x}, is mapped twice"
        )

    def _every_entry(self) -> Iterator[tuple[int, int]]:
        """(guest offset, L2 entry) of every cluster of every readable L2
        table, for the alias errors' search for the other claimant."""
        l1, index = self._l1, 0
        while (index := self._next_allocated_table(index)) < len(l1):
            try:
                table = self.read_l2(index)
            except FormatError:
                index += 1
                continue
            for position, entry in enumerate(self.table_entries(table)):
                yield index * self._l2_span + position * self._cluster, entry
            index += 1

    def _alias_error(self, host: int, guest: int) -> FormatError:
        """The message for a host cluster claimed twice: who else maps it.
        Only on the error path: it may read every L2 table again."""
        cluster = self._cluster
        if self._host is self.file:
            for start, stop, what in self._metadata:
                if start < host + cluster and host < stop:
                    return FormatError(metadata_alias_message(host, guest, what))
        for other, entry in self._every_entry():
            if not entry or other == guest:
                continue
            if entry & self.COMPRESSED_FLAG:
                start, size = self.compressed_range(entry)
                if self.data_file is None and start < host + cluster and host < start + size:
                    return FormatError(alias_message(host, guest, other))
            elif entry & self.L2_OFFSET_MASK == host:
                return FormatError(alias_message(host, guest, other))
        return FormatError(  # pragma: no cover - a claim always has a claimant
            f"host offset {host:#x}, mapped at guest offset {guest:#x}, is mapped twice"
        )

    def close(self) -> None:
        if self.data_file is not None:
            self.data_file.close()
            self._data_claims.close()
        self.file.close()
        self._tables.clear()
        self._claims.close()
        self._checked.close()
        if self._compressed is not None:
            self._compressed.close()
        if self._compressed_sectors is not None:
            self._compressed_sectors.close()
