"""The write-side helpers of formats.common, which every writer uses."""

from __future__ import annotations

import struct
from array import array

import pytest

from instar.formats.common import pack_table

VALUES = [0, 1, 0x1234_5678, 0xFFFF_FFFF]


@pytest.mark.parametrize("byteorder", ["big", "little"])
@pytest.mark.parametrize("width", [4, 8])
def test_pack_table_matches_struct(width: int, byteorder: str) -> None:
    code = {4: "I", 8: "Q"}[width]
    expected = struct.pack(("<" if byteorder == "little" else ">") + code * len(VALUES), *VALUES)
    for values in (VALUES, array(code, VALUES), array("Q" if width == 4 else "I", VALUES)):
        assert pack_table(values, width, byteorder) == expected


def test_pack_table_pads_and_leaves_its_input_alone() -> None:
    table = array("I", [1, 2])
    packed = pack_table(table, 4, "big", size=16, fill=0xFF)
    assert packed == b"\0\0\0\x01\0\0\0\x02" + b"\xff" * 8
    assert table.tolist() == [1, 2]
    assert pack_table(range(3), 8, "little", size=8) == pack_table(range(3), 8, "little")
    assert pack_table([], 4, "big", size=512) == bytes(512)


def test_pack_table_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(OverflowError):
        pack_table([1 << 32], 4, "little")
