"""``instar commit`` against ``qemu-img commit`` (7.2): one chain built by
qemu-img and qemu-io, copied into two directories, the same command line in
each, then the same stdout, exit status and stderr, every image of the two
chains equal by ``qemu-img compare`` (the base holding the committed data,
the overlay emptied or kept), the same ``qemu-img info`` and ``map`` of the
top image, and a clean ``qemu-img check``. Then instar's own refusals (the
files unchanged), hostile images, the policy, and a crash at every write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import hostile_corpus as corpus
from helpers import (
    Result,
    assert_units_old_or_new,
    build_images,
    qemu_img_ok,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
    stopped_runs,
    without_keys,
)
from instar.commit import commit
from instar.worker import SandboxSettings
from mutation_sweep import check_run, corpus_params

pytestmark = pytest.mark.usefixtures("qemu_img")

Step = tuple[str, ...]  # ("create", args...), ("io", fmt, file, command) or qemu-img args
_VOLATILE = ("filename", "actual-size", "dirty-flag", "full-backing-filename")


def _raw(name: str, size: str, *writes: str) -> list[Step]:
    return [("create", "-f", "raw", name, size), *(("io", "raw", name, w) for w in writes)]


def _qcow2(name: str, size: str | None, *writes: str, backing: str | None = None,
           backing_fmt: str = "qcow2", options: str = "") -> list[Step]:
    args: list[str] = ["-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    args.append(name)
    if size is not None:
        args.append(size)
    return [("create", *args), *(("io", "qcow2", name, w) for w in writes)]


def _normalised(info: Any) -> Any:
    return without_keys(info, _VOLATILE)


def _fmt(name: str) -> str:
    return "raw" if name.endswith(".raw") else name.rsplit(".", 1)[1]


def _map(text: str) -> list[dict[str, Any]]:
    """qemu-img map's runs without host offsets (where each program put a
    cluster differs), neighbours alike merged."""
    runs: list[dict[str, Any]] = []
    for run in json.loads(text):
        run.pop("offset", None)
        last = runs[-1] if runs else None
        if last is not None and {k: v for k, v in last.items() if k not in ("start", "length")} \
                == {k: v for k, v in run.items() if k not in ("start", "length")}:
            last["length"] += run["length"]
        else:
            runs.append(run)
    return runs


def _meter(text: str) -> str:
    """The meter's lines (qemu-img's read with universal newlines) with a line
    drawn again right after itself dropped."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line for number, line in enumerate(lines)
                     if not number or line != lines[number - 1] or not line)


def _same(qemu: Result, ours: Result) -> None:
    assert ours.rc == qemu.rc, (qemu.stderr, ours.stderr)
    assert ours.stdout == qemu.stdout, (qemu.stdout, ours.stdout)
    assert ours.normalised_stderr() == qemu.normalised_stderr()


def _parity(tmp_path: Path, steps: list[Step], *args: str, top: str = "ov.qcow2",
            same_bytes: bool = True) -> Result:
    """Build the chain, commit it with each program, compare everything."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    build_images(qdir, steps)
    shutil.copytree(qdir, idir)
    names = sorted(path.name for path in qdir.iterdir())
    qemu = run_qemu_img("commit", *args, top, cwd=qdir)
    ours = run_instar("commit", *args, top, cwd=idir)
    if "-p" in args:  # qemu draws a step again when its job reports (timing)
        qemu = Result(qemu.rc, _meter(qemu.stdout), qemu.stderr)
        ours = Result(ours.rc, _meter(ours.stdout), ours.stderr)
    _same(qemu, ours)
    for name in names:
        fmt = _fmt(name)
        result = run_qemu_img("compare", "-f", fmt, "-F", fmt, str(qdir / name),
                              str(idir / name))
        assert result.rc == 0, (name, result.stdout, result.stderr)
        info = [_normalised(json.loads(qemu_img_ok("info", "--output=json", "-f", fmt, name,
                                                   cwd=d))) for d in (qdir, idir)]
        assert info[0] == info[1], name
        if fmt == "qcow2":
            checked = run_qemu_img("check", "-f", fmt, name, cwd=idir)
            assert checked.rc == 0, (name, checked.stdout)
            assert "No errors were found" in checked.stdout
    if same_bytes and ours.rc == 0 and top.endswith((".qcow2", ".qcow")) and \
            not {"-d", "-b"} & set(args):
        # emptied: the same bytes as qemu's make_empty leaves
        assert (qdir / top).read_bytes() == (idir / top).read_bytes()
    if not any(name.endswith(".raw") for name in names):
        # (qemu punches holes for zeros in a raw base, instar writes zeros:
        # the map there says data where qemu's says zero; docs/cli.md)
        maps = [_map(qemu_img_ok("map", "--output=json", top, cwd=d)) for d in (qdir, idir)]
        assert maps[0] == maps[1]
    return ours


BASE_QCOW2 = _qcow2("base.qcow2", "4M", "write -P 1 0 1M", "write -P 9 3M 100k")
OV_WRITES = ("write -P 2 512k 1M", "write -z 2M 64k", "write -P 7 3M 1000",
             "write -z 3100k 10k")


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [(), ("-q",), ("-d",), ("-b", "base.qcow2"),
                                  ("-t", "none", "-r", "1M"), ("-b", "./base.qcow2", "-d")])
def test_two_images_qcow2_base(tmp_path: Path, args: tuple[str, ...]) -> None:
    _parity(tmp_path, [*BASE_QCOW2, *_qcow2("ov.qcow2", None, *OV_WRITES,
                                            backing="base.qcow2")], *args)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [(), ("-d",)])
def test_two_images_raw_base(tmp_path: Path, args: tuple[str, ...]) -> None:
    _parity(tmp_path, [*_raw("base.raw", "4M", "write -P 1 0 3M"),
                       *_qcow2("ov.qcow2", None, *OV_WRITES, backing="base.raw",
                               backing_fmt="raw")], *args)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [(), ("-b", "base.raw"), ("-b", "mid.qcow2")])
def test_three_images(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Into the middle image (the default), or into the base past it, with its data."""
    steps = [*_raw("base.raw", "2M", "write -P 1 0 2M"),
             *_qcow2("mid.qcow2", "4M", "write -P 3 1M 2M", "write -z 3200k 64k",
                     backing="base.raw", backing_fmt="raw"),
             *_qcow2("ov.qcow2", None, "write -P 4 3M 64k", "write -z 0 64k",
                     backing="mid.qcow2")]
    _parity(tmp_path, steps, *args)


@pytest.mark.usefixtures("allow_own_directories")
def test_three_images_qcow2_base(tmp_path: Path) -> None:
    steps = [*BASE_QCOW2,
             *_qcow2("mid.qcow2", None, "write -P 3 1M 2M", backing="base.qcow2",
                     options="cluster_size=4k"),
             *_qcow2("ov.qcow2", None, "write -P 4 3M 64k", "write -z 0 8k",
                     backing="mid.qcow2", options="cluster_size=512")]
    _parity(tmp_path, steps, "-b", "base.qcow2")


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("base", ["qcow2", "raw"])
@pytest.mark.parametrize("ov_size", ["1M", "3M", "5000k", "3000000"])
def test_sizes(tmp_path: Path, base: str, ov_size: str) -> None:
    """The base grows to a larger overlay's size (qemu's commit job truncates
    it); a smaller overlay leaves the base's end as it was."""
    name = f"base.{base}"
    steps = (_qcow2(name, "2M", "write -P 1 0 2M") if base == "qcow2"
             else _raw(name, "2M", "write -P 1 0 2M"))
    steps += _qcow2("ov.qcow2", ov_size, "write -P 2 900k 100k", "write -z 1000k 24k",
                    backing=name, backing_fmt=base)
    if ov_size != "1M":
        steps += [("io", "qcow2", "ov.qcow2", "write -P 5 1900k 200k"),
                  ("io", "qcow2", "ov.qcow2", "write -P 6 2500k 4k")]
    _parity(tmp_path, steps)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["cluster_size=512", "compat=0.10",
                                     "cluster_size=4k,refcount_bits=1"])
def test_base_options(tmp_path: Path, options: str) -> None:
    """Small clusters, a version 2 base (zeros written as data), narrow refcounts."""
    steps = [*_qcow2("base.qcow2", "1M", "write -P 1 0 300k", options=options),
             *_qcow2("ov.qcow2", None, "write -P 2 100k 300k", "write -z 500k 64k",
                     backing="base.qcow2", options="cluster_size=4k")]
    _parity(tmp_path, steps)


@pytest.mark.usefixtures("allow_own_directories")
def test_base_with_snapshot(tmp_path: Path) -> None:
    """Clusters the base shares with a snapshot get new places; the snapshot
    keeps its data."""
    steps = [*_qcow2("base.qcow2", "1M", "write -P 1 0 1M"),
             ("snapshot", "-c", "s1", "base.qcow2"),
             *_qcow2("ov.qcow2", None, "write -P 2 100k 300k", "write -z 600k 64k",
                     backing="base.qcow2")]
    _parity(tmp_path, steps)
    for name in ("q", "i"):
        qemu_img_ok("convert", "-l", "s1", "-O", "raw", str(tmp_path / name / "base.qcow2"),
                    str(tmp_path / f"{name}.s1.raw"))
    assert (tmp_path / "q.s1.raw").read_bytes() == (tmp_path / "i.s1.raw").read_bytes()


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["compat=0.10", "compat=0.10,cluster_size=512"])
def test_version2_overlay(tmp_path: Path, options: str) -> None:
    """qemu empties a version 2 image by discarding every cluster: L2 entries
    0, refcounts dropped, the tables and the file's length kept (the freed
    clusters' bytes differ: qemu punches holes, instar leaves them)."""
    steps = [*BASE_QCOW2, *_qcow2("ov.qcow2", None, "write -P 3 0 200k", "write -z 1M 64k",
                                  "write -P 4 3M 64k", backing="base.qcow2", options=options)]
    _parity(tmp_path, steps, same_bytes=False)
    for name in ("q", "i"):
        assert (tmp_path / name / "ov.qcow2").stat().st_size == \
            (tmp_path / "q" / "ov.qcow2").stat().st_size
        checked = qemu_img_ok("check", "--output=json", "ov.qcow2", cwd=tmp_path / name)
        assert json.loads(checked)["image-end-offset"] == json.loads(qemu_img_ok(
            "check", "--output=json", "ov.qcow2", cwd=tmp_path / "q"))["image-end-offset"]


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["cluster_size=64k", "cluster_size=4k"])
def test_compressed_base(tmp_path: Path, options: str) -> None:
    """The base's compressed clusters the commit writes over get new places;
    the clusters their bytes shared are freed only when nothing else uses them."""
    steps = [*_raw("src.raw", "1M", "write -P 1 0 1M"),
             ("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, "src.raw",
              "base.qcow2"),
             *_qcow2("ov.qcow2", None, "write -P 2 100k 300k", "write -z 600k 64k",
                     "write -P 3 1000k 3k", backing="base.qcow2")]
    _parity(tmp_path, steps)


@pytest.mark.usefixtures("allow_own_directories")
def test_compressed_cluster_at_end_of_file(tmp_path: Path) -> None:
    """A compressed cluster the base's file ends inside (qemu does not write the
    tail of its last sector) is committed over as qemu does, not refused."""
    steps = [*_qcow2("base.qcow2", "64k", "write -c -P 103 0 64k"),
             *_qcow2("ov.qcow2", None, "write -P 5 0 512", backing="base.qcow2")]
    _parity(tmp_path, steps)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("chain", [
    [*_raw("base.raw", "2M"),
     *_qcow2("mid.qcow2", "64k", backing="base.raw", backing_fmt="raw", options="compat=0.10")],
    [*_qcow2("mid.qcow2", "64k", options="compat=0.10"), ("snapshot", "-c", "s", "mid.qcow2")],
    [*_raw("base.raw", "2M"),
     ("create", "-f", "qed", "-b", "base.raw", "-F", "raw", "mid.qed", "64k")],
], ids=["v2-over-longer-backing", "v2-with-snapshot", "qed-over-longer-backing"])
def test_base_that_cannot_grow(tmp_path: Path, chain: list[Step]) -> None:
    """A base smaller than the top image that qemu's job fails to grow: the job
    says only the errno ("Block job failed: Operation not supported"), and the
    qed base over a longer backing file is refused as qemu's block layer refuses
    it, not grown."""
    mid = str(chain[-1][-2]) if chain[-1][0] == "create" else "mid.qcow2"
    steps = [*chain, *_qcow2("ov.qcow2", "2M", "write -P 1 1M 4k", backing=mid,
                             backing_fmt=_fmt(mid))]
    ours = _parity(tmp_path, steps)
    assert (ours.rc, ours.stderr) == (1, "instar: Block job failed: Operation not supported\n")


@pytest.mark.usefixtures("allow_own_directories")
def test_v2_base_grown_inside_its_last_cluster(tmp_path: Path) -> None:
    """A v2 base over a longer backing file grown only inside the cluster its
    old end lies in: qemu writes explicit zeros there (no zero clusters needed)
    and commits."""
    steps = [*_raw("base.raw", "64k", "write -P 3 0 64k"),
             *_qcow2("mid.qcow2", "1k", "write -P 4 0 512", backing="base.raw",
                     backing_fmt="raw", options="compat=0.10"),
             *_qcow2("ov.qcow2", "64k", "write -P 1 8k 4k", backing="mid.qcow2")]
    assert _parity(tmp_path, steps).rc == 0


@pytest.mark.usefixtures("allow_own_directories")
def test_empty_overlay_grown_base(tmp_path: Path) -> None:
    """A big sparse overlay (the base grows, its refcount structures with it)."""
    steps = [*_qcow2("base.qcow2", "1M", "write -P 1 0 64k", options="cluster_size=512"),
             *_qcow2("ov.qcow2", "64M", "write -P 2 60M 64k", backing="base.qcow2")]
    _parity(tmp_path, steps)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [(), ("-d",)])
def test_qed_overlay(tmp_path: Path, args: tuple[str, ...]) -> None:
    """qemu cannot empty a QED image: committed, it is left as it was."""
    steps = [*BASE_QCOW2, ("create", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", "ov.qed"),
             ("io", "qed", "ov.qed", "write -P 3 64k 200k"),
             ("io", "qed", "ov.qed", "write -z 1M 64k")]
    _parity(tmp_path, steps, *args, top="ov.qed")


# --- qemu's refusals and usage ----------------------------------------------------------------


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [
    ("-b", "nope.qcow2", "ov.qcow2"), ("-b", "", "ov.qcow2"), ("-b", "ov.qcow2", "ov.qcow2"),
    ("base.qcow2",), ("-f", "raw", "ov.qcow2"), ("-f", "foo", "ov.qcow2"),
    ("-f", "vmdk", "ov.qcow2"), ("missing.qcow2",), (), ("ov.qcow2", "base.qcow2"),
    ("-r", "x", "ov.qcow2"), ("-r", "-5", "ov.qcow2"), ("-t", "bad", "ov.qcow2"),
    ("-x", "ov.qcow2"), ("-b",), ("", ), ("-p", "base.qcow2"), ("-p", "-b", "x", "ov.qcow2"),
    ("-p", "missing.qcow2"), ("-p", "-t", "bad", "ov.qcow2"), ("-p", "-q", "base.qcow2"),
])
def test_refusals(tmp_path: Path, args: tuple[str, ...]) -> None:
    qdir, idir = tmp_path / "q", tmp_path / "i"
    build_images(qdir, [*BASE_QCOW2, *_qcow2("ov.qcow2", None, *OV_WRITES, backing="base.qcow2")])
    shutil.copytree(qdir, idir)
    before = {p.name: p.read_bytes() for p in idir.iterdir()}
    qemu = run_qemu_img("commit", *args, cwd=qdir)
    ours = run_instar("commit", *args, cwd=idir)
    qemu = Result(qemu.rc, _meter(qemu.stdout), qemu.stderr)
    ours = Result(ours.rc, _meter(ours.stdout), ours.stderr)
    _same(qemu, ours)
    assert qemu.rc != 0
    assert {p.name: p.read_bytes() for p in idir.iterdir()} == before


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [("-p",), ("-p", "-q"), ("-p", "-d")])
def test_progress(tmp_path: Path, args: tuple[str, ...]) -> None:
    """qemu's meter for an overlay holding nothing: 0, 0, then 100 (with
    data, qemu's steps follow its job's timing; instar draws 0 and 100)."""
    _parity(tmp_path, [*BASE_QCOW2, *_qcow2("ov.qcow2", None, backing="base.qcow2")], *args)


@pytest.mark.usefixtures("allow_own_directories")
def test_raw_probed_overlay(tmp_path: Path) -> None:
    qdir, idir = tmp_path / "q", tmp_path / "i"
    build_images(qdir, _raw("a.img", "1M"))
    shutil.copytree(qdir, idir)
    _same(run_qemu_img("commit", "a.img", cwd=qdir), run_instar("commit", "a.img", cwd=idir))


# --- what instar refuses where qemu commits ---------------------------------------------------


def _refused(directory: Path, *args: str, words: str) -> None:
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    result = run_instar("commit", *args, cwd=directory)
    assert result.rc == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and words in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [(), ("-d",), ("-q",)])
def test_qcow_top_emptied(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A qcow (version 1) top image is emptied as qemu empties it: its L1
    table zeroed and the file cut after it, byte for byte qemu's."""
    _parity(tmp_path, [*BASE_QCOW2,
                       ("create", "-f", "qcow", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow"),
                       *(("io", "qcow", "ov.qcow", write) for write in OV_WRITES)],
            *args, top="ov.qcow")


@pytest.mark.usefixtures("allow_own_directories")
def test_not_supported_yet(tmp_path: Path) -> None:
    build_images(tmp_path, [*_qcow2("base.qcow2", "1M"), ("bitmap", "--add", "base.qcow2", "bm"),
                      *_qcow2("ov.qcow2", None, "write -P 2 0 64k", backing="base.qcow2"),
                      *_qcow2("b2.qcow2", "1M", "write -P 1 0 64k"),
                      *_qcow2("sn.qcow2", None, "write -P 2 0 64k", backing="b2.qcow2"),
                      ("bitmap", "--add", "sn.qcow2", "b")])
    _refused(tmp_path, "ov.qcow2", words="persistent bitmaps is not supported yet")
    _refused(tmp_path, "sn.qcow2", words="not supported yet")
    result = run_instar("commit", "-d", "sn.qcow2", cwd=tmp_path)  # kept: fine
    assert result.rc == 0 and result.stdout == "Image committed.\n"


def test_policy_refusal(tmp_path: Path) -> None:
    """The base's directory is not allowed: nothing is written anywhere."""
    build_images(tmp_path / "b", BASE_QCOW2)
    build_images(tmp_path / "o", _qcow2("ov.qcow2", None, "write -P 2 0 64k",
                                  backing="../b/base.qcow2"))
    before = (tmp_path / "b" / "base.qcow2").read_bytes()
    _refused(tmp_path / "o", "ov.qcow2", words="outside the allowed directories")
    _refused(tmp_path / "o", "--allow", str(tmp_path / "o"), "ov.qcow2",
             words="outside the allowed directories")
    assert (tmp_path / "b" / "base.qcow2").read_bytes() == before
    result = run_instar("commit", "--allow", str(tmp_path / "b"), "ov.qcow2",
                        cwd=tmp_path / "o")
    assert result.rc == 0, result.stderr


# --- hostile images ---------------------------------------------------------------------------


def _patch(path: Path, offset: int, value: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(value)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("victim,offset,value", [
    ("ov.qcow2", 40, (1 << 40).to_bytes(8, "big")),  # overlay's L1 past the end
    ("ov.qcow2", 20, (30).to_bytes(4, "big")),  # cluster size
    ("base.qcow2", 48, (1 << 40).to_bytes(8, "big")),  # base's refcount table
    ("base.qcow2", 40, (1 << 40).to_bytes(8, "big")),  # base's L1
    ("base.qcow2", 4, (7).to_bytes(4, "big")),  # version
    ("base.qcow2", 0x2001A, bytes(2)),  # a data cluster of the base with refcount 0
    ("base.qcow2", 0x30000, (0x7FFF0000 | 1 << 63).to_bytes(8, "big")),  # L2 outside
])
def test_hostile_refused(tmp_path: Path, victim: str, offset: int, value: bytes) -> None:
    build_images(tmp_path, [*BASE_QCOW2, *_qcow2("ov.qcow2", None, *OV_WRITES,
                                           backing="base.qcow2")])
    _patch(tmp_path / victim, offset, value)
    _refused(tmp_path, "-f", "qcow2", "ov.qcow2", words="")


@pytest.mark.usefixtures("allow_own_directories")
def test_hostile_data_cluster_outside(tmp_path: Path) -> None:
    """The base's L2 entry names a data cluster past the end of its file."""
    build_images(tmp_path, [*BASE_QCOW2, *_qcow2("ov.qcow2", None, *OV_WRITES,
                                           backing="base.qcow2")])
    base = tmp_path / "base.qcow2"
    l1 = int.from_bytes(base.read_bytes()[40:48], "big")
    l2 = int.from_bytes(base.read_bytes()[l1 : l1 + 8], "big") & ((1 << 56) - 512)
    _patch(base, l2 + 8 * 8, ((1 << 40) | 1 << 63).to_bytes(8, "big"))
    _refused(tmp_path, "ov.qcow2", words="")


# --- crash safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("base,grow,version", [("qcow2", False, "1.1"), ("qcow2", True, "1.1"),
                                               ("raw", True, "1.1"), ("qcow2", False, "0.10"),
                                               ("raw", False, "qcow")])
def test_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str,
                              grow: bool, version: str) -> None:
    """commit stopped after k changes (counted across its updates: the base's
    growth, its data, the overlay's emptying) for every k until it
    finishes: the overlay reads as it did; the base reads, cluster by
    cluster, as before or as committed; qemu-img check finds leaks at most.
    ``version``: the overlay's qcow2 compat, or "qcow" for a qcow overlay."""
    name = f"base.{base}"
    steps = (_qcow2(name, "1M", "write -P 1 0 1M", options="cluster_size=4k")
             if base == "qcow2" else _raw(name, "1M", "write -P 1 0 1M"))
    writes = ("write -P 2 4k 8k", "write -z 100k 4k", "write -P 3 900k 20k",
              "write -P 4 1500k 4k" if grow else "write -P 4 1000k 4k")
    top = "ov.qcow" if version == "qcow" else "ov.qcow2"
    top_fmt = _fmt(top)
    if version == "qcow":
        steps += [("create", "-f", "qcow", "-b", name, "-F", base, top),
                  *(("io", "qcow", top, write) for write in writes)]
    else:
        steps += _qcow2(top, "2M" if grow else None, *writes, backing=name, backing_fmt=base,
                        options=f"cluster_size=4k,compat={version}")
    origin = tmp_path / "origin"
    build_images(origin, steps)
    expected = qemu_read_raw(origin / top, tmp_path, top_fmt)
    old = qemu_read_raw(origin / name, tmp_path, base)
    work = tmp_path / "work"
    for k, finished in stopped_runs(  # changes counted across the updates (base, then overlay)
            monkeypatch, origin, work, lambda: commit(str(work / top), allow=(str(work),),
                                                      sandbox=SandboxSettings(mode="off"))):
        for image, fmt in ((work / top, top_fmt), (work / name, base)):
            if fmt == "qcow2":
                checked = run_qemu_img("check", "--output=json", "-f", fmt, str(image))
                report = json.loads(checked.stdout)
                assert checked.rc in (0, 3), (k, image, checked.stdout, checked.stderr)
                assert not report.get("corruptions") and not report.get("check-errors"), k
        assert qemu_read_raw(work / top, tmp_path, top_fmt) == expected, k
        now = qemu_read_raw(work / name, tmp_path, base)
        new = expected + old[len(expected):]
        assert_units_old_or_new(now, old.ljust(len(now), b"\0"), new, 4096, k)
        if finished:
            assert now == new
            if version == "1.1":
                assert (work / top).stat().st_size == 4 * 4096  # emptied
            if version == "qcow":  # emptied: cut after its L1 table
                header = (origin / top).read_bytes()[:48]
                size, shift = int.from_bytes(header[24:32], "big"), header[32] + header[33]
                l1_end = int.from_bytes(header[40:48], "big") + 8 * -(-size >> shift)
                assert (work / top).stat().st_size == l1_end
            assert "depth\": 0" not in qemu_img_ok("map", "--output=json", "-f", top_fmt,
                                                    str(work / top))
    assert k >= 6


# --- the hostile corpus -----------------------------------------------------------------------


@pytest.mark.parametrize("case,mode", corpus_params([(), ("-d",)]))
def test_hostile_corpus(case: corpus.Case, mode: tuple[str, ...], hostile_bases: corpus.Bases,
                        tmp_path: Path) -> None:
    """Every image of the hostile corpus committed by a confined instar:
    committed or refused in one line; committed, nothing changed outside the
    allowed directory (`mutation_sweep`)."""
    check_run("commit", lambda image: [*mode, image], case, hostile_bases, tmp_path,
              success=b"Image committed.\n", may_change="allowed")


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("kind", ["killed", "leak", "low"])
@pytest.mark.parametrize("args", [("-d",), ("-b", "base.qcow2")])
def test_dirty_overlay_repaired_first(tmp_path: Path, kind: str, args: tuple[str, ...]) -> None:
    """A dirty qcow2 overlay (lazy refcounts, not closed cleanly) is repaired
    by the read-write open, its check's lines on stderr, then committed."""
    ours = _parity(tmp_path, [*BASE_QCOW2, ("dirty", kind, "ov.qcow2", "base.qcow2")], *args)
    assert ours.rc == 0 and "cluster" in ours.stderr


@pytest.mark.usefixtures("allow_own_directories")
def test_dirty_overlay_emptying_not_supported_yet(tmp_path: Path) -> None:
    """A dirty overlay whose repair rebuilt its refcount structure (the tables
    moved) cannot be emptied after the commit yet: refused in one line after
    the repair (qemu's open makes it too), the overlay clean and unchanged
    in what it reads, the base unchanged."""
    build_images(tmp_path, [*BASE_QCOW2, ("dirty", "killed", "ov.qcow2", "base.qcow2")])
    reads = qemu_read_raw(tmp_path / "ov.qcow2", tmp_path, "qcow2")
    base = (tmp_path / "base.qcow2").read_bytes()
    ours = run_instar("commit", "ov.qcow2", cwd=tmp_path)
    assert ours.rc == 1 and "cluster" in ours.stderr
    assert ours.stderr.splitlines()[-1].endswith("is not supported yet; use -d to keep its data")
    assert run_qemu_img("check", str(tmp_path / "ov.qcow2")).rc == 0
    assert qemu_read_raw(tmp_path / "ov.qcow2", tmp_path, "qcow2") == reads
    assert (tmp_path / "base.qcow2").read_bytes() == base
