"""Reading dmg (UDIF) images: the chunk table as one mapping function.

Opening follows qemu 7.2 (`layout`): the same checks, in the same order,
with the same messages. The table is then sorted by guest sector and
checked once, where qemu checks nothing more; what it finds is kept as the
image's corruption, so ``info`` describes the image as qemu-img does and
every read fails, in one line:

- a chunk whose bytes lie beyond the end of the file (qemu reads zeros there);
- a raw chunk shorter than its sectors (qemu returns stale memory there);
- two chunks covering one guest sector (qemu's binary search picks one);
- two chunks sharing file bytes, or a chunk over the trailer or the table
  (a host range mapped twice: a small file standing for more than it holds).

Reading: zero and ignored chunks are ZERO (never read), raw chunks DATA at
their file offset, zlib and bzip2 chunks COMPRESSED units inflated with the
chunk's sectors as the bound (a chunk that inflates past them, or to fewer,
is refused, as qemu fails it). Guest sectors in no chunk, or in a chunk qemu
drops (lzfse without qemu's dmg-lzfse module, ADC, unknown types), fail
to read, as in qemu, with a message naming the chunk's type.
"""

from __future__ import annotations

import itertools
from array import array
from bisect import bisect_right
from collections.abc import Iterator

from instar.errors import FormatError, InstarError, UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import BZIP2 as BZIP2_CODEC
from instar.formats.common import ZLIB as ZLIB_CODEC
from instar.formats.common import alias_message, inflate, metadata_alias_message
from instar.formats.dmg.layout import (
    ADC,
    BZIP2,
    IGNORE,
    LZFSE,
    RAW,
    SECTOR,
    TRAILER_SIZE,
    ZEROES,
    ZLIB,
    Chunks,
    Trailer,
    find_trailer,
    read_chunks,
    type_name,
)
from instar.image import COMPRESSED, DATA, OFFSET_VALID, ZERO, Driver, Run

_STORED = (RAW, ZLIB, BZIP2)  # chunks whose bytes are in the file


def open_dmg(file: InputFile, resolver: Resolver) -> Driver:
    """Open a dmg; FormatError (qemu's words where qemu has them) if malformed."""
    trailer = find_trailer(file)
    chunks = read_chunks(file, trailer)
    _arrange(chunks)
    return DmgDriver(file, trailer, chunks, _corruption(file, trailer, chunks))


def _arrange(chunks: Chunks) -> None:
    """The table in guest order, without chunks of no sectors (they cover
    nothing). qemu searches the table as if it were in order; hdiutil writes
    it so, and then nothing moves."""
    sectors, counts = chunks.sectors, chunks.counts
    keep = [i for i in range(len(sectors)) if counts[i]]
    moved = len(keep) != len(sectors)
    if any(sectors[a] > sectors[b] for a, b in itertools.pairwise(keep)):
        keep.sort(key=sectors.__getitem__)
        moved = True
    if not moved:
        return
    for table in (chunks.types, chunks.sectors, chunks.counts, chunks.offsets, chunks.lengths):
        table[:] = array(table.typecode, [table[i] for i in keep])


def _corruption(file: InputFile, trailer: Trailer, chunks: Chunks) -> str | None:
    """What makes the table unreadable, in one message (None: nothing)."""
    types, sectors, counts = chunks.types, chunks.sectors, chunks.counts
    offsets, lengths = chunks.offsets, chunks.lengths
    for index in range(len(types)):
        guest = sectors[index] * SECTOR
        if index and sectors[index] < sectors[index - 1] + counts[index - 1]:
            return (
                f"chunks at guest offsets {sectors[index - 1] * SECTOR:#x} and {guest:#x} "
                "overlap (guest sectors mapped twice: the image is corrupt)"
            )
        if types[index] not in _STORED:
            continue
        if offsets[index] + lengths[index] > file.size:
            return (
                f"{type_name(types[index])} chunk at guest offset {guest:#x} lies beyond "
                "the end of the file (the image is truncated or corrupt)"
            )
        if types[index] == RAW and lengths[index] < counts[index] * SECTOR:
            return (
                f"raw chunk at guest offset {guest:#x} holds {lengths[index]} bytes, "
                f"fewer than its {counts[index]} sectors"
            )
    return _host_alias(trailer, chunks)


def _host_alias(trailer: Trailer, chunks: Chunks) -> str | None:
    """Two stored chunks sharing bytes of the file, or one over the trailer
    or the table it was read from. Chunks in host order (hdiutil's order is
    the guest order: no sort then), neighbours compared."""
    types, sectors, offsets, lengths = chunks.types, chunks.sectors, chunks.offsets, chunks.lengths
    order = [i for i in range(len(types)) if types[i] in _STORED and lengths[i]]
    if any(offsets[a] > offsets[b] for a, b in itertools.pairwise(order)):
        order.sort(key=offsets.__getitem__)
    for a, b in itertools.pairwise(order):
        if offsets[b] < offsets[a] + lengths[a]:
            return alias_message(offsets[b], sectors[a] * SECTOR, sectors[b] * SECTOR)
    table = ((trailer.rsrc_offset, trailer.rsrc_length, "the resource fork")
             if trailer.rsrc_length else
             (trailer.xml_offset, trailer.xml_length, "the property list"))
    for start, length, what in ((trailer.at, TRAILER_SIZE, "the UDIF trailer"), table):
        for index in order:
            if offsets[index] < start + length and start < offsets[index] + lengths[index]:
                return metadata_alias_message(max(start, offsets[index]),
                                              sectors[index] * SECTOR, what)
    return None


class DmgDriver(Driver):
    """The chunk table, sorted by guest sector, as runs.

    qemu's dmg has no block-status callback: it says DATA over the whole
    disk (``generic_status``).
    """

    generic_status = True

    def __init__(self, file: InputFile, trailer: Trailer, chunks: Chunks,
                 corruption: str | None) -> None:
        self.file = file
        self.name = file.name
        self.virtual_size = trailer.sectors * SECTOR
        self.chunks = chunks
        self.corruption = corruption

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if self.corruption is not None:
            raise FormatError(self.corruption)
        chunks = self.chunks
        sectors, counts, types = chunks.sectors, chunks.counts, chunks.types
        end = offset + length
        position = offset
        index = -1
        while position < end:
            sector = position // SECTOR
            if not (0 <= index < len(sectors) and
                    sectors[index] <= sector < sectors[index] + counts[index]):
                index = bisect_right(sectors, sector) - 1
                if index < 0 or sector >= sectors[index] + counts[index]:
                    raise self._unreadable(sector)
            start = sectors[index] * SECTOR
            stop = min(end, start + counts[index] * SECTOR)
            kind = types[index]
            if kind in (ZEROES, IGNORE):
                yield Run(position, stop, ZERO)
            elif kind == RAW:
                host = chunks.offsets[index] + position - start
                yield Run(position, stop, DATA | OFFSET_VALID, self.file, host)
            else:
                yield Run(position, stop, DATA | COMPRESSED, self.file, position - start, index)
            position = stop
            index += 1

    def _unreadable(self, sector: int) -> InstarError:
        """Why guest ``sector`` cannot be read: a chunk of a type qemu drops
        (UnsupportedError: the data is there, in a form instar cannot decode),
        or no chunk at all (FormatError: the image is corrupt)."""
        for first, count, kind in self.chunks.unreadable:
            if first <= sector < first + count:
                where = f"the chunk at guest offset {first * SECTOR:#x}"
                if kind == LZFSE:
                    return UnsupportedError(
                        f"{where} is lzfse-compressed, which instar cannot read (qemu reads "
                        "it only when built with its dmg-lzfse module)")
                if kind == ADC:
                    return UnsupportedError(
                        f"{where} is ADC-compressed, which instar cannot read (nor can qemu)")
                return UnsupportedError(f"{where} is of unknown type {kind:#x}, which instar "
                                        "cannot read (nor can qemu)")
        return FormatError(f"no chunk of the image holds guest offset {sector * SECTOR:#x}")

    def decompress(self, run: Run) -> bytes:
        """Chunk ``run.unit``, inflated to exactly its sectors (bounded by them)."""
        index = run.unit
        assert isinstance(index, int)
        chunks = self.chunks
        kind = chunks.types[index]
        size = chunks.counts[index] * SECTOR
        where = (f"{type_name(kind)} chunk at guest offset "
                 f"{chunks.sectors[index] * SECTOR:#x}")
        data = self.file.pread(chunks.offsets[index], chunks.lengths[index])
        out = inflate(data, size, BZIP2_CODEC if kind == BZIP2 else ZLIB_CODEC, where)
        if len(out) != size:
            raise FormatError(f"{where} inflates to {len(out)} bytes, not its {size}")
        return out

    def close(self) -> None:
        self.file.close()
