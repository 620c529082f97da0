"""Reading cloop images as qemu 7.2 reads them.

The layout: a 128-byte shell script (the V2.0 magic), then the block size and
the number of blocks (big-endian 32-bit), then ``n + 1`` big-endian 64-bit
file offsets: block ``i`` is the zlib stream from ``offsets[i]`` to
``offsets[i + 1]``, and inflates to exactly one block. The header is checked
in qemu's order with qemu's messages.

Where instar is stricter than qemu (qemu reads what lies past the end of the
file as zeros): an offsets table larger than `MAX_TABLE_BYTES` is refused;
one that does not lie in the file, or a block over the header or the table,
is refused when the disk is read (``info`` still describes the image, as
qemu-img's does).
"""

from __future__ import annotations

import itertools
import sys
from array import array
from collections.abc import Iterator

from instar.errors import FormatError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import ZLIB, inflate, metadata_alias_message
from instar.image import COMPRESSED, DATA, Driver, Run
from instar.safety import MAX_TABLE_BYTES

SECTOR = 512
HEADER_SIZE = 128  # the script, padded
TABLE_OFFSET = HEADER_SIZE + 8  # after the block size and the block count
MAX_BLOCK_SIZE = 64 << 20  # qemu's: a block is inflated in memory
MAX_COMPRESSED_SIZE = 2 * MAX_BLOCK_SIZE  # qemu's bound on one compressed block
U32 = 0xFFFFFFFF
MAX_BLOCKS = (U32 - 1) // 8  # qemu's bound: (n + 1) * 8 must fit 32 bits
MAX_OFFSETS_BYTES = 512 << 20  # qemu's bound on the table


def open_cloop(file: InputFile, resolver: Resolver) -> Driver:
    """Open a cloop image; FormatError (qemu's words where qemu has them) if malformed."""
    fields = file.pread(HEADER_SIZE, 8).ljust(8, b"\0")  # past the end: zeros, as in qemu
    block_size = int.from_bytes(fields[:4], "big")
    blocks = int.from_bytes(fields[4:], "big")
    if block_size % SECTOR:
        raise FormatError(f"block_size {block_size} must be a multiple of 512")
    if block_size == 0:
        raise FormatError("block_size cannot be zero")
    if block_size > MAX_BLOCK_SIZE:
        raise FormatError(f"block_size {block_size} must be {MAX_BLOCK_SIZE >> 20} MB or less")
    if blocks > MAX_BLOCKS:
        raise FormatError(f"n_blocks {blocks} must be {MAX_BLOCKS} or less")
    table_bytes = (blocks + 1) * 8
    if table_bytes & U32 > MAX_OFFSETS_BYTES:
        raise FormatError("image requires too many offsets, try increasing block size")
    if table_bytes & U32 == 0:  # qemu's 32-bit size wraps to 0: its allocation fails
        raise FormatError("Could not allocate offsets table")
    if table_bytes > MAX_TABLE_BYTES:
        raise FormatError(
            f"offsets table of {blocks + 1} entries is over instar's limit of "
            f"{MAX_TABLE_BYTES} bytes"
        )
    data = file.pread(TABLE_OFFSET, table_bytes)
    corruption = None
    if len(data) < table_bytes:  # qemu reads zeros past the end of the file
        corruption = (
            f"the offsets table ({blocks + 1} entries at offset {TABLE_OFFSET}) lies beyond "
            "the end of the file (the image is truncated or corrupt)"
        )
    offsets = array("Q")
    assert offsets.itemsize == 8
    offsets.frombytes(data.ljust(table_bytes, b"\0"))
    if sys.byteorder == "little":
        offsets.byteswap()
    _check_offsets(offsets)
    return CloopDriver(file, block_size, offsets, corruption)


def _check_offsets(offsets: array[int]) -> None:
    """qemu's checks, in its order: increasing offsets, no compressed block
    over 128 MiB. A slice of the table at a time (memory stays bounded), its
    sizes tested in C; only a slice that fails is walked for qemu's index."""
    for first in range(0, len(offsets) - 1, _CHECK_SLICE):
        piece = offsets[first : first + _CHECK_SLICE + 1]
        sizes = [after - before for before, after in itertools.pairwise(piece)]
        if min(sizes) >= 0 and max(sizes) <= MAX_COMPRESSED_SIZE:
            continue
        for index, size in enumerate(sizes, first + 1):
            if size < 0:
                raise FormatError(
                    f"offsets not monotonically increasing at index {index}, image file is corrupt"
                )
            if size > MAX_COMPRESSED_SIZE:
                raise FormatError(
                    f"invalid compressed block size at index {index}, image file is corrupt"
                )


_CHECK_SLICE = 1 << 16


class CloopDriver(Driver):
    """Every block is one compressed unit (``unit``: its index).

    qemu's cloop has no block-status callback: it says DATA over the whole
    disk (``generic_status``). The size is qemu's, including its 32-bit
    product of the block count and the sectors per block.
    """

    generic_status = True

    def __init__(
        self, file: InputFile, block_size: int, offsets: array[int], corruption: str | None
    ) -> None:
        self.file = file
        self.corruption = corruption
        self.name = file.name
        self.block_size = block_size
        self.offsets = offsets
        blocks = len(offsets) - 1
        self.virtual_size = (blocks * (block_size // SECTOR) & U32) * SECTOR
        self._metadata_end = TABLE_OFFSET + len(offsets) * 8

    def map(self, offset: int, length: int) -> Iterator[Run]:
        if self.corruption is not None:
            raise FormatError(self.corruption)
        end = offset + length
        size = self.block_size
        position = offset
        while position < end:
            index, within = divmod(position, size)
            step = min(end - position, size - within)
            yield Run(position, position + step, DATA | COMPRESSED, self.file, within, index)
            position += step

    def decompress(self, run: Run) -> bytes:
        """Block ``run.unit``, inflated to exactly one block (bounded by it)."""
        index = run.unit
        assert isinstance(index, int)
        start, stop = self.offsets[index], self.offsets[index + 1]
        where = f"compressed block {index} (guest offset {index * self.block_size:#x})"
        if start < self._metadata_end and stop > start:
            what = "the header" if start < TABLE_OFFSET else "the offsets table"
            raise FormatError(metadata_alias_message(start, index * self.block_size, what))
        if start >= self.file.size and stop > start:
            raise FormatError(f"{where} at offset {start} lies beyond the end of the file")
        # What lies past the end of the file reads as nothing (qemu: zeros, which
        # no zlib stream ends with): the stream must end inside the file.
        size = self.block_size
        out = inflate(self.file.pread(start, stop - start), size, ZLIB, where)
        if len(out) != size:
            raise FormatError(f"{where} inflates to {len(out)} bytes, not a whole block")
        return out

    def close(self) -> None:
        self.file.close()

