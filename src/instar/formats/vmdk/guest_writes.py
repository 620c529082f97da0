"""Guest data written into an existing VMDK disk in place, as qemu-img 7.2's
commit writes into a VMDK base: the format's ``updater`` (`VmdkWriter`).

What qemu 7.2 does, and so instar (checked by running it):

- a hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse): a grain
  the extent maps is rewritten in place; a new grain is appended past the end
  of the file and its grain table entry set, in the grain table and in the
  redundant one where the image has a redundant grain directory. A grain
  written as zeros where the top image reads zeros without storing them
  (qemu's write-zeroes) becomes entry 1 (a zero grain) with the
  ``zeroed_grain`` flag, even over a grain the extent holds (which then
  leaks, as in qemu), and a grain of zero bytes without it.
- a flat extent (monolithicFlat, twoGbMaxExtentFlat): the bytes written
  into the extent file in place.
- streamOptimized (qemu's layout with the grain directory in the header):
  new grains appended deflated behind a grain marker; a grain the image
  holds already cannot be rewritten: qemu fails with "Could not write to
  allocated cluster for streamOptimized" and "Block job failed:
  Input/output error"; instar says the same, before its grain table
  changes (the grains it appended are cut off again).
- the descriptor's ``CID`` gets a new random value once anything was written
  (qemu rewrites the descriptor: the embedded one's 20 sectors, or the
  descriptor file rounded up to a sector).

The order, through one `instar.mutate.ImageUpdate` per file: the grains
(phase ``data``), then the grain table entries (``pointers``), then the
descriptor (``header``). A crash leaves every grain old or new.

Refused before anything is written (one line): what qemu would damage or
instar cannot check -- a grain directory entry of 0 (qemu writes the grain
and loses it: there is no grain table to point at it), a redundant grain
directory entry of 0, grain tables or grains outside the file or claimed
twice (by two entries, or by an entry and the image's metadata), two
extents naming one file, a stream with its grain directory at the end
(qemu 7.2 appends after the footer, and the image no longer opens: "Invalid
footer"), extents whose grain sizes differ or a sparse extent that does not
start on a grain of the disk, a descriptor without a ``CID`` line before
its ``parentCID`` line. Extent files are opened for writing through the
resolver (the broker's policy), and must be the files that were read.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from array import array

from instar.errors import FormatError, ImageCommitError, UnsupportedError
from instar.files import InputFile
from instar.formats.common import HostClaims
from instar.formats.vmdk.layout import (
    FLAG_RGD,
    GD_AT_END,
    GRAIN_MARKER,
    GTE_ZEROED,
    MAX_EXTENT_SECTORS,
    SECTOR,
    SparseHeader,
    descriptor_text,
    sectors_for,
)
from instar.formats.vmdk.reader import FlatExtent, SparseExtent, VmdkDriver, u32_table
from instar.formats.vmdk.writer import COMPRESS_LEVEL
from instar.image import Driver
from instar.mutate import ImageUpdate, SequentialWrites

GRANULARITY = 64 << 10  # the unit of a disk of flat extents only (qemu's mirror default)
DESC_BYTES = 20 * SECTOR  # what qemu rewrites of an embedded descriptor


def _up(value: int, step: int) -> int:
    return -(-value // step) * step


class _Sparse:
    """One hosted sparse extent being written: its new grains, then its
    grain table entries."""

    def __init__(self, extent: SparseExtent, update: ImageUpdate) -> None:
        self.extent = extent
        self.update = update
        self.file = extent.file
        header = extent.header
        self.stream = header.compressed
        self.grain_sectors = header.grain_sectors
        self.per_table = header.gtes_per_gt
        self.gd = extent.grain_directory
        self.size = self.file.size
        self.rgd = self._redundant(header)
        self._end = _up(sectors_for(self.size), self.grain_sectors)  # qemu puts new grains here
        self._check()
        self.entries: dict[int, int] = {}  # grain -> its new grain table entry
        self._tables: dict[int, array[int]] = {}
        self._appended = SequentialWrites(update)
        self._in_place = SequentialWrites(update)
        self._grew = False

    def _redundant(self, header: SparseHeader) -> array[int] | None:
        """The redundant grain directory qemu updates too (the RGD flag set)."""
        if not header.flags & FLAG_RGD or not header.rgd_offset or not len(self.gd):
            return None
        data = self.file.pread_exact(header.rgd_offset * SECTOR, len(self.gd) * 4,
                                     f"redundant grain directory of '{self.file.name}'")
        return u32_table(data)

    def _check(self) -> None:
        """Every grain table and grain inside the file, each sector claimed
        once (metadata, tables, grains): an entry qemu would write through
        could otherwise land in another structure."""
        name, header = self.file.name, self.extent.header
        claims = HostClaims(self.size, SECTOR)
        try:
            gt_bytes = self.per_table * 4

            def claim(offset: int, length: int, what: str) -> None:
                if offset + length > self.size:
                    raise FormatError(f"{what} of '{name}' lies beyond the end of the file")
                if not claims.claim(offset, length):
                    raise FormatError(f"{what} of '{name}' overlaps another structure of "
                                      "the image (the image is corrupt)")

            claim(0, SECTOR, "the header")
            if header.desc_offset and header.desc_sectors:
                claim(header.desc_offset * SECTOR, header.desc_sectors * SECTOR,
                      "the descriptor")
            claim(header.gd_offset * SECTOR, len(self.gd) * 4, "the grain directory")
            if self.rgd is not None:
                claim(header.rgd_offset * SECTOR, len(self.rgd) * 4,
                      "the redundant grain directory")
            for kind, directory in (("", self.gd), ("redundant ", self.rgd)):
                if directory is None:
                    continue
                for index, sector in enumerate(directory):
                    if not sector:
                        raise UnsupportedError(
                            f"{kind}grain directory entry {index} of '{name}' is 0 (no grain "
                            "table): writing into it is not supported yet (qemu-img would "
                            "lose the data)")
                    claim(sector * SECTOR, gt_bytes, f"{kind}grain table {index}")
            empty = bytes(gt_bytes)
            length = SECTOR if self.stream else self.grain_sectors * SECTOR
            zeroed = self.extent.zero_grains
            for index in range(len(self.gd)):
                data = self.file.pread(self.gd[index] * SECTOR, gt_bytes)
                if data == empty:
                    continue
                for slot, entry in enumerate(u32_table(data)):
                    if entry == 0 or (entry == GTE_ZEROED and zeroed):
                        continue
                    claim(entry * SECTOR, length,
                          f"the grain of grain table {index} entry {slot} (sector {entry})")
        finally:
            claims.close()

    def _table(self, index: int) -> array[int]:
        table = self._tables.get(index)
        if table is None:
            data = self.file.pread_exact(self.gd[index] * SECTOR, self.per_table * 4,
                                         f"grain table of '{self.file.name}'")
            table = self._tables[index] = u32_table(data)
        return table

    def _allocate(self, sectors: int) -> int:
        sector = self._end
        if sector + sectors > MAX_EXTENT_SECTORS:
            raise UnsupportedError(f"'{self.file.name}' would grow past the largest grain "
                                   "offset a vmdk grain table holds")
        self._end += sectors
        self._grew = True
        return sector

    def write(self, grain: int, data: bytes | None) -> None:
        """Grain ``grain`` of the extent gets ``data`` (None: zeros, as qemu's write-zeroes)."""
        index, slot = divmod(grain, self.per_table)
        if index >= len(self.gd):
            raise FormatError(f"grain {grain} lies past the grain directory of "
                              f"'{self.file.name}'")
        entry = self._table(index)[slot]
        zeroed = self.extent.zero_grains
        allocated = entry != 0 and not (entry == GTE_ZEROED and zeroed)
        if self.stream and allocated:
            error = ImageCommitError("Could not write to allocated cluster for streamOptimized")
            from instar.cli.output import PROGRAM

            error.hint = f"{PROGRAM}: Block job failed: Input/output error"
            raise error
        self.update.phase("data")
        if data is None and zeroed:
            self.entries[grain] = GTE_ZEROED
            return
        payload = bytes(self.grain_sectors * SECTOR) if data is None else data
        if self.stream:
            packed = zlib.compress(payload, COMPRESS_LEVEL)
            record = GRAIN_MARKER.pack(grain * self.grain_sectors, len(packed)) + packed
            sectors = sectors_for(len(record))
            sector = self._allocate(sectors)
            self._appended.write(sector * SECTOR, record.ljust(sectors * SECTOR, b"\0"))
            self.entries[grain] = sector
        elif allocated:
            self._in_place.write(entry * SECTOR, payload)
        else:
            sector = self._allocate(self.grain_sectors)
            self._appended.write(sector * SECTOR, payload)
            self.entries[grain] = sector

    def flush_data(self) -> None:
        self._appended.flush()
        self._in_place.flush()

    def write_pointers(self) -> None:
        """The grain table entries, runs of neighbours at once, in the grain
        table and the redundant one (phase pointers)."""
        grains = sorted(self.entries)
        position = 0
        while position < len(grains):
            first = grains[position]
            stop = position + 1
            while (stop < len(grains) and grains[stop] == grains[stop - 1] + 1
                   and grains[stop] // self.per_table == first // self.per_table):
                stop += 1
            index, slot = divmod(first, self.per_table)
            run = grains[position:stop]
            data = struct.pack(f"<{len(run)}I", *(self.entries[g] for g in run))
            self.update.write(self.gd[index] * SECTOR + slot * 4, data)
            if self.rgd is not None:
                self.update.write(self.rgd[index] * SECTOR + slot * 4, data)
            position = stop

    def abandon(self) -> None:
        """Nothing points at the grains appended: cut them off again."""
        self._appended = SequentialWrites(self.update)
        self._in_place = SequentialWrites(self.update)
        if self._grew and os.fstat(self.update.fd).st_size > self.size:
            self.update.truncate(self.size)
        self._grew = False


class _Flat:
    """One flat extent: bytes written in place from ``start`` in its file."""

    def __init__(self, extent: FlatExtent, update: ImageUpdate) -> None:
        self.start = extent.start
        self.update = update
        self._writes = SequentialWrites(update)

    def write(self, offset: int, data: bytes) -> None:
        self.update.phase("data")
        self._writes.write(self.start + offset, data)

    def flush_data(self) -> None:
        self._writes.flush()

    def write_pointers(self) -> None:
        pass

    def abandon(self) -> None:
        self._writes = SequentialWrites(self.update)


class VmdkWriter:
    """Guest units (grains, or 64 KiB for a disk of flat extents) written
    into ``driver``'s disk through ``update`` (the descriptor's file, which
    is also the extent of a monolithic disk) and an update per extent file."""

    def __init__(self, driver: Driver, update: ImageUpdate, what: str) -> None:
        if not isinstance(driver, VmdkDriver):
            raise AssertionError("a vmdk writer for another format's layer")
        self.update = update
        self.size = driver.virtual_size
        extents = driver.disk_extents
        grains = {e.grain_bytes for e in extents if isinstance(e, SparseExtent)}
        if len(grains) > 1:
            raise UnsupportedError(f"{what}: vmdk extents of different grain sizes are not "
                                   "supported yet")
        self.unit = grains.pop() if grains else GRANULARITY
        descriptor_file = driver.descriptor_file
        main = extents[0].file if descriptor_file is None else descriptor_file
        if main.fd != update.fd:
            raise AssertionError("the update is not the descriptor's file")
        if descriptor_file is None:
            self._check_monolithic(extents[0], what)
        self._desc_at, self._desc_area, self._cid_text = self._descriptor(driver, main)
        updates = self._extent_updates(driver, what)
        self._parts: list[_Sparse | _Flat] = []
        self._starts: list[int] = []
        start = 0
        for extent, extent_update in zip(extents, updates, strict=True):
            if isinstance(extent, SparseExtent):
                if start % self.unit:
                    raise UnsupportedError(f"{what}: a vmdk sparse extent that does not "
                                           "start on a grain of the disk is not supported yet")
                self._parts.append(_Sparse(extent, extent_update))
            else:
                self._parts.append(_Flat(extent, extent_update))
            self._starts.append(start)
            start += extent.length
        self._updates = [update, *(u for u in updates if u is not update)]
        self._written = False

    @staticmethod
    def _check_monolithic(extent: SparseExtent | FlatExtent, what: str) -> None:
        """A stream with its footer is refused (qemu 7.2 breaks it)."""
        first = SparseHeader.unpack(extent.file.pread_exact(0, SECTOR, "VMDK header"))
        if first.gd_offset == GD_AT_END:
            raise UnsupportedError(
                f"{what}: a streamOptimized vmdk with its grain directory at the end (a "
                "footer) is not supported yet (qemu-img 7.2 appends past the footer and "
                "leaves an image it cannot open)")

    def _descriptor(self, driver: VmdkDriver, main: InputFile) -> tuple[int, int, tuple[str, str]]:
        """Where the descriptor is, how many bytes qemu rewrites there, and
        its text around the CID value."""
        if driver.descriptor_file is None:
            extent = driver.disk_extents[0]
            header = SparseHeader.unpack(main.pread_exact(0, SECTOR, "VMDK header"))
            if not header.desc_offset or not header.desc_sectors:
                raise UnsupportedError(f"'{main.name}' has no embedded descriptor: writing "
                                       "into it is not supported yet (qemu-img would write "
                                       "one over the sectors after its header)")
            at = header.desc_offset * SECTOR
            area = min(header.desc_sectors * SECTOR, DESC_BYTES)
            if at + area > extent.file.size:
                raise FormatError(f"the descriptor of '{main.name}' lies beyond the end "
                                  "of the file")
            raw = main.pread(at, area)
        else:
            at, raw = 0, main.pread(0, main.size)
            area = _up(main.size, SECTOR)
        text = descriptor_text(raw)
        cid = text.find("CID")
        parent = text.find("parentCID")
        if (cid < 0 or parent < cid or text[cid + 3 : cid + 4] != "="
                or (cid and text[cid - 1] != "\n")):
            raise UnsupportedError(f"the descriptor of '{main.name}' has no CID line before "
                                   "its parentCID line: writing into it is not supported yet")
        before, after = text[: cid + 4], text[parent:]
        longest = len((before + "ffffffff\n" + after).encode("utf-8", "surrogateescape"))
        if driver.descriptor_file is None and longest >= area:
            raise UnsupportedError(f"the descriptor of '{main.name}' fills its sectors: "
                                   "writing a new CID into it is not supported yet")
        return at, area, (before, after)

    def _extent_updates(self, driver: VmdkDriver, what: str) -> list[ImageUpdate]:
        """An update per extent: the main one for a monolithic disk; else each
        extent file opened again for writing through the resolver's policy."""
        if driver.descriptor_file is None:
            return [self.update]
        resolver = driver.resolver
        reopen = getattr(resolver, "open_file_for_update", None)
        assert driver.descriptor is not None
        if reopen is None:
            raise UnsupportedError(f"{what}: writing into vmdk extent files is not supported "
                                   "here")
        seen = {driver.descriptor_file.identity}
        updates = []
        for line, extent in zip(driver.descriptor.extents, driver.disk_extents, strict=True):
            if extent.file.identity in seen:
                raise UnsupportedError(f"{what}: vmdk extents naming one file (or the "
                                       "descriptor) are not supported")
            seen.add(extent.file.identity)
            file: InputFile = reopen(line.name, driver.descriptor_file, "extent")
            if file.identity != extent.file.identity:
                raise ImageCommitError(f"'{file.name}' changed while it was opened")
            updates.append(ImageUpdate(file.fd, file.name))
        return updates

    def overwrite(self, number: int, data: bytes | None) -> None:
        """Guest unit ``number`` gets ``data`` (a whole unit), or zeros when
        None (as qemu's write-zeroes stores them)."""
        unit = self.unit
        at, end = number * unit, min((number + 1) * unit, self.size)
        part = bisect.bisect_right(self._starts, at) - 1
        while at < end:
            start = self._starts[part]
            target = self._parts[part]
            stop = (self._starts[part + 1] if part + 1 < len(self._starts) else self.size)
            piece_end = min(end, stop)
            self._written = True
            if isinstance(target, _Sparse):
                target.write((at - start) // unit, data)  # a grain of the extent, whole
            else:
                offset = at - number * unit
                piece = (bytes(piece_end - at) if data is None
                         else data[offset : offset + piece_end - at])
                target.write(at - start, piece)
            at = piece_end
            part += 1

    def finish(self) -> None:
        """The grains reach the disk, then the grain table entries."""
        for part in self._parts:
            part.flush_data()
        for update in self._updates:
            update.phase("pointers")
        for part in self._parts:
            part.write_pointers()

    def write_header(self) -> None:
        """A new CID in the descriptor, as qemu's first write gives it."""
        if not self._written:
            return
        for update in self._updates:
            update.phase("header")
        before, after = self._cid_text
        cid = int.from_bytes(os.urandom(4), "little")
        text = (before + f"{cid:x}\n" + after).encode("utf-8", "surrogateescape")
        area = max(self._desc_area, _up(len(text), SECTOR))
        self.update.write(self._desc_at, text.ljust(area, b"\0"))

    def release(self) -> None:
        """Nothing to free (a grain replaced by a zero grain leaks, as in
        qemu); the extent files are flushed (the caller flushes its own)."""
        for update in self._updates:
            if update is not self.update:
                update.finish()

    def abandon(self) -> None:
        for part in self._parts:
            part.abandon()
