"""The write-side helpers of formats.common, which every writer uses."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import threading
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest

from instar.formats.common import CompressionPool, UnitSequencer, pack_table, unit_spans

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


# --- unit_spans and UnitSequencer -----------------------------------------------------------


def test_unit_spans_cut_at_unit_boundaries() -> None:
    assert list(unit_spans(1000, 5000, 2048)) == [
        (0, 1000, 0, 1048), (1, 0, 1048, 2048), (2, 0, 3096, 1904)
    ]
    assert list(unit_spans(4096, 0, 512)) == []


class Recorder:
    """A sink that rebuilds the image from what a UnitSequencer emits."""

    def __init__(self, unit: int, size: int) -> None:
        self.unit = unit
        self.image = bytearray(size + unit)
        self.runs: list[tuple[int, int]] = []

    def emit(self, first: int, data: memoryview) -> None:
        assert len(data) % self.unit == 0 and data
        assert not self.runs or first * self.unit >= self.runs[-1][1]  # in order, no overlap
        start = first * self.unit
        self.image[start : start + len(data)] = data
        self.runs.append((start, start + len(data)))


@pytest.mark.parametrize("check_whole", [True, False])
@pytest.mark.parametrize("unit", [512, 4096, 65536])
def test_sequencer_rebuilds_random_writes(unit: int, check_whole: bool) -> None:
    rng = random.Random(unit)
    size = 40 * unit + 123
    expected = bytearray(size)
    sink = Recorder(unit, size)
    sequencer = UnitSequencer(unit, size, sink.emit, check_whole=check_whole)
    offset = rng.randrange(unit)
    while offset < size:
        length = min(size - offset, rng.choice([1, 100, unit - 1, unit, 3 * unit + 7, 5 * unit]))
        kind = rng.randrange(3)
        if kind == 0:
            sequencer.write_zeroes(offset, length)
        else:
            data = rng.randbytes(length) if kind == 1 else bytes(length)
            sequencer.write(offset, data)
            expected[offset : offset + length] = data
        offset += length + rng.choice([0, 0, 5, unit])
    sequencer.flush()
    assert sink.image[:size] == expected
    for start, end in sink.runs:
        for lo in range(start, end, unit):
            chunk = sink.image[lo : lo + unit]
            if any(chunk):
                continue
            # Only whole units handed in at once skip the zero test, and only when asked.
            assert not check_whole


def test_sequencer_skips_zero_units_between_runs() -> None:
    sink = Recorder(4, 64)
    sequencer = UnitSequencer(4, 64, sink.emit)
    sequencer.write(0, b"abcd" + bytes(8) + b"efghijkl" + bytes(4))
    sequencer.write(25, b"xy")  # a partial unit, emitted at flush
    assert sink.runs == [(0, 4), (12, 20)]
    sequencer.flush()
    assert sink.runs[-1] == (24, 28)
    assert sink.image[24:28] == b"\0xy\0"


def test_sequencer_refuses_writes_out_of_order_or_range() -> None:
    sequencer = UnitSequencer(512, 4096, lambda first, data: None)
    sequencer.write(1000, b"x")
    with pytest.raises(ValueError, match="goes back"):
        sequencer.write(999, b"x")
    with pytest.raises(ValueError, match="go back"):
        sequencer.write_zeroes(0, 1)
    with pytest.raises(ValueError, match="outside the image"):
        sequencer.write(4000, bytes(100))


def test_sequencer_takes_memoryviews() -> None:
    sink = Recorder(512, 2048)
    sequencer = UnitSequencer(512, 2048, sink.emit)
    sequencer.write(0, memoryview(b"\1" * 1024 + bytes(512)))
    assert sink.runs == [(0, 1024)]


# --- CompressionPool ------------------------------------------------------------------------


def _counting_codec(made: list[int]) -> Callable[[], Callable[[memoryview], bytes]]:
    def codec() -> Callable[[memoryview], bytes]:
        made.append(threading.get_ident())
        return lambda unit: zlib.compress(unit)

    return codec


def test_pool_delivers_in_order_with_one_codec_per_thread() -> None:
    unit = 4096
    rng = random.Random(5)
    data = rng.randbytes(300 * unit)
    delivered: list[tuple[int, bytes, bytes]] = []
    made: list[int] = []
    pool = CompressionPool(
        unit, _counting_codec(made),
        lambda index, raw, packed: delivered.append((index, bytes(raw), packed)),
        name="test", batch_bytes=8 * unit, in_flight_bytes=64 * unit,
    )
    first = 0
    while first < 300:  # runs of assorted lengths, with gaps between them
        count = min(300 - first, rng.randrange(1, 40))
        pool.submit(first, memoryview(data)[first * unit : (first + count) * unit])
        first += count + rng.randrange(3)
    pool.finish()
    pool.close()
    assert [i for i, _, _ in delivered] == sorted(i for i, _, _ in delivered)
    for index, raw, packed in delivered:
        assert raw == data[index * unit : (index + 1) * unit]
        assert zlib.decompress(packed) == raw
    assert len(made) == len(set(made)) <= 4  # one codec per thread, never per unit


def test_pool_hands_units_over_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls = []
    submit = ThreadPoolExecutor.submit

    def counting_submit(self: ThreadPoolExecutor, *args: object) -> object:
        calls.append(1)
        return submit(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ThreadPoolExecutor, "submit", counting_submit)
    pool = CompressionPool(
        512, lambda: bytes, lambda index, raw, packed: None, name="test", batch_bytes=32 * 512
    )
    for first in range(0, 640, 64):
        pool.submit(first, memoryview(bytes(64 * 512)))
    pool.finish()
    pool.close()
    assert len(calls) == 20  # 640 units, 32 a batch


def test_pool_copies_a_buffer_the_caller_reuses() -> None:
    buffer = bytearray(b"a" * 512)
    delivered: list[bytes] = []
    pool = CompressionPool(
        512, lambda: bytes, lambda index, raw, packed: delivered.append(packed), name="test"
    )
    pool.submit(0, memoryview(buffer))
    buffer[:] = b"b" * 512
    pool.finish()
    pool.close()
    assert delivered == [b"a" * 512]


def test_pool_raises_a_codec_error_and_closes() -> None:
    def codec() -> Callable[[memoryview], bytes]:
        def fail(unit: memoryview) -> bytes:
            raise RuntimeError("codec failed")

        return fail

    pool = CompressionPool(512, codec, lambda index, raw, packed: None, name="test")
    pool.submit(0, memoryview(bytes(4096)))
    with pytest.raises(RuntimeError, match="codec failed"):
        pool.finish()
    pool.close()
    pool.close()  # closing twice is harmless


def test_writers_without_compression_do_not_load_the_pool() -> None:
    code = (
        "import sys; import instar.formats.qcow2.writer, instar.formats.vmdk.writer, "
        "instar.formats.vpc.writer, instar.formats.vhdx.writer; "
        "sys.exit('concurrent.futures' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
