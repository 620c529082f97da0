"""``instar commit`` into VPC (VHD) and VHDX bases, against qemu-img 7.2.

A qcow2 overlay over a base of each format and subformat (blocks the base
holds and blocks it does not, zeros written in the overlay with ``write -z``,
a range across a block edge) is committed by qemu-img and by instar, on
copies: the same status and output, the bases read alike (``qemu-img
compare``), the same file size and block-status map (host offsets aside:
qemu's commit job finishes its zero writes before its copies, so it places
new blocks in another order), ``qemu-img check`` clean for VHDX, and
libvhdi and dissect.hypervisor read what qemu reads. Stopped after every
change, the base reads block by block as before or as committed. Hostile
bases are refused in one line with the files unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Result,
    assert_units_old_or_new,
    qemu_img_ok,
    qemu_io,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
    stopped_runs,
)
from instar.commit import commit
from instar.formats.vhdx import guest_writes as vhdx_writes
from instar.formats.vhdx import layout
from instar.formats.vpc import guest_writes as vpc_writes
from instar.worker import SandboxSettings
from test_vhdx_reader import make_child, make_log_entry

pytestmark = pytest.mark.usefixtures("qemu_img")

MiB = 1 << 20

# name: (format, creation options, unit of the old-or-new check after a crash)
BASES = {
    "vpc-dynamic": ("vpc", "subformat=dynamic", 2 * MiB),
    "vpc-fixed": ("vpc", "subformat=fixed", 64 << 10),
    "vhdx-dynamic": ("vhdx", "subformat=dynamic,block_size=1M", MiB),
    "vhdx-dynamic-unmapped": ("vhdx", "subformat=dynamic,block_size=1M,block_state_zero=off",
                              MiB),
    "vhdx-fixed": ("vhdx", "subformat=fixed,block_size=1M", MiB),
    "vhdx-fixed-allocated": ("vhdx", "subformat=fixed,block_size=1M,block_state_zero=off", MiB),
}
BASE_WRITES = ("write -P 1 0 1M", "write -P 2 4M 512k")
# across the 2 MiB edge (a VPC block's, and a VHDX block's), zeros over a block
# the base holds and over one it does not, a small write in the last block
TOP_WRITES = ("write -P 3 1536k 1M", "write -z 4M 64k", "write -z 6M 64k",
              "write -P 4 7800k 3k")


def _chain(directory: Path, kind: str, size: str = "8M",
           top_writes: tuple[str, ...] = TOP_WRITES,
           base_writes: tuple[str, ...] = BASE_WRITES) -> Path:
    """base.FMT (of ``kind``) with ``BASE_WRITES``, top.qcow2 over it; the base's path."""
    fmt, options, _ = BASES[kind]
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f"base.{fmt}"
    qemu_img_ok("create", "-q", "-f", fmt, "-o", options, base.name, size, cwd=directory)
    for command in base_writes:
        qemu_io(base, command, fmt)
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", base.name, "-F", fmt, "top.qcow2",
                cwd=directory)
    for command in top_writes:
        qemu_io(directory / "top.qcow2", command, "qcow2")
    return base


def _map(image: Path, fmt: str) -> list[dict[str, Any]]:
    """qemu-img map's runs without host offsets, neighbours alike merged."""
    runs: list[dict[str, Any]] = []
    for run in json.loads(qemu_img_ok("map", "--output=json", "-f", fmt, str(image))):
        run.pop("offset", None)
        kind = {k: v for k, v in run.items() if k not in ("start", "length")}
        if runs and {k: v for k, v in runs[-1].items() if k not in ("start", "length")} == kind:
            runs[-1]["length"] += run["length"]
        else:
            runs.append(run)
    return runs


def _same(qemu: Result, ours: Result) -> None:
    assert (ours.rc, ours.stdout) == (qemu.rc, qemu.stdout), (qemu.stderr, ours.stderr)
    assert ours.normalised_stderr() == qemu.normalised_stderr()


def _independent_reads(image: Path, fmt: str, expected: bytes) -> None:
    """libvhdi and dissect.hypervisor read ``expected`` from ``image``."""
    import pyvhdi
    from dissect.hypervisor.disk import vhd, vhdx

    handle = pyvhdi.file()
    handle.open(str(image))
    try:
        assert handle.read_buffer_at_offset(len(expected), 0) == expected
    finally:
        handle.close()
    with image.open("rb") as stream:
        disk = vhdx.VHDX(stream) if fmt == "vhdx" else vhd.VHD(stream)
        assert disk.read(len(expected)) == expected


def _in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks written in 512 KiB parts (the writers' path for blocks over 2 MiB)."""
    monkeypatch.setattr(vpc_writes, "MAX_UNIT", 512 << 10)
    monkeypatch.setattr(vhdx_writes, "MAX_UNIT", 512 << 10)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("kind,args,parts", [(kind, (), False) for kind in BASES]
                         + [("vpc-dynamic", ("-d",), False), ("vhdx-dynamic", ("-d",), False),
                            ("vpc-dynamic", (), True), ("vhdx-dynamic", (), True)])
def test_parity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                args: tuple[str, ...], parts: bool) -> None:
    """``parts``: blocks written in 512 KiB parts, as blocks over 2 MiB are."""
    fmt = BASES[kind][0]
    if parts:
        _in_parts(monkeypatch)
    writes = TOP_WRITES + (("write -P 5 8M 1k",) if fmt == "vpc" else ())  # the CHS tail
    qbase = _chain(tmp_path / "q", kind, top_writes=writes)
    ibase = _chain(tmp_path / "i", kind, top_writes=writes)  # a copy would fill the holes
    qemu = run_qemu_img("commit", *args, "top.qcow2", cwd=tmp_path / "q")
    ours = run_instar("commit", *args, "top.qcow2", cwd=tmp_path / "i")
    _same(qemu, ours)
    assert qemu.rc == 0
    for name, image_fmt in ((qbase.name, fmt), ("top.qcow2", "qcow2")):
        compared = run_qemu_img("compare", "-f", image_fmt, "-F", image_fmt,
                                str(tmp_path / "q" / name), str(tmp_path / "i" / name))
        assert compared.rc == 0, (name, compared.stdout, compared.stderr)
    assert ibase.stat().st_size == qbase.stat().st_size
    assert _map(ibase, fmt) == _map(qbase, fmt)
    if fmt == "vhdx":
        checked = run_qemu_img("check", "-f", fmt, str(ibase))
        assert checked.rc == 0 and "No errors were found" in checked.stdout, checked.stdout
    _independent_reads(ibase, fmt, qemu_read_raw(ibase, tmp_path, fmt))


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("kind", ["vpc-dynamic", "vhdx-dynamic"])
def test_empty_top_leaves_the_base(tmp_path: Path, kind: str) -> None:
    """Nothing to commit: qemu writes nothing into the base (no VHDX header
    update either), and neither does instar."""
    base = _chain(tmp_path, kind, top_writes=())
    before = base.read_bytes()
    result = run_instar("commit", "top.qcow2", cwd=tmp_path)
    assert result.rc == 0, result.stderr
    assert base.read_bytes() == before


def _vhdx_headers(image: Path) -> list[layout.Header]:
    data = image.read_bytes()
    headers = [layout.decode_header(data[at : at + layout.HEADER_SIZE])
               for at in layout.HEADER_OFFSETS]
    assert headers[0] is not None and headers[1] is not None
    return [headers[0], headers[1]]


@pytest.mark.usefixtures("allow_own_directories")
def test_vhdx_headers_renewed(tmp_path: Path) -> None:
    """Both headers valid, with higher sequence numbers, a new FileWriteGuid
    and DataWriteGuid, and no log."""
    base = _chain(tmp_path, "vhdx-dynamic")
    old = _vhdx_headers(base)
    assert run_instar("commit", "top.qcow2", cwd=tmp_path).rc == 0
    new = _vhdx_headers(base)
    top = max(h.sequence_number for h in old)
    assert sorted(h.sequence_number for h in new) == [top + 1, top + 2]
    for header in new:
        assert header.file_write_guid not in {h.file_write_guid for h in old}
        assert header.data_write_guid not in {h.data_write_guid for h in old}
        assert header.log_guid == layout.ZERO_GUID


# --- crash safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,parts", [("vpc-dynamic", False), ("vpc-fixed", False),
                                        ("vhdx-dynamic", False), ("vhdx-fixed", False),
                                        ("vpc-dynamic", True)])
def test_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              kind: str, parts: bool) -> None:
    """commit stopped after k changes for every k until it finishes: the
    base reads, unit by unit, as before or as committed (VHDX: qemu-img check
    clean); the overlay reads as it did."""
    fmt, _, unit = BASES[kind]
    if parts:
        unit = 512 << 10
    origin = tmp_path / "origin"
    base = _chain(origin, kind, size="4M",
                  top_writes=("write -P 3 1536k 1M", "write -z 3M 64k"),
                  base_writes=("write -P 1 0 1M", "write -P 2 2560k 512k"))
    expected = qemu_read_raw(origin / "top.qcow2", tmp_path, "qcow2")
    old = qemu_read_raw(base, tmp_path, fmt)
    new = expected + old[len(expected):]
    work = tmp_path / "work"
    if parts:
        _in_parts(monkeypatch)
    for k, finished in stopped_runs(
            monkeypatch, origin, work,
            lambda: commit(str(work / "top.qcow2"), allow=(str(work),),
                           sandbox=SandboxSettings(mode="off"))):
        assert qemu_read_raw(work / "top.qcow2", tmp_path, "qcow2") == expected, k
        now = qemu_read_raw(work / base.name, tmp_path, fmt)
        assert len(now) == len(old), k
        assert_units_old_or_new(now, old, new, unit, k)
        if fmt == "vhdx":
            checked = run_qemu_img("check", "-f", fmt, str(work / base.name))
            assert checked.rc == 0, (k, checked.stdout, checked.stderr)
        if finished:
            assert now == new
    assert k >= 3


# --- hostile bases ----------------------------------------------------------------------------


def _patch(path: Path, offset: int, value: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(value)


def _vpc_bat(base: Path) -> int:
    data = base.read_bytes()
    header = int.from_bytes(data[16:24], "big")
    return int.from_bytes(data[header + 16 : header + 24], "big")


def _vhdx_bat(base: Path) -> int:
    regions = layout.decode_region_table(base.read_bytes()[192 << 10 : 256 << 10])
    return next(r.file_offset for r in regions if r.guid == layout.BAT_REGION)


def _refused(directory: Path, qemu_refuses: bool) -> str:
    """instar refuses the commit in one line, every file unchanged; qemu-img
    refuses too where ``qemu_refuses``. Returns instar's line."""
    files = {path: path.read_bytes() for path in directory.iterdir()}
    ours = run_instar("commit", "top.qcow2", cwd=directory)
    assert ours.rc == 1 and not ours.stdout, ours
    lines = ours.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instar: "), ours.stderr
    assert {path: path.read_bytes() for path in directory.iterdir()} == files
    if qemu_refuses:
        spare = directory.parent / "qemu"
        shutil.copytree(directory, spare)
        assert run_qemu_img("commit", "top.qcow2", cwd=spare).rc == 1
    return lines[0]


def _vpc_entry(base: Path, index: int) -> bytes:
    at = _vpc_bat(base) + 4 * index
    return base.read_bytes()[at : at + 4]


def _vhdx_entry(base: Path, index: int) -> bytes:
    at = _vhdx_bat(base) + 8 * index
    return base.read_bytes()[at : at + 8]


# (kind, the BAT entry patched, its new value from the base, whether qemu refuses too)
HOSTILE = {
    "vpc-past-eof": ("vpc-dynamic", 1, lambda b: (1 << 20).to_bytes(4, "big"), True),
    "vpc-into-bat": ("vpc-dynamic", 1, lambda b: (_vpc_bat(b) // 512).to_bytes(4, "big"),
                     False),
    "vpc-twice": ("vpc-dynamic", 1, lambda b: _vpc_entry(b, 0), False),
    "vhdx-past-eof": ("vhdx-dynamic", 1, lambda b: struct.pack("<Q", (1 << 40) | 6), True),
    "vhdx-into-metadata": ("vhdx-dynamic", 1, lambda b: struct.pack("<Q", (1 << 20) | 6),
                           True),
    "vhdx-twice": ("vhdx-dynamic", 1, lambda b: _vhdx_entry(b, 0), False),
}


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_base_refused(tmp_path: Path, name: str) -> None:
    kind, index, value, qemu_refuses = HOSTILE[name]
    fmt = BASES[kind][0]
    base = _chain(tmp_path / "chain", kind)
    _patch(base, (_vpc_bat if fmt == "vpc" else _vhdx_bat)(base)
           + index * (4 if fmt == "vpc" else 8), value(base))
    _refused(tmp_path / "chain", qemu_refuses)


@pytest.mark.usefixtures("allow_own_directories")
def test_vhdx_pending_log_refused(tmp_path: Path) -> None:
    """A base whose log has writes to replay: qemu cannot open it read-only
    (its backing file) and fails; instar refuses it, not supported yet."""
    directory = tmp_path / "chain"
    base = _chain(directory, "vhdx-dynamic")
    header = _vhdx_headers(base)[0]
    log_guid = os.urandom(16)
    size = base.stat().st_size
    _patch(base, header.log_offset, make_log_entry(1, log_guid, 0, size, [], [(2 * MiB, 4096)]))
    for at in layout.HEADER_OFFSETS:
        current = layout.decode_header(base.read_bytes()[at : at + layout.HEADER_SIZE])
        assert current is not None
        _patch(base, at, current._replace(log_guid=log_guid).encode())
    line = _refused(directory, qemu_refuses=True)
    assert "log to replay is not supported yet" in line


@pytest.mark.usefixtures("allow_own_directories")
def test_vhdx_differencing_refused(tmp_path: Path) -> None:
    directory = tmp_path / "chain"
    directory.mkdir()
    parent = directory / "parent.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(parent), "4M")
    make_child(directory / "child.vhdx", parent, {1: ("full", b"\x05" * MiB, None)},
               virtual_size=4 * MiB)
    # qemu opens no differencing VHDX: the overlay gets its backing file unsafely
    qemu_img_ok("create", "-q", "-f", "qcow2", "top.qcow2", "4M", cwd=directory)
    qemu_io(directory / "top.qcow2", "write -P 3 1536k 1M", "qcow2")
    qemu_img_ok("rebase", "-u", "-b", "child.vhdx", "-F", "vhdx", "top.qcow2", cwd=directory)
    line = _refused(directory, qemu_refuses=True)
    assert "differencing VHDX image is not supported yet" in line


@pytest.mark.usefixtures("allow_own_directories")
def test_vpc_spare_bat_entry_past_eof_refused(tmp_path: Path) -> None:
    """A BAT entry past the ones the disk needs names a block past the end of
    the file: qemu refuses the disk (its free offset counts every entry);
    instar reads the disk, and refuses to write into it."""
    from instar.formats.vpc.layout import checksum

    directory = tmp_path / "chain"
    base = _chain(directory, "vpc-dynamic")
    data = base.read_bytes()
    at = int.from_bytes(data[16:24], "big")  # the dynamic header
    header = bytearray(data[at : at + 1024])
    count = int.from_bytes(header[28:32], "big")
    header[28:32] = (count + 1).to_bytes(4, "big")
    header[36:40] = bytes(4)
    header[36:40] = checksum(bytes(header)).to_bytes(4, "big")
    _patch(base, at, bytes(header))
    _patch(base, _vpc_bat(base) + 4 * count, (1 << 20).to_bytes(4, "big"))
    assert run_qemu_img("info", "-f", "vpc", str(base)).rc == 1
    assert run_instar("info", "-f", "vpc", str(base)).rc == 0
    line = _refused(directory, qemu_refuses=True)
    assert "after the end of the file" in line
