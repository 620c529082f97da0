"""Where qemu-img commit writes zeros as zeros, not as data: qemu 7.2's
active commit is a mirror job, and this is its choice, per chunk.

The job copies the ranges the images above the base allocate, in chunks of
its granularity (the base's cluster size, kept between 4 KiB and 64 KiB;
qemu's ``bdrv_get_default_bitmap_granularity``): every chunk such a range
touches is dirty. Through each run of dirty chunks it asks the block status
of the whole chain (``bdrv_block_status_above``) at the chunk it has come
to. An answer without data that covers at least one whole chunk, rounded
down to whole chunks, is written as zeros (``write_zeroes``: a zero cluster,
or zeros in place) when it starts and ends on the base's cluster boundaries;
any other answer is copied, one chunk at least, as a buffer the base stores
as data, zeros or not (``mirror_iteration``). So zeros the top image holds
over part of a base cluster, or an answer cut short by a layer boundary,
become data in the base.
"""

from __future__ import annotations

from instar.image import DATA, Image, StatusLayer

MIN_GRANULARITY, MAX_GRANULARITY = 4 << 10, 64 << 10


def zero_regions(top: Image, ranges: list[tuple[int, int]], size: int,
                 cluster: int | None) -> list[tuple[int, int]]:
    """The ranges of ``[0, size)`` qemu's job writes as zeros into a base of
    ``cluster``-byte clusters (None: the base reports none), in order, when
    it commits ``ranges`` (what the layers above the base allocate, merged
    and in order) of ``top``."""
    granularity = (MAX_GRANULARITY if not cluster
                   else min(MAX_GRANULARITY, max(MIN_GRANULARITY, cluster)))
    align = cluster or 1
    layer = StatusLayer(top)
    zeros: list[tuple[int, int]] = []
    for first, last in _dirty_runs(ranges, granularity):
        position, end = first, min(last, size)
        while position < end:
            status = layer.status(position)
            length = min(status.piece_end, end) - position
            chunks = length - length % granularity
            if (not status.flags & DATA and chunks and not position % align
                    and not chunks % align):
                if zeros and zeros[-1][1] == position:
                    zeros[-1] = (zeros[-1][0], position + chunks)
                else:
                    zeros.append((position, position + chunks))
                position += chunks
            else:
                position += max(chunks, granularity)  # copied
    return zeros


def _dirty_runs(ranges: list[tuple[int, int]], granularity: int) -> list[tuple[int, int]]:
    """The runs of whole chunks that ``ranges`` touch."""
    runs: list[tuple[int, int]] = []
    for start, end in ranges:
        first = start - start % granularity
        last = -(-end // granularity) * granularity
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], last))
        else:
            runs.append((first, last))
    return runs
