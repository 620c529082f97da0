"""The VHDX metadata log: finding the active sequence and replaying it in memory.

A VHDX whose current header has a non-zero log GUID may hold log entries
written before a crash: BAT and metadata updates that are not yet in place.
Reading such a file without replaying them gives stale data. qemu refuses to
open it read-only; instar replays the active sequence into a `LogOverlay`, a
read-only view of the file with the logged writes applied, and never writes
to the file.

The log is a circular buffer of 4 KiB sectors. An entry is a 64-byte header
and descriptors (filling whole sectors), then one 4 KiB data sector per data
descriptor; its CRC-32C covers the whole entry. The active sequence is the
run of valid entries with consecutive sequence numbers whose last ("head")
entry has the highest sequence number; its ``tail`` field names the entry the
replay starts from (MS-VHDX 2.3.3).
"""

from __future__ import annotations

import bisect
import struct

from instar.errors import FormatError, UnsupportedError
from instar.files import ExactReads, InputFile
from instar.formats.vhdx import layout
from instar.formats.vhdx.layout import MiB
from instar.runtime_types import NamedTuple
from instar.safety import MAX_TABLE_BYTES

SECTOR = 4096
ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
DESCRIPTOR = struct.Struct("<4sIQQQ")
DATA_SECTOR_HEAD = struct.Struct("<4sI")
ENTRY_SIGNATURE = b"loge"
DATA_DESCRIPTOR = b"desc"
ZERO_DESCRIPTOR = b"zero"
DATA_SIGNATURE = b"data"
MAX_LOG_BYTES = MAX_TABLE_BYTES  # instar reads a log to replay into memory
MAX_LOG_WRITES = 65536  # descriptors replayed (a real log holds a few hundred)
MAX_FILE_BYTES = (1 << 63) - 1  # file offsets are signed 64-bit


class Write(NamedTuple):
    """One logged write: ``data`` at ``offset``, or ``length`` zeros when data is None."""

    offset: int
    length: int
    data: bytes | None


class LogEntry(NamedTuple):
    position: int  # byte offset of the entry in the log
    length: int
    sequence: int
    tail: int
    flushed_file_offset: int
    last_file_offset: int
    writes: tuple[Write, ...]


class _Budget:
    """Bytes of checksum work left for scanning one log.

    Entries are checked structurally (descriptors, data sector signatures)
    before their CRC, so in a real log only the entries themselves and a few
    stale headers reach the CRC. A crafted log of overlapping candidates
    could ask for a CRC over the whole log at every sector; the budget turns
    that into a clear refusal instead of minutes of work.
    """

    def __init__(self, log_length: int) -> None:
        self.left = 8 * log_length

    def spend(self, amount: int) -> None:
        self.left -= amount
        if self.left < 0:
            raise UnsupportedError("the log has too many overlapping entries to replay safely")


def _entry_crc(log: bytes, position: int, length: int) -> int:
    """CRC-32C of the entry at ``position`` with its checksum field taken as zero."""
    view = memoryview(log)
    crc = layout.crc32c_extend(0, view[position : position + 4])
    crc = layout.crc32c_extend(crc, bytes(4))
    end = position + length
    crc = layout.crc32c_extend(crc, view[position + 8 : min(end, len(log))])
    if end > len(log):  # the entry wraps around the end of the circular log
        crc = layout.crc32c_extend(crc, view[: end - len(log)])
    return crc


def parse_entry(log: bytes, position: int, log_guid: bytes, budget: _Budget) -> LogEntry | None:
    """The entry at ``position`` if every check passes, else None (it is not part of a log)."""
    if log[position : position + 4] != ENTRY_SIGNATURE:
        return None
    (_, checksum, length, tail, sequence, count, _, guid, flushed, last) = ENTRY_HEADER.unpack_from(
        log, position
    )
    if guid != log_guid or sequence == 0 or length == 0 or length % SECTOR or length > len(log):
        return None
    if tail % SECTOR or tail >= len(log):
        return None
    descriptor_sectors = -(-(count + 2) // (SECTOR // DESCRIPTOR.size))
    if descriptor_sectors * SECTOR > length:
        return None
    writes = _descriptors(log, position, length, count, descriptor_sectors, sequence)
    if writes is None:
        return None
    budget.spend(length)
    if _entry_crc(log, position, length) != checksum:
        return None
    return LogEntry(position, length, sequence, tail, flushed, last, writes)


def _descriptors(
    log: bytes, position: int, length: int, count: int, descriptor_sectors: int, sequence: int
) -> tuple[Write, ...] | None:
    """The writes an entry's descriptors describe, or None at the first malformed one.

    Positions wrap around the circular log; a descriptor (32 bytes) or a data
    sector (4 KiB) never straddles the wrap, as the log is whole sectors.
    """
    writes = []
    data_sector = descriptor_sectors * SECTOR
    for i in range(count):
        at = (position + ENTRY_HEADER.size + i * DESCRIPTOR.size) % len(log)
        signature, trailing, leading, offset, seq = DESCRIPTOR.unpack_from(log, at)
        if seq != sequence or offset % SECTOR:
            return None
        if signature == ZERO_DESCRIPTOR:
            if leading % SECTOR:  # the zero length
                return None
            writes.append(Write(offset, leading, None))
        elif signature == DATA_DESCRIPTOR:
            if data_sector + SECTOR > length:
                return None
            start = (position + data_sector) % len(log)
            head, high = DATA_SECTOR_HEAD.unpack_from(log, start)
            low = struct.unpack_from("<I", log, start + SECTOR - 4)[0]
            if head != DATA_SIGNATURE or (high << 32 | low) != sequence:
                return None
            body = log[start + 8 : start + SECTOR - 4]
            writes.append(
                Write(
                    offset, SECTOR, struct.pack("<Q", leading) + body + struct.pack("<I", trailing)
                )
            )
            data_sector += SECTOR
        else:
            return None
    return tuple(writes)


def active_sequence(log: bytes, log_guid: bytes) -> list[LogEntry]:
    """The entries to replay, oldest first; empty when no valid sequence exists."""
    entries = {}
    budget = _Budget(len(log))
    for position in range(0, len(log), SECTOR):
        entry = parse_entry(log, position, log_guid, budget)
        if entry is not None:
            entries[position] = entry

    def successor(entry: LogEntry) -> LogEntry | None:
        after = entries.get((entry.position + entry.length) % len(log))
        return after if after is not None and after.sequence == entry.sequence + 1 else None

    has_predecessor = {id(s) for e in entries.values() if (s := successor(e)) is not None}
    best: list[LogEntry] = []
    for start in entries.values():
        if id(start) in has_predecessor:
            continue  # chains are walked from their first entry only
        chain = [start]
        while (after := successor(chain[-1])) is not None and len(chain) < len(entries):
            chain.append(after)
        head = chain[-1]
        firsts = [i for i, e in enumerate(chain) if e.position == head.tail]
        if not firsts:
            continue  # the head's tail is not in this chain: not a complete sequence
        sequence = chain[firsts[-1] :]
        if not best or head.sequence > best[-1].sequence:
            best = sequence
    return best


class LogOverlay(ExactReads):
    """A read-only file view with replayed log writes on top (an `InputFile` look-alike)."""

    def __init__(self, base: InputFile, entries: list[LogEntry]) -> None:
        self.base = base
        self.name = base.name
        size = base.size
        for entry in entries:
            if entry.flushed_file_offset > base.size:
                raise FormatError(
                    f"log entry {entry.sequence} says the file was {entry.flushed_file_offset} "
                    f"bytes, but it is {base.size}: the image has been truncated"
                )
            grown = -(-entry.last_file_offset // MiB) * MiB
            if grown > MAX_FILE_BYTES:
                raise FormatError(
                    f"log entry {entry.sequence} says the file grows to {entry.last_file_offset} "
                    "bytes, past the largest file offset"
                )
            size = max(size, grown)
        self.size = size
        self._starts: list[int] = []
        self._spans: list[tuple[int, int, bytes | None]] = []  # (start, end, data or zeros)
        writes = sum(len(entry.writes) for entry in entries)
        if writes > MAX_LOG_WRITES:
            raise UnsupportedError(
                f"the log to replay has {writes} writes; instar replays at most {MAX_LOG_WRITES}"
            )
        for entry in entries:
            for write in entry.writes:
                if write.offset + write.length > size:
                    raise FormatError(
                        f"log entry {entry.sequence} writes past the end of the file "
                        f"(offset {write.offset}, {write.length} bytes)"
                    )
                self._apply(write)

    def _apply(self, write: Write) -> None:
        """Insert a write over the sorted, disjoint spans, cutting what it covers."""
        start, end = write.offset, write.offset + write.length
        if start == end:
            return
        first = bisect.bisect_right(self._starts, start) - 1
        if first < 0 or self._spans[first][1] <= start:
            first += 1
        last = bisect.bisect_left(self._starts, end)
        pieces: list[tuple[int, int, bytes | None]] = []
        if first < last:
            s, e, data = self._spans[first]
            if s < start:
                pieces.append((s, start, None if data is None else data[: start - s]))
        pieces.append((start, end, write.data))
        if first < last:
            s, e, data = self._spans[last - 1]
            if e > end:
                pieces.append((end, e, None if data is None else data[end - s :]))
        self._spans[first:last] = pieces
        self._starts[first:last] = [piece[0] for piece in pieces]

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        length = min(length, self.size - offset)
        end = offset + length
        data = self.base.pread(offset, length)
        first = max(0, bisect.bisect_right(self._starts, offset) - 1)
        spans = []
        for span in self._spans[first:]:
            if span[0] >= end:
                break
            if span[1] > offset:
                spans.append(span)
        if not spans and len(data) == length:
            return data
        buffer = bytearray(data) + bytes(length - len(data))  # past the old end: zeros
        for s, e, payload in spans:
            lo, hi = max(s, offset), min(e, end)
            piece = bytes(hi - lo) if payload is None else payload[lo - s : hi - s]
            buffer[lo - offset : hi - offset] = piece
        return bytes(buffer)

    def close(self) -> None:
        self.base.close()


def replay(file: InputFile, header: layout.Header) -> InputFile | LogOverlay:
    """``file`` itself if there is nothing to replay, else a view with the log applied."""
    if header.log_guid == layout.ZERO_GUID or header.log_length == 0:
        return file
    if header.log_length % MiB:
        raise FormatError(f"log length {header.log_length} is not a multiple of 1 MiB")
    if header.log_length > MAX_LOG_BYTES:
        raise UnsupportedError(
            f"the image has a {header.log_length}-byte log to replay; "
            f"instar replays logs of up to {MAX_LOG_BYTES} bytes"
        )
    log = file.pread_exact(header.log_offset, header.log_length, "log")
    entries = active_sequence(log, header.log_guid)
    return LogOverlay(file, entries) if entries else file
