"""VMDK: what ``qemu-img check`` 7.2 checks (qemu's ``vmdk_co_check``).

qemu steps through the disk a cluster at a time (a grain for a sparse
extent, the whole extent for a flat one), from sector 0, whatever extent
boundaries fall between its steps, and asks where each cluster is. The
first one stored at or past the end of its extent's file stops the check:
"ERROR: cluster offset for sector N points after EOF", one corruption, and
qemu-img's "Check failed: Invalid argument". Nothing else is checked.

instar visits the same clusters without a step per grain: empty grain
directory entries are skipped at memory speed, and a grain table is only
searched entry by entry if its largest entry lies past the end.
"""

from __future__ import annotations

from instar.findings import CORRUPTION, CheckResult
from instar.formats.common import first_other
from instar.formats.vmdk.layout import GTE_ZEROED, SECTOR
from instar.formats.vmdk.reader import FlatExtent, SparseExtent, VmdkDriver


def check(driver: VmdkDriver) -> CheckResult:
    result = CheckResult()
    sector = 0  # qemu's sector_num: where its next step lands
    start = 0
    for extent in driver.disk_extents:
        end = start + extent.length // SECTOR
        if sector < end:
            if isinstance(extent, FlatExtent):
                step = end - start
                if extent.start >= extent.file.size:
                    return _beyond_eof(result, sector)
            else:
                step = extent.header.grain_sectors
                first = (sector - start) // step
                found = _grain_beyond_eof(extent, first, -(-(end - sector) // step))
                if found is not None:
                    return _beyond_eof(result, sector + (found - first) * step)
            sector += -(-(end - sector) // step) * step
        start = end
    return result


def _beyond_eof(result: CheckResult, sector: int) -> CheckResult:
    result.add(CORRUPTION, "grain-beyond-eof",
               f"ERROR: cluster offset for sector {sector} points after EOF")
    result.fail("Invalid argument")
    return result


def _grain_beyond_eof(extent: SparseExtent, first: int, count: int) -> int | None:
    """The first of grains ``[first, first + count)`` stored at or past the
    end of the extent's file (a grain table entry), or None."""
    per_table = extent.header.gtes_per_gt
    limit = -(-extent.file.size // SECTOR)  # an entry from here on points past the end
    directory = extent.grain_directory
    largest: dict[int, int] = {}  # grain table sector -> its largest entry (tables named again)
    grain, last = first, first + count
    while grain < last:
        index = grain // per_table
        if index >= len(directory):
            return None  # past the directory: no cluster (qemu never gets here)
        if directory[index] == 0:  # whole tables unallocated
            following = first_other(directory, index, len(directory), 0)
            grain = max(grain, following * per_table)
            continue
        low = grain % per_table
        high = min(per_table, low + last - grain)
        sector = directory[index]
        if largest.get(sector, limit) < limit:
            grain += high - low
            continue
        table = extent.grain_table(index)
        largest[sector] = max(table)
        if max(table[low:high]) >= limit:
            for position in range(low, high):
                entry = table[position]
                if entry >= limit and entry and not (entry == GTE_ZEROED and extent.zero_grains):
                    return grain + position - low
        grain += high - low
    return None
