"""The in-place qcow2 guest writer with extended L2 entries: a subcluster of a
cluster the image has allocated already is written in place, its bitmap
bit set, as qemu 7.2 does (safe ``rebase`` copying what the old backing file
gave into the top image; ``commit`` into a base with extended_l2=on, which
qemu's mirror job writes by whole clusters).

Parity against qemu-img on the same images (built once, copied): the same
output, the images reading the same, ``qemu-img check`` and ``map`` of
rebase's result equal to qemu's (host offsets too), commit's base equal to
qemu's in ``info`` and ``map`` but for host offsets (qemu reuses a cluster
freed earlier in the same commit; instar frees it last). Then a snapshot's
shared cluster refused, and a crash at every change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    assert_units_old_or_new,
    build_images,
    qemu_img_ok,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
    stopped_runs,
)
from instar.commit import commit
from instar.rebase import rebase
from instar.worker import SandboxSettings

pytestmark = pytest.mark.usefixtures("qemu_img")

Step = tuple[str, ...]


def _qcow2(name: str, options: str, size: str | None, *writes: str,
           backing: str | None = None) -> list[Step]:
    create: Step = ("create", "-f", "qcow2", "-o", options)
    if backing is not None:
        create += ("-b", backing, "-F", "qcow2")
    create += (name,) if size is None else (name, size)
    return [create, *(("io", "qcow2", name, w) for w in writes)]


def _rebase_chain(options: str) -> list[Step]:
    """A top image with extended L2 entries whose clusters are partly
    allocated, over an old backing file that differs from the new one."""
    return [*_qcow2("old.qcow2", "cluster_size=64k", "1M", "write -P 1 0 1M"),
            *_qcow2("new.qcow2", "cluster_size=64k", "1M", "write -P 7 0 100k",
                    "write -P 1 300k 64k"),
            *_qcow2("top.qcow2", options, None, "write -P 2 4k 2k", "write -P 3 70k 10k",
                    "write -z 200k 4k", "write -P 4 330k 1k", backing="old.qcow2")]


def _commit_chain(options: str) -> list[Step]:
    """A base with extended L2 entries, partly allocated clusters, under an
    overlay whose clusters cover them partly and wholly (data and zeros)."""
    return [*_qcow2("base.qcow2", options, "1M", "write -P 1 0 300k", "write -P 5 600k 4k",
                    "write -z 700k 4k"),
            *_qcow2("ov.qcow2", "cluster_size=64k", None, "write -P 2 4k 8k",
                    "write -P 3 130k 70k", "write -z 200k 4k", "write -z 256k 64k",
                    "write -P 4 610k 2k", "write -P 6 900k 4k", backing="base.qcow2")]


def _map(text: str, offsets: bool) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = json.loads(text)
    if not offsets:  # without host offsets, neighbours alike merged
        merged: list[dict[str, Any]] = []
        for run in runs:
            run.pop("offset", None)
            if merged and {k: v for k, v in merged[-1].items() if k not in ("start", "length")} \
                    == {k: v for k, v in run.items() if k not in ("start", "length")}:
                merged[-1]["length"] += run["length"]
            else:
                merged.append(run)
        runs = merged
    return runs


def _parity(tmp_path: Path, steps: list[Step], args: list[str], top: str,
            exact: bool) -> None:
    qdir, idir = tmp_path / "q", tmp_path / "i"
    build_images(qdir, steps)
    shutil.copytree(qdir, idir)
    qemu = run_qemu_img(*args, cwd=qdir)
    ours = run_instar(*args, cwd=idir)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == \
        (qemu.rc, qemu.stdout, qemu.normalised_stderr()), (qemu.stderr, ours.stderr)
    assert qemu.rc == 0
    for name in sorted(path.name for path in qdir.iterdir() if path.suffix == ".qcow2"):
        result = run_qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(qdir / name),
                              str(idir / name))
        assert result.rc == 0, (name, result.stdout, result.stderr)
        infos = [json.loads(qemu_img_ok("info", "--output=json", name, cwd=d))
                 for d in (qdir, idir)]
        for info in infos:
            info.pop("actual-size", None)
        assert infos[0] == infos[1], name
        checks = [run_qemu_img("check", name, cwd=d) for d in (qdir, idir)]
        assert checks[1].rc == 0 and "No errors were found" in checks[1].stdout, name
        if exact:
            assert checks[0].stdout == checks[1].stdout, name
        maps = [_map(qemu_img_ok("map", "--output=json", name, cwd=d), exact)
                for d in (qdir, idir)]
        assert maps[0] == maps[1], name
    if exact:
        assert len(qdir.joinpath(top).read_bytes()) == len(idir.joinpath(top).read_bytes())


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["extended_l2=on,cluster_size=64k",
                                     "extended_l2=on,cluster_size=16k"])
def test_rebase(tmp_path: Path, options: str) -> None:
    _parity(tmp_path, _rebase_chain(options), ["rebase", "-b", "new.qcow2", "-F", "qcow2",
                                               "top.qcow2"], "top.qcow2", exact=True)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options,args", [("extended_l2=on,cluster_size=64k", []),
                                          ("extended_l2=on,cluster_size=64k", ["-d"]),
                                          ("extended_l2=on,cluster_size=32k", [])])
def test_commit(tmp_path: Path, options: str, args: list[str]) -> None:
    _parity(tmp_path, _commit_chain(options), ["commit", *args, "ov.qcow2"], "ov.qcow2",
            exact=False)


@pytest.mark.usefixtures("allow_own_directories")
def test_commit_compressed_snapshot_base(tmp_path: Path) -> None:
    """A compressed base whose clusters a snapshot shares: each cluster the
    commit writes gets a new place; the snapshot reads as qemu's leaves it."""
    steps: list[Step] = [
        ("create", "-f", "raw", "src.raw", "1M"), ("io", "raw", "src.raw", "write -P 1 0 300k"),
        ("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=32k,extended_l2=on",
         "src.raw", "base.qcow2"),
        ("io", "qcow2", "base.qcow2", "write -P 5 600k 4k"), ("snapshot", "-c", "s1", "base.qcow2"),
        *_qcow2("ov.qcow2", "cluster_size=64k", None, "write -P 2 4k 8k", "write -P 3 130k 70k",
                "write -z 256k 64k", "write -P 4 610k 2k", backing="base.qcow2")]
    _parity(tmp_path, steps, ["commit", "ov.qcow2"], "ov.qcow2", exact=False)
    reads = []
    for directory in (tmp_path / "q", tmp_path / "i"):
        qemu_img_ok("convert", "-l", "s1", "-O", "raw", "base.qcow2", "s1.raw", cwd=directory)
        reads.append((directory / "s1.raw").read_bytes())
    assert reads[0] == reads[1] and reads[0][:4096] == b"\1" * 4096


@pytest.mark.usefixtures("allow_own_directories")
def test_snapshot_shared_cluster_not_supported_yet(tmp_path: Path) -> None:
    """A partly allocated cluster a snapshot shares needs copying first
    (qemu's copy on write of its other subclusters): refused, unchanged."""
    build_images(tmp_path, [*_rebase_chain("extended_l2=on,cluster_size=64k"),
                            ("snapshot", "-c", "s1", "top.qcow2")])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_instar("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", cwd=tmp_path)
    assert result.rc == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "instar: writing into a qcow2 cluster a snapshot shares (extended L2 entries) is not "
        "supported yet"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- crash safety -----------------------------------------------------------------------------


def _assert_clean(image: Path, k: int) -> None:
    checked = run_qemu_img("check", "--output=json", str(image))
    report = json.loads(checked.stdout)
    assert checked.rc in (0, 3), (k, image, checked.stdout, checked.stderr)
    assert not report.get("corruptions") and not report.get("check-errors"), (k, report)


def test_rebase_crash_at_every_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Safe rebase stopped after k changes for every k: the top image reads
    as it did, through the old backing file or the new one; check finds
    leaks at most."""
    origin = tmp_path / "origin"
    build_images(origin, _rebase_chain("extended_l2=on,cluster_size=16k"))
    expected = qemu_read_raw(origin / "top.qcow2", tmp_path, "qcow2")
    work = tmp_path / "work"
    for k, finished in stopped_runs(
            monkeypatch, origin, work,
            lambda: rebase(str(work / "top.qcow2"), "new.qcow2", backing_fmt="qcow2",
                           allow=(str(work),), sandbox=SandboxSettings(mode="off"))):
        _assert_clean(work / "top.qcow2", k)
        assert qemu_read_raw(work / "top.qcow2", tmp_path, "qcow2") == expected, k
        if finished:
            backing = json.loads(qemu_img_ok("info", "--output=json",
                                             str(work / "top.qcow2")))["backing-filename"]
            assert backing == "new.qcow2"
    assert k >= 4


@pytest.mark.parametrize("snapshot", [False, True])
def test_commit_crash_at_every_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      snapshot: bool) -> None:
    """commit into a base with extended L2 entries (its clusters shared with
    a snapshot, or not) stopped after k changes for every k: the overlay
    reads as it did, the base subcluster by subcluster as before or as
    committed; check finds leaks at most."""
    origin = tmp_path / "origin"
    steps = _commit_chain("extended_l2=on,cluster_size=32k")
    if snapshot:
        steps.insert(4, ("snapshot", "-c", "s1", "base.qcow2"))
    build_images(origin, steps)
    expected = qemu_read_raw(origin / "ov.qcow2", tmp_path, "qcow2")
    old = qemu_read_raw(origin / "base.qcow2", tmp_path, "qcow2")

    def snapshot_reads(directory: Path) -> bytes:
        qemu_img_ok("convert", "-l", "s1", "-O", "raw", "base.qcow2", "s1.raw", cwd=directory)
        return (directory / "s1.raw").read_bytes()

    kept = snapshot_reads(origin) if snapshot else b""
    work = tmp_path / "work"
    for k, finished in stopped_runs(
            monkeypatch, origin, work,
            lambda: commit(str(work / "ov.qcow2"), allow=(str(work),),
                           sandbox=SandboxSettings(mode="off"))):
        for name in ("ov.qcow2", "base.qcow2"):
            _assert_clean(work / name, k)
        assert qemu_read_raw(work / "ov.qcow2", tmp_path, "qcow2") == expected, k
        now = qemu_read_raw(work / "base.qcow2", tmp_path, "qcow2")
        assert not snapshot or snapshot_reads(work) == kept, k
        assert_units_old_or_new(now, old, expected, 1024, k)
        if finished:
            assert now == expected
    assert k >= 4
