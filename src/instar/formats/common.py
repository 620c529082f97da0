"""Helpers every format shares, so no format keeps a private copy.

Read side: bounded inflate (zlib, raw deflate, zstd), the LRU table cache.
Write side: the ordered compression pool, the zero-skipping cluster
sequencer, endian table packing.
"""

from __future__ import annotations
