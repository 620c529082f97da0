"""The channel's data encoding (instar.wire): what round-trips, and what a
hostile worker can send the host (anything: it must come back as one
ValueError, quickly, in bounded memory, or as the host's one-line refusal)."""

from __future__ import annotations

import math
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instar import wire
from instar.errors import InstarError
from instar.safety import PathPolicy
from instar.worker import SandboxSettings, run_job

_SCALARS = (st.none() | st.booleans() | st.integers(-(2**511), 2**511 - 1)
            | st.floats(allow_nan=False) | st.text() | st.binary())
PLAIN = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)


def _as_sent(value: Any) -> Any:
    """What the other side gets: tuples become lists."""
    if isinstance(value, list | tuple):
        return [_as_sent(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_sent(item) for key, item in value.items()}
    return value


@given(PLAIN)
def test_round_trip(value: Any) -> None:
    assert wire.decode(wire.encode(value)) == _as_sent(value)


def test_values_json_would_carry_the_same_way() -> None:
    assert wire.decode(wire.encode({1: "a", "b": (1, 2)})) == {"1": "a", "b": [1, 2]}
    assert math.isnan(wire.decode(wire.encode(float("nan"))))
    assert wire.decode(wire.encode("\udc80 lone surrogate")) == "\udc80 lone surrogate"
    assert wire.decode(wire.encode(2**64 - 1)) == 2**64 - 1
    assert wire.decode(wire.encode(-(2**63))) == -(2**63)


@pytest.mark.parametrize("value", [object(), {(1, 2): "tuple key"}, {None: 1}, 2**600])
def test_what_is_not_plain_data_is_refused_when_sent(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        wire.encode(value)


def _nested(depth: int) -> bytes:
    return b"l\x00\x00\x00\x01" * depth + b"N"


@pytest.mark.parametrize("data", [
    b"",                                    # nothing
    b"X",                                   # an unknown tag
    b"NN",                                  # bytes after the value
    b"i\x00",                               # an integer of no bytes
    b"i\xff" + b"\x01" * 255,               # an integer past MAX_INT_BYTES
    b"i\x02\x01",                           # an integer cut short
    b"s\x00\x00\x00\x05abc",                # a string cut short
    b"s\x00\x00\x00\x02\xff\xfe",           # not UTF-8
    b"l\xff\xff\xff\xff",                   # four billion items claimed, none there
    b"d\xff\xff\xff\xffN",                  # the same for a dict
    b"d\x00\x00\x00\x01i\x01\x01N",         # a key that is not a string
    b"f\x00\x00",                           # a float cut short
    _nested(wire.MAX_DEPTH + 1),            # nested too deep
    _nested(100_000),                       # much too deep: no RecursionError
])
def test_malformed_data_is_one_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode(data)


def test_nesting_up_to_the_limit_is_taken() -> None:
    assert wire.decode(_nested(wire.MAX_DEPTH)) is not None


@settings(max_examples=500)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_value_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except ValueError:
        pass


@given(PLAIN, st.data())
def test_any_cut_or_changed_encoding_decodes_or_raises_value_error(value: Any,
                                                                   data: st.DataObject) -> None:
    encoded = bytearray(wire.encode(value))
    cut = data.draw(st.integers(0, len(encoded)))
    changed = encoded[:cut]
    if changed and data.draw(st.booleans()):
        changed[data.draw(st.integers(0, len(changed) - 1))] = data.draw(st.integers(0, 255))
    try:
        wire.decode(bytes(changed))
    except ValueError:
        pass


def test_claimed_counts_cost_nothing() -> None:
    """A list claiming 2**32 - 1 items of one byte each, with 100 MB less
    than that: refused before anything is built."""
    data = b"l" + struct.pack(">I", 2**32 - 1) + b"N" * 1000
    started = time.monotonic()
    with pytest.raises(ValueError):
        wire.decode(data)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("frame", [
    struct.pack(">I", 5) + b"Zjunk",             # an unknown tag
    struct.pack(">I", 1) + b"N",                 # a message that is not a dict
    struct.pack(">I", 64 << 20 | 1),             # a frame over the limit
    struct.pack(">I", 9) + b"d\x00\x00\x00\x01s\x00",  # cut inside the message
])
def test_a_worker_sending_garbage_gets_one_line(frame: bytes) -> None:
    """The host's side: whatever a (taken over) worker writes on its socket
    ends the job with the host's one-line refusal."""
    def job(broker: Any, events: Any) -> Any:
        broker._channel.sock.sendall(frame)
        broker._channel.sock.close()
        time.sleep(5)  # the host must not wait for more

    started = time.monotonic()
    with pytest.raises(InstarError) as raised:
        run_job(job, PathPolicy([]), SandboxSettings(mode="auto"), inputs=[])
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(("the worker broke the protocol", "the worker ended without"))
    assert time.monotonic() - started < 4
