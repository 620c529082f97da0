"""Format names to format modules, imported lazily, and format probing.

Adding a format is one line in `_DRIVERS` and its own module. Formats qemu
reads but instar does not (yet) are still recognised by their magic, so a VDI
is refused clearly instead of being copied as raw bytes.
"""

from __future__ import annotations

import importlib

from instar.errors import UnsupportedError
from instar.formats.base import Format

PROBE_SIZE = 2048  # qemu's BLOCK_PROBE_BUF_SIZE

_DRIVERS: dict[str, str] = {
    "raw": "instar.formats.raw",
    "qcow2": "instar.formats.qcow2",
    "vmdk": "instar.formats.vmdk",
    "vpc": "instar.formats.vpc",
    "vhdx": "instar.formats.vhdx",
}

# Formats qemu-img knows, with the magic that identifies each (offset, bytes).
_RECOGNISED_ONLY: dict[str, tuple[int, bytes]] = {
    "vdi": (64, b"\x7f\x10\xda\xbe"),
    "qed": (0, b"QED\x00"),
    "luks": (0, b"LUKS\xba\xbe"),
    "parallels": (0, b"WithoutFreeSpace"),
    "bochs": (0, b"Bochs Virtual HD Image"),
    "cloop": (0, b"#!/bin/sh\n#V2.0 Format\n"),
}


def known_names() -> list[str]:
    """Every format instar can name (readable or not)."""
    return sorted(set(_DRIVERS) | set(_RECOGNISED_ONLY))


def get(name: str) -> Format | None:
    """The format called ``name``, or None if instar has no driver for it."""
    module_name = _DRIVERS.get(name)
    if module_name is None:
        return None
    module = importlib.import_module(module_name)
    fmt: Format = module.FORMAT
    return fmt


def is_recognised_only(name: str) -> bool:
    """True for a format qemu has and instar does not (yet)."""
    return name in _RECOGNISED_ONLY and name not in _DRIVERS


def probe(header: bytes, filename: str) -> Format:
    """The format qemu would pick for ``header``: the best score wins, raw last.

    A header of a format instar cannot read raises UnsupportedError rather than
    silently falling back to raw.
    """
    best: Format | None = None
    best_score = 0
    for name in _DRIVERS:
        fmt = get(name)
        assert fmt is not None
        score = fmt.probe(header, filename)
        if score > best_score:
            best, best_score = fmt, score
    if best is not None and best.name != "raw":
        return best
    for name, (offset, magic) in _RECOGNISED_ONLY.items():
        if name in _DRIVERS:
            continue
        if header[offset : offset + len(magic)] == magic:
            raise UnsupportedError(
                f"'{filename}' is a {name} image, which instar cannot read yet"
            )
    assert best is not None
    return best
