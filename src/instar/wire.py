"""The data the host and the worker send each other: a small typed encoding.

What crosses the channel is plain data: None, bools, ints, floats, strings,
bytes, lists (tuples are sent as lists) and dicts with string keys, nested at
most `MAX_DEPTH` deep. The host decodes what a worker sends, and a worker
that a hostile image took over may send anything, so `decode` trusts nothing:
every length is checked against the bytes that are there, nesting is bounded,
a dict key must be a string, and anything malformed is one `ValueError`.
Never pickle or marshal, which build whatever the bytes describe.

Why not JSON: ``import json`` loads ``re`` and ``enum`` with it, about a fifth
of what a command spent before its work began (docs/performance.md), and JSON
cannot carry bytes (the module code the host serves a worker was base64).

Each value is a one-byte tag and its payload, big-endian:

- ``N`` None, ``T`` True, ``F`` False;
- ``i`` an int: a 1-byte length n (at most `MAX_INT_BYTES`), then n bytes,
  two's complement;
- ``f`` a float: 8 bytes, IEEE 754 double;
- ``s`` a string (UTF-8) or ``b`` bytes: a 4-byte length, then the bytes;
- ``l`` a list: a 4-byte count, then the items;
- ``d`` a dict: a 4-byte count, then each key (a string) and its value.
"""

from __future__ import annotations

import struct

from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 32  # lists and dicts inside each other
MAX_INT_BYTES = 64  # 512 bits: far past any size an image has

_COUNT = struct.Struct(">I")
_FLOAT = struct.Struct(">d")


def encode(value: Any) -> bytes:
    """``value`` as bytes; TypeError for what is not plain data."""
    parts: list[bytes] = []
    _encode(value, parts, 0)
    return b"".join(parts)


def _encode(value: Any, parts: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"data nested more than {MAX_DEPTH} deep")
    if value is None:
        parts.append(b"N")
    elif value is True:
        parts.append(b"T")
    elif value is False:
        parts.append(b"F")
    elif isinstance(value, int):
        size = (value + (value < 0)).bit_length() // 8 + 1
        if size > MAX_INT_BYTES:
            raise ValueError(f"an integer of {size} bytes")
        parts += (b"i", bytes((size,)), value.to_bytes(size, "big", signed=True))
    elif isinstance(value, float):
        parts += (b"f", _FLOAT.pack(value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        parts += (b"s", _COUNT.pack(len(data)), data)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        parts += (b"b", _COUNT.pack(len(data)), data)
    elif isinstance(value, list | tuple):
        parts += (b"l", _COUNT.pack(len(value)))
        for item in value:
            _encode(item, parts, depth + 1)
    elif isinstance(value, dict):
        parts += (b"d", _COUNT.pack(len(value)))
        for key, item in value.items():
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)  # as JSON would
            if not isinstance(key, str):
                raise TypeError(f"a dict key of type {type(key).__name__}")
            _encode(key, parts, depth + 1)
            _encode(item, parts, depth + 1)
    else:
        raise TypeError(f"{type(value).__name__} is not plain data")


def decode(data: bytes) -> Any:
    """The value `encode` made of ``data``; ValueError for anything else
    (trailing bytes included)."""
    view = memoryview(data)
    value, end = _Decoder(view).value(0, 0)
    if end != len(view):
        raise ValueError("bytes after the value")
    return value


class _Decoder:
    """Reads one value at a time from ``view``, checking every length."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def _take(self, position: int, length: int) -> int:
        """The end of ``length`` bytes at ``position``, if they are there."""
        end = position + length
        if end > len(self.view):
            raise ValueError("the data ends inside a value")
        return end

    def _count(self, position: int) -> tuple[int, int]:
        end = self._take(position, 4)
        (count,) = _COUNT.unpack_from(self.view, position)
        return count, end

    def value(self, position: int, depth: int) -> tuple[Any, int]:
        """The value at ``position`` and where it ends."""
        if depth > MAX_DEPTH:
            raise ValueError(f"data nested more than {MAX_DEPTH} deep")
        tag = self.view[self._take(position, 1) - 1]
        position += 1
        if tag == 0x4E:  # N
            return None, position
        if tag == 0x54:  # T
            return True, position
        if tag == 0x46:  # F
            return False, position
        if tag == 0x69:  # i
            size = self.view[self._take(position, 1) - 1]
            if not 1 <= size <= MAX_INT_BYTES:
                raise ValueError(f"an integer of {size} bytes")
            end = self._take(position + 1, size)
            return int.from_bytes(self.view[position + 1:end], "big", signed=True), end
        if tag == 0x66:  # f
            end = self._take(position, 8)
            return _FLOAT.unpack_from(self.view, position)[0], end
        if tag in (0x73, 0x62):  # s, b
            length, start = self._count(position)
            end = self._take(start, length)
            raw = self.view[start:end]
            return (bytes(raw) if tag == 0x62 else str(raw, "utf-8", "surrogatepass")), end
        if tag == 0x6C:  # l
            count, position = self._count(position)
            self._take(position, count)  # every item takes a byte at least
            items = []
            for _ in range(count):
                item, position = self.value(position, depth + 1)
                items.append(item)
            return items, position
        if tag == 0x64:  # d
            count, position = self._count(position)
            self._take(position, 2 * count)
            mapping: dict[str, Any] = {}
            for _ in range(count):
                key, position = self.value(position, depth + 1)
                if not isinstance(key, str):
                    raise ValueError("a dict key that is not a string")
                mapping[key], position = self.value(position, depth + 1)
            return mapping, position
        raise ValueError(f"an unknown tag {tag:#04x}")
