"""Format names to format modules, imported lazily, and format probing.

Adding a format is one line in `_DRIVERS` and its own module. Formats qemu
reads but instar does not (yet) are still recognised by their magic, so such an
image is refused clearly instead of being copied as raw bytes; any other driver qemu
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
    "vdi": "instar.formats.vdi",
    "parallels": "instar.formats.parallels",
    "qed": "instar.formats.qed",
    "qcow": "instar.formats.qcow",
    "file": "instar.formats.file",  # the file protocol driver: raw under its own name
    # Read only: qemu-img cannot create these either.
    "dmg": "instar.formats.dmg",
    "bochs": "instar.formats.bochs",
    "cloop": "instar.formats.cloop",
}

# Formats qemu-img knows, with the magics that identify each (offset, bytes).
_RECOGNISED_ONLY: dict[str, tuple[tuple[int, bytes], ...]] = {
    "luks": ((0, b"LUKS\xba\xbe"),),
}
# Formats qemu-img probes by the file name's ending, not by content (none left
# that instar does not read: dmg is read, and probed by its ``.dmg`` name).
_RECOGNISED_BY_NAME: dict[str, str] = {}


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


def creation_refusal(name: str) -> str | None:
    """Why ``-O name`` is refused before anything is created (None: instar
    writes it, or qemu does not know the name): qemu-img's own words for a
    driver that cannot create images (dmg, bochs, cloop, which instar reads),
    "not supported yet" for one qemu writes and instar does not."""
    if name in QEMU_CANNOT_CREATE or is_recognised_only(name):
        return unsupported_message(name, writing=True)
    return None


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


def import_all() -> None:
    """Import every format's package (its probe and options, not its reader):
    the host does it before it forks a worker whose job will probe, so the
    worker inherits them instead of asking for each one."""
    for name in _DRIVERS:
        get(name)


def is_recognised_only(name: str) -> bool:
    """True for a format qemu has and instar does not (yet)."""
    return (name in _RECOGNISED_ONLY or name in _RECOGNISED_BY_NAME
            or name in QEMU_DRIVERS) and name not in _DRIVERS


def probe_name(header: bytes, filename: str) -> str:
    """The name of the format qemu would pick for ``header``, readable or not:
    the best score among instar's formats, else one instar only recognises,
    else raw."""
    best, best_score = "raw", 0
    for name in _DRIVERS:
        fmt = get(name)
        assert fmt is not None
        score = fmt.probe(header, filename)
        if score > best_score:
            best, best_score = name, score
    if best != "raw":
        return best
    for name in sorted(_RECOGNISED_ONLY.keys() | _RECOGNISED_BY_NAME.keys()):
        if name not in _DRIVERS and _recognised(name, header, filename):
            return name
    return "raw"


def probe(header: bytes, filename: str) -> Format:
    """The format qemu would pick for ``header``: the best score wins, raw last.

    A header of a format instar cannot read raises UnsupportedError rather than
    silently falling back to raw.
    """
    name = probe_name(header, filename)
    fmt = get(name)
    if fmt is None:
        raise UnsupportedError(
            f"Could not open '{filename}': {unsupported_message(name, writing=False)}"
        )
    return fmt
