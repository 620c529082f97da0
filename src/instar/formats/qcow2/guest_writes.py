"""Guest data written into an existing qcow2 image, in place and crash safe.

`GuestWriter` gives whole guest clusters that the image does not hold yet
(their L2 entry is 0: the backing file answers there) new content: a data
cluster of this image, or, for version 3, a zero cluster (no data). With
extended L2 entries it works by subclusters: each written into a cluster it
appends, or in place into the cluster the image has allocated already (as
qemu does; refused when a snapshot shares it or it is compressed: not
supported yet), the allocation bit set; or made a zero subcluster. ``rebase``
uses it to copy in what the old backing file provided; ``commit`` writes an
overlay's clusters into its base with `overwrite`, which also takes clusters
the image holds: rewritten in place when only that entry references them
(a crash leaves each cluster old or new), replaced by a new cluster when a
snapshot shares them (the old reference dropped in the ``release`` phase).

The order, through one `ImageUpdate` (see `instar.mutate`):

1. ``data``: each cluster's bytes, as they come (`write`), past the end of
   the file and of every cluster in use, where nothing points; then (in
   `finish`) the new L2 tables, the refcount blocks claiming all of it, and a
   larger refcount table if one is needed. A crash here leaves the image as
   it was (at worst with leaked clusters).
2. ``pointers``: the refcount table entries for new blocks, the L2 tables
   changed in place, then the L1 entries for new or copied L2 tables. Each
   L2 entry is set with the COPIED flag (refcount exactly 1). A crash here
   leaves each cluster either unallocated (old content through the backing
   file) or written (the same content here).
3. ``header``: the caller's (the refcount table's place, if it moved, with
   whatever else the caller changes there).
4. ``release`` (`release`): an L2 table that was shared with an internal
   snapshot, and so copied before it changed, loses the active L1's
   reference; an old refcount table is freed.

Refused (one line, before anything is written): an external data file, the
dirty or corrupt bit (the caller checks those of the open), refcounts that do
not match.
"""

from __future__ import annotations

import os
from array import array

from instar.errors import FormatError, UnsupportedError
from instar.formats.common import read_table
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.allocation import Refcounts
from instar.formats.qcow2.reader import Qcow2Driver
from instar.mutate import ImageUpdate, UnitWrites


def check_writable(driver: Qcow2Driver, what: str) -> None:
    """Refuse, before any write, an image whose guest data instar cannot
    change in place yet; ``what`` names the command in the message."""
    header = driver.header
    if header.incompatible_features & L.INCOMPAT_DATA_FILE:
        raise UnsupportedError(f"{what} of a qcow2 image with an external data file "
                               "is not supported yet")
    end = header.refcount_table_offset + header.refcount_table_clusters * header.cluster_size
    if end > driver.file.size:
        raise FormatError("qcow2 refcount table lies outside the image")


class GuestWriter:
    """Guest units written into ``driver``'s image through ``update``: whole
    clusters, or with extended L2 entries, subclusters (``unit`` bytes each)."""

    def __init__(self, driver: Qcow2Driver, update: ImageUpdate, what: str) -> None:
        check_writable(driver, what)
        header = driver.header
        self.driver = driver
        self.update = update
        self.cluster = header.cluster_size
        self.extended = header.extended_l2
        self.entries = L.l2_entries(header.cluster_bits, self.extended)
        self.entry_bytes = 16 if self.extended else 8
        # write's unit: a subcluster with extended L2 entries (rebase copies by those)
        self.sub_unit = self.cluster // (L.SUBCLUSTERS if self.extended else 1)
        # overwrite's (commit's) unit: a cluster, qemu's mirror granularity
        self.unit = self.cluster
        self.zero_clusters = header.version >= 3
        self.refcounts = Refcounts(driver)
        if header.l1_size and header.l1_table_offset + header.l1_size * 8 > driver.file.size:
            raise FormatError("qcow2 L1 table lies outside the image")
        self.l1: array[int] = (read_table(driver.file, header.l1_table_offset, header.l1_size,
                                          8, "big", "L1 table")
                               if header.l1_size else array("Q"))
        # Data goes from here on, claimed in `finish` (allocate_at_end picks this place).
        self._units = UnitWrites(update, unit=self.cluster,
                                 first=max(-(-driver.file.size // self.cluster),
                                           self.refcounts.last_in_use() + 1),
                                 size=driver.file.size)
        self._entries: dict[int, dict[int, bytes]] = {}  # L1 index -> {slot: L2 entry}
        self._shared: list[int] = []  # L2 tables copied: their reference is dropped last
        self._fresh: set[int] = set()  # clusters appended for subclusters
        self._dropped: list[int] = []  # shared clusters `overwrite` replaced

    @property
    def changed(self) -> bool:
        return bool(self._entries)

    def write(self, guest_unit: int, data: bytes | None) -> None:
        """Give guest unit ``guest_unit`` (a cluster, or a subcluster with
        extended L2 entries, that the image does not hold) the bytes ``data``
        (a whole unit), or zeros when None. The L2 table it goes into is
        checked first, so a damaged one is refused before anything is written
        for it."""
        guest_cluster, sub = divmod(guest_unit, L.SUBCLUSTERS) if self.extended \
            else (guest_unit, 0)
        index, slot = divmod(guest_cluster, self.entries)
        if index >= len(self.l1):
            raise FormatError(f"qcow2 guest cluster {guest_cluster} lies past the L1 table")
        if index not in self._entries:
            self._check_table(index)
        self.update.phase("data")
        slots = self._entries.setdefault(index, {})
        if self.extended:
            slots[slot] = self._subcluster(index, slot, sub, data, slots.get(slot))
        elif data is None and self.zero_clusters:
            slots[slot] = L.OFLAG_ZERO.to_bytes(8, "big")
        else:
            content = bytes(self.cluster) if data is None else data
            host = self._units.host(self._units.append(content))
            slots[slot] = (host | L.OFLAG_COPIED).to_bytes(8, "big")

    def overwrite(self, guest_unit: int, data: bytes | None) -> None:
        """Like `write`, for a unit the image may hold already (commit's base):
        a data cluster only this entry references is rewritten in place (None:
        a zero cluster and this one freed, as qemu's commit unmaps it, or zeros
        written before version 3);
        one shared with a snapshot, or a compressed one, is replaced by a new
        cluster and its references dropped at `release`. An allocated cluster
        with extended L2 entries goes through `write` (in place, or appended)."""
        if self.extended:
            self._overwrite_subclusters(guest_unit, data)
            return
        index, slot, entry = self._active_entry(guest_unit)
        if slot in self._entries.get(index, {}):
            raise AssertionError("a guest unit overwritten twice")
        host = entry & L.L2E_OFFSET_MASK
        if entry & L.OFLAG_COMPRESSED:
            # A new cluster; the reference the entry held on each cluster its
            # compressed bytes touch is dropped at `release`.
            held = self._compressed_clusters(entry)
            self.write(guest_unit, data)
            self._dropped.extend(held)
            return
        if not host:
            self.write(guest_unit, data)
            return
        references = self._references(host)
        if references > 1:
            self.write(guest_unit, data)
            self._dropped.append(host // self.cluster)
            return
        self.update.phase("data")
        slots = self._entries.setdefault(index, {})
        if data is None and self.zero_clusters:
            # qemu's commit writes zeros with unmap: a zero cluster, this one freed
            slots[slot] = L.OFLAG_ZERO.to_bytes(8, "big")
            self._dropped.append(host // self.cluster)
            return
        self._units.rewrite(host, bytes(self.cluster) if data is None else data)
        if entry != host | L.OFLAG_COPIED:
            slots[slot] = (host | L.OFLAG_COPIED).to_bytes(8, "big")

    def _overwrite_subclusters(self, guest_cluster: int, data: bytes | None) -> None:
        """`overwrite` with extended L2 entries, a whole cluster (``data``):
        each subcluster through `write` in place in a cluster only this entry
        references; a new cluster, all of it allocated, for one a snapshot
        shares or a compressed one (as qemu's copy on write with nothing left
        to copy); for None, a zero cluster as qemu's unmap leaves it: no
        cluster, every subcluster zero. A cluster replaced or unmapped loses
        this entry's reference at `release`."""
        index, slot, entry = self._active_entry(guest_cluster)
        host = entry & L.L2E_OFFSET_MASK
        if entry & L.OFLAG_COMPRESSED:
            held = self._compressed_clusters(entry)
        elif host:
            shared = self._references(host, partly=True) > 1
            if data is not None and not shared:
                size = self.sub_unit
                for sub in range(L.SUBCLUSTERS):
                    self.write(guest_cluster * L.SUBCLUSTERS + sub,
                               data[sub * size : (sub + 1) * size])
                return
            held = [host // self.cluster]
        else:
            held = []
        self.update.phase("data")
        if data is None:
            bitmap = L.SUBCLUSTER_ALLOC_MASK << 32  # every zero bit, no allocation bit
            new = 0
        else:
            new = self._units.host(self._units.append(data))
            bitmap = L.SUBCLUSTER_ALLOC_MASK
            new |= L.OFLAG_COPIED
        self._dropped.extend(held)
        self._entries.setdefault(index, {})[slot] = (new.to_bytes(8, "big")
                                                    + bitmap.to_bytes(8, "big"))

    def _active_entry(self, guest_cluster: int) -> tuple[int, int, int]:
        """(L1 index, L2 slot, the L2 entry's first 8 bytes) of ``guest_cluster``,
        its L2 table checked the first time it is named."""
        index, slot = divmod(guest_cluster, self.entries)
        if index >= len(self.l1):
            raise FormatError(f"qcow2 guest cluster {guest_cluster} lies past the L1 table")
        if index not in self._entries:
            self._check_table(index)
        table = self.l1[index] & L.L1E_OFFSET_MASK
        raw = (self.driver.file.pread(table + slot * self.entry_bytes, 8) if table
               else bytes(8))
        return index, slot, int.from_bytes(raw, "big")

    def _compressed_clusters(self, entry: int) -> list[int]:
        """The clusters a compressed entry's bytes touch, which must lie in the file.

        qemu does not write the tail of a compressed cluster's last sector, so
        the file may end inside that sector: only its start must be in the file
        (the sector lies in one cluster, the one its data ends in)."""
        start, length = self.driver.compressed_range(entry)
        last_sector = (start + length - 1) & ~(L.SECTOR - 1)
        if last_sector >= self.driver.file.size:
            raise FormatError(f"qcow2 compressed cluster at {start:#x} lies outside the image")
        return list(range(start // self.cluster, (start + length - 1) // self.cluster + 1))

    def _references(self, host: int, partly: bool = False) -> int:
        """The refcount of the data cluster at ``host``, which must lie in the
        file (``partly``: begin in it; qemu does not write a cluster's last
        subclusters until they are written) and be in use."""
        end = host + (1 if partly else self.cluster)
        if host % self.cluster or end > self.driver.file.size:
            raise FormatError(f"qcow2 data cluster at {host:#x} lies outside the image")
        references = self.refcounts.get(host // self.cluster)
        if references == 0:
            raise FormatError(f"qcow2 refcount of data cluster {host:#x} is 0; run "
                              "'qemu-img check -r all' first")
        return references

    def _subcluster(self, index: int, slot: int, sub: int, data: bytes | None,
                    current: bytes | None) -> bytes:
        """The extended L2 entry after subcluster ``sub`` of the cluster at
        ``slot`` gets ``data`` (None: the zero bit): in a data cluster appended
        for it, or, as qemu does, in place in the cluster the image has
        allocated already when only this entry references it (one a snapshot
        shares, or a compressed one, is refused: not supported yet)."""
        if current is None:
            offset = self.l1[index] & L.L1E_OFFSET_MASK
            current = (self.driver.file.pread(offset + slot * 16, 16) if offset
                       else bytes(16))
        entry, bitmap = int.from_bytes(current[:8], "big"), int.from_bytes(current[8:], "big")
        if data is None:
            bitmap = (bitmap & ~(1 << sub)) | (1 << (32 + sub))
        else:
            host = entry & L.L2E_OFFSET_MASK
            if entry & L.OFLAG_COMPRESSED:
                raise UnsupportedError("writing into a compressed qcow2 cluster (extended "
                                       "L2 entries) is not supported yet")
            if not host:
                host = self._units.host(self._units.reserve())  # its subclusters to come
                self._fresh.add(host)
                entry = host | L.OFLAG_COPIED
            if host in self._fresh:
                self._units.write_appended(host + sub * self.sub_unit, data)
            else:
                # Allocated already: its other subclusters hold data; written
                # in place (a crash leaves this subcluster old or new: the bitmap
                # names it only in the pointers phase, or named it already).
                if self._references(host, partly=True) > 1:
                    raise UnsupportedError("writing into a qcow2 cluster a snapshot shares "
                                           "(extended L2 entries) is not supported yet")
                self._units.rewrite(host + sub * self.sub_unit, data)
            bitmap = (bitmap | (1 << sub)) & ~(1 << (32 + sub))
        return entry.to_bytes(8, "big") + bitmap.to_bytes(8, "big")

    def _check_table(self, index: int) -> None:
        """L2 table ``index`` (if any) lies in the file and is in use."""
        offset = self.l1[index] & L.L1E_OFFSET_MASK
        if not offset:
            return
        if offset % self.cluster or offset + self.cluster > self.driver.file.size:
            raise FormatError(f"qcow2 L2 table {index} lies outside the image")
        if self.refcounts.get(offset // self.cluster) == 0:
            raise FormatError(f"qcow2 refcount of L2 table {index} is 0; run "
                              "'qemu-img check -r all' first")

    def abandon(self) -> None:
        """After a failure before `finish` pointed at anything: the file cut
        back to its old length (nothing refers to what was written past it)."""
        self._units.abandon()

    def _table(self, index: int) -> tuple[int, bytearray]:
        """L2 table ``index``'s offset (0: none) and its entries with the new ones."""
        offset = self.l1[index] & L.L1E_OFFSET_MASK  # checked by `write`
        table = bytearray(self.driver.file.pread(offset, self.cluster) if offset
                          else self.cluster)
        size = self.entry_bytes
        for slot, entry in self._entries[index].items():
            table[slot * size : (slot + 1) * size] = entry
        return offset, table

    def finish(self) -> None:
        """Claim what `write` wrote, write the tables and point at them (phases
        data and pointers); the caller writes its header next."""
        self._units.flush()
        if not self._entries:
            return
        cluster = self.cluster
        appended = self._units.count
        end = self._units.host(self._units.next_number)
        if appended and os.fstat(self.update.fd).st_size < end:
            self.update.truncate(end)  # a new cluster's last subclusters not written
        in_place: list[tuple[int, bytes]] = []
        placed: list[tuple[int, bytes]] = []  # (L1 index, table) for new places
        for index in sorted(self._entries):
            offset, table = self._table(index)
            if offset:
                if self.refcounts.get(offset // cluster) == 1:
                    in_place.append((offset, bytes(table)))
                    continue
                self._shared.append(offset // cluster)
            placed.append((index, bytes(table)))
        first = self.refcounts.allocate_at_end(appended + len(placed))
        if first != self._units.host(self._units.first):
            raise AssertionError("allocation moved under the guest writer")
        tables = first + appended * cluster
        update = self.update
        update.phase("data")
        for number, (_, content) in enumerate(placed):
            update.write(tables + number * cluster, content)
        self.refcounts.write_blocks(update)
        self.refcounts.write_new_table(update)
        update.phase("pointers")
        self._units.pointing()
        self.refcounts.write_table_entries(update)
        for offset, content in in_place:
            update.write(offset, content)
        l1_offset = self.driver.header.l1_table_offset
        for number, (index, _) in enumerate(placed):
            entry = (tables + number * cluster) | L.OFLAG_COPIED
            update.write(l1_offset + 8 * index, entry.to_bytes(8, "big"))

    def refcount_table(self) -> tuple[int, int] | None:
        """The refcount table's (offset, clusters) for the header, if it moved."""
        return self.refcounts.new_table

    def write_header(self) -> None:
        """The refcount table's place in the header, if it moved (phase header)."""
        table = self.refcounts.new_table
        if table is not None:
            self.update.phase("header")
            self.update.write(48, table[0].to_bytes(8, "big") + table[1].to_bytes(4, "big"))

    def release(self) -> None:
        """After the header: drop the references the active L1 no longer holds."""
        if not self._entries:
            return
        self.update.phase("release")
        for number in self._shared + self._dropped:
            self.refcounts.add(number, 1, -1)
        self.refcounts.release_old_table()
        self.refcounts.write_blocks(self.update)
