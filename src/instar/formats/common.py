"""Helpers every format shares, so no format keeps a private copy.

Read side: bounded inflate (zlib, raw deflate, zstd), the LRU table cache.
Write side: the ordered compression pool, the zero-skipping cluster
sequencer, endian table packing.
"""

from __future__ import annotations

import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from instar.errors import FormatError

# ---------------------------------------------------------------------------
# Read side

Table = TypeVar("Table")


class TableCache(Generic[Table]):
    """Decoded metadata tables (L2 tables, grain tables, sector bitmaps) by
    key, least recently used dropped first; ``load`` reads one on a miss.

    ``limit`` bounds the tables kept, so memory stays bounded however large
    the image claims to be.
    """

    def __init__(self, load: Callable[[int], Table], limit: int) -> None:
        self._load = load
        self._limit = max(1, limit)
        self._tables: OrderedDict[int, Table] = OrderedDict()

    def get(self, key: int) -> Table:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = self._load(key)
        self._tables[key] = table
        if len(self._tables) > self._limit:
            self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        self._tables.clear()


DEFLATE, ZLIB, ZSTD = "deflate", "zlib", "zstd"


def inflate(data: bytes, limit: int, codec: str, where: str) -> bytes:
    """Decompress one unit, never producing more than ``limit`` bytes.

    ``codec``: DEFLATE (raw deflate, any window: qcow2), ZLIB (a zlib stream:
    VMDK grains) or ZSTD. Returns what the unit decodes to (callers check the
    length they need); a corrupt stream raises FormatError naming ``where``.
    A stream never decodes past ``limit``: a unit cannot be made to allocate
    more than its own size. Raw deflate is cut there (qemu reads the start of
    a longer qcow2 zlib stream); a zlib stream or a zstd frame that goes on
    past it is refused, as qemu refuses them.
    """
    try:
        if codec == ZSTD:
            decompressor = zstd_module().ZstdDecompressor()
            out: bytes = decompressor.decompress(data, max_length=limit)
            if len(out) == limit and not decompressor.eof:
                # qemu takes a frame only if it ends with the unit: a longer one
                # is a bomb, one cut short is damaged.
                if decompressor.decompress(b"", max_length=1):
                    raise FormatError(f"{where} does not inflate to at most {limit} bytes")
                if not decompressor.eof:
                    raise FormatError(f"{where} ends inside a zstd frame")
            return out
        inflater = zlib.decompressobj(-15 if codec == DEFLATE else 15)
        out = inflater.decompress(data, limit)
    except (zlib.error, ValueError, EOFError) as error:
        raise FormatError(f"{where} does not decompress: {error}") from None
    except Exception as error:  # zstd.ZstdError, which lives in a lazy import
        if type(error).__name__ != "ZstdError":
            raise
        raise FormatError(f"{where} does not decompress: {error}") from None
    if codec == ZLIB and not inflater.eof:
        raise FormatError(f"{where} does not inflate to at most {limit} bytes")
    return out


def zstd_module() -> Any:
    """The zstd module (imported on first use): the standard library's from 3.14."""
    if sys.version_info >= (3, 14):
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]
    else:
        from backports import zstd
    return zstd
