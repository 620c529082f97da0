"""``instar commit`` into QED, qcow (version 1), VDI and parallels bases,
against ``qemu-img commit`` (7.2): a qcow2 overlay over a base of each
format (units the base holds and does not hold, zeros written in the top
with ``write -z``, whole and partial units, a range across unit edges),
committed by each program in a copy of the same directory: the same output
and exit status, the base and the overlay reading the same (``qemu-img
compare``), the same ``map`` of the base (host offsets aside) and a clean
``check``. Then a crash at every write, and hostile bases refused in one
line with the files unchanged."""

from __future__ import annotations

import json
import re
import shutil
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
from instar.worker import SandboxSettings

pytestmark = pytest.mark.usefixtures("qemu_img")

Base = tuple[str, str, str, tuple[str, ...]]  # (format, size, create options, qemu-io writes)


def _build(directory: Path, base: Base, top_size: str | None, *top_writes: str,
           top_cluster: str = "4k") -> None:
    """``base.FMT`` written with qemu-io, ``ov.qcow2`` over it written too."""
    fmt, size, options, writes = base
    directory.mkdir(parents=True, exist_ok=True)
    name = f"base.{fmt}"
    qemu_img_ok("create", "-q", "-f", fmt, *(("-o", options) if options else ()), name, size,
                cwd=directory)
    for write in writes:
        qemu_io(directory / name, write, fmt)
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size={top_cluster}", "-b", name,
                "-F", fmt, "ov.qcow2", *((top_size,) if top_size else ()), cwd=directory)
    for write in top_writes:
        qemu_io(directory / "ov.qcow2", write, "qcow2")


def _map(image: Path, fmt: str) -> list[dict[str, Any]]:
    """qemu-img map's runs without host offsets, neighbours alike merged."""
    runs: list[dict[str, Any]] = []
    for run in json.loads(qemu_img_ok("map", "--output=json", "-f", fmt, str(image))):
        run.pop("offset", None)
        if runs and all(runs[-1][k] == run[k] for k in run if k not in ("start", "length")):
            runs[-1]["length"] += run["length"]
        else:
            runs.append(run)
    return runs


def _info(image: Path, fmt: str) -> Any:
    info = json.loads(qemu_img_ok("info", "--output=json", "-f", fmt, str(image)))
    for key in ("filename", "actual-size", "dirty-flag", "full-backing-filename"):
        info.pop(key, None)
    return info


def _same(qemu: Result, ours: Result) -> None:
    assert ours.rc == qemu.rc, (qemu.stderr, ours.stderr)
    assert ours.stdout == qemu.stdout, (qemu.stdout, ours.stdout)
    assert ours.normalised_stderr() == qemu.normalised_stderr()


_FRAGMENTED = re.compile(r"[0-9.]+% fragmented|Image end offset: \d+")


def _parity(tmp_path: Path, base: Base, top_size: str | None, *top_writes: str,
            args: tuple[str, ...] = (), same_map: bool = True, top_cluster: str = "4k"
            ) -> Result:
    """Build, commit with each program, compare everything."""
    fmt = base[0]
    qdir, idir = tmp_path / "q", tmp_path / "i"
    _build(qdir, base, top_size, *top_writes, top_cluster=top_cluster)
    shutil.copytree(qdir, idir)
    qemu = run_qemu_img("commit", *args, "ov.qcow2", cwd=qdir)
    ours = run_instar("commit", *args, "ov.qcow2", cwd=idir)
    _same(qemu, ours)
    for name, kind in ((f"base.{fmt}", fmt), ("ov.qcow2", "qcow2")):
        result = run_qemu_img("compare", "-f", kind, "-F", kind, str(qdir / name),
                              str(idir / name))
        assert result.rc == 0, (name, result.stdout, result.stderr)
        assert _info(qdir / name, kind) == _info(idir / name, kind), name
    base_name = f"base.{fmt}"
    if same_map:
        assert _map(qdir / base_name, fmt) == _map(idir / base_name, fmt)
    # (qemu's job writes several chunks at once, so its clusters land in
    # another order, reusing freed ones: fragmentation and end offset differ)
    checks = [run_qemu_img("check", "-f", fmt, base_name, cwd=d) for d in (qdir, idir)]
    assert [(c.rc, _FRAGMENTED.sub("", c.stdout), c.stderr) for c in checks[1:]] == \
        [(c.rc, _FRAGMENTED.sub("", c.stdout), c.stderr) for c in checks[:1]]
    if fmt != "qcow":  # qemu has no check for qcow
        assert checks[1].rc == 0 and "No errors were found" in checks[1].stdout
    return ours


# Top writes for 4 KiB base clusters over a 1 MiB image.
SMALL_TOP = ("write -P 2 4k 8k", "write -z 64k 4k", "write -z 300k 8k", "write -P 3 900k 20k",
             "write -z 128k 4k", "write -P 0 400k 4k")
# Top writes for 64 KiB base clusters: zeros over a whole cluster, over part of
# one, over part of a zero cluster, across two clusters; data across an edge.
WIDE_TOP = ("write -z 4k 4k", "write -z 130k 8k", "write -z 200k 4k", "write -P 0 400k 4k",
            "write -z 260k 4k", "write -P 3 500k 40k", "write -z 600k 64k",
            "write -z 768k 128k")
WIDE_BASE = ("write -P 1 0 64k", "write -P 5 128k 4k", "write -z 256k 64k",
             "write -P 6 768k 64k")

QED_SMALL: Base = ("qed", "1M", "cluster_size=4k",
                   ("write -P 1 0 8k", "write -P 5 64k 4k", "write -z 200k 4k"))
QED_WIDE: Base = ("qed", "1M", "", WIDE_BASE)
QCOW_SMALL: Base = ("qcow", "1M", "",
                    ("write -P 1 0 8k", "write -P 5 64k 4k", "write -c -P 6 128k 4k"))
VDI: Base = ("vdi", "4M", "", ("write -P 1 0 8k", "write -P 5 2M 4k"))
VDI_STATIC: Base = ("vdi", "4M", "static=on", VDI[3])
VDI_TOP = ("write -P 2 4k 8k", "write -z 2M 4k", "write -z 1M 8k", "write -P 3 3M 20k",
           "write -P 4 1020k 8k")


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("base,top_size,writes,args", [
    (QED_SMALL, None, SMALL_TOP, ()),
    (QED_SMALL, "2M", (*SMALL_TOP, "write -P 4 1500k 4k"), ()),  # qemu grows the base
    (QED_SMALL, "2M", ("write -P 4 1500k 4k",), ("-d",)),
    (QED_WIDE, None, WIDE_TOP, ()),
    (QED_WIDE, None, WIDE_TOP, ("-b", "base.qed")),
    (QCOW_SMALL, None, SMALL_TOP, ()),
    (QCOW_SMALL, None, SMALL_TOP, ("-d",)),
    (("qcow", "1M", "", WIDE_BASE), None, WIDE_TOP, ()),
    (QCOW_SMALL, "2M", ("write -P 4 1500k 4k",), ()),  # refused as qemu refuses
    (VDI, None, VDI_TOP, ()),
    (VDI, None, (), ()),
    (VDI, "5M", ("write -P 4 4500k 4k",), ()),  # refused as qemu refuses
    # qemu's choice of zeros (commit_zeros) holds for a qcow2 base too
    (("qcow2", "1M", "", WIDE_BASE), None, WIDE_TOP, ()),
], ids=["qed", "qed-grown", "qed-grown-d", "qed-64k", "qed-64k-b", "qcow", "qcow-d",
        "qcow-64k", "qcow-smaller", "vdi", "vdi-empty-top", "vdi-smaller", "qcow2-64k"])
def test_parity(tmp_path: Path, base: Base, top_size: str | None, writes: tuple[str, ...],
                args: tuple[str, ...]) -> None:
    _parity(tmp_path, base, top_size, *writes, args=args)


@pytest.mark.usefixtures("allow_own_directories")
def test_parity_64k_top(tmp_path: Path) -> None:
    """An overlay of 64 KiB clusters over 4 KiB base clusters."""
    _parity(tmp_path, QED_SMALL, None, "write -z 0 64k", "write -P 7 100k 30k",
            "write -z 192k 8k", top_cluster="64k")


@pytest.mark.usefixtures("allow_own_directories")
def test_static_vdi(tmp_path: Path) -> None:
    """A static VDI base: blocks rewritten in place. qemu writes only the
    chunks it copies, instar whole blocks: the guest reads the same, qemu's
    map differs where the file has holes (docs/formats/vdi.md)."""
    _parity(tmp_path, VDI_STATIC, None, *VDI_TOP, same_map=False)
    size = (tmp_path / "i" / "base.vdi").stat().st_size
    assert size == (tmp_path / "q" / "base.vdi").stat().st_size


_NODE = re.compile(r"#block\d+")


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [(), ("-d",), ("-q",), ("-p",), ("-b", "base.parallels")])
def test_parallels_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    """qemu cannot reopen a parallels base read-write: nothing is written;
    qemu's node name changes from run to run, instar's is fixed (docs/cli.md)."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    qdir.mkdir()
    qemu_img_ok("create", "-q", "-f", "parallels", "base.parallels", "4M", cwd=qdir)
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "base.parallels", "-F", "parallels",
                "ov.qcow2", cwd=qdir)
    qemu_io(qdir / "ov.qcow2", "write -P 2 4k 8k", "qcow2")
    shutil.copytree(qdir, idir)
    before = {p.name: p.read_bytes() for p in qdir.iterdir()}
    qemu = run_qemu_img("commit", *args, "ov.qcow2", cwd=qdir)
    ours = run_instar("commit", *args, "ov.qcow2", cwd=idir)
    assert qemu.rc == ours.rc == 1
    # (qemu-img's output is read with universal newlines: the meter's \r)
    assert ours.stdout.replace("\r\n", "\n") == qemu.stdout
    assert _NODE.sub("#block", ours.normalised_stderr()) == \
        _NODE.sub("#block", qemu.normalised_stderr())
    for directory in (qdir, idir):
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


# --- crash safety -----------------------------------------------------------------------------


_MISMATCH = re.compile(r"^ERROR: allocated blocks mismatch, is (\d+), should be (\d+)$")


def _check_after_crash(image: Path, fmt: str) -> None:
    """qemu-img check of a base left by a crash: leaks at most (QED: clusters
    appended and not yet named, which qemu's ``-r all`` leaves as they are);
    for VDI, at most the header's count ahead of the map (qemu has no repair
    for VDI)."""
    if fmt == "qcow":
        return  # qemu has no check for qcow
    checked = run_qemu_img("check", "--output=json", "-f", fmt, str(image))
    if fmt == "vdi":
        lines = checked.stderr.splitlines()
        assert checked.rc in (0, 2), checked.stderr
        for line in lines:
            match = _MISMATCH.match(line)
            assert match and int(match[1]) < int(match[2]), line
        return
    report = json.loads(checked.stdout)
    assert checked.rc in (0, 3), checked.stdout + checked.stderr
    assert not report.get("corruptions") and not report.get("check-errors")
    # qemu's QED check repairs no leaks: -r all finds the same, nothing worse
    repaired = run_qemu_img("check", "-r", "all", "--output=json", "-f", fmt, str(image))
    assert repaired.rc == checked.rc, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout).get("leaks", 0) == report.get("leaks", 0)


@pytest.mark.parametrize("base,top_size,writes,unit", [
    (("qed", "256k", "cluster_size=4k", ("write -P 1 0 16k", "write -z 32k 4k")), "320k",
     ("write -P 2 4k 8k", "write -z 16k 4k", "write -z 32k 4k", "write -P 3 60k 8k",
      "write -P 4 300k 4k"), 4096),
    (("qcow", "256k", "", ("write -P 1 0 16k", "write -c -P 5 32k 4k")), None,
     ("write -P 2 4k 8k", "write -z 16k 4k", "write -P 3 32k 4k", "write -P 4 60k 8k",
      "write -P 6 200k 4k"), 4096),
    (("vdi", "3M", "", ("write -P 1 0 8k",)), None,
     ("write -P 2 4k 8k", "write -P 3 1020k 8k", "write -z 2M 4k"), 1 << 20),
], ids=["qed-grown", "qcow", "vdi"])
def test_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: Base,
                              top_size: str | None, writes: tuple[str, ...], unit: int) -> None:
    """commit stopped after k changes (counted across its updates: the base's
    growth, its data, the overlay's emptying) for every k until it
    finishes: the overlay reads as it did; the base reads, unit by unit, as
    before or as committed; qemu-img check finds leaks at most."""
    fmt = base[0]
    name = f"base.{fmt}"
    origin = tmp_path / "origin"
    _build(origin, base, top_size, *writes)
    expected = qemu_read_raw(origin / "ov.qcow2", tmp_path, "qcow2")
    old = qemu_read_raw(origin / name, tmp_path, fmt)
    new = expected + old[len(expected):]
    work = tmp_path / "work"
    for k, finished in stopped_runs(
            monkeypatch, origin, work,
            lambda: commit(str(work / "ov.qcow2"), allow=(str(work),),
                           sandbox=SandboxSettings(mode="off"))):
        assert qemu_read_raw(work / "ov.qcow2", tmp_path, "qcow2") == expected, k
        now = qemu_read_raw(work / name, tmp_path, fmt)
        assert_units_old_or_new(now, old.ljust(len(now), b"\0"), new, unit, k)
        _check_after_crash(work / name, fmt)
        if finished:
            assert now == new
    assert k >= 4


# --- hostile bases ----------------------------------------------------------------------------


def _patch(path: Path, offset: int, value: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(value)


def _l2_table(path: Path, fmt: str) -> int:
    """The first L2 table of a QED or qcow image."""
    data = path.read_bytes()
    order: Any = "little" if fmt == "qed" else "big"
    l1 = int.from_bytes(data[40:48], order)
    return int.from_bytes(data[l1 : l1 + 8], order)


def _hostile(path: Path, fmt: str, kind: str) -> None:
    """An entry of the base's first table that names a unit past the end of
    the file ("outside"), or the unit the first entry names ("twice")."""
    if fmt == "vdi":
        bmap = int.from_bytes(path.read_bytes()[340:344], "little")
        value = 1000 if kind == "outside" else 0
        _patch(path, bmap + 4 * 2, value.to_bytes(4, "little"))
        return
    order: Any = "little" if fmt == "qed" else "big"
    table = _l2_table(path, fmt)
    first = int.from_bytes(path.read_bytes()[table : table + 8], order)
    value = (1 << 30) if kind == "outside" else first
    _patch(path, table + 8 * 5, value.to_bytes(8, order))


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("kind", ["outside", "twice"])
@pytest.mark.parametrize("base,top_size", [
    (QED_SMALL, None), (QED_SMALL, "2M"), (QCOW_SMALL, None), (VDI, None),
], ids=["qed", "qed-grown", "qcow", "vdi"])
def test_hostile_base_refused(tmp_path: Path, base: Base, top_size: str | None,
                              kind: str) -> None:
    """A damaged base is refused in one line before anything is written,
    though the top image covers the damaged units (it never reads them)."""
    _build(tmp_path, base, top_size, *(("write -P 2 0 1M", "write -P 3 2M 1M")
                                       if base[0] == "vdi" else ("write -P 2 0 24k",)))
    _hostile(tmp_path / f"base.{base[0]}", base[0], kind)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_instar("commit", "ov.qcow2", cwd=tmp_path)
    assert result.rc == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("instar: "), result.stderr
    assert "internal error" not in lines[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
