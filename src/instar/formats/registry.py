"""Format names to format modules, imported lazily, and format probing.

Adding a format is one line in `_DRIVERS` and its own module. Formats qemu
reads but instar does not (yet) are still recognised by their magic, so a VDI
is refused clearly instead of being copied as raw bytes; any other driver qemu
has is refused as not supported, not as unknown (`unsupported_message`).
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
    "qed": "instar.formats.qed",
    "qcow": "instar.formats.qcow",
}

# Formats qemu-img knows, with the magics that identify each (offset, bytes).
_RECOGNISED_ONLY: dict[str, tuple[tuple[int, bytes], ...]] = {
    "vdi": ((64, b"\x7f\x10\xda\xbe"),),
    "luks": ((0, b"LUKS\xba\xbe"),),
    "parallels": ((0, b"WithoutFreeSpace"), (0, b"WithouFreSpacExt")),
    "bochs": ((0, b"Bochs Virtual HD Image"),),
    "cloop": ((0, b"#!/bin/sh\n#V2.0 Format\n"),),
}
# Formats qemu-img probes by the file name's ending, not by content.
_RECOGNISED_BY_NAME: dict[str, str] = {"dmg": ".dmg"}


# Every driver qemu-img 7.2 has ("Supported formats" in ``qemu-img --help``).
QEMU_DRIVERS = frozenset((
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster",
    "host_cdrom", "host_device", "http", "https", "iscsi", "iser", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi",
    "vhdx", "vmdk", "vpc", "vvfat",
))
# The format drivers qemu-img cannot create an image with: it says so before creating.
QEMU_CANNOT_CREATE = frozenset((
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "ftp", "ftps", "http", "https", "null-aio",
    "null-co", "preallocate", "quorum", "replication", "snapshot-access", "throttle", "vvfat",
))


def unsupported_message(name: str, writing: bool) -> str:
    """Why instar refuses ``name``, a driver qemu has (`is_recognised_only`)."""
    if writing and name in QEMU_CANNOT_CREATE:
        return f"Format driver '{name}' does not support image creation"  # as qemu-img
    return f"{name}: {'writing' if writing else 'reading'} this format is not supported yet"


def known_names() -> list[str]:
    """Every format instar can name (readable or not)."""
    return sorted(set(_DRIVERS) | set(_RECOGNISED_ONLY) | set(_RECOGNISED_BY_NAME))


def _recognised(name: str, header: bytes, filename: str) -> bool:
    """Whether qemu's probe would pick ``name`` over raw for this file."""
    if any(header[at : at + len(magic)] == magic for at, magic in _RECOGNISED_ONLY.get(name, ())):
        return True
    suffix = _RECOGNISED_BY_NAME.get(name)
    return suffix is not None and filename.endswith(suffix)


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
    return (name in _RECOGNISED_ONLY or name in _RECOGNISED_BY_NAME
            or name in QEMU_DRIVERS) and name not in _DRIVERS


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
    for name in _RECOGNISED_ONLY.keys() | _RECOGNISED_BY_NAME.keys():
        if name not in _DRIVERS and _recognised(name, header, filename):
            raise UnsupportedError(
                f"Could not open '{filename}': {unsupported_message(name, writing=False)}"
            )
    assert best is not None
    return best
