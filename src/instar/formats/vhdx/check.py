"""VHDX: what ``qemu-img check`` 7.2 checks (qemu's ``vhdx_co_check``).

qemu checks the BAT alone, and only its FULLY_PRESENT entries: an offset
that would overflow, a block that starts or ends past the end of the file,
and a payload block that overlaps a region qemu registered (the log and
each region table entry, the last registered tried first). Each is one
corruption, reported with error_report (so with the program's prefix).

qemu counts the entries it takes for payload blocks among the FULLY_PRESENT
ones only: after every ``chunk_ratio`` of them the next FULLY_PRESENT entry
is taken for a sector bitmap and not checked against the regions. instar
counts as qemu does, so the same entries are reported. The length of a
block is computed from the BAT index (qemu's own arithmetic), which only
matters for the last block of a disk.
"""

from __future__ import annotations

from array import array

from instar.findings import CORRUPTION, CheckResult
from instar.formats.common import first_other
from instar.formats.vhdx import layout
from instar.formats.vhdx.reader import VhdxDriver

U64 = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1


def check(driver: VhdxDriver) -> CheckResult:
    result = CheckResult()
    bat: array[int] = driver.bat
    geometry = driver.geometry
    block_size, ratio = geometry.block_size, geometry.chunk_ratio
    file_size = driver.file_size
    disk_bytes = geometry.virtual_size
    # qemu's region list, most recently registered first: the region table's
    # entries in reverse, then the log of the current header.
    regions = [(r.file_offset, (r.file_offset + r.length) & U64) for r in driver.regions]
    header = driver.header
    regions.reverse()
    regions.append((header.log_offset, (header.log_offset + header.log_length) & U64))
    payload_left = ratio  # qemu's ``payblocks``: it counts FULLY_PRESENT entries only
    index, count = 0, len(bat)
    while index < count:
        entry = bat[index]
        following = index + 1  # then past a run of the same entry
        if following < count and bat[following] == entry:
            following = first_other(bat, following, count, entry)
        if entry & layout.STATE_MASK != layout.PAYLOAD_FULLY_PRESENT:
            index = following
            continue
        offset = entry & layout.OFFSET_MASK
        if (
            offset <= INT64_MAX - block_size
            and offset + block_size <= file_size
            and _overlapped(regions, offset, block_size) is None
        ):  # nothing to say of any entry of the run: only qemu's count moves on
            payload_left = (payload_left - (following - index)) % (ratio + 1)
            index = following
            continue
        for at in range(index, following):
            length = min(block_size, (disk_bytes - at * block_size) & U64) & 0xFFFFFFFF
            if offset > INT64_MAX - block_size:
                _report(result, "bat-offset-overflow", f"VHDX BAT entry {at} offset overflow.")
            if offset >= file_size:
                _report(result, "bat-beyond-eof",
                        f"VHDX BAT entry {at} start offset {offset} points after end of file "
                        f"({file_size}). Image has probably been truncated.")
            elif offset + length > file_size:
                _report(result, "bat-end-beyond-eof",
                        f"VHDX BAT entry {at} end offset {offset + length - 1} points after "
                        f"end of file ({file_size}). Image has probably been truncated.")
            if payload_left:
                payload_left -= 1
                region = _overlapped(regions, offset, block_size)
                if region is not None:
                    start, stop = region
                    stop_text = str(stop) if stop else ""  # qemu's "%.lu": 0 prints nothing
                    _report(result, "bat-overlaps-region",
                            f"VHDX region {offset}-{(offset + block_size) & U64} overlaps "
                            f"with region {start}-{stop_text}")
            else:
                payload_left = ratio
        index = following
    return result


def _overlapped(regions: list[tuple[int, int]], offset: int,
                length: int) -> tuple[int, int] | None:
    """The first region (qemu's order) that ``[offset, offset + length)`` overlaps."""
    end = (offset + length) & U64
    for start, stop in regions:
        if not (offset >= stop or end <= start):
            return start, stop
    return None


def _report(result: CheckResult, code: str, message: str) -> None:
    result.add(CORRUPTION, code, message, prefixed=True)
