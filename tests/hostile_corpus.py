"""The hostile corpus of tests/test_hostile.py: images built to attack a reader.

No image is committed: each is built by its case, either from a base qemu-img
made (patched here in Python) or written here from the format specification
(qcow2: qemu's docs/interop/qcow2.txt; qcow: the layout qemu's block/qcow.c
reads; QED: qemu's docs/interop/qed_spec.txt; VMDK: VMware's Virtual Disk Format
5.0; VHD: Microsoft's VHD specification; VHDX: MS-VHDX; VDI: VirtualBox's header
version 1.1; zstd: RFC 8878; dmg, bochs and cloop, which qemu cannot write: their reader
tests' builders).

A case builds its files in ``img/`` and returns the name of the image the
commands open. Beside ``img/`` lies ``secret/canary.bin``, a file of a random
token no output may ever contain; attacks name it in every way a path can be
spelled. One function per class of attack, its docstring saying what it
attacks; `CASES` is every case of every class.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import os
import random
import secrets
import shutil
import socket
import struct
import sys
import uuid
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import test_bochs as bochs_tests
import test_cloop as cloop_tests
import test_dmg as dmg_tests
import test_parallels_reader as parallels_tests
import test_vhdx_reader as vhdx_tests
import test_vpc_reader as vpc_tests
from helpers import pattern, qemu_img_ok, qemu_io
from instar.formats.vhdx import layout as vhdx_layout

KiB, MiB, GiB, TiB, PiB, EiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50, 1 << 60

# What must never appear in any output: the canary, the environment of the
# instar process (what /proc/self/environ would give), /etc/passwd, and (when
# its directory is not allowed) the upload next to the image.
CANARY_TOKEN = secrets.token_hex(16).encode()
ENV_SECRET = secrets.token_hex(16)
NEIGHBOUR_TOKEN = secrets.token_hex(16).encode()
PASSWD_MARK = b"root:x:0:0:"


def canary_bytes(token: bytes) -> bytes:
    line = b"CANARY " + token + b"\n"
    return line * (64 * KiB // len(line))


# --- where a case lives -----------------------------------------------------------------------


class Bases:
    """Directories of files qemu-img made, built on first use, shared by a module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def get(self, key: str) -> Path:
        if key not in self.built:
            directory = self.root / key
            directory.mkdir()
            BASE_BUILDERS[key](directory)
            self.built[key] = directory
        return self.built[key]

    def copy(self, key: str, target: Path, name: str | None = None) -> str:
        """Copy the base's image (as ``name``) into ``target``; returns its name."""
        source = self.get(key)
        image = BASE_IMAGES[key]
        shutil.copyfile(source / image, target / (name or image))
        return name or image


@dataclass
class Place:
    """A case's directories: ``root`` (where commands run), ``img`` (the
    image and what it may name), ``out`` (outputs), ``secret`` (the canary,
    outside every allowed directory) and ``scratch`` (the harness's own)."""

    root: Path
    img: Path
    out: Path
    secret: Path
    scratch: Path
    bases: Bases

    @property
    def canary(self) -> Path:
        return self.secret / "canary.bin"

    @classmethod
    def make(cls, tmp_path: Path, bases: Bases) -> Place:
        root = tmp_path / "case"
        place = cls(root, root / "img", root / "out", root / "secret", tmp_path / "harness",
                    bases)
        for directory in (place.img, place.out, place.secret, place.scratch):
            directory.mkdir(parents=True)
        place.canary.write_bytes(canary_bytes(CANARY_TOKEN))
        return place


def forbidden(neighbour_allowed: bool) -> list[bytes]:
    """What no output of a run may contain (halves too: a read of 47 bytes
    anywhere in the canary holds one whole)."""
    found = [CANARY_TOKEN, CANARY_TOKEN[:16], CANARY_TOKEN[16:], ENV_SECRET.encode(),
             PASSWD_MARK]
    if not neighbour_allowed:
        found += [NEIGHBOUR_TOKEN, NEIGHBOUR_TOKEN[:16], NEIGHBOUR_TOKEN[16:]]
    return found


Build = Callable[[Place], str]


@dataclass(frozen=True)
class Case:
    """One hostile image and what instar must do with it.

    ``expect``: "read" (every command succeeds and reads what qemu-img reads),
    "refuse" (every command refuses, in one line) or "either" (each command
    reads correctly or refuses in one line). ``info``: what the two info
    commands must do where it differs (info opens no backing file). ``says``:
    a regex each refusal of a "refuse" case must contain. ``allow``: "none";
    "dir" (``--allow img``: a benign image needs its backing files); "both"
    (an attack on paths: the seven commands with ``--allow img``, then dd
    without it, refused both ways, or as ``without_allow`` says; a refusal
    without it must contain ``says_without_allow`` where given).
    ``qemu``: qemu-img may be run on the image to get the bytes it reads
    (never on an image that names a path outside its directory).
    """

    name: str
    build: Build
    expect: str
    says: str | None = None
    info: str | None = None
    fmt: str | None = None
    allow: str = "none"
    without_allow: str | None = None
    says_without_allow: str | None = None
    qemu: bool = True
    probes: str | None = None
    family: str = ""

    def probed_format(self, image: str) -> str:
        """The format the image must be read as (where info reads it): the
        extension's, unless the case says; an image the harness would let probe
        as raw would test nothing."""
        if self.probes is not None:
            return self.probes
        if self.fmt is not None:
            return self.fmt
        suffix = image.rsplit(".", 1)[-1]
        return {"vhd": "vpc", "img": "raw", "bin": "raw"}.get(suffix, suffix)


def case(name: str, build: Build, expect: str, **more: object) -> Case:
    assert expect in ("read", "refuse", "either"), expect
    return Case(name, build, expect, **more)  # type: ignore[arg-type]


def attack(name: str, build: Build, says: str | None = None, **more: object) -> Case:
    """An attack on paths: refused with ``--allow img`` and without it; qemu
    is never run on it."""
    more.setdefault("allow", "both")
    more.setdefault("qemu", False)
    return case(name, build, "refuse", says=says, **more)


OUTSIDE = r"outside the allowed directories"


# --- patching ---------------------------------------------------------------------------------


def put(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def cut(path: Path, size: int) -> None:
    os.truncate(path, size)


def write_at(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    """A new file with each piece at its offset (holes between), ``size`` long if given."""
    with path.open("wb") as handle:
        for offset, data in pieces:
            handle.seek(offset)
            handle.write(data)
        if size is not None:
            handle.truncate(size)


# --- qcow2, from the specification ------------------------------------------------------------

QCOW2_MAGIC = b"QFI\xfb"
COPIED, COMPRESSED = 1 << 63, 1 << 62
EXT_BACKING_FORMAT, EXT_DATA_FILE = 0xE2792ACA, 0x44415441
INCOMPAT_DATA_FILE, AUTOCLEAR_DATA_FILE_RAW = 1 << 2, 1 << 1
QCOW2_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # version 3 without the compression byte


class Qcow2:
    """A qcow2 image written from the specification: the header (and its
    extensions and backing name) in cluster 0, the refcount table in 1, one
    refcount block in 2, the L1 table from 3, then L2 tables and data clusters
    in the order they are added. ``fields`` overrides header fields by name."""

    def __init__(self, size: int, cluster_bits: int = 16, *, version: int = 3,
                 l1_size: int | None = None, compression_type: int = 0) -> None:
        self.size, self.bits, self.version = size, cluster_bits, version
        self.cluster = 1 << cluster_bits
        self.per_l2 = self.cluster // 8
        self.l1_size = -(-size // (self.per_l2 * self.cluster)) if l1_size is None else l1_size
        self.l1: dict[int, int] = {}
        self.l1_offset = 3 * self.cluster
        self.free = 3 + max(1, -(-8 * self.l1_size // self.cluster))
        self.blobs: list[tuple[int, bytes]] = []
        self.l2: dict[int, dict[int, int]] = {}
        self.l2_at: dict[int, int] = {}
        self.backing: bytes | None = None
        self.extensions: list[tuple[int, bytes]] = []
        self.fields: dict[str, int] = {}
        self.compression_type = compression_type
        self.length = 0  # a file length at least this (a sparse tail)

    def alloc(self, data: bytes = b"", clusters: int = 1) -> int:
        offset = self.free * self.cluster
        self.free += max(clusters, -(-len(data) // self.cluster))
        if data:
            self.blobs.append((offset, data))
        return offset

    def table(self, index: int) -> int:
        """The L2 table of L1 entry ``index`` (allocated on first use)."""
        if index not in self.l2_at:
            self.l2[index] = {}
            self.l2_at[index] = self.alloc()
            self.l1[index] = self.l2_at[index] | COPIED
        return self.l2_at[index]

    def entry(self, cluster: int, value: int) -> None:
        """A raw L2 entry for guest cluster ``cluster``."""
        index = cluster // self.per_l2
        self.table(index)
        self.l2[index][cluster % self.per_l2] = value

    def data(self, cluster: int, payload: bytes) -> int:
        host = self.alloc(payload)
        self.entry(cluster, host | COPIED)
        return host

    def compressed_entry(self, host: int, length: int) -> int:
        """The L2 entry of a compressed cluster of ``length`` bytes at ``host``."""
        shift = 62 - (self.bits - 8)
        extra = (host % 512 + length - 1) // 512  # sectors after the first
        assert extra < 1 << (self.bits - 8), "too long for a compressed cluster"
        return COMPRESSED | extra << shift | host

    def compressed(self, cluster: int, stream: bytes) -> int:
        entry = self.compressed_entry(self.alloc(stream), len(stream))
        self.entry(cluster, entry)
        return entry

    def set_backing(self, name: bytes | str, fmt: str | None = None) -> None:
        self.backing = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        if fmt:
            self.extensions.append((EXT_BACKING_FORMAT, fmt.encode()))

    def set_data_file(self, name: str | bytes, raw: bool = False) -> None:
        payload = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        self.extensions.append((EXT_DATA_FILE, payload))
        self.fields["incompatible"] = self.fields.get("incompatible", 0) | INCOMPAT_DATA_FILE
        if raw:
            self.fields["autoclear"] = AUTOCLEAR_DATA_FILE_RAW

    def header_bytes(self) -> bytes:
        header_length = 112 if self.version >= 3 else 72
        extensions = b"".join(
            struct.pack(">II", kind, len(payload)) + payload + bytes(-len(payload) % 8)
            for kind, payload in self.extensions
        ) + bytes(8)
        backing_offset = header_length + len(extensions) if self.backing is not None else 0
        values = {
            "version": self.version, "backing_file_offset": backing_offset,
            "backing_file_size": len(self.backing or b""), "cluster_bits": self.bits,
            "size": self.size, "crypt_method": 0, "l1_size": self.l1_size,
            "l1_table_offset": self.l1_offset, "refcount_table_offset": self.cluster,
            "refcount_table_clusters": 1, "nb_snapshots": 0, "snapshots_offset": 0,
            "incompatible": 0, "compatible": 0, "autoclear": 0, "refcount_order": 4,
            "header_length": header_length,
        }  # fmt: skip
        values.update(self.fields)
        packed = QCOW2_HEADER.pack(QCOW2_MAGIC, *values.values())
        if self.version >= 3:
            packed += bytes([self.compression_type]) + bytes(7)
        else:
            packed = packed[:72]
        return packed + extensions + (self.backing or b"")

    def write(self, path: Path) -> None:
        c = self.cluster
        refcounts = min(self.free, c // 2)
        pieces = [(0, self.header_bytes()), (c, struct.pack(">Q", 2 * c)),
                  (2 * c, struct.pack(f">{refcounts}H", *[1] * refcounts))]
        pieces += [(self.l1_offset + 8 * i, struct.pack(">Q", v)) for i, v in self.l1.items()]
        for index, entries in self.l2.items():
            at = self.l2_at[index]
            pieces += [(at + 8 * i, struct.pack(">Q", v)) for i, v in entries.items()]
        pieces += self.blobs
        write_at(path, pieces, max(self.free * c, self.length))


def qcow2_file(size: int = MiB, clusters: int = 4, seed: int = 1, **options: object) -> Qcow2:
    """A qcow2 image of ``size`` with patterned data in its first ``clusters`` clusters."""
    image = Qcow2(size, **options)  # type: ignore[arg-type]
    for cluster in range(clusters):
        image.data(cluster, pattern(image.cluster, seed=seed + cluster))
    return image


def qcow2_build(make: Callable[[Place], Qcow2], name: str = "v.qcow2") -> Build:
    def build(place: Place) -> str:
        make(place).write(place.img / name)
        return name

    return build


def qcow2_with(change: Callable[[Qcow2, Place], None], name: str = "v.qcow2",
               **options: object) -> Build:
    """The standard 1 MiB spec image, changed by ``change`` before it is written."""

    def make(place: Place) -> Qcow2:
        image = qcow2_file(**options)  # type: ignore[arg-type]
        change(image, place)
        return image

    return qcow2_build(make, name)


def qcow2_fields(**values: int) -> Build:
    return qcow2_with(lambda image, place: image.fields.update(values))


def qcow2_backed(name: str | Callable[[Place], str | bytes], fmt: str | None = None,
                 image_name: str = "v.qcow2", prepare: Callable[[Place], None] | None = None
                 ) -> Build:
    """A qcow2 image whose backing file is ``name`` (text, or computed from the place)."""

    def build(place: Place) -> str:
        if prepare is not None:
            prepare(place)
        image = qcow2_file(clusters=1)
        image.set_backing(name(place) if callable(name) else name, fmt)
        image.write(place.img / image_name)
        return image_name

    return build


def qcow2_data_file(name: str | Callable[[Place], str], raw: bool = False,
                    prepare: Callable[[Place], None] | None = None) -> Build:
    """A qcow2 image whose data lives in the external data file ``name``."""

    def build(place: Place) -> str:
        if prepare is not None:
            prepare(place)
        image = Qcow2(MiB)
        image.set_data_file(name(place) if callable(name) else name, raw)
        for cluster in range(4):  # guest offset = data file offset, as qemu lays it out
            image.entry(cluster, cluster * image.cluster | COPIED)
        image.write(place.img / "v.qcow2")
        return "v.qcow2"

    return build


# --- qcow (version 1) and QED: two-level cluster tables ------------------------------------


class TwoLevelImage:
    """What qcow (version 1) and QED images share: an L1 table of L2 tables
    of cluster offsets (entries of ``ENTRY``), written from dicts, with L2
    tables and data clusters placed from ``free`` on in the order they are
    added. Subclasses lay out the header. ``fields`` overrides header fields."""

    ENTRY: ClassVar[str]  # struct format of one table entry

    def __init__(self, size: int, cluster: int, per_l2: int, l1_offset: int, free: int) -> None:
        self.size, self.cluster, self.per_l2 = size, cluster, per_l2
        self.l1_offset, self.free = l1_offset, free
        self.l1: dict[int, int] = {}
        self.l2: dict[int, dict[int, int]] = {}
        self.l2_at: dict[int, int] = {}
        self.blobs: list[tuple[int, bytes]] = []
        self.backing: bytes | None = None
        self.fields: dict[str, int] = {}

    def alloc(self, data: bytes = b"", length: int = 0) -> int:
        offset = self.free
        self.free += -(-max(length, len(data), 1) // self.cluster) * self.cluster
        if data:
            self.blobs.append((offset, data))
        return offset

    def table(self, index: int) -> int:
        """The L2 table of L1 entry ``index`` (allocated on first use)."""
        if index not in self.l2_at:
            self.l2[index] = {}
            self.l2_at[index] = self.alloc(length=8 * self.per_l2)
            self.l1[index] = self.l2_at[index]
        return self.l2_at[index]

    def entry(self, cluster: int, value: int) -> None:
        index = cluster // self.per_l2
        self.table(index)
        self.l2[index][cluster % self.per_l2] = value

    def data(self, cluster: int, payload: bytes) -> int:
        host = self.alloc(payload)
        self.entry(cluster, host)
        return host

    def header_bytes(self) -> bytes:
        raise NotImplementedError

    def write(self, path: Path) -> None:
        raise NotImplementedError

    def pieces(self) -> list[tuple[int, bytes]]:
        """The header, the tables' entries and the data, each at its offset."""
        pieces = [(0, self.header_bytes())]
        pieces += [(self.l1_offset + 8 * i, struct.pack(self.ENTRY, v))
                   for i, v in self.l1.items()]
        for index, entries in self.l2.items():
            at = self.l2_at[index]
            pieces += [(at + 8 * i, struct.pack(self.ENTRY, v)) for i, v in entries.items()]
        return pieces + self.blobs


Layered = TypeVar("Layered", bound=TwoLevelImage)


def two_level_file(kind: Callable[..., Layered], size: int = MiB, clusters: int = 4,
                   seed: int = 1, **options: int) -> Layered:
    """An image of ``kind`` of ``size`` with patterned data in its first ``clusters`` clusters."""
    image = kind(size, **options)
    for cluster in range(clusters):
        image.data(cluster, pattern(image.cluster, seed=seed + cluster))
    return image


def two_level_with(kind: Callable[..., Layered], change: Callable[[Layered, Place], None],
                   name: str, **options: int) -> Build:
    """The standard 1 MiB image of ``kind``, changed by ``change`` before it is written."""

    def make(place: Place) -> Layered:
        image = two_level_file(kind, **options)
        change(image, place)
        return image

    return two_level_build(make, name)


def two_level_build(make: Callable[[Place], TwoLevelImage], name: str) -> Build:
    """The image ``make`` gives, written as ``name`` in the place's image directory."""

    def build(place: Place) -> str:
        make(place).write(place.img / name)
        return name

    return build


# qcow (version 1), from the layout qemu reads.

QCOW_HEADER = struct.Struct(">4sIQIIQBBHIQ")
QCOW_COMPRESSED = 1 << 63


class Qcow(TwoLevelImage):
    """A qcow (version 1) image: the 48-byte header, the backing file name
    at 48, the L1 table at 1072 (after room for the longest name), then L2
    tables and data clusters (cluster-aligned)."""

    ENTRY = ">Q"

    def __init__(self, size: int, cluster_bits: int = 12, l2_bits: int = 9) -> None:
        self.bits, self.l2_bits = cluster_bits, l2_bits
        shift = cluster_bits + l2_bits
        self.l1_size = (size + (1 << shift) - 1) >> shift
        l1_offset = QCOW_HEADER.size + 1024
        # The file holds the L1 table, unless it is absurd (a size of 2^63): then 1 GiB of it.
        self.l1_end = l1_offset + 8 * min(self.l1_size, 1 << 27)
        cluster = 1 << cluster_bits
        super().__init__(size, cluster, 1 << l2_bits, l1_offset,
                         -(-self.l1_end // cluster) * cluster)
        self.l1_blob: bytes | None = None  # the whole L1 table at once (millions of entries)

    def compressed_entry(self, host: int, length: int) -> int:
        assert 0 <= length < self.cluster, "too long for a compressed cluster"
        return QCOW_COMPRESSED | length << (63 - self.bits) | host

    def compressed(self, cluster: int, stream: bytes) -> int:
        entry = self.compressed_entry(self.alloc(stream), len(stream))
        self.entry(cluster, entry)
        return entry

    def set_backing(self, name: bytes | str) -> None:
        self.backing = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name

    def header_bytes(self) -> bytes:
        values = {
            "magic": QCOW2_MAGIC, "version": 1,
            "backing_file_offset": QCOW_HEADER.size if self.backing is not None else 0,
            "backing_file_size": len(self.backing or b""), "mtime": 0, "size": self.size,
            "cluster_bits": self.bits, "l2_bits": self.l2_bits, "padding": 0,
            "crypt_method": 0, "l1_table_offset": self.l1_offset,
        }  # fmt: skip
        values.update(self.fields)
        return QCOW_HEADER.pack(*values.values()) + (self.backing or b"")

    def write(self, path: Path) -> None:
        pieces = self.pieces()
        if self.l1_blob is not None:  # under the entries set one by one
            pieces.insert(1, (self.l1_offset, self.l1_blob))
        write_at(path, pieces, max(self.free, self.l1_end))


def qcow_file(size: int = MiB, clusters: int = 4, seed: int = 1, **options: int) -> Qcow:
    """A qcow image of ``size`` with patterned data in its first ``clusters`` clusters."""
    return two_level_file(Qcow, size, clusters, seed, **options)


def qcow_build(make: Callable[[Place], Qcow], name: str = "v.qcow") -> Build:
    return two_level_build(make, name)


def qcow_with(change: Callable[[Qcow, Place], None], name: str = "v.qcow",
              **options: int) -> Build:
    """The standard 1 MiB image, changed by ``change`` before it is written."""
    return two_level_with(Qcow, change, name, **options)


def qcow_backed(name: str | Callable[[Place], str], image_name: str = "v.qcow") -> Build:
    """A qcow image whose backing file is ``name`` (qcow has no backing format: probed)."""

    def change(image: Qcow, place: Place) -> None:
        image.set_backing(name(place) if callable(name) else name)

    return qcow_with(change, image_name, clusters=1)


# QED, from the specification.

QED_MAGIC = b"QED\0"
QED_HEADER = struct.Struct("<4sIIIQQQQQII")
QED_BACKING_FILE, QED_BACKING_RAW = 1 << 0, 1 << 2


class Qed(TwoLevelImage):
    """A QED image written from the specification: the header in cluster 0
    (the backing file name right after it), the L1 table from cluster 1,
    then L2 tables and data clusters."""

    ENTRY = "<Q"

    def __init__(self, size: int, cluster: int = 64 * KiB, table_size: int = 4) -> None:
        self.table_size = table_size
        self.entries = cluster * table_size // 8  # per L1 or L2 table
        self.table_bytes = cluster * table_size
        super().__init__(size, cluster, self.entries, cluster, cluster + self.table_bytes)
        self.features = 0
        self.length = 0  # a file length at least this (a sparse tail)

    def set_backing(self, name: bytes | str, raw: bool = False) -> None:
        self.backing = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        self.features |= QED_BACKING_FILE | (QED_BACKING_RAW if raw else 0)

    def header_bytes(self) -> bytes:
        values = {
            "magic": QED_MAGIC, "cluster_size": self.cluster, "table_size": self.table_size,
            "header_size": 1, "features": self.features, "compat_features": 0,
            "autoclear_features": 0, "l1_table_offset": self.l1_offset, "image_size": self.size,
            "backing_filename_offset": QED_HEADER.size if self.backing else 0,
            "backing_filename_size": len(self.backing or b""),
        }  # fmt: skip
        values.update(self.fields)
        return QED_HEADER.pack(*values.values()) + (self.backing or b"")

    def write(self, path: Path) -> None:
        write_at(path, self.pieces(), max(self.free, self.length))


def qed_file(size: int = MiB, clusters: int = 4, seed: int = 1, **options: int) -> Qed:
    """A QED image of ``size`` with patterned data in its first ``clusters`` clusters."""
    return two_level_file(Qed, size, clusters, seed, **options)


def qed_build(make: Callable[[Place], Qed], name: str = "v.qed") -> Build:
    return two_level_build(make, name)


def qed_with(change: Callable[[Qed, Place], None], name: str = "v.qed",
             **options: int) -> Build:
    """The standard 1 MiB spec image, changed by ``change`` before it is written."""
    return two_level_with(Qed, change, name, **options)


def qed_backed(name: str | Callable[[Place], str], raw: bool = False,
               image_name: str = "v.qed") -> Build:
    """A QED image whose backing file is ``name`` (text, or computed from the place)."""

    def change(image: Qed, place: Place) -> None:
        image.set_backing(name(place) if callable(name) else name, raw)

    return qed_with(change, image_name, clusters=1)


# --- VMDK, from the specification ------------------------------------------------------------

VMDK_MAGIC = b"KDMV"
VMDK_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
VMDK_FLAGS_NL, VMDK_FLAG_COMPRESSED, VMDK_FLAG_MARKERS = 1, 1 << 16, 1 << 17


def descriptor_text(create_type: str, extents: Sequence[str], extra: Sequence[str] = (),
                    cid: str = "fffffffe") -> str:
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid}", "parentCID=ffffffff",
             f'createType="{create_type}"', *extra, "", "# Extent description", *extents, "",
             "# The Disk Data Base", "#DDB", "", 'ddb.virtualHWVersion = "4"',
             'ddb.adapterType = "ide"']
    return "\n".join(lines) + "\n"


class Vmdk:
    """A hosted sparse extent written from the specification: header (sector
    0), embedded descriptor (1-20), grain directory (21-), the grain tables it
    needs and the grains, in the order they are added. Grains are compressed
    behind grain markers when ``compressed`` (a streamOptimized disk whose
    directory is in the header rather than a footer)."""

    def __init__(self, capacity: int, grain: int = 128, gtes: int = 512, *,
                 compressed: bool = False, descriptor: str | None = None,
                 footer: bool = False) -> None:
        self.capacity, self.grain_sectors, self.gtes = capacity, grain, gtes
        self.compressed = compressed
        self.footer = footer  # the header says "at the end": a footer holds the real offset
        self.gd_entries = -(-capacity // (grain * gtes)) if grain * gtes else 0
        self.gd_sectors = max(1, -(-self.gd_entries * 4 // 512))
        self.gt_sectors = max(1, -(-gtes * 4 // 512))
        self.overhead = -(-(21 + self.gd_sectors) // max(grain, 1)) * max(grain, 1)
        self.free = self.overhead  # next free sector
        self.gd: dict[int, int] = {}
        self.gts: dict[int, dict[int, int]] = {}
        self.blobs: list[tuple[int, bytes]] = []
        kind = "streamOptimized" if compressed else "monolithicSparse"
        self.descriptor = descriptor if descriptor is not None else descriptor_text(
            kind, [f'RW {capacity} SPARSE "v.vmdk"'])
        self.fields: dict[str, int] = {}

    def alloc(self, data: bytes, sectors: int = 0) -> int:
        sector = self.free
        self.free += max(sectors, -(-len(data) // 512))
        self.blobs.append((sector * 512, data))
        return sector

    def table(self, index: int) -> int:
        if index not in self.gd:
            self.gd[index] = self.alloc(b"", self.gt_sectors)
            self.gts[index] = {}
        return self.gd[index]

    def gte(self, grain: int, value: int) -> None:
        index = grain // self.gtes
        self.table(index)
        self.gts[index][grain % self.gtes] = value

    def stored(self, grain: int, data: bytes) -> int:
        """Store ``data`` as grain ``grain`` (compressed behind a marker if asked)."""
        if self.compressed:
            payload = zlib.compress(data)
            sector = self.alloc(struct.pack("<QI", grain * self.grain_sectors, len(payload))
                                + payload)
        else:
            sector = self.alloc(data, self.grain_sectors)
        self.gte(grain, sector)
        return sector

    def marker_grain(self, grain: int, stream: bytes, lba: int | None = None) -> int:
        """A compressed grain holding ``stream`` as it is (a bomb, say)."""
        lba = grain * self.grain_sectors if lba is None else lba
        sector = self.alloc(struct.pack("<QI", lba, len(stream)) + stream)
        self.gte(grain, sector)
        return sector

    def write(self, path: Path) -> None:
        flags = VMDK_FLAGS_NL | (VMDK_FLAG_COMPRESSED | VMDK_FLAG_MARKERS if self.compressed
                                 else 0)
        values = {
            "version": 3 if self.compressed else 1, "flags": flags, "capacity": self.capacity,
            "grain": self.grain_sectors, "desc_offset": 1, "desc_sectors": 20,
            "gtes": self.gtes, "rgd_offset": 0, "gd_offset": 21, "overhead": self.overhead,
            "unclean": 0,
        }  # fmt: skip
        values.update(self.fields)
        footer_values = dict(values)  # with a footer, the footer holds the real offset
        if self.footer:
            values["gd_offset"] = 0xFFFF_FFFF_FFFF_FFFF
        compression = 1 if self.compressed else 0
        header = VMDK_HEADER.pack(VMDK_MAGIC, *values.values(), b"\n \r\n", compression)
        pieces = [(0, header), (512, self.descriptor.encode("utf-8", "surrogateescape"))]
        end = max(self.free, self.overhead) * 512
        if self.footer:  # footer marker, footer, end-of-stream marker
            footer = VMDK_HEADER.pack(VMDK_MAGIC, *footer_values.values(), b"\n \r\n",
                                      compression)
            pieces += [(end, struct.pack("<QII", 1, 0, 3)), (end + 512, footer),
                       (end + 1024, bytes(512))]
            end += 1536
        pieces += [(21 * 512 + 4 * i, struct.pack("<I", v)) for i, v in self.gd.items()]
        for index, entries in self.gts.items():
            at = self.gd[index] * 512
            pieces += [(at + 4 * i, struct.pack("<I", v)) for i, v in entries.items()]
        pieces += self.blobs
        write_at(path, pieces, end)


def vmdk_file(capacity: int = 4096, grains: int = 4, seed: int = 3, **options: object) -> Vmdk:
    image = Vmdk(capacity, **options)  # type: ignore[arg-type]
    for grain in range(grains):
        image.stored(grain, pattern(image.grain_sectors * 512, seed=seed + grain))
    return image


def vmdk_with(change: Callable[[Vmdk, Place], None], name: str = "v.vmdk",
              **options: object) -> Build:
    def build(place: Place) -> str:
        image = vmdk_file(**options)  # type: ignore[arg-type]
        change(image, place)
        image.write(place.img / name)
        return name

    return build


def vmdk_fields(**values: int) -> Build:
    return vmdk_with(lambda image, place: image.fields.update(values))


def flat_descriptor(extents: list[str] | Callable[[Place], list[str]],
                    files: dict[str, bytes] | None = None, create_type: str = "monolithicFlat",
                    prepare: Callable[[Place], None] | None = None, name: str = "v.vmdk",
                    text: Callable[[str], bytes] | None = None) -> Build:
    """A text descriptor naming ``extents`` (``{canary}``, ``{secret}`` and
    ``{img}`` stand for absolute paths), with ``files`` beside it."""

    def build(place: Place) -> str:
        for file_name, data in (files or {}).items():
            (place.img / file_name).parent.mkdir(parents=True, exist_ok=True)
            (place.img / file_name).write_bytes(data)
        if prepare is not None:
            prepare(place)
        lines = extents(place) if callable(extents) else extents
        lines = [line.format(canary=place.canary, secret=place.secret, img=place.img)
                 for line in lines]
        descriptor = descriptor_text(create_type, lines)
        data = text(descriptor) if text is not None else descriptor.encode(
            "utf-8", "surrogateescape")
        (place.img / name).write_bytes(data)
        return name

    return build


# --- VHD, from the specification -------------------------------------------------------------

VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
VHD_DYNAMIC = struct.Struct(">8sQQIIII16sII512s")
VHD_LOCATOR = struct.Struct(">4sIIIQ")
NO_BLOCK = 0xFFFFFFFF


def vhd_checksum(data: bytes) -> int:
    return ~sum(data) & 0xFFFFFFFF


def vhd_footer(size: int, disk_type: int, data_offset: int, *, creator: bytes = b"win ",
               geometry: tuple[int, int, int] | None = None, current: int | None = None) -> bytes:
    """A footer; "win " makes qemu (and instar) take the size from current_size."""
    cylinders, heads, sectors = geometry or (min(65535, size // (16 * 63 * 512)), 16, 63)
    fields = [b"conectix", 2, 0x10000, data_offset, 0, creator, 0x10000, b"Wi2k", size,
              size if current is None else current, cylinders, heads, sectors, disk_type]
    unsummed = VHD_FOOTER.pack(*fields, 0, b"\x11" * 16, 0)
    return VHD_FOOTER.pack(*fields, vhd_checksum(unsummed), b"\x11" * 16, 0)


def fix_vhd_checksum(data: bytearray, start: int, length: int, at: int) -> None:
    data[start + at : start + at + 4] = bytes(4)
    data[start + at : start + at + 4] = struct.pack(
        ">I", vhd_checksum(bytes(data[start : start + length])))


@dataclass
class Vhd:
    """A dynamic VHD written from the specification: footer copy, dynamic
    header, BAT (at 1536), blocks (bitmap sector, then data), footer."""

    size: int
    block_size: int = 2 * MiB
    creator: bytes = b"win "
    geometry: tuple[int, int, int] | None = None
    max_entries: int | None = None
    current: int | None = None
    bat: dict[int, int] = field(default_factory=dict)
    blocks: list[bytes] = field(default_factory=list)
    header_fields: dict[str, int] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def table_bytes(self) -> int:
        """The BAT's bytes, at most 64 MiB: instar refuses a larger one unread."""
        return min(-(-4 * self.entries // 512) * 512, 64 * MiB)

    @property
    def first_block(self) -> int:
        return 1536 + self.table_bytes

    def block(self, index: int, data: bytes) -> int:
        """Block ``index`` holds ``data`` (a bitmap of all ones first); its sector."""
        bitmap = max(512, -(-self.block_size // 512 // 8 // 512) * 512)
        span = bitmap + self.block_size
        sector = (self.first_block + len(self.blocks) * span) // 512
        self.blocks.append(b"\xff" * (self.block_size // 512 // 8) + bytes(
            bitmap - self.block_size // 512 // 8) + data.ljust(self.block_size, b"\0"))
        self.bat[index] = sector
        return sector

    def write(self, path: Path) -> None:
        footer = vhd_footer(self.size, 3, 512, creator=self.creator, geometry=self.geometry,
                            current=self.current)
        values = {"table_offset": 1536,
                  "max_entries": min(self.max_entries or self.entries, 0xFFFFFFFF),
                  "block_size": self.block_size}
        values.update(self.header_fields)
        head = VHD_DYNAMIC.pack(b"cxsparse", 0xFFFFFFFFFFFFFFFF, values["table_offset"],
                                0x10000, values["max_entries"], values["block_size"], 0,
                                bytes(16), 0, 0, bytes(512))
        header = bytearray(head + bytes(1024 - len(head)))
        fix_vhd_checksum(header, 0, 1024, 36)
        table = array("I", b"\xff" * self.table_bytes)
        for index, sector in self.bat.items():
            if index < len(table):
                table[index] = sector
        if sys.byteorder == "little":
            table.byteswap()  # the VHD is big-endian (0xFFFFFFFF reads the same)
        body = b"".join(self.blocks)
        end = self.first_block + len(body)
        write_at(path, [(0, footer + bytes(header) + table.tobytes()), (self.first_block, body),
                        (end, footer)])


def vhd_file(size: int = 6 * MiB, blocks: tuple[int, ...] = (0, 2), **options: object) -> Vhd:
    image = Vhd(size, **options)  # type: ignore[arg-type]
    for index in blocks:
        image.block(index, pattern(image.block_size, seed=5 + index))
    return image


def vhd_with(change: Callable[[Vhd, Place], None], name: str = "v.vhd",
             **options: object) -> Build:
    def build(place: Place) -> str:
        image = vhd_file(**options)  # type: ignore[arg-type]
        change(image, place)
        image.write(place.img / name)
        return name

    return build


def vhd_fixed(size: int, data: bytes = b"", name: str = "v.vhd", **footer: object) -> Build:
    def build(place: Place) -> str:
        body = data.ljust(size, b"\0")
        (place.img / name).write_bytes(body + vhd_footer(size, 2, 0xFFFFFFFFFFFFFFFF,
                                                          **footer))  # type: ignore[arg-type]
        return name

    return build


# --- VDI, from VirtualBox's layout ----------------------------------------------------------------

VDI_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56x")
VDI_MAX_BLOCKS = ((1 << 31) - 512) // 4  # qemu's limit: a block map of 2 GiB
VDI_FREE, VDI_ZERO = 0xFFFFFFFF, 0xFFFFFFFE


@dataclass
class Vdi:
    """A VDI: the 512-byte header, the block map at 512 (an entry per 1 MiB
    block: a data block's index, or free or zero), the data blocks after it.
    ``table``: the map's bytes as given (None: built from ``bmap``; b"": not
    written, a hole whose every entry is 0)."""

    size: int
    image_type: int = 1
    bmap: dict[int, int] = field(default_factory=dict)
    blocks: list[bytes] = field(default_factory=list)
    fields: dict[str, int] = field(default_factory=dict)
    table: bytes | None = None
    length: int = 0  # the file's size, if more than the blocks need

    @property
    def entries(self) -> int:
        return -(-self.size // MiB)

    @property
    def data_offset(self) -> int:
        return 512 + -(-4 * self.entries // 512) * 512

    def block(self, index: int, data: bytes) -> None:
        self.bmap[index] = len(self.blocks)
        self.blocks.append(data.ljust(MiB, b"\0"))

    def write(self, path: Path) -> None:
        values = {"offset_bmap": 512, "offset_data": self.data_offset, "blocks": self.entries,
                  "disk_size": self.size, "block_size": MiB, "sector_size": 512,
                  "version": 0x00010001, "header_size": 0x190, "signature": 0xBEDA107F}
        values.update(self.fields)
        header = VDI_HEADER.pack(
            b"<<< instar's hostile corpus >>>\n", values["signature"], values["version"],
            values["header_size"], self.image_type, 0, b"", values["offset_bmap"],
            values["offset_data"], 0, 0, 0, values["sector_size"], 0, values["disk_size"],
            values["block_size"], 0, values["blocks"], len(self.blocks), b"\x01" * 16,
            b"\x02" * 16, bytes(16), bytes(16))
        pieces = [(0, header)]
        table = self.table
        if table is None:
            entries = array("I", [VDI_FREE]) * self.entries
            for index, value in self.bmap.items():
                entries[index] = value
            if sys.byteorder == "big":
                entries.byteswap()
            table = entries.tobytes()
        if table:
            pieces.append((values["offset_bmap"], table))
        pieces += [(values["offset_data"] + n * MiB, data) for n, data in enumerate(self.blocks)]
        end = max(values["offset_data"] + len(self.blocks) * MiB, 512, self.length)
        write_at(path, pieces, size=end)


def vdi_with(change: Callable[[Vdi], None], size: int = 5 * MiB, name: str = "v.vdi",
             blocks: tuple[int, ...] = (0, 2, 4)) -> Build:
    def build(place: Place) -> str:
        image = Vdi(size)
        for index in blocks:
            image.block(index, pattern(MiB, seed=11 + index))
        change(image)
        image.write(place.img / name)
        return name

    return build


# --- VHDX, from the specification ---------------------------------------------------------------


@dataclass
class Vhdx:
    """A dynamic VHDX written from MS-VHDX: the header section (identifier,
    two headers, two region tables), the log (1 MiB at 1 MiB, empty unless
    entries are added), the BAT (from 2 MiB), the metadata region, then
    payload blocks. instar's layout module encodes the CRC'd structures, as
    the reader tests do."""

    virtual_size: int
    block_size: int = MiB
    logical: int = 512
    physical: int = 4096
    bat: dict[int, int] = field(default_factory=dict)
    blobs: list[tuple[int, bytes]] = field(default_factory=list)
    log_offset: int = MiB
    log_length: int = MiB
    log_guid: bytes = bytes(16)
    log_entries: list[tuple[int, bytes]] = field(default_factory=list)  # (position, entry)
    bat_length: int | None = None
    headers: tuple[dict[str, object], dict[str, object]] = ({}, {})
    items: dict[bytes, bytes] = field(default_factory=dict)
    length: int = 0
    data_write_guid: bytes = b"\x22" * 16

    @property
    def geometry(self) -> vhdx_layout.Geometry:
        return vhdx_layout.Geometry(self.virtual_size, self.block_size, self.logical)

    @property
    def bat_offset(self) -> int:
        return 2 * MiB

    @property
    def bat_region_length(self) -> int:
        if self.bat_length is not None:
            return self.bat_length
        return max(MiB, -(-self.geometry.bat_entries(False) * 8 // MiB) * MiB)

    @property
    def metadata_offset(self) -> int:
        return self.bat_offset + self.bat_region_length

    @property
    def free(self) -> int:
        used = [self.metadata_offset + MiB, self.length] + [
            -(-(offset + len(data)) // MiB) * MiB for offset, data in self.blobs]
        return max(used)

    def block(self, index: int, data: bytes) -> int:
        """Payload block ``index`` holds ``data``, at the next free MiB."""
        offset = self.free
        self.blobs.append((offset, data.ljust(self.block_size, b"\0")))
        self.bat[self.geometry.payload_index(index)] = offset | vhdx_layout.PAYLOAD_FULLY_PRESENT
        return offset

    def write(self, path: Path) -> None:
        L = vhdx_layout
        params = L.FileParameters(self.block_size, leave_blocks_allocated=False,
                                  has_parent=False)
        required, disk = L.META_IS_REQUIRED, L.META_IS_REQUIRED | L.META_IS_VIRTUAL_DISK
        values = {
            L.FILE_PARAMETERS: (required, L.encode_file_parameters(params)),
            L.VIRTUAL_DISK_SIZE: (disk, struct.pack("<Q", self.virtual_size)),
            L.PAGE83_DATA: (disk, b"\x33" * 16),
            L.LOGICAL_SECTOR_SIZE: (disk, struct.pack("<I", self.logical)),
            L.PHYSICAL_SECTOR_SIZE: (disk, struct.pack("<I", self.physical)),
        }
        for item, value in self.items.items():  # items of its own are not required
            values[item] = (values[item][0] if item in values else 0, value)
        table, items = L.encode_metadata([(k, f, v) for k, (f, v) in values.items()])
        base = L.Header(1, b"\x11" * 16, self.data_write_guid, self.log_guid, 0, 1,
                        self.log_length, self.log_offset)
        first = base._replace(**self.headers[0])
        second = base._replace(**{"sequence_number": 2, **self.headers[1]})
        regions = L.encode_region_table([
            L.RegionEntry(L.BAT_REGION, self.bat_offset, self.bat_region_length),
            L.RegionEntry(L.METADATA_REGION, self.metadata_offset, MiB)])
        pieces = [
            (0, L.encode_file_identifier("instar hostile corpus")),
            (L.HEADER_OFFSETS[0], first.encode()), (L.HEADER_OFFSETS[1], second.encode()),
            (L.REGION_TABLE_OFFSETS[0], regions), (L.REGION_TABLE_OFFSETS[1], regions),
            (self.metadata_offset, table),
            (self.metadata_offset + L.METADATA_TABLE_SIZE, items),
        ]
        if self.bat:
            table = array("Q", bytes(8 * (max(self.bat) + 1)))
            for index, value in self.bat.items():
                table[index] = value
            pieces.append((self.bat_offset, table.tobytes()))
        pieces += [(self.log_offset + position, entry) for position, entry in self.log_entries]
        pieces += self.blobs
        write_at(path, pieces, self.free)


def vhdx_file(virtual_size: int = 3 * MiB, blocks: tuple[int, ...] = (0, 2),
              **options: object) -> Vhdx:
    image = Vhdx(virtual_size, **options)  # type: ignore[arg-type]
    for index in blocks:
        image.block(index, pattern(image.block_size, seed=7 + index))
    return image


def vhdx_with(change: Callable[[Vhdx, Place], None], name: str = "v.vhdx",
              **options: object) -> Build:
    def build(place: Place) -> str:
        image = vhdx_file(**options)  # type: ignore[arg-type]
        change(image, place)
        image.write(place.img / name)
        return name

    return build


LOG_ENTRY = struct.Struct("<4sIIIQII16sQQ")
LOG_DESCRIPTOR = struct.Struct("<4sIQQQ")


def log_entry(sequence: int, guid: bytes, *, tail: int = 0, flushed: int, last: int,
              data: Sequence[tuple[int, bytes]] = (), zeros: Sequence[tuple[int, int]] = ()
              ) -> bytes:
    """One log entry (MS-VHDX 2.3.1): header, descriptors, data sectors, CRC-32C."""
    count = len(data) + len(zeros)
    descriptor_sectors = -(-(count + 2) // 128)
    length = (descriptor_sectors + len(data)) * 4096
    entry = bytearray(length)
    LOG_ENTRY.pack_into(entry, 0, b"loge", 0, length, tail, sequence, count, 0, guid,
                        flushed, last)
    slot = 64
    for offset, size in zeros:
        LOG_DESCRIPTOR.pack_into(entry, slot, b"zero", 0, size, offset, sequence)
        slot += 32
    for i, (offset, sector) in enumerate(data):
        leading, trailing = struct.unpack_from("<Q", sector)[0], struct.unpack_from(
            "<I", sector, 4092)[0]
        LOG_DESCRIPTOR.pack_into(entry, slot, b"desc", trailing, leading, offset, sequence)
        slot += 32
        at = (descriptor_sectors + i) * 4096
        entry[at : at + 4096] = (b"data" + struct.pack("<I", sequence >> 32) + sector[8:4092]
                                 + struct.pack("<I", sequence & 0xFFFFFFFF))
    struct.pack_into("<I", entry, 4, vhdx_layout.crc32c(entry))
    return bytes(entry)


def with_log(*entries: Callable[[Vhdx], list[tuple[int, bytes]]], log_length: int = MiB,
             at_end: bool = False, log_offset: int | None = None) -> Build:
    """The standard VHDX with a pending log: ``entries`` give (position in
    the log, entry bytes); both headers name the log, of ``log_length``
    bytes at 1 MiB, at the end of the file (``at_end``) or at ``log_offset``."""

    def change(image: Vhdx, place: Place) -> None:
        image.log_guid = LOG_GUID
        image.log_length = log_length
        if at_end:
            image.log_offset = image.free
            image.length = image.log_offset + log_length
        elif log_offset is not None:
            image.log_offset = log_offset
        for make in entries:
            image.log_entries += make(image)

    return vhdx_with(change)


def block_0(image: Vhdx) -> int:
    """Where payload block 0 lies: what the log's writes aim at."""
    return image.bat[0] & vhdx_layout.OFFSET_MASK


LOG_GUID = b"\x44" * 16


# --- qemu-made bases ------------------------------------------------------------------------------


# --- dmg, bochs, cloop: built by their reader tests' builders ----------------------------------


def image_file(name: str, make: Callable[[Place], bytes]) -> Build:
    """A case whose image is ``make(place)``, written as ``name``."""

    def build(place: Place) -> str:
        (place.img / name).write_bytes(make(place))
        return name

    return build


Chunk, Dmg = dmg_tests.Chunk, dmg_tests.Dmg
DMG_TYPES = dmg_tests.TYPES


def dmg(image: Callable[[], Dmg], name: str = "v.dmg") -> Build:
    return image_file(name, lambda place: image().build())


def dmg_chunks(*entries: tuple[str, int, int, int, int], sectors: int | None = None,
               form: str = "plist") -> Build:
    """A dmg of raw data whose chunk entries are ``entries`` (kind, sector,
    sectors, offset, length), over a data fork of 64 KiB of pattern."""

    def image() -> Dmg:
        chunks = [Chunk("raw", pattern(64 * KiB, seed=4))]
        table = [(0, i, (DMG_TYPES[kind], 0, *rest)) for i, (kind, *rest) in enumerate(entries)]
        chunks += [Chunk("raw", b"") for _ in entries[1:]]
        return Dmg([chunks], entries=table, sectors=sectors, form=form)

    return dmg(image)


def dmg_one(kind: str, guest: bytes, stored: bytes, sectors: int | None = None) -> Build:
    """A dmg of one chunk of ``kind`` standing for ``guest`` and holding ``stored``."""
    return dmg(lambda: Dmg([[Chunk(kind, guest, stored=stored, sectors=sectors)]]))


def dmg_plist(before: bytes = b"", after: bytes = b"", pad: int = 0) -> Build:
    """The standard dmg with ``before`` inserted ahead of its first <dict>,
    ``after`` ahead of the plist's end, ``pad`` bytes of spaces after that."""

    def image() -> Dmg:
        return Dmg(dmg_tests.every_kind("zlib"), plist_before=before + after + b" " * pad)

    return dmg(image)


def bochs(image: Callable[[], bochs_tests.Bochs], name: str = "v.bochs") -> Build:
    return image_file(name, lambda place: image().build())


def cloop(image: Callable[[], bytes], name: str = "v.cloop") -> Build:
    return image_file(name, lambda place: image())


def cloop_table(block_size: int, offsets: list[int], blocks: int | None = None) -> bytes:
    """A cloop header and offsets table (no blocks after it)."""
    count = len(offsets) - 1 if blocks is None else blocks
    return (cloop_tests.MAGIC.ljust(cloop_tests.HEADER, b"\0")
            + struct.pack(">II", block_size, count) + struct.pack(f">{len(offsets)}Q", *offsets))


def _base_raw(directory: Path, size: int = MiB, seed: int = 1) -> Path:
    raw = directory / "source.raw"
    data = bytearray(pattern(size, seed=seed))
    data[size // 4 : size // 2] = bytes(size // 4)
    raw.write_bytes(bytes(data))
    return raw


def _qemu_convert(directory: Path, fmt: str, name: str, *options: str, size: int = MiB) -> None:
    raw = _base_raw(directory, size)
    qemu_img_ok("convert", "-f", "raw", "-O", fmt, *options, str(raw), str(directory / name))
    raw.unlink()


def _build_vhdx_base(directory: Path) -> None:
    image = directory / "v.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(image),
                str(2 * MiB + 512))
    qemu_io(image, "write -P 0x41 0 128k", "vhdx")
    qemu_io(image, f"write -P 0x43 {2 * MiB} 512", "vhdx")


BASE_BUILDERS: dict[str, Callable[[Path], None]] = {
    "qcow2": lambda d: _qemu_convert(d, "qcow2", "v.qcow2"),
    "qcow2-v2": lambda d: _qemu_convert(d, "qcow2", "v.qcow2", "-o", "compat=0.10"),
    "vmdk": lambda d: _qemu_convert(d, "vmdk", "v.vmdk"),
    "vmdk-stream": lambda d: _qemu_convert(d, "vmdk", "v.vmdk", "-o",
                                           "subformat=streamOptimized"),
    "vhd": lambda d: _qemu_convert(d, "vpc", "v.vhd", size=5 * MiB),
    "vhd-fixed": lambda d: _qemu_convert(d, "vpc", "v.vhd", "-o", "subformat=fixed"),
    "vhdx": _build_vhdx_base,
    "vdi": lambda d: _qemu_convert(d, "vdi", "v.vdi", size=3 * MiB),
    "vdi-static": lambda d: _qemu_convert(d, "vdi", "v.vdi", "-o", "static=on", size=3 * MiB),
    "dmg": lambda d: (d / "v.dmg").write_bytes(Dmg(dmg_tests.every_kind("zlib")).build()),
    "bochs": lambda d: (d / "v.bochs").write_bytes(bochs_tests.IMAGES["mixed.bochs"].build()),
    "cloop": lambda d: (d / "v.cloop").write_bytes(cloop_tests.damaged()),
    "qed": lambda d: _qemu_convert(d, "qed", "v.qed"),
    "qcow": lambda d: _qemu_convert(d, "qcow", "v.qcow"),
}
BASE_IMAGES = {"qcow2": "v.qcow2", "qcow2-v2": "v.qcow2", "vmdk": "v.vmdk",
               "vmdk-stream": "v.vmdk", "vhd": "v.vhd", "vhd-fixed": "v.vhd", "vhdx": "v.vhdx",
               "vdi": "v.vdi", "vdi-static": "v.vdi", "dmg": "v.dmg", "bochs": "v.bochs",
               "cloop": "v.cloop", "qed": "v.qed", "qcow": "v.qcow"}


def base(key: str, change: Callable[[Path, Place], None] | None = None) -> Build:
    """A copy of a qemu-made base, changed by ``change(path, place)``."""

    def build(place: Place) -> str:
        name = place.bases.copy(key, place.img)
        if change is not None:
            change(place.img / name, place)
        return name

    return build


def then(build: Build, change: Callable[[Path, Place], None]) -> Build:
    """``build``, then ``change(path, place)`` on the image it made."""

    def both(place: Place) -> str:
        name = build(place)
        change(place.img / name, place)
        return name

    return both


def truncated(key: str, size: int | Callable[[Path], int]) -> Build:
    return base(key, lambda path, place: cut(path, size(path) if callable(size) else size))


# --- special files -----------------------------------------------------------------------------


def make_fifo(name: str) -> Callable[[Place], None]:
    return lambda place: os.mkfifo(place.img / name)


def make_socket(name: str) -> Callable[[Place], None]:
    """A bound UNIX socket (bound by a relative name: tmp paths can be longer
    than a socket address may be). Nothing accepts on it."""

    def prepare(place: Place) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.getcwd()
        try:
            os.chdir(place.img)
            sock.bind(name)
        finally:
            os.chdir(old)
            sock.close()

    return prepare


def make_dir(name: str) -> Callable[[Place], None]:
    return lambda place: (place.img / name).mkdir()


def make_link(name: str, target: str | Callable[[Place], str]) -> Callable[[Place], None]:
    return lambda place: os.symlink(target(place) if callable(target) else target,
                                    place.img / name)


def canary_path(place: Place) -> str:
    return str(place.canary)


# --- compression bombs -------------------------------------------------------------------------


@functools.cache
def deflate_bomb(size: int = 16 * MiB, raw: bool = True, byte: bytes = b"A") -> bytes:
    """``size`` bytes of one byte, deflated (raw deflate, or a zlib stream)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15 if raw else 15)
    chunk = byte * MiB
    return b"".join(compressor.compress(chunk) for _ in range(size // MiB)) + compressor.flush()


def zstd_rle_frame(content: int, claimed: int | None = None, byte: int = 0x41,
                   block: int = 128 * KiB, window: int | None = None) -> bytes:
    """A zstd frame (RFC 8878) of RLE blocks: ``content`` bytes of ``byte`` in
    4 bytes a block. The header declares ``claimed`` bytes; the window is
    2^``window`` bytes, or the whole content (a single segment) if None."""
    claimed = content if claimed is None else claimed
    if window is None:
        frame = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", claimed)
    else:  # a window descriptor: exponent (log - 10) in the top 5 bits, no mantissa
        frame = struct.pack("<IBB", 0xFD2FB528, 0xC0, (window - 10) << 3)
        frame += struct.pack("<Q", claimed)
    left = content
    while left > 0:
        size = min(block, left)
        left -= size
        frame += struct.pack("<I", (size << 3) | (1 << 1) | (left == 0))[:3] + bytes([byte])
    return frame


# --- the classes of attack ------------------------------------------------------------------------


def huge_tables() -> list[Case]:
    """Tables whose sizes would make a reader allocate, read or loop over
    gigabytes before any data is read: qcow2 L1 and refcount tables, qcow
    L1 tables, QED L1 and L2 tables of up to a GiB, VMDK grain directories,
    VHD and VHDX block allocation tables, at instar's limits and past them."""
    return [
        case("qcow2-l1-size-2^31", qcow2_fields(l1_size=0x7FFFFFFF), "refuse",
             says="L1 table too large"),
        case("qcow2-l1-32MiB-of-zeros", qcow2_build(lambda p: Qcow2(2 * PiB)), "either"),
        case("qcow2-refcount-table-8MiB", qcow2_with(_refcount_table_8_mib), "either"),
        case("qcow2-refcount-table-2^32-clusters",
             qcow2_fields(refcount_table_clusters=0xFFFFFFFF), "refuse"),
        case("vmdk-grain-directory-64MiB", vmdk_build(lambda p: Vmdk(1 << 40)), "refuse"),
        case("vmdk-grain-directory-32MiB-of-zeros", vmdk_build(lambda p: Vmdk(1 << 39)),
             "either"),
        case("vmdk-4M-grain-tables-of-512-byte-grains",  # qemu takes minutes over it
             vmdk_build(lambda p: Vmdk(1 << 31, grain=1)), "either", qemu=False),
        case("vhd-BAT-of-2040-GiB", vhd_with(lambda v, p: None, size=2040 * GiB, blocks=()),
             "read"),
        case("vhd-BAT-of-4-KiB-blocks", vhd_with(lambda v, p: None, size=2040 * GiB,
                                                 block_size=4 * KiB, blocks=()), "refuse"),
        case("vhdx-BAT-of-64M-entries", vhdx_with(
            lambda x, p: setattr(x, "bat_length", 513 * MiB), virtual_size=64 * TiB - MiB,
            blocks=()), "refuse"),
        case("vhdx-metadata-table-of-2047-items", vhdx_with(lambda x, p: x.items.update(
            {uuid.UUID(int=i).bytes_le: b"x" for i in range(1, 2043)})), "either"),
        # qcow's L1 table at instar's limit (8 TiB of 4 KiB clusters) and past it (9 TiB).
        case("qcow-L1-of-32-MiB-of-zeros", qcow_build(lambda p: Qcow(8 * TiB)), "either",
             qemu=False),
        case("qcow-L1-of-36-MiB", qcow_build(lambda p: Qcow(9 * TiB)), "refuse",
             says="over instar's limit", qemu=False),
        # The largest tables a non-empty QED can have: 16 MiB each (1 MiB clusters, 16 a table).
        case("qed-L2-tables-of-16-MiB", qed_build(lambda p: qed_file(
            4 * MiB, cluster=MiB, table_size=16)), "read"),
        # An empty disk whose L1 table is 1 GiB (64 MiB clusters, 16 a table): nothing to read.
        case("qed-L1-of-1-GiB-for-an-empty-disk", qed_build(lambda p: Qed(
            0, cluster=64 * MiB, table_size=16)), "read"),
    ]


def _refcount_table_8_mib(image: Qcow2, place: Place) -> None:
    image.fields["refcount_table_clusters"] = 128
    image.length = 16 * MiB


def vmdk_build(make: Callable[[Place], Vmdk], name: str = "v.vmdk") -> Build:
    def build(place: Place) -> str:
        make(place).write(place.img / name)
        return name

    return build


def beyond_eof() -> list[Case]:
    """Offsets past the end of the file, at the top of the offset range, and
    into the image's own metadata (headers, tables, the table itself): every
    table entry that points somewhere, pointed at the wrong place."""

    def q_entry(value: Callable[[Qcow2], int], cluster: int = 1) -> Build:
        return qcow2_with(lambda q, p: q.entry(cluster, value(q)))

    def v_gte(value: Callable[[Vmdk], int], grain: int = 1) -> Build:
        return vmdk_with(lambda v, p: v.gte(grain, value(v)))

    def vhd_bat(value: Callable[[Vhd], int]) -> Build:
        return vhd_with(lambda v, p: v.bat.__setitem__(0, value(v)))

    def vhdx_bat(offset: Callable[[Vhdx], int]) -> Build:
        return vhdx_with(lambda x, p: x.bat.__setitem__(
            0, offset(x) | vhdx_layout.PAYLOAD_FULLY_PRESENT))

    return [
        case("qcow2-L1-past-EOF", qcow2_fields(l1_table_offset=1 << 40), "refuse"),
        case("qcow2-L2-table-past-EOF", qcow2_with(lambda q, p: q.l1.__setitem__(
            0, COPIED | 1 << 40)), "refuse", info="read"),
        case("qcow2-cluster-past-EOF", q_entry(lambda q: COPIED | 1 << 40), "refuse",
             info="read"),
        case("qcow2-cluster-is-the-L1-table", q_entry(lambda q: COPIED | q.l1_offset),
             "either"),
        case("qcow2-cluster-is-its-own-L2-table", q_entry(lambda q: COPIED | q.l2_at[0]),
             "either"),
        case("qcow2-L2-table-is-the-L1-table", qcow2_with(lambda q, p: q.l1.__setitem__(
            0, COPIED | q.l1_offset)), "either"),
        case("qcow2-compressed-cluster-is-the-header", q_entry(
            lambda q: q.compressed_entry(0, 4096)), "refuse", info="read"),
        case("vmdk-grain-directory-past-EOF", vmdk_fields(gd_offset=1 << 40), "refuse"),
        case("vmdk-grain-table-past-EOF", vmdk_with(lambda v, p: v.gd.__setitem__(
            0, 0x7FFFFFFF)), "refuse"),
        case("vmdk-grain-past-EOF", v_gte(lambda v: 0xFFFFFFFF), "refuse", info="read"),
        case("vmdk-grain-is-the-descriptor", v_gte(lambda v: 1), "either"),
        case("vmdk-stream-footer-directory-past-EOF", vmdk_build(lambda p: _stream_footer_gd(
            1 << 40)), "refuse"),
        case("qcow-L1-past-EOF", qcow_with(lambda q, p: q.fields.update(
            l1_table_offset=1 << 40)), "refuse"),
        case("qcow-L2-table-past-EOF", qcow_with(lambda q, p: q.l1.__setitem__(0, 1 << 40)),
             "refuse", info="read"),
        case("qcow-cluster-past-EOF", qcow_with(lambda q, p: q.entry(1, 1 << 40)), "refuse",
             info="read"),
        case("qcow-cluster-is-the-header-and-L1-table", qcow_with(lambda q, p: q.entry(
            1, q.cluster)), "either"),
        case("qcow-cluster-is-its-own-L2-table", qcow_with(lambda q, p: q.entry(
            1, q.l2_at[0])), "either"),
        case("qcow-compressed-cluster-past-EOF", qcow_with(lambda q, p: q.entry(
            1, q.compressed_entry(1 << 40, 100))), "refuse", info="read"),
        case("qcow-compressed-cluster-is-the-header", qcow_with(lambda q, p: q.entry(
            1, q.compressed_entry(0, 2000))), "refuse", info="read"),
        case("qed-L1-past-EOF", qed_with(lambda q, p: q.fields.update(
            l1_table_offset=1 << 40)), "refuse"),
        case("qed-L2-table-past-EOF", qed_with(lambda q, p: q.l1.__setitem__(0, 1 << 40)),
             "refuse", info="read"),
        case("qed-cluster-past-EOF", qed_with(lambda q, p: q.entry(1, 1 << 40)), "refuse",
             info="read"),
        case("qed-cluster-is-the-L1-table", qed_with(lambda q, p: q.entry(1, q.l1_offset)),
             "either"),
        case("qed-cluster-is-its-own-L2-table", qed_with(lambda q, p: q.entry(1, q.l2_at[0])),
             "either"),
        case("qed-L2-table-is-the-L1-table", qed_with(lambda q, p: q.l1.__setitem__(
            0, q.l1_offset)), "either"),
        case("qed-cluster-in-the-header", qed_with(lambda q, p: q.entry(1, 0x8000)), "refuse",
             info="read"),
        case("vhd-BAT-entry-is-the-footer-copy", vhd_bat(lambda v: 0), "either"),
        case("vhd-block-crosses-EOF", vhd_bat(lambda v: (v.first_block + 2 * (
            v.block_size + 512)) // 512 - 4), "refuse"),
        case("vhdx-BAT-entry-at-the-top-of-the-range", vhdx_bat(
            lambda x: vhdx_layout.OFFSET_MASK), "refuse"),
        case("vhdx-BAT-entry-is-the-header-section", vhdx_bat(lambda x: 0), "refuse"),
        case("vhdx-BAT-entry-is-the-log", vhdx_bat(lambda x: x.log_offset), "refuse"),
        case("vhdx-metadata-item-past-its-region", vhdx_with(lambda x, p: x.items.update(
            {vhdx_layout.PAGE83_DATA: b"\x33" * 16 + bytes(MiB)})), "refuse"),
        case("dmg-chunk-past-EOF", dmg_chunks(("raw", 0, 128, TiB, 64 * KiB)), "refuse",
             info="read"),
        case("dmg-chunk-offset-wraps-2^64", dmg_chunks(
            ("zlib", 0, 128, (1 << 64) - 100, 64 * KiB)), "refuse", info="read"),
        case("dmg-chunk-is-the-plist", dmg_chunks(("raw", 0, 2, 64 * KiB, 1024)), "refuse",
             info="read"),
        case("dmg-resource-fork-chunk-is-the-fork", dmg_chunks(
            ("raw", 0, 2, 64 * KiB, 1024), form="rsrc"), "refuse", info="read"),
        case("bochs-catalog-past-EOF", bochs(lambda: dataclasses.replace(
            bochs_tests.IMAGES["mixed.bochs"], cut=600)), "refuse", info="read"),
        case("bochs-extent-at-the-top-of-the-range", bochs(lambda: dataclasses.replace(
            bochs_tests.IMAGES["mixed.bochs"], entries={0: 0xFFFFFFFE})), "refuse",
             info="read"),
        case("bochs-extent-is-the-header", bochs(lambda: bochs_tests.Bochs(
            64 * KiB, header_size=256, stored=bochs_tests.sectors(0, 8, 3))), "refuse",
             info="read"),
        case("cloop-offsets-table-of-1M-past-EOF", cloop(lambda: cloop_table(
            64 * KiB, [], blocks=1 << 20)), "refuse", info="read"),
        case("cloop-blocks-at-2^63", cloop(lambda: cloop_table(
            64 * KiB, [1 << 63, (1 << 63) + 100, (1 << 63) + 200])), "refuse", info="read"),
        case("cloop-block-is-the-header", cloop(lambda: cloop_tests.damaged(
            offsets=[0, 1000, 2000, 3000, 4000])), "refuse", info="read"),
    ]


def aliasing() -> list[Case]:
    """Two table entries naming the same host bytes, up to a small file whose
    every entry names one cluster: terabytes of data claimed by a few KiB.
    The readers refuse a host unit mapped twice (docs/architecture.md, the
    aliasing check); either way instar must answer within the limits."""

    def terabytes_qcow2(place: Place) -> Qcow2:
        image = Qcow2(4 * TiB)
        data = image.alloc(pattern(image.cluster, seed=9))
        table = image.alloc()
        image.l1 = dict.fromkeys(range(image.l1_size), table | COPIED)
        image.l2_at[0] = table
        image.l2[0] = dict.fromkeys(range(image.per_l2), data | COPIED)
        return image

    def terabytes_vmdk(place: Place) -> Vmdk:
        image = Vmdk(1 << 32)  # 2 TiB
        image.stored(0, pattern(64 * KiB, seed=9))
        image.gts[0] = dict.fromkeys(range(512), image.gts[0][0])
        image.gd = dict.fromkeys(range(image.gd_entries), image.gd[0])
        return image

    def terabytes_qcow(place: Place) -> Qcow:
        image = Qcow(4 * TiB)
        data = image.alloc(pattern(image.cluster, seed=9))
        table = image.alloc(length=8 * image.per_l2)
        image.l1_blob = struct.pack(">Q", table) * image.l1_size  # 2 Mi entries, one bytes
        image.l2_at[0] = table
        image.l2[0] = dict.fromkeys(range(image.per_l2), data)
        return image

    def compressed_everywhere(place: Place) -> Qcow:
        image = Qcow(64 * GiB)
        stream = deflate_bomb(MiB)
        entry = image.compressed_entry(image.alloc(stream), len(stream))
        table = image.alloc(length=8 * image.per_l2)
        image.l1 = dict.fromkeys(range(image.l1_size), table)
        image.l2_at[0] = table
        image.l2[0] = dict.fromkeys(range(image.per_l2), entry)
        return image

    def terabytes_qed(place: Place) -> Qed:
        image = Qed(64 * TiB)
        data = image.alloc(pattern(image.cluster, seed=9))
        table = image.alloc(length=image.table_bytes)
        image.l1 = dict.fromkeys(range(image.entries), table)
        image.l2_at[0] = table
        image.l2[0] = dict.fromkeys(range(image.entries), data)
        return image

    def terabytes_vhd(image: Vhd, place: Place) -> None:
        image.bat = dict.fromkeys(range(image.entries), image.bat[0])

    def terabytes_vhdx(image: Vhdx, place: Place) -> None:
        first = image.bat[0]
        geometry = image.geometry
        image.bat = {geometry.payload_index(b): first for b in range(geometry.payload_blocks)}

    return [
        case("qcow2-two-L2-entries-one-cluster", qcow2_with(
            lambda q, p: q.entry(5, q.l2[0][0])), "either"),
        case("qcow2-4-TiB-from-one-cluster", qcow2_build(terabytes_qcow2), "either"),
        case("qcow2-64-GiB-from-one-compressed-cluster", qcow2_build(
            lambda p: _every_cluster_compressed(64 * GiB)), "either"),
        case("qcow-two-L2-entries-one-cluster", qcow_with(
            lambda q, p: q.entry(5, q.l2[0][0])), "either"),
        case("qcow-4-TiB-from-one-cluster", qcow_build(terabytes_qcow), "either"),
        case("qcow-64-GiB-from-one-compressed-cluster", qcow_build(compressed_everywhere),
             "either"),
        case("qed-two-L2-entries-one-cluster", qed_with(lambda q, p: q.entry(5, q.l2[0][0])),
             "either"),
        case("qed-64-TiB-from-one-cluster", qed_build(terabytes_qed), "either"),
        case("vmdk-2-TiB-from-one-grain", vmdk_build(terabytes_vmdk), "either"),
        case("vhd-two-BAT-entries-one-block", vhd_with(
            lambda v, p: v.bat.__setitem__(1, v.bat[0])), "either"),
        case("vhd-2040-GiB-from-one-block", vhd_with(terabytes_vhd, size=2040 * GiB,
                                                     blocks=(0,)), "either"),
        case("vhdx-two-BAT-entries-one-block", vhdx_with(
            lambda x, p: x.bat.__setitem__(1, x.bat[0])), "either"),
        case("vhdx-1-TiB-from-one-block", vhdx_with(terabytes_vhdx, virtual_size=TiB,
                                                    blocks=(0,)), "either"),
        case("vmdk-1000-flat-extents-one-file", flat_descriptor(
            ['RW 128 FLAT "x.bin" 0'] * 1000, {"x.bin": pattern(64 * KiB, seed=2)}), "either",
             allow="dir"),
        case("dmg-1-TiB-from-one-zlib-chunk", dmg(_terabyte_dmg), "refuse", info="read"),
        case("dmg-two-chunks-one-guest-range", dmg_chunks(
            ("raw", 0, 128, 0, 64 * KiB), ("raw", 64, 64, 0, 32 * KiB)), "refuse", info="read"),
        case("bochs-every-extent-one-extent", bochs(lambda: bochs_tests.Bochs(
            4 * GiB, catalog=0x100000, stored=bochs_tests.sectors(0, 8, 5),
            entries=dict.fromkeys(range(1, 0x100000), 0))), "refuse", info="read"),
    ]


def _terabyte_dmg() -> Dmg:
    """16384 zlib chunks of 64 MiB, every one naming the same compressed bytes."""
    count = 1 << 17  # sectors in 64 MiB
    chunks = [Chunk("zlib", bytes(64 * MiB), stored=zlib.compress(bytes(64 * MiB)))]
    stored = len(chunks[0].encoded())
    entries = [(0, i, (DMG_TYPES["zlib"], 0, i * count, count, 0, stored))
               for i in range(1, 16384)]
    chunks += [Chunk("zlib", b"", stored=b"") for _ in entries]
    return Dmg([chunks], entries=entries, sectors=16384 * count)


def _stream_footer_gd(sector: int) -> Vmdk:
    """A streamOptimized disk whose footer puts the grain directory at ``sector``."""
    image = vmdk_file(compressed=True, footer=True)
    image.fields["gd_offset"] = sector
    return image


def _every_cluster_compressed(size: int) -> Qcow2:
    """Every L2 entry of a ``size`` image names one compressed cluster."""
    image = Qcow2(size)
    stream = deflate_bomb(MiB)
    entry = image.compressed_entry(image.alloc(stream), len(stream))
    table = image.alloc()
    image.l1 = dict.fromkeys(range(image.l1_size), table | COPIED)
    image.l2_at[0] = table
    image.l2[0] = dict.fromkeys(range(image.per_l2), entry)
    return image


def bad_geometry() -> list[Case]:
    """Sizes and shapes that do not fit together: CHS geometries of nothing
    or of more than the BAT covers, block, grain and cluster sizes out of
    range or not powers of two, sector sizes and disk sizes that do not
    divide."""
    return [
        case("vhd-CHS-0-0-0", vhd_with(lambda v, p: None, creator=b"qemu", geometry=(0, 0, 0)),
             "either"),
        case("vhd-CHS-maximum-with-size-2^63", vhd_with(
            lambda v, p: None, creator=b"qemu", geometry=(65535, 16, 255), current=1 << 63),
             "refuse"),
        case("vhd-CHS-larger-than-the-BAT", vhd_with(
            lambda v, p: setattr(v, "max_entries", 3), creator=b"qemu",
            geometry=(1000, 16, 63)), "refuse"),
        case("vhd-block-size-3-MiB", vhd_with(lambda v, p: v.header_fields.update(
            block_size=3 * MiB)), "refuse"),
        case("vhd-fixed-larger-than-its-file", vhd_fixed(MiB, pattern(4096)), "either",
             fmt="vpc"),
        case("qcow2-cluster-bits-8", qcow2_fields(cluster_bits=8), "refuse"),
        case("qcow2-size-not-a-sector-multiple", qcow2_fields(size=MiB - 100), "either"),
        case("qcow2-extended-L2-with-512-byte-clusters", qcow2_fields(
            cluster_bits=9, incompatible=1 << 4), "refuse"),
        case("vmdk-grain-of-3-sectors", vmdk_build(lambda p: vmdk_file(999, grain=3)),
             "either"),
        case("vmdk-capacity-0", vmdk_fields(capacity=0, desc_offset=0, desc_sectors=0),
             "either"),
        case("vhdx-4096-byte-sectors-odd-size", vhdx_with(
            lambda x, p: None, logical=4096, virtual_size=3 * MiB + 512), "refuse"),
        case("vhdx-virtual-size-0", vhdx_with(lambda x, p: None, virtual_size=0, blocks=()),
             "either"),
    ]


def huge_virtual_sizes() -> list[Case]:
    """Disks claiming 2^63-1 bytes, 2^64-512 bytes, exabytes: sizes that
    overflow signed 64-bit arithmetic, file systems and table sizes, in
    every format's size field."""
    vhdx_size = vhdx_layout.VIRTUAL_DISK_SIZE

    def vhdx_sized(size: int) -> Build:
        return vhdx_with(lambda x, p: x.items.update({vhdx_size: struct.pack("<Q", size)}))

    def vhd_sized(size: int) -> Build:
        return vhd_with(lambda v, p: None, size=size, blocks=())

    return [
        case("qcow2-2^63-1", qcow2_fields(size=(1 << 63) - 1), "refuse"),
        case("qcow2-2^64-512", qcow2_fields(size=(1 << 64) - 512), "refuse"),
        case("qcow2-1-EiB-with-its-L1-table", qcow2_build(
            lambda p: Qcow2(EiB, cluster_bits=21)), "either"),
        case("qcow2-8-EiB-with-2-MiB-clusters", qcow2_build(
            lambda p: Qcow2((1 << 63) - 2 * MiB, cluster_bits=21, l1_size=1)), "refuse"),
        case("qcow-2^63", qcow_build(lambda p: Qcow(1 << 63)), "refuse", says="Image too large"),
        case("qcow-2^64-1", qcow_build(lambda p: Qcow((1 << 64) - 1)), "refuse",
             says="Image too large"),
        case("qcow-2^57-of-64-KiB-clusters", qcow_build(lambda p: qcow_file(
            1 << 57, cluster_bits=16, l2_bits=13)), "refuse"),
        case("qed-2^63-with-2-MiB-clusters", qed_build(lambda p: Qed(
            1 << 63, cluster=2 * MiB, table_size=8)), "refuse"),
        case("qed-2^64-512", qed_build(lambda p: Qed((1 << 64) - 512)), "refuse"),
        case("qed-64-TiB", qed_build(lambda p: qed_file(64 * TiB)), "either"),
        case("vmdk-capacity-2^54-sectors", vmdk_fields(capacity=1 << 54), "refuse"),
        case("vmdk-1-EiB-of-1-GiB-grains", vmdk_build(
            lambda p: Vmdk(1 << 51, grain=1 << 21)), "either"),
        case("vhd-2^64-512", vhd_sized((1 << 64) - 512), "refuse"),
        case("vhd-fixed-2^63", vhd_fixed(4096, pattern(4096), current=1 << 63), "refuse",
             fmt="vpc"),
        case("vhdx-2^64-512", vhdx_sized((1 << 64) - 512), "refuse"),
        case("vhdx-64-TiB", vhdx_sized(64 * TiB), "refuse"),
        case("dmg-2^63-1-sectors", dmg(lambda: Dmg([[Chunk("zero", bytes(512))]],
                                                   sectors=(1 << 63) - 1)), "refuse"),
        case("dmg-zero-chunk-of-2^50-sectors", dmg(lambda: Dmg(
            [[Chunk("zero", bytes(512), sectors=1 << 50)]], sectors=1 << 50)), "either",
             qemu=False),  # qemu's dmg has no block status: it would read 512 PiB of zeros
        case("bochs-disk-2^64-512", bochs(lambda: dataclasses.replace(
            bochs_tests.IMAGES["mixed.bochs"], disk=(1 << 64) - 512, catalog=256)), "refuse"),
        case("bochs-1M-extents-of-8-MiB", bochs(lambda: bochs_tests.Bochs(
            8 * TiB, extent=8 * MiB, bitmap=2048, stored=bochs_tests.sectors(0, 8, 6))),
             "either", qemu=False),  # 8 TiB of zeros through qemu's bochs: hours
        case("cloop-size-wraps-32-bits", cloop(lambda: cloop_table(
            64 * MiB, [4104] * 65537)), "read"),  # 65536 blocks of 64 MiB: qemu says size 0
    ]


def compression_bombs() -> list[Case]:
    """Compressed units that inflate far past the cluster or grain they
    stand for (zlib and zstd qcow2 clusters, qcow clusters, deflate VMDK
    stream grains), frames claiming exabytes, streams that end early or never."""

    def zlib_cluster(stream: Callable[[], bytes], **options: object) -> Build:
        return qcow2_with(lambda q, p: q.compressed(1, stream()), **options)

    def zstd_cluster(stream: Callable[[], bytes]) -> Build:
        def change(image: Qcow2, place: Place) -> None:
            image.compressed(1, stream())
            image.fields["incompatible"] = 1 << 3

        return qcow2_with(change, compression_type=1)

    def grain(stream: Callable[[], bytes]) -> Build:
        return vmdk_with(lambda v, p: v.marker_grain(1, stream()), compressed=True)

    zstd_skippable = struct.pack("<II", 0x184D2A50, 60000) + bytes(60000)
    return [
        # qemu keeps the first cluster of a zlib bomb; instar refuses it (docs/formats/qcow2.md).
        case("qcow2-zlib-cluster-of-16-MiB", zlib_cluster(deflate_bomb), "refuse", info="read"),
        case("qcow2-zlib-2-MiB-cluster-of-64-MiB", zlib_cluster(
            lambda: deflate_bomb(64 * MiB), cluster_bits=21, size=8 * MiB), "refuse",
             info="read"),
        case("qcow2-zlib-stream-ends-early", zlib_cluster(
            lambda: zlib.compress(random.Random(1).randbytes(64 * KiB), wbits=-15)[:30000]),
             "refuse", info="read"),
        case("qcow2-zlib-stream-shorter-than-a-cluster", zlib_cluster(
            lambda: zlib.compress(b"A" * 100, wbits=-15)), "refuse", info="read"),
        # qemu refuses a zstd frame that does not end inside its cluster (as instar).
        case("qcow2-zstd-cluster-of-1-GiB", zstd_cluster(lambda: zstd_rle_frame(GiB, window=17)),
             "refuse", info="read"),
        case("qcow2-zstd-cluster-of-exactly-a-cluster", zstd_cluster(
            lambda: zstd_rle_frame(64 * KiB, window=17)), "read"),
        case("qcow2-zstd-frame-claiming-1-EiB", zstd_cluster(
            lambda: zstd_rle_frame(MiB, claimed=EiB)), "either"),
        case("qcow2-zstd-skippable-frames-only", zstd_cluster(lambda: zstd_skippable),
             "refuse", info="read"),
        case("qcow2-zstd-garbage", zstd_cluster(lambda: b"\x28\xb5\x2f\xfd" + b"\xff" * 5000),
             "refuse", info="read"),
        # qcow's compressed size field holds less than a cluster: 1 MiB fits in ~1 KiB.
        case("qcow-cluster-of-1-MiB", qcow_with(lambda q, p: q.compressed(
            1, deflate_bomb(MiB))), "refuse", info="read"),
        case("qcow-64-KiB-cluster-of-16-MiB", qcow_with(lambda q, p: q.compressed(
            1, deflate_bomb()), cluster_bits=16, l2_bits=13), "refuse", info="read"),
        case("qcow-stream-ends-early", qcow_with(lambda q, p: q.compressed(
            1, zlib.compress(random.Random(2).randbytes(4 * KiB), wbits=-15)[:2000])),
             "refuse", info="read"),
        case("qcow-stream-shorter-than-a-cluster", qcow_with(lambda q, p: q.compressed(
            1, zlib.compress(b"A" * 100, wbits=-15))), "refuse", info="read"),
        case("qcow-zlib-header-not-raw-deflate", qcow_with(lambda q, p: q.compressed(
            1, zlib.compress(b"C" * 4 * KiB))), "refuse", info="read"),
        case("vmdk-stream-grain-of-16-MiB", grain(lambda: deflate_bomb(raw=False)), "refuse",
             info="read"),
        case("vmdk-stream-grain-half-a-grain", grain(lambda: zlib.compress(b"B" * 32 * KiB)),
             "refuse", info="read"),
        case("dmg-zlib-chunk-of-16-MiB-in-4-KiB", dmg_one(
            "zlib", bytes(4 * KiB), deflate_bomb(raw=False)), "refuse", info="read"),
        case("dmg-zlib-64-MiB-chunk-of-128-MiB", dmg_one(
            "zlib", bytes(0), deflate_bomb(128 * MiB, raw=False), sectors=1 << 17), "refuse",
             info="read"),
        case("dmg-zlib-chunk-of-exactly-8-MiB", dmg_one(
            "zlib", bytes(8 * MiB), deflate_bomb(8 * MiB, raw=False)), "read"),
        case("dmg-bzip2-chunk-of-16-MiB-in-4-KiB", dmg_one(
            "bzip2", bytes(4 * KiB), bz2.compress(b"A" * 16 * MiB)), "refuse", info="read"),
        case("dmg-bzip2-chunk-of-exactly-8-MiB", dmg_one(
            "bzip2", b"A" * 8 * MiB, bz2.compress(b"A" * 8 * MiB)), "read",
             qemu=False),  # this machine's qemu lacks its dmg-bz2 module
        case("dmg-bzip2-garbage", dmg_one("bzip2", bytes(4 * KiB), b"BZh9" + b"\xff" * 5000),
             "refuse", info="read"),
        case("dmg-zlib-stream-ends-early", dmg_one("zlib", pattern(64 * KiB), zlib.compress(
            random.Random(2).randbytes(64 * KiB))[:30000]), "refuse", info="read"),
        case("cloop-block-of-16-MiB-in-64-KiB", cloop(lambda: cloop_tests.damaged(
            streams=[deflate_bomb(raw=False)] * 4)), "refuse", info="read"),
        case("cloop-8-MiB-block-of-zeros", cloop(lambda: cloop_tests.cloop_bytes(
            bytes(8 * MiB), 8 * MiB)), "read"),
    ]


def chains() -> list[Case]:
    """Backing chains and named files that loop (A->A, A->B->A, through a
    hard link), go 17 deep, or name what is no image file: json: and nbd:
    specifications, /dev/zero, /dev/stdin, /proc/self/environ, /proc/self/mem,
    a FIFO, a UNIX socket, a directory, a symbolic link out of the directory,
    the canary by ../ and by absolute path; in qcow2, qcow and QED backing files,
    qcow2 data files, VMDK parent hints, VHD and VHDX parent locators."""

    def loop_of_two(place: Place) -> str:
        for name, other in (("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")):
            image = qcow2_file(clusters=1)
            image.set_backing(other)
            image.write(place.img / name)
        return "a.qcow2"

    def loop_through_link(place: Place) -> str:
        image = qcow2_file(clusters=1)
        image.set_backing("b.qcow2")
        image.write(place.img / "a.qcow2")
        os.link(place.img / "a.qcow2", place.img / "b.qcow2")
        return "a.qcow2"

    def chain(depth: int) -> Build:
        """``depth`` qcow2 images below the top one, each holding one cluster of its own."""

        def build(place: Place) -> str:
            for level in range(depth + 1):
                image = Qcow2(MiB)
                image.data(level % 16, pattern(image.cluster, seed=level))
                if level:
                    image.set_backing(f"l{level - 1}.qcow2", "qcow2")
                image.write(place.img / f"l{level}.qcow2")
            return f"l{depth}.qcow2"

        return build

    def in_subdir(place: Place) -> str:
        (place.img / "sub").mkdir()
        qcow2_file(clusters=3, seed=40).write(place.img / "sub" / "base.qcow2")
        image = Qcow2(MiB)
        image.data(1, pattern(image.cluster, seed=50))
        image.set_backing("sub/base.qcow2", "qcow2")
        image.write(place.img / "v.qcow2")
        return "v.qcow2"

    def mixed(place: Place) -> str:
        place.bases.copy("vhd", place.img, "base.vhd")
        middle = Qcow2(5 * MiB)
        middle.data(3, pattern(middle.cluster, seed=60))
        middle.set_backing("base.vhd", "vpc")
        middle.write(place.img / "mid.qcow2")
        top = Qcow2(5 * MiB)
        top.data(20, pattern(top.cluster, seed=61))
        top.set_backing("mid.qcow2", "qcow2")
        top.write(place.img / "v.qcow2")
        return "v.qcow2"

    def qcow_chain(place: Place) -> str:
        qed_file(clusters=3, seed=43).write(place.img / "base.qed")
        middle = qcow_file(clusters=0)
        middle.data(40, pattern(middle.cluster, seed=44))
        middle.set_backing("base.qed")
        middle.write(place.img / "mid.qcow")
        top = Qcow(MiB, cluster_bits=9, l2_bits=12)  # as qemu makes a backed qcow
        top.data(3, pattern(top.cluster, seed=45))
        top.set_backing("mid.qcow")
        top.write(place.img / "v.qcow")
        return "v.qcow"

    def qed_chain(place: Place) -> str:
        qed_file(clusters=3, seed=40).write(place.img / "base.qed")
        middle = Qcow2(MiB)
        middle.data(1, pattern(middle.cluster, seed=41))
        middle.set_backing("base.qed", "qed")
        middle.write(place.img / "mid.qcow2")
        top = qed_file(clusters=0)
        top.data(2, pattern(top.cluster, seed=42))
        top.set_backing("mid.qcow2")
        top.write(place.img / "v.qed")
        return "v.qed"

    def vmdk_parent(hint: str | Callable[[Place], str],
                    prepare: Callable[[Place], None] | None = None) -> Build:
        def build(place: Place) -> str:
            if prepare is not None:
                prepare(place)
            name = hint(place) if callable(hint) else hint
            text = descriptor_text("monolithicSparse", ['RW 4096 SPARSE "v.vmdk"'],
                                   [f'parentFileNameHint="{name}"'])
            vmdk_file(descriptor=text).write(place.img / "v.vmdk")
            return "v.vmdk"

        return build

    def vpc_child(locator: str, platform: bytes = b"W2ru") -> Build:
        def build(place: Place) -> str:
            place.bases.copy("vhd", place.img, "base.vhd")
            blob = locator.encode("utf-8" if platform == b"MacX" else "utf-16-le")
            vpc_tests.make_child(place.img / "child.vhd", place.img / "base.vhd", {},
                                 [(platform, blob)], "")
            return "child.vhd"

        return build

    def vhdx_child(relative: str) -> Build:
        def build(place: Place) -> str:
            parent = place.img / "parent.vhdx"
            vhdx_file().write(parent)
            linkage = vhdx_tests._guid_string(b"\x22" * 16)
            vhdx_tests.make_child(place.img / "child.vhdx", parent, {},
                                  virtual_size=3 * MiB,
                                  locator={"parent_linkage": linkage, "relative_path": relative})
            return "child.vhdx"

        return build

    json_file = 'json:{"driver":"file","filename":"../secret/canary.bin"}'
    return [
        case("loop-A-A", qcow2_backed("v.qcow2"), "refuse", says="deeper than 16",
             says_without_allow=OUTSIDE, info="read", allow="both", qemu=False),
        case("loop-A-B-A", loop_of_two, "refuse", says="deeper than 16",
             says_without_allow=OUTSIDE, info="read", allow="both", qemu=False),
        case("17-deep", chain(17), "refuse", says="deeper than 16",
             says_without_allow=OUTSIDE, info="read", allow="both", qemu=False),
        case("16-deep", chain(16), "read", allow="dir"),
        case("backing-file-in-a-subdirectory", in_subdir, "read", allow="dir"),
        case("qcow2-over-qcow2-over-vhd", mixed, "read", allow="dir"),
        case("qcow-loop-A-A", qcow_backed("v.qcow"), "refuse", says="deeper than 16",
             says_without_allow=OUTSIDE, info="read", allow="both", qemu=False),
        case("qcow-over-qcow-over-qed", qcow_chain, "read", allow="dir"),
        attack("qcow-backing-canary", qcow_backed("../secret/canary.bin"), OUTSIDE,
               info="read"),
        attack("qcow-backing-dev-zero", qcow_backed("/dev/zero"), OUTSIDE, info="read"),
        case("qed-loop-A-A", qed_backed("v.qed"), "refuse", says="deeper than 16",
             says_without_allow=OUTSIDE, info="read", allow="both", qemu=False),
        case("qed-over-qcow2-over-qed", qed_chain, "read", allow="dir"),
        attack("qed-backing-canary", qed_backed("../secret/canary.bin", raw=True), OUTSIDE,
               info="read"),
        attack("qed-backing-etc-passwd-probed", qed_backed("/etc/passwd"), OUTSIDE,
               info="read"),
        attack("json-file-canary", qcow2_backed(json_file), info="read"),
        attack("nbd-tcp", qcow2_backed("nbd:localhost:10809", "raw"), info="read"),
        attack("dev-zero", qcow2_backed("/dev/zero", "raw"), OUTSIDE, info="read"),
        attack("dev-stdin", qcow2_backed("/dev/stdin", "raw"), OUTSIDE, info="read"),
        attack("proc-self-environ", qcow2_backed("/proc/self/environ", "raw"), OUTSIDE,
               info="read"),
        attack("proc-self-mem", qcow2_backed("/proc/self/mem", "raw"), OUTSIDE, info="read"),
        attack("fifo", qcow2_backed("pipe", "raw", prepare=make_fifo("pipe")), info="read"),
        attack("unix-socket", qcow2_backed("sock", "raw", prepare=make_socket("sock")),
               info="read"),
        attack("directory", qcow2_backed("sub", "raw", prepare=make_dir("sub")), info="read"),
        attack("symlink-out-of-the-directory", qcow2_backed(
            "link", "raw", prepare=make_link("link", "../secret/canary.bin")), OUTSIDE,
            info="read"),
        attack("dot-dot-canary", qcow2_backed("../secret/canary.bin", "raw"), OUTSIDE,
               info="read"),
        attack("NUL-in-the-name", qcow2_backed(b"base.qcow2\0../secret/canary.bin", "raw"),
               info="either"),
        attack("data-file-directory", qcow2_data_file("sub", prepare=make_dir("sub"))),
        attack("data-file-fifo", qcow2_data_file("pipe", prepare=make_fifo("pipe"))),
        case("data-file-is-the-image-itself", qcow2_data_file("v.qcow2"), "either",
             allow="both", qemu=False),
        attack("vmdk-parent-is-itself", vmdk_parent("v.vmdk"), "deeper than 16", info="read",
               says_without_allow=OUTSIDE),
        attack("vmdk-parent-canary", vmdk_parent("../secret/canary.bin"), OUTSIDE,
               info="read"),
        attack("vpc-parent-etc-passwd-by-MacX", vpc_child("file:///etc/passwd", b"MacX"),
               OUTSIDE, info="either"),
        attack("vhdx-parent-canary", vhdx_child("..\\secret\\canary.bin"), OUTSIDE,
               info="either"),
    ]


def vmdk_descriptor() -> list[Case]:
    """VMDK text descriptors naming what they must not: /etc/passwd,
    absolute paths, ../, links and special files as extents; 2000 extents;
    sector counts and offsets of 2^63; NUL bytes; descriptors of 2 MiB;
    control characters and 5000-character names; parent hints outside."""
    x_bin = {"x.bin": pattern(4096, seed=8)}

    def flat(name: str, prepare: Callable[[Place], None] | None = None) -> Build:
        return flat_descriptor([f'RW 8 FLAT "{name}" 0'], x_bin, prepare=prepare)

    def nul_inside(descriptor: str) -> bytes:
        return descriptor.replace('x.bin"', 'x.bin\0../secret/canary.bin"').encode()

    def nul_before_extents(descriptor: str) -> bytes:
        return descriptor.replace("# Extent description", "\0").encode()

    def padded(size: int) -> Callable[[str], bytes]:
        return lambda text: (text + "#" * 100 + "\n").encode().ljust(size, b"#")

    def crlf(text: str) -> bytes:
        return text.replace("\n", "\r\n").encode()

    return [
        attack("extent-etc-passwd", flat("/etc/passwd"), OUTSIDE),
        attack("extent-absolute-canary", flat("{canary}"), OUTSIDE),
        attack("extent-dot-dot-canary", flat("../secret/canary.bin"), OUTSIDE),
        attack("extent-symlink-out", flat("link", make_link("link", "../secret/canary.bin")),
               OUTSIDE),
        attack("extent-directory", flat("sub", make_dir("sub"))),
        attack("extent-fifo", flat("pipe", make_fifo("pipe"))),
        case("extent-is-the-descriptor-itself", flat("v.vmdk"), "either", allow="both",
             qemu=False),
        # Descriptors naming x.bin beside them: --allow img, as for any benign image.
        case("2000-extents", flat_descriptor(['RW 8 FLAT "x.bin" 0'] * 2000, x_bin), "refuse",
             says="1024 extents", allow="dir"),
        case("1024-extents-one-file", flat_descriptor(['RW 8 FLAT "x.bin" 0'] * 1024, x_bin),
             "either", allow="dir"),
        case("flat-extent-of-2^63-sectors", flat_descriptor(
            ['RW 9223372036854775807 FLAT "x.bin" 0'], x_bin), "refuse", allow="dir"),
        case("flat-extent-at-sector-2^62", flat_descriptor(  # qemu wraps it round to 0
            ['RW 8 FLAT "x.bin" 4611686018427387904'], x_bin), "refuse", allow="dir"),
        case("NUL-inside-an-extent-name", flat_descriptor(
            ['RW 8 FLAT "x.bin" 0'], x_bin, text=nul_inside), "refuse", allow="dir"),
        case("NUL-before-the-extents", flat_descriptor(
            ['RW 8 FLAT "{canary}" 0'], text=nul_before_extents), "refuse", allow="both",
            qemu=False),
        case("descriptor-of-2-MiB", flat_descriptor(
            ['RW 8 FLAT "x.bin" 0'], x_bin, text=padded(2 * MiB)), "refuse",
            says="larger than", allow="dir"),
        case("control-characters-in-a-name", flat("\x1b[2J\x1b]0;pwned\x07.bin"), "refuse",
             allow="dir"),
        case("5000-character-name", flat("n" * 5000), "refuse", allow="dir"),
        attack("embedded-parent-hint-etc-passwd", vmdk_build(lambda p: vmdk_file(
            descriptor=descriptor_text("monolithicSparse", ['RW 4096 SPARSE "v.vmdk"'],
                                       ['parentFileNameHint="/etc/passwd"']))), OUTSIDE,
               info="read"),
        case("sparse-extent-that-is-a-descriptor", flat_descriptor(
            ['RW 8 SPARSE "inner.vmdk"'], create_type="twoGbMaxExtentSparse",
            prepare=lambda p: (p.img / "inner.vmdk").write_text(descriptor_text(
                "monolithicFlat", ['RW 8 FLAT "../secret/canary.bin" 0']))), "refuse",
             allow="both", qemu=False),
    ]


def vhdx_log() -> list[Case]:
    """VHDX header and log attacks: entries claiming the file grows to
    2^64 bytes, writes over the headers, region tables and the log itself,
    thousands of entries and descriptors, sequence numbers that are zero,
    repeat, skip or wrap, tails and lengths outside the log, logs outside
    the file or over instar's limits."""
    L = vhdx_layout

    def entry(sequence: int = 1, position: int = 0, **fields: object) -> Callable[
            [Vhdx], list[tuple[int, bytes]]]:
        def make(image: Vhdx) -> list[tuple[int, bytes]]:
            values: dict[str, object] = {"flushed": image.free, "last": image.free}
            values.update(fields)
            return [(position, log_entry(sequence, LOG_GUID, **values))]  # type: ignore[arg-type]

        return make

    def bat_page(image: Vhdx, first: int) -> bytes:
        page = bytearray(4096)
        for index, value in image.bat.items():
            if index < 512:
                struct.pack_into("<Q", page, 8 * index, value)
        struct.pack_into("<Q", page, 0, first)
        return bytes(page)

    def remap_block_0(offset: int, last: int) -> Callable[[Vhdx], list[tuple[int, bytes]]]:
        def make(image: Vhdx) -> list[tuple[int, bytes]]:
            page = bat_page(image, offset | L.PAYLOAD_FULLY_PRESENT)
            return [(0, log_entry(1, LOG_GUID, flushed=image.free, last=last,
                                  data=[(image.bat_offset, page)]))]

        return make

    def header_naming_other_log(image: Vhdx) -> list[tuple[int, bytes]]:
        other = L.Header(9, b"\x11" * 16, b"\x22" * 16, b"\x55" * 16, 0, 1, MiB, MiB).encode()
        return [(0, log_entry(1, LOG_GUID, flushed=image.free, last=image.free,
                              data=[(L.HEADER_OFFSETS[0], other)]))]

    def regions_into_metadata(image: Vhdx) -> list[tuple[int, bytes]]:
        # The rest of the 64 KiB table is zeros, in the file as in the buffer: the CRC holds.
        table = L.encode_region_table([
            L.RegionEntry(L.BAT_REGION, image.metadata_offset, MiB),
            L.RegionEntry(L.METADATA_REGION, image.metadata_offset, MiB)])[:4096]
        return [(0, log_entry(1, LOG_GUID, flushed=image.free, last=image.free,
                              data=[(L.REGION_TABLE_OFFSETS[0], table)]))]

    def over_the_log(image: Vhdx) -> list[tuple[int, bytes]]:
        return [(0, log_entry(1, LOG_GUID, flushed=image.free, last=image.free,
                              data=[(image.log_offset, b"\xee" * 4096)]))]

    def many(count: int, per_entry: int = 1) -> Callable[[Vhdx], list[tuple[int, bytes]]]:
        def make(image: Vhdx) -> list[tuple[int, bytes]]:
            out, position = [], 0
            for sequence in range(1, count + 1):
                made = log_entry(sequence, LOG_GUID, flushed=image.free, last=image.free,
                                 zeros=[(block_0(image), 4096)] * per_entry)
                out.append((position, made))
                position += len(made)
            return out

        return make

    def wrapping(image: Vhdx) -> list[tuple[int, bytes]]:
        made = log_entry(1, LOG_GUID, tail=image.log_length - 4096, flushed=image.free,
                         last=image.free, data=[(block_0(image), b"\x66" * 4096)])
        return [(image.log_length - 4096, made[:4096]), (0, made[4096:])]

    def sequences(*numbers: int, tail: int = 0) -> Callable[[Vhdx], list[tuple[int, bytes]]]:
        def make(image: Vhdx) -> list[tuple[int, bytes]]:
            return [(4096 * i, log_entry(n, LOG_GUID, tail=tail, flushed=image.free,
                                         last=image.free, zeros=[(block_0(image), 4096)]))
                    for i, n in enumerate(numbers)]

        return make

    top = (1 << 64) - 1
    return [
        case("log-grows-the-file-and-moves-block-0-to-2^64", with_log(
            remap_block_0(L.OFFSET_MASK, top)), "refuse"),
        case("log-says-the-file-was-2^64", with_log(entry(flushed=top, last=top)), "refuse"),
        case("log-zeroes-2^63-bytes", with_log(entry(zeros=[(0, 1 << 63)])), "refuse"),
        case("log-overwrites-header-1", with_log(header_naming_other_log), "either",
             qemu=False),
        case("log-overwrites-the-region-table", with_log(regions_into_metadata), "either",
             qemu=False),
        case("4096-log-entries", with_log(many(4096), at_end=True, log_length=16 * MiB),
             "either", qemu=False),
        case("log-entry-of-70000-descriptors", with_log(many(1, 70000), at_end=True,
                                                        log_length=4 * MiB), "refuse"),
        case("log-sequence-0", with_log(sequences(0)), "either", qemu=False),
        case("log-sequence-wraps-2^64", with_log(sequences(top, 0)), "either", qemu=False),
        case("log-entry-wrapping-the-circular-log", with_log(wrapping), "either", qemu=False),
        case("log-of-4-GiB-past-EOF", with_log(entry(), log_length=4 * GiB - MiB), "refuse"),
        case("log-in-the-header-section", with_log(log_offset=0), "refuse"),
        case("log-of-64-MiB", with_log(entry(), at_end=True, log_length=64 * MiB), "refuse"),
    ]


def _with_length(entry: bytes, length: int) -> bytes:
    """An entry whose header claims ``length`` bytes (CRC recomputed over what it has)."""
    data = bytearray(entry)
    struct.pack_into("<I", data, 8, length)
    struct.pack_into("<I", data, 4, 0)
    struct.pack_into("<I", data, 4, vhdx_layout.crc32c(data))
    return bytes(data)


def polyglots() -> list[Case]:
    """Files that are two formats at once: a qcow2 that is also an MBR disk,
    an ISO 9660 volume, a GPT disk or a VHD (a footer at its end); a raw or
    VHD disk holding a qcow2 header that names a host file (the image a
    guest writes); a VMDK descriptor with a VHD footer."""
    mbr = struct.pack("<B3sB3sII", 0x80, b"\x00\x02\x00", 0x83, b"\xfe\xff\xff", 1,
                      2047) + bytes(48) + b"\x55\xaa"  # a partition table, at 446
    iso = b"\x01CD001\x01" + b"\x00" + b"LINUX".ljust(32) + b"INSTAR-POLYGLOT".ljust(32)
    gpt = b"EFI PART" + struct.pack("<IIII", 0x10000, 92, 0, 0)

    def at(offset: int, data: bytes) -> Callable[[Path, Place], None]:
        return lambda path, place: put(path, offset, data)

    def vhd_footer_appended(path: Path, place: Place) -> None:
        size = path.stat().st_size
        with path.open("ab") as handle:
            handle.write(vhd_footer(size, 2, 0xFFFFFFFFFFFFFFFF))

    def qcow2_header_naming(name: str) -> bytes:
        image = Qcow2(MiB)
        image.set_backing(name, "raw")
        return image.header_bytes()

    def raw_holding_qcow2(place: Place) -> str:
        (place.img / "disk.img").write_bytes(
            qcow2_header_naming("/etc/passwd").ljust(MiB, b"\0"))
        return "disk.img"

    def mbr_in_footer_copy(path: Path, place: Place) -> None:
        data = bytearray(path.read_bytes())
        data[510:512] = b"\x55\xaa"
        fix_vhd_checksum(data, 0, 512, 64)
        path.write_bytes(bytes(data))

    def descriptor_and_footer(place: Place) -> str:
        (place.img / "x.bin").write_bytes(pattern(4096, seed=8))
        text = descriptor_text("monolithicFlat", ['RW 8 FLAT "x.bin" 0']).encode()
        (place.img / "v.vmdk").write_bytes(text + vhd_footer(len(text), 2,
                                                             0xFFFFFFFFFFFFFFFF))
        return "v.vmdk"

    return [
        case("qcow2-and-MBR", base("qcow2-v2", at(446, mbr)), "read"),
        case("qcow2-and-ISO-9660", base("qcow2", at(0x8000, iso)), "read"),
        case("qcow2-and-GPT", base("qcow2-v2", at(512, gpt)), "read"),
        case("qcow2-and-VHD-footer", base("qcow2", vhd_footer_appended), "read"),
        case("vmdk-and-MBR", then(vmdk_with(lambda v, p: None), at(446, mbr)), "read"),
        case("raw-holding-a-qcow2-header-read-as-raw", raw_holding_qcow2, "read", fmt="raw"),
        attack("raw-holding-a-qcow2-header-probed", raw_holding_qcow2, OUTSIDE, info="read",
               probes="qcow2"),
        attack("vhd-fixed-holding-a-qcow2-header", vhd_fixed(
            MiB, qcow2_header_naming("../secret/canary.bin")), OUTSIDE, info="read",
               probes="qcow2"),
        case("vmdk-descriptor-and-VHD-footer", descriptor_and_footer, "either", allow="dir"),
    ]


def truncated_headers() -> list[Case]:
    """Every format's header cut short: inside the magic, inside fixed
    fields, at the end of the header, before the tables it points to."""

    cuts = [
        ("qcow2", [4, 71, 104, 3 * 65536]),
        ("qcow2-v2", [72]),
        ("vmdk", [511, 11264]),
        ("vhd", [511, 1000]),
        ("vhdx", [8, 64 * KiB + 100, 192 * KiB + 10, MiB]),
        ("bochs", [100, 511, 700]),
        ("cloop", [60, 130, 140]),
        ("qed", [4, 40, 64, 64 * KiB + 100, 5 * 64 * KiB + 10]),
        ("qcow", [4, 20, 47, 56, 4096 + 100]),
    ]
    cases = [case(f"{key}-at-{size}", truncated(key, size), "either", probes="any")
             for key, sizes in cuts for size in sizes]
    cases.append(case("vmdk-stream-without-its-footer", then(
        vmdk_build(lambda p: vmdk_file(compressed=True, footer=True)),
        lambda path, place: cut(path, path.stat().st_size - 1536)), "refuse"))
    # A dmg's header is its trailer, at the end: cut inside it, before it, to nothing.
    for left in (100, 300, 512, 700):
        cases.append(case(f"dmg-trailer-cut-{left}-bytes-in", truncated(
            "dmg", lambda path, left=left: path.read_bytes().rfind(b"koly") + left),
                          "either", probes="any"))
    cases.append(case("dmg-cut-to-511-bytes", truncated("dmg", 511), "refuse"))
    return cases


def cves() -> list[Case]:
    """The six CVEs, restated for instar: CVE-2024-32498 (a qcow2 data file
    or VMDK extent naming another file), CVE-2015-5163 (a backing file naming
    a host file), CVE-2022-47951 (a flat extent reading another upload in the
    same directory), CVE-2015-5162 (huge snapshot and refcount tables),
    CVE-2014-0223 (qcow version 1 with a huge L2 size) and CVE-2024-4467
    (qemu-img info on a qcow2 whose data file is a json: name)."""

    def neighbour(create_type: str) -> Build:
        def build(place: Place) -> str:
            (place.img / "upload-2.raw").write_bytes(canary_bytes(NEIGHBOUR_TOKEN))
            text = descriptor_text(create_type, ['RW 128 FLAT "upload-2.raw" 0'])
            (place.img / "upload-1.vmdk").write_text(text)
            return "upload-1.vmdk"

        return build

    def snapshots(count: int, extra: int = 0, l1_size: int = 0, id_size: int = 1,
                  name_size: int = 1) -> Build:
        def change(image: Qcow2, place: Place) -> None:
            entry = struct.pack(">QIHHIIQII", 0, l1_size, id_size, name_size, 0, 0, 0, 0, extra)
            entry += bytes(min(extra, 1024)) + b"1" * id_size + b"s" * name_size
            entry += bytes(-len(entry) % 8)
            table = image.alloc(entry * count)
            image.fields.update(nb_snapshots=count, snapshots_offset=table)

        return qcow2_with(change)

    def qcow1(place: Place) -> str:
        header = struct.pack(">4sIQIIQBBHIQ", QCOW2_MAGIC, 1, 0, 0, 0, MiB, 16, 30, 0, 0, 4096)
        (place.img / "v.qcow").write_bytes(header.ljust(8192, b"\0"))
        return "v.qcow"

    json_self = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"v.qcow2"}}'
    json_canary = 'json:{"driver":"raw","file":{"driver":"file","filename":"{c}"}}'
    return [
        attack("CVE-2024-32498-data-file-dot-dot", qcow2_data_file(
            "../secret/canary.bin", raw=True), OUTSIDE),
        attack("CVE-2024-32498-data-file-absolute", qcow2_data_file(canary_path, raw=True),
               OUTSIDE),
        attack("CVE-2024-32498-vmdk-extent-absolute", flat_descriptor(
            ['RW 128 FLAT "{canary}" 0']), OUTSIDE),
        case("CVE-2024-32498-sparse-vmdk-embedded-extent-line", vmdk_build(
            lambda p: vmdk_file(descriptor=descriptor_text(
                "monolithicSparse", [f'RW 4096 FLAT "{p.canary}" 0']))), "either",
             allow="both", qemu=False),
        attack("CVE-2015-5163-backing-etc-passwd", qcow2_backed("/etc/passwd", "raw"),
               OUTSIDE, info="read"),
        attack("CVE-2015-5163-backing-canary", qcow2_backed("../secret/canary.bin", "raw"),
               OUTSIDE, info="read"),
        case("CVE-2022-47951-flat-extent-next-upload", neighbour("monolithicFlat"), "read",
             allow="both", without_allow="refuse", says=OUTSIDE),
        case("CVE-2022-47951-2GbMaxExtentFlat-next-upload", neighbour("twoGbMaxExtentFlat"),
             "read", allow="both", without_allow="refuse", says=OUTSIDE),
        case("CVE-2015-5162-65536-snapshots", snapshots(65536), "either",
             qemu=False),  # qemu-img info takes 9 s over it
        case("CVE-2015-5162-snapshot-of-huge-sizes", snapshots(
            1, extra=1024, l1_size=0x7FFFFFFF, id_size=65535, name_size=65535), "either"),
        case("CVE-2015-5162-refcount-table-of-4-GiB", qcow2_fields(
            refcount_table_clusters=65536), "refuse"),
        case("CVE-2014-0223-qcow1-L2-of-2^30", qcow1, "refuse",
             says="L2 table size must be between 512 and 64k"),
        case("CVE-2014-0223-qcow1-named-qcow", qcow1, "refuse",
             says="L2 table size must be between 512 and 64k", fmt="qcow"),
        attack("CVE-2024-4467-data-file-json-qcow2", qcow2_data_file(json_self)),
        attack("CVE-2024-4467-data-file-json-raw-canary", qcow2_data_file(
            lambda p: json_canary.replace("{c}", str(p.canary)))),
    ]


def plists() -> list[Case]:
    """The XML property list of a dmg, which holds its chunk table: nested
    entities (a billion laughs), external entities naming /etc/passwd and
    the canary, entity references inside the table, a plist of 16 MiB and one
    past it, a hundred thousand elements, an element never closed, a NUL in
    the middle. instar, like qemu, never parses it as XML: it looks for
    <data> elements only."""
    laughs = b'<!DOCTYPE plist [<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)) + b"]>\n<string>&lol9;</string>\n"

    def external(place: Place) -> bytes:
        return (b'<!DOCTYPE plist [<!ENTITY passwd SYSTEM "file:///etc/passwd">'
                b'<!ENTITY canary SYSTEM "' + str(place.canary).encode() + b'">]>\n'
                b"<string>&passwd;&canary;</string>\n")

    def with_external(place: Place) -> bytes:
        return Dmg(dmg_tests.every_kind("zlib"), plist_before=external(place)).build()

    def entity_in_data(place: Place) -> bytes:
        image = bytearray(Dmg(dmg_tests.every_kind("zlib")).build())
        at = image.index(b"<data>") + 6
        image[at : at + 8] = b"&canary;"
        return bytes(image)

    def many_elements() -> Dmg:
        return Dmg(dmg_tests.every_kind("zlib"), plist_before=b"<data>AAAA</data>" * 100000)

    def cut_at(text: bytes, size: Callable[[bytes], int]) -> Callable[[Place], bytes]:
        def make(place: Place) -> bytes:
            image = Dmg(dmg_tests.every_kind("zlib")).build()
            at = size(image)
            return image[:at] + text + image[at + len(text):]

        return make

    return [
        case("dmg-billion-laughs", dmg_plist(laughs), "read"),
        case("dmg-external-entities", image_file("v.dmg", with_external), "read"),
        case("dmg-entity-reference-in-the-table", image_file("v.dmg", entity_in_data), "either"),
        case("dmg-plist-of-16-MiB", dmg_plist(pad=16 * MiB - 20000), "read"),
        case("dmg-plist-past-16-MiB", dmg_plist(pad=16 * MiB), "refuse"),
        case("dmg-100000-data-elements", dmg(many_elements), "read"),
        case("dmg-data-never-closed", image_file("v.dmg", cut_at(
            b"</dat>!", lambda image: image.rfind(b"</data>"))), "refuse"),
        case("dmg-NUL-inside-the-table", image_file("v.dmg", cut_at(
            b"\0", lambda image: image.index(b"<data>") + 10)), "refuse"),
    ]


def vdi() -> list[Case]:
    """VDI block maps and headers built to attack the reader: entries past the
    end of the file and at the top of the range, two entries naming one block,
    data blocks over the header or the map, a 2 GiB map of zeros behind qemu's
    largest disk, 1 TiB of alternating free and zero entries, sizes and block
    counts past qemu's limits, headers and maps cut short. Where the map is
    wrong, instar refuses when it reads (compare: qemu's "Sector allocation
    test failed"), and info still describes the image, as qemu-img info does."""
    def entry(index: int, value: int | Callable[[Vdi], int]) -> Build:
        return vdi_with(lambda v: v.bmap.__setitem__(
            index, value(v) if callable(value) else value))

    def fields(**values: int) -> Build:
        return vdi_with(lambda v: v.fields.update(values))

    def largest_from_one_block(image: Vdi) -> None:
        image.size = VDI_MAX_BLOCKS * MiB
        image.table = b""  # a hole: 2^29 entries of 0, every one naming block 0

    def over_the_header(image: Vdi) -> None:
        image.fields["offset_data"] = 0  # block 0 is the header and the map
        image.bmap[0] = 0
        image.length = 4 * MiB

    def alternating(image: Vdi) -> None:
        image.size = TiB
        image.table = struct.pack("<II", VDI_FREE, VDI_ZERO) * (image.entries // 2)

    return [
        case("vdi-entry-past-EOF", entry(1, 0x00FFFFFF), "refuse", info="read"),
        case("vdi-entry-at-the-top-of-the-range", entry(1, 0xFFFFFFFD), "refuse",
             info="read"),
        case("vdi-entry-one-past-the-last-block", entry(1, 3), "refuse",
             info="read"),
        case("vdi-two-entries-one-block", entry(3, 0), "refuse", info="read"),
        case("vdi-block-over-the-header", vdi_with(over_the_header, blocks=()), "refuse",
             info="read"),
        case("vdi-block-over-the-block-map", fields(offset_data=512), "refuse",
             info="read"),
        case("vdi-512-TiB-from-one-block", vdi_with(largest_from_one_block, blocks=(0,)),
             "refuse", info="read", qemu=False),  # qemu reads the 2 GiB map
        case("vdi-1-TiB-of-free-and-zero-entries", vdi_with(alternating, blocks=()), "read",
             qemu=False),  # qemu takes minutes over its 1M answers
        case("vdi-block-map-past-EOF", fields(offset_bmap=0xFFFFFE00), "refuse",
             says="extends beyond the end of the file"),
        case("vdi-2-GiB-map-not-in-the-file", fields(blocks=VDI_MAX_BLOCKS,
                                                     disk_size=VDI_MAX_BLOCKS * MiB),
             "refuse", says="extends beyond the end of the file"),
        case("vdi-disk-size-2^64-512", fields(disk_size=(1 << 64) - 512), "refuse",
             says="Unsupported VDI image size"),
        case("vdi-disk-size-2^63", fields(disk_size=1 << 63), "refuse"),
        case("vdi-2^32-1-blocks", fields(blocks=0xFFFFFFFF), "refuse", says="too many blocks"),
        case("vdi-block-size-0", fields(block_size=0), "refuse"),
        case("vdi-differencing", vdi_with(lambda v: setattr(v, "image_type", 4)), "refuse"),
        case("vdi-header-at-70", truncated("vdi", 70), "refuse"),
        case("vdi-header-at-300", truncated("vdi", 300), "refuse"),
        case("vdi-cut-in-the-block-map", truncated("vdi", 514), "refuse"),
        case("vdi-cut-in-the-last-block", truncated("vdi", lambda p: p.stat().st_size - 4096),
             "refuse", info="read"),
        case("vdi-static-cut-in-a-block", truncated(
            "vdi-static", lambda p: p.stat().st_size - MiB - 4096), "refuse",
             info="read"),
    ]


# --- Parallels, from the specification (qemu's docs/interop/parallels.rst) ----------------------

PARALLELS_HEADER = struct.Struct("<16sIIIIIQIIIQ")


@dataclass
class Parallels:
    """A Parallels image written from the specification: the 64-byte header,
    the catalog (little-endian 32-bit entries: clusters in version 2, sectors
    in version 1), clusters from ``data_off``, an optional format extension."""

    size: int  # bytes
    cluster: int = 64 * KiB
    version_1: bool = False
    entries: int | None = None
    catalog: dict[int, int] = field(default_factory=dict)
    clusters: list[bytes] = field(default_factory=list)
    fields: dict[str, int] = field(default_factory=dict)
    extension: bytes | None = None

    @property
    def catalog_entries(self) -> int:
        return -(-self.size // self.cluster) if self.entries is None else self.entries

    @property
    def data_off(self) -> int:
        """The first cluster, in bytes: after the catalog (on disk at most 64 MiB of it)."""
        stored = 64 + 4 * min(self.catalog_entries, 16 * MiB)
        return -(-stored // self.cluster) * self.cluster

    def unit(self) -> int:
        return 512 if self.version_1 else self.cluster

    def store(self, index: int, data: bytes) -> int:
        """Cluster ``index`` holds ``data``; its catalog entry."""
        host = self.data_off + len(self.clusters) * self.cluster
        self.clusters.append(data.ljust(self.cluster, b"\0"))
        self.catalog[index] = host // self.unit()
        return self.catalog[index]

    def write(self, path: Path) -> None:
        magic = b"WithoutFreeSpace" if self.version_1 else b"WithouFreSpacExt"
        end = self.data_off + len(self.clusters) * self.cluster
        values = {"tracks": self.cluster // 512, "entries": self.catalog_entries,
                  "sectors": -(-self.size // 512), "data_off": self.data_off // 512,
                  "ext_off": end // 512 if self.extension else 0}
        values.update(self.fields)
        header = PARALLELS_HEADER.pack(magic, 2, 16, 1, values["tracks"], values["entries"],
                                       values["sectors"], 0, values["data_off"], 0,
                                       values["ext_off"])
        table = array("I", bytes(4 * min(self.catalog_entries, 16 * MiB)))
        for index, entry in self.catalog.items():
            table[index] = entry
        if sys.byteorder == "big":
            table.byteswap()
        pieces = [(0, header + table.tobytes()), (self.data_off, b"".join(self.clusters))]
        if self.extension:
            pieces.append((end, self.extension))
        write_at(path, pieces)


def parallels_build(make: Callable[[Place], Parallels], name: str = "v.parallels") -> Build:
    def build(place: Place) -> str:
        make(place).write(place.img / name)
        return name

    return build


def parallels_file(size: int = MiB, clusters: tuple[int, ...] = (0, 3), **options: object
                   ) -> Parallels:
    image = Parallels(size, **options)  # type: ignore[arg-type]
    for index in clusters:
        image.store(index, pattern(image.cluster, seed=20 + index))
    return image


def parallels_with(change: Callable[[Parallels], None], **options: object) -> Build:
    def make(place: Place) -> Parallels:
        image = parallels_file(**options)  # type: ignore[arg-type]
        change(image)
        return image

    return parallels_build(make)


def parallels() -> list[Case]:
    """Parallels images: catalog entries past the end of the file or at the
    top of their range, entries aliasing one cluster (2 TiB from one), huge
    catalogs (qemu's limit, instar's, a catalog longer than its file, one of
    2 GiB of holes that check walks), huge
    and wrapping sizes (qemu's 32-bit catalog index past 2^32 clusters),
    format extensions that run past their cluster or whose cluster is 2 GiB,
    and headers cut short."""

    def set_entry(index: int, value: int | Callable[[Parallels], int]) -> Callable[
            [Parallels], None]:
        return lambda image: image.catalog.__setitem__(
            index, value(image) if callable(value) else value)

    def terabytes(image: Parallels) -> None:
        image.catalog = dict.fromkeys(range(image.catalog_entries), image.catalog[0])

    def extension(features: list[bytes], cluster: int) -> bytes:
        return parallels_tests.extension_cluster(features, cluster)

    def empty_bitmaps(count: int) -> Callable[[Parallels], None]:
        """``count`` bitmaps of a disk of size 0 (no table): their data runs
        past the cluster long before qemu's count of what is left runs out."""
        features = [parallels_tests.bitmap_feature(bytes([n]) * 16, 0, 1, [])
                    for n in range(count)]

        def change(image: Parallels) -> None:
            # No end marker: the features fill the cluster, and run past it.
            image.extension = parallels_tests.extension_cluster(features, image.cluster, b"")

        return change

    def truncated_at(size: int) -> Build:
        return then(parallels_build(lambda p: parallels_file()), lambda path, place: cut(
            path, size))

    def catalog_in_holes(path: Path, place: Place) -> None:
        """2 GiB of catalog, holes but for its first entries and one near its
        end (a cluster past the end of the file, for check to report)."""
        cut(path, 2 * GiB)
        with path.open("r+b") as handle:
            handle.seek(2 * GiB - 4096)
            handle.write(struct.pack("<I", 0x00FFFFFF))

    # Refused when the data is mapped, and compare says only qemu's words then
    # ("Sector allocation test failed"): what each says is the conformance table's.
    return [
        case("parallels-entry-past-EOF", parallels_with(set_entry(0, 0x00FFFFFF)), "refuse",
             info="read"),
        case("parallels-entry-at-the-top-of-the-range", parallels_with(
            set_entry(0, 0xFFFFFFFF)), "refuse", info="read"),
        case("parallels-v1-entry-at-the-top-of-the-range", parallels_with(
            set_entry(0, 0xFFFFFFFF), version_1=True), "refuse", info="read"),
        case("parallels-entry-is-the-catalog", parallels_with(
            set_entry(0, 1), version_1=True, entries=200), "refuse",
             info="read"),
        case("parallels-two-entries-one-cluster", parallels_with(
            set_entry(5, lambda image: image.catalog[0])), "refuse", info="read"),
        case("parallels-2-TiB-from-one-cluster", parallels_with(
            terabytes, size=2 * TiB, cluster=MiB, clusters=(0,)), "refuse",
             info="read"),
        case("parallels-catalog-too-large", parallels_with(
            lambda image: image.fields.update(entries=0x20000000)), "refuse"),
        case("parallels-catalog-of-2^29-1-entries-in-4-KiB", parallels_with(
            lambda image: image.fields.update(entries=0x1FFFFFFF), clusters=()), "either",
             qemu=False),  # qemu-img fails it with EIO: 4 * entries overflows an int
        case("parallels-catalog-of-2-GiB-of-holes", then(parallels_with(
            lambda image: image.fields.update(entries=0x1FFFFFFF)), catalog_in_holes),
             "either", qemu=False),  # qemu-img fails it with EIO, as the one of 4 KiB
        case("parallels-catalog-of-32-MiB-of-zeros", parallels_build(lambda p: Parallels(
            32 * GiB, cluster=4 * KiB)), "either"),
        case("parallels-catalog-over-32-MiB", parallels_build(lambda p: Parallels(
            32 * GiB + 4 * KiB, cluster=4 * KiB)), "refuse", says="over instar's limit"),
        case("parallels-size-2^63-512", parallels_with(
            lambda image: image.fields.update(sectors=(1 << 54) - 1)), "refuse"),
        case("parallels-size-2^64-512", parallels_with(
            lambda image: image.fields.update(sectors=(1 << 64) - 1)), "refuse"),
        case("parallels-v1-size-of-64-bits", parallels_with(
            lambda image: image.fields.update(sectors=(1 << 63) | 2048), version_1=True),
             "either"),
        case("parallels-index-wraps-past-2^32-clusters", parallels_with(
            lambda image: image.fields.update(sectors=(1 << 32) + 64), cluster=512,
            clusters=(0,)), "refuse", info="read", qemu=False),
        case("parallels-index-wraps-over-nothing", parallels_with(
            lambda image: image.fields.update(sectors=(1 << 32) + 64), cluster=512,
            clusters=()), "either", qemu=False),
        case("parallels-extension-cluster-of-2-GiB", parallels_with(
            lambda image: image.fields.update(tracks=0x7FFFFFFF // 513, ext_off=8),
            clusters=()), "refuse", qemu=False),
        case("parallels-extension-features-past-the-cluster", parallels_with(
            empty_bitmaps(20), size=0, cluster=512, clusters=()), "refuse",
             says="past its cluster", qemu=False),  # qemu 7.2 reads past its buffer
        case("parallels-bitmap-of-512-byte-granules", parallels_with(
            lambda image: setattr(image, "extension", extension(
                [parallels_tests.bitmap_feature(b"\x01" * 16, 2048, 1, [1])], image.cluster)),
            ), "either"),
        *(case(f"parallels-cut-at-{size}", truncated_at(size), "either", probes="any")
          for size in (8, 17, 20, 40, 63, 64, 100, 64 * KiB + 100)),
    ]


FAMILIES = [huge_tables, beyond_eof, aliasing, bad_geometry, huge_virtual_sizes,
            compression_bombs, chains, vmdk_descriptor, vhdx_log, polyglots,
            truncated_headers, cves, vdi, parallels, plists]
CASES = [dataclasses.replace(c, family=family.__name__) for family in FAMILIES
         for c in family()]
