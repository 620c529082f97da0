"""Helpers every format shares, so no format keeps a private copy.

Read side: bounded inflate (zlib, raw deflate, zstd), the LRU table cache.
Write side: the ordered compression pool, the zero-skipping cluster
sequencer, endian table packing.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from typing import Literal

# =============================================================================================
# Write side: endian table packing.
# =============================================================================================

_TABLE_TYPECODES: dict[int, str] = {4: "I", 8: "Q"}
assert all(array(code).itemsize == width for width, code in _TABLE_TYPECODES.items())


def pack_table(
    values: Iterable[int],
    width: Literal[4, 8],
    byteorder: Literal["big", "little"],
    size: int = 0,
    fill: int = 0,
) -> bytes:
    """``values`` as unsigned ``width``-byte integers in ``byteorder``, then ``fill``
    bytes up to ``size`` bytes.

    Every format's tables (qcow2 L1/L2/refcount table, VHD BAT, VMDK GD/GT,
    VHDX BAT) differ only in these parameters; an array and one byteswap pack
    them at C speed. ``values`` itself is never changed.
    """
    typecode = _TABLE_TYPECODES[width]
    if isinstance(values, array) and values.typecode == typecode and byteorder == sys.byteorder:
        data = values.tobytes()
    else:
        table = array(typecode, values)
        if byteorder != sys.byteorder:
            table.byteswap()
        data = table.tobytes()
    if len(data) < size:
        data += bytes([fill]) * (size - len(data))
    return data
