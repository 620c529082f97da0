"""``instar rebase`` against ``qemu-img rebase`` (7.2): the same files built in
two directories, the same command line in each, then the same exit status,
stdout and stderr; for a rebase made, the same ``qemu-img info`` (modulo sizes
on disk), the same header cluster after ``-u``, the same map of what the image
holds after a copy, a clean ``qemu-img check`` and ``qemu-img compare`` of the
two results equal (and equal to what the image read before). Then what
instar refuses where qemu rebases (nothing changed on disk), hostile images,
and a crash at every write of a safe-mode copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import hostile_corpus as corpus
from helpers import (
    Result,
    build_images,
    qemu_img_ok,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
    sample_image_names,
    stopped_runs,
    unpack_sample_image,
    without_keys,
)
from instar.rebase import rebase
from instar.worker import SandboxSettings
from mutation_sweep import check_run, corpus_params

pytestmark = pytest.mark.usefixtures("qemu_img")

# A setup step: ("create", args of qemu-img create...) or ("io", fmt, file, command).
Step = tuple[str, ...]
MiB = 1 << 20


def _raw(name: str, size: str, *writes: str) -> list[Step]:
    return [("create", "-f", "raw", name, size), *(("io", "raw", name, w) for w in writes)]


def _qcow2(name: str, size: str, backing: str | None = None, backing_fmt: str = "raw",
           options: str = "", writes: tuple[str, ...] = ()) -> list[Step]:
    args: list[str] = ["-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    return [("create", *args, name, size), *(("io", "qcow2", name, w) for w in writes)]


_VOLATILE = ("filename", "actual-size", "dirty-flag", "full-backing-filename")


def _normalised(info: Any) -> Any:
    return without_keys(info, _VOLATILE)


def _info(path: Path) -> Any:
    return _normalised(json.loads(qemu_img_ok("info", "--output=json", path.name,
                                              cwd=path.parent)))


def _held(path: Path, fmt: str) -> list[list[Any]]:
    """What the image holds itself (depth 0) and where it reads zeros, as
    qemu-img map says, host offsets aside (so neighbours of one kind join)."""
    entries = json.loads(qemu_img_ok("map", "--output=json", "-f", fmt, path.name,
                                     cwd=path.parent))
    held: list[list[Any]] = []
    for entry in entries:
        if entry["depth"] != 0:
            continue
        kind = (entry["data"], entry["zero"])
        if held and held[-1][2] == kind and held[-1][0] + held[-1][1] == entry["start"]:
            held[-1][1] += entry["length"]
        else:
            held.append([entry["start"], entry["length"], kind])
    return held


def _same(qemu: Result, ours: Result) -> None:
    assert ours.rc == qemu.rc, (qemu.stderr, ours.stderr)
    # qemu-img's output is read with universal newlines: its meter's \r too
    assert ours.stdout.replace("\r\n", "\n").replace("\r", "\n") == qemu.stdout
    assert ours.normalised_stderr() == qemu.normalised_stderr()


def _parity(tmp_path: Path, steps: list[Step], image: str, *args: str,
            fmt: str = "qcow2") -> tuple[Result, Path, Path]:
    """Build ``steps`` twice, rebase ``image`` with ``args`` by each program,
    compare their answers and, when they rebased, the two images."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    build_images(qdir, steps)
    shutil.copytree(qdir, idir)
    before = qemu_read_raw(qdir / image, tmp_path, fmt) if fmt in ("qcow2", "qed") else b""
    qemu = run_qemu_img("rebase", *args, image, cwd=qdir)
    ours = run_instar("rebase", *args, image, cwd=idir)
    _same(qemu, ours)
    qpath, ipath = qdir / image, idir / image
    named = args[args.index("-b") + 1] if "-b" in args[:-1] else ""
    if qemu.rc == 0:
        assert _info(ipath) == _info(qpath)
        if named and (len(named) > 255 or not (ipath.parent / named).exists()
                      or named == image):
            return qemu, qpath, ipath  # -u to a file not there (or itself): nothing to read
        checked = run_qemu_img("check", "-f", fmt, image, cwd=idir)
        assert checked.rc == 0, checked.stdout + checked.stderr
        compared = run_qemu_img("compare", "-f", fmt, "-F", fmt, str(qpath), str(ipath))
        assert compared.rc == 0, compared.stdout + compared.stderr
        if "-u" not in args:  # safe mode: reads as it read before
            assert qemu_read_raw(ipath, tmp_path, fmt) == before
            assert _held(ipath, fmt) == _held(qpath, fmt)
    else:
        assert ipath.read_bytes() == qpath.read_bytes() or qemu.rc
    return qemu, qpath, ipath


def _header_cluster(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: 1 << int.from_bytes(data[20:24], "big")]


# --- unsafe mode -------------------------------------------------------------------------------

_OVERLAY = [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
            *_qcow2("ov.qcow2", "1M", "base.raw")]


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["", "compat=0.10", "cluster_size=512",
                                     "cluster_size=2M", "extended_l2=on",
                                     "compression_type=zstd"])
@pytest.mark.parametrize("args", [
    ("-u", "-b", "nb.raw", "-F", "raw"),
    ("-u", "-b", "nb.qcow2", "-F", "qcow2"),
    ("-u", "-b", ""),
    ("-u",),
    ("-u", "-b", "a/much/longer/name/than/before/for/the/backing/file.img", "-F", "raw"),
    ("-u", "-b", "x" * 1023, "-F", "raw"),
])
def test_unsafe_qcow2(tmp_path: Path, options: str, args: tuple[str, ...]) -> None:
    """-u rewrites the header as qemu does, byte for byte."""
    steps = [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
             ("create", "-f", "qcow2", "nb.qcow2", "1M"),
             *_qcow2("ov.qcow2", "1M", "base.raw", options=options, writes=("write 64k 8k",))]
    if args == ("-u", "-b", "x" * 1023, "-F", "raw") and options == "cluster_size=512":
        args = ("-u", "-b", "x" * 300, "-F", "raw")
    _, qpath, ipath = _parity(tmp_path, steps, "ov.qcow2", *args)
    assert _header_cluster(ipath) == _header_cluster(qpath)


@pytest.mark.parametrize("args", [
    ("-u", "-b", "x" * 1024, "-F", "raw"),  # too long for qcow2
    ("-u", "-b", "x" * 500, "-F", "raw"),  # no room in a 512-byte cluster
    ("-u", "-b", "nb.raw"),  # -F missing
    ("-b", "nb.raw"),
    ("-u", "-b", "nb.raw", "-F", "bogus"),
    ("-b", "missing.raw", "-F", "raw"),
    ("-b", "", "-F", "bogus"),
    ("-t", "bogus", "-b", "nb.raw", "-F", "raw"),
    ("-T", "bogus", "-b", "nb.raw", "-F", "raw"),
    ("-p", "-t", "bogus", "-b", "nb.raw", "-F", "raw"),
    ("-p", "-b", "missing.raw", "-F", "raw"),
    (),
    ("-b",),
    ("-z",),
    ("-u", "-b", "nb.raw", "-F", "raw", "-f", "qed"),
    ("-u", "-b", "nb.raw", "-F", "raw", "other"),
])
@pytest.mark.usefixtures("allow_own_directories")
def test_refusals(tmp_path: Path, args: tuple[str, ...]) -> None:
    """qemu's refusals and usage errors, with nothing changed. (Safe mode
    without -F: qemu copies, then refuses to change the header; instar
    refuses before it copies. Both images read as before.)"""
    steps = [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
             *_qcow2("ov.qcow2", "1M", "base.raw", options="cluster_size=512")]
    build_images(tmp_path / "original", steps)
    qemu, qpath, ipath = _parity(tmp_path, steps, "ov.qcow2", *args)
    assert qemu.rc == 1
    assert ipath.read_bytes() == (tmp_path / "original" / "ov.qcow2").read_bytes()
    compared = run_qemu_img("compare", str(qpath), str(ipath))
    assert compared.rc == 0, compared.stdout


def test_missing_image(tmp_path: Path) -> None:
    qemu = run_qemu_img("rebase", "-u", "-b", "", "none.qcow2", cwd=tmp_path)
    ours = run_instar("rebase", "-u", "-b", "", "none.qcow2", cwd=tmp_path)
    _same(qemu, ours)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("fmt", ["qcow", "vmdk", "vdi", "vpc", "vhdx", "parallels", "raw"])
@pytest.mark.parametrize("args", [("-u", "-b", "nb.raw", "-F", "raw"), ("-u", "-b", ""),
                                  ("-u",), ("-b", "nb.raw", "-F", "raw")])
def test_formats_without_backing_change(tmp_path: Path, fmt: str,
                                        args: tuple[str, ...]) -> None:
    """qemu changes the backing file of qcow2 and qed only: "Operation not supported"."""
    steps: list[Step] = [*_raw("nb.raw", "1M"), ("create", "-f", fmt, f"t.{fmt}", "1M")]
    qemu, _, _ = _parity(tmp_path, steps, f"t.{fmt}", *args, fmt=fmt)
    assert qemu.rc == 1


# parallels-with-bitmap: qemu warns that it ignores the format extension when it
# opens the image for writing, which instar does not print (then both refuse alike).
@pytest.mark.parametrize("name", [name for name in sample_image_names()
                                  if name != "parallels-with-bitmap"])
@pytest.mark.parametrize("args", [("-u", "-b", ""), ("-u", "-b", "x.raw", "-F", "raw")])
def test_sample_images(tmp_path: Path, name: str, args: tuple[str, ...]) -> None:
    """qemu's real sample images: refused as qemu refuses them (read-only
    formats, damaged ones, formats without backing files), unchanged."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    for where in (qdir, idir):
        where.mkdir()
        unpack_sample_image(name, where)
    image = next(path.name for path in idir.iterdir())
    before = (idir / image).read_bytes()
    qemu = run_qemu_img("rebase", *args, image, cwd=qdir)
    ours = run_instar("rebase", *args, image, cwd=idir)
    _same(qemu, ours)
    assert qemu.rc == 1 and (idir / image).read_bytes() == before


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [
    ("-u", "-b", "nb.raw", "-F", "raw"),
    ("-u", "-b", "nb.qcow2", "-F", "qcow2"),
    ("-u", "-b", ""),
    ("-u",),
    ("-b", "same.raw", "-F", "raw"),  # safe mode, nothing to copy
    ("-b", "nb.raw", "-F", "raw"),  # safe mode: nothing to copy where the image holds all
])
def test_qed(tmp_path: Path, args: tuple[str, ...]) -> None:
    steps: list[Step] = [*_raw("base.raw", "1M", "write -P 1 0 1M"),
                         *_raw("same.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
                         ("create", "-f", "qcow2", "nb.qcow2", "1M"),
                         ("create", "-f", "qed", "-b", "base.raw", "-F", "raw", "ov.qed", "1M"),
                         ("io", "qed", "ov.qed", "write -P 2 0 1M")]
    _, qpath, ipath = _parity(tmp_path, steps, "ov.qed", *args, fmt="qed")
    assert qpath.read_bytes()[:4096] == ipath.read_bytes()[:4096]


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["cluster_size=4k", "", "cluster_size=16k,table_size=2"])
@pytest.mark.parametrize("args", [
    ("-b", "nb.raw", "-F", "raw"),
    ("-b", ""),
    ("-b", "short.raw", "-F", "raw"),
    ("-b", "long.raw", "-F", "raw"),
    ("-p", "-b", "nb.qcow2", "-F", "qcow2"),
])
def test_safe_qed(tmp_path: Path, options: str, args: tuple[str, ...]) -> None:
    """Safe mode copies into QED as into qcow2 (its own L1 and L2 tables)."""
    steps: list[Step] = [
        *_raw("base.raw", "1M", "write -P 1 0 512k", "write -P 2 640k 100k"),
        *_raw("nb.raw", "1M", "write -P 1 0 256k", "write -P 3 700k 4k"),
        *_raw("short.raw", "300k", "write -P 1 0 300k"),
        *_raw("long.raw", "3M", "write -P 1 0 3M"),
        *_qcow2("nb.qcow2", "1M", "nb.raw", writes=("write -P 9 900k 10k",)),
        ("create", "-f", "qed", "-o", options or "cluster_size=64k", "-b", "base.raw", "-F",
         "raw", "ov.qed", "2M"),
        *(("io", "qed", "ov.qed", w) for w in _WRITES)]
    _parity(tmp_path, steps, "ov.qed", *args, fmt="qed")


# --- safe mode -------------------------------------------------------------------------------

_WRITES = ("write -P 7 0 64k", "write -P 8 200k 3k", "write -z 400k 64k")


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["", "compat=0.10", "cluster_size=512", "cluster_size=4k",
                                     "cluster_size=2M", "refcount_bits=1",
                                     "refcount_bits=64"])
@pytest.mark.parametrize("args", [
    ("-b", "nb.raw", "-F", "raw"),
    ("-b", "nb.qcow2", "-F", "qcow2"),
    ("-b", ""),
    ("-b", "short.raw", "-F", "raw"),  # new backing shorter than the image
    ("-b", "long.raw", "-F", "raw"),  # longer
    ("-b", "base.raw", "-F", "raw"),  # the same file: nothing to copy
    ("-p", "-b", "nb.raw", "-F", "raw"),
])
def test_safe_over_raw(tmp_path: Path, options: str, args: tuple[str, ...]) -> None:
    steps = [*_raw("base.raw", "1M", "write -P 1 0 512k", "write -P 2 640k 100k"),
             *_raw("nb.raw", "1M", "write -P 1 0 256k", "write -P 3 700k 4k"),
             *_raw("short.raw", "300k", "write -P 1 0 300k"),
             *_raw("long.raw", "3M", "write -P 1 0 3M"),
             *_qcow2("nb.qcow2", "1M", "nb.raw", writes=("write -P 9 900k 10k",)),
             *_qcow2("ov.qcow2", "1M", "base.raw", options=options, writes=_WRITES)]
    _parity(tmp_path, steps, "ov.qcow2", *args)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [
    ("-b", "nb.raw", "-F", "raw"),
    ("-b", "mid.qcow2", "-F", "qcow2"),  # a file of the old chain
    ("-b", "", "-f", "qcow2"),
    ("-b", "long.qcow2", "-F", "qcow2"),
])
def test_safe_over_qcow2_chain(tmp_path: Path, args: tuple[str, ...]) -> None:
    """The old backing is a chain (qcow2 over qcow2 over raw), shorter than the image."""
    steps = [*_raw("base.raw", "600k", "write -P 1 0 600k"),
             *_qcow2("mid.qcow2", "800k", "base.raw", options="cluster_size=4k",
                     writes=("write -P 5 100k 100k", "write -z 300k 8k")),
             *_qcow2("top.qcow2", "900k", "mid.qcow2", "qcow2",
                     writes=("write -P 6 500k 4k",)),
             *_raw("nb.raw", "1M", "write -P 1 0 64k"),
             *_qcow2("long.qcow2", "4M", options="cluster_size=512",
                     writes=("write -P 4 0 3M",)),
             *_qcow2("ov.qcow2", "2M", "top.qcow2", "qcow2", options="cluster_size=16k",
                     writes=("write -P 7 64k 32k",))]
    _parity(tmp_path, steps, "ov.qcow2", *args)


@pytest.mark.usefixtures("allow_own_directories")
def test_safe_relative_name(tmp_path: Path) -> None:
    """A relative -b is found beside the image, and written as given."""
    steps: list[Step] = [("mkdir", "d"), *_raw("d/base.raw", "1M", "write -P 1 0 1M"),
                         *_raw("d/nb.raw", "1M", "write -P 1 0 100k"),
                         *_qcow2("d/ov.qcow2", "1M", "base.raw")]
    _parity(tmp_path, steps, "d/ov.qcow2", "-b", "nb.raw", "-F", "raw")
    _parity(tmp_path / "again", steps, "d/ov.qcow2", "-b", "missing.raw", "-F", "raw")


@pytest.mark.usefixtures("allow_own_directories")
def test_safe_with_snapshot(tmp_path: Path) -> None:
    """L2 tables shared with an internal snapshot are copied before they change."""
    steps = [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
             *_qcow2("ov.qcow2", "1M", "base.raw", options="cluster_size=4k",
                     writes=("write -P 2 0 8k", "write -P 3 600k 8k")),
             ("snapshot", "-c", "s1", "ov.qcow2")]
    _, qpath, ipath = _parity(tmp_path, steps, "ov.qcow2", "-b", "nb.raw", "-F", "raw")
    for path in (qpath, ipath):
        qemu_img_ok("convert", "-l", "s1", "-O", "raw", str(path), str(path) + ".s1")
    assert Path(str(ipath) + ".s1").read_bytes() == Path(str(qpath) + ".s1").read_bytes()


@pytest.mark.usefixtures("allow_own_directories")
def test_safe_refcount_table_grows(tmp_path: Path) -> None:
    """Enough copied clusters (512 bytes, 1-bit refcounts... 16-bit here) that
    new refcount blocks and a larger refcount table are needed."""
    steps = [*_raw("base.raw", "24M", "write -P 1 0 24M"), *_raw("nb.raw", "24M"),
             *_qcow2("ov.qcow2", "24M", "base.raw", options="cluster_size=512")]
    _parity(tmp_path, steps, "ov.qcow2", "-b", "nb.raw", "-F", "raw")


def test_backing_refused_by_policy(tmp_path: Path) -> None:
    """Without --allow, neither the old nor the new backing file is opened."""
    build_images(tmp_path, [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
                      *_qcow2("ov.qcow2", "1M", "base.raw")])
    before = (tmp_path / "ov.qcow2").read_bytes()
    ours = run_instar("rebase", "-b", "nb.raw", "-F", "raw", "ov.qcow2", cwd=tmp_path)
    assert ours.rc == 1 and ours.stderr.count("\n") == 1, ours.stderr
    assert "backing file" in ours.stderr
    ours = run_instar("rebase", "--allow", str(tmp_path / "none"), "-u", "-b", "nb.raw", "-F",
                      "raw", "ov.qcow2", cwd=tmp_path)
    assert ours.rc == 0  # -u opens no backing file
    qemu_img_ok("rebase", "-u", "-b", "base.raw", "-F", "raw", "ov.qcow2", cwd=tmp_path)
    (tmp_path / "sub").mkdir()
    ours = run_instar("rebase", "--allow", str(tmp_path), "-b", "/etc/hostname", "-F", "raw",
                      "ov.qcow2", cwd=tmp_path)
    assert (ours.rc == 1 and "not allowed" in ours.stderr.lower()) or "policy" in ours.stderr
    assert (tmp_path / "ov.qcow2").read_bytes() == before


# --- refused where qemu rebases -----------------------------------------------------------------


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["extended_l2=on", "extended_l2=on,cluster_size=16k"])
@pytest.mark.parametrize("args", [
    ("-b", "nb.raw", "-F", "raw"),
    ("-b", ""),
    ("-b", "short.raw", "-F", "raw"),
    ("-b", "long.raw", "-F", "raw"),
])
def test_safe_extended_l2(tmp_path: Path, options: str, args: tuple[str, ...]) -> None:
    """Extended L2 entries: subclusters copied into new clusters, zero bits
    where the old backing file has ended (the image's own clusters whole)."""
    steps = [*_raw("base.raw", "1M", "write -P 1 0 512k", "write -P 2 640k 100k"),
             *_raw("nb.raw", "1M", "write -P 1 0 256k", "write -P 3 700k 4k"),
             *_raw("short.raw", "300k", "write -P 1 0 300k"),
             *_raw("long.raw", "3M", "write -P 1 0 3M"),
             *_qcow2("ov.qcow2", "2M", "base.raw", options=options,
                     writes=("write -P 7 0 64k", "write -z 384k 64k"))]
    _parity(tmp_path, steps, "ov.qcow2", *args)


@pytest.mark.usefixtures("allow_own_directories")
def test_copy_refused_partly_allocated(tmp_path: Path) -> None:
    """Extended L2 entries: a cluster the image allocated, with subclusters
    the backing file answers that must be copied: not supported yet, refused,
    the file unchanged."""
    build_images(tmp_path, [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
                      *_qcow2("ov.qcow2", "1M", "base.raw", options="extended_l2=on",
                              writes=("write -P 2 0 2k",)), ("snapshot", "-c", "s", "ov.qcow2")])
    before = (tmp_path / "ov.qcow2").read_bytes()
    ours = run_instar("rebase", "-b", "nb.raw", "-F", "raw", "ov.qcow2", cwd=tmp_path)
    assert ours.rc == 1 and ours.stderr.count("\n") == 1 and "not supported yet" in ours.stderr
    assert (tmp_path / "ov.qcow2").read_bytes() == before


# --- hostile images ---------------------------------------------------------------------------


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("offset,value", [
    (40, (1 << 40).to_bytes(8, "big")),  # L1 past the end of the file
    (48, (1 << 40).to_bytes(8, "big")),  # reftable past the end
    (4, (7).to_bytes(4, "big")),  # version
    (20, (30).to_bytes(4, "big")),  # cluster bits
    (8, (70000).to_bytes(8, "big")),  # backing name offset past the cluster
    (16, (5000).to_bytes(4, "big")),  # backing name length
    (72, (1 << 1).to_bytes(8, "big")),  # the corrupt bit
    (72, (1 << 0).to_bytes(8, "big")),  # the dirty bit
])
@pytest.mark.parametrize("args", [("-u", "-b", "nb.raw", "-F", "raw"),
                                  ("-b", "nb.raw", "-F", "raw")])
def test_hostile_refused(tmp_path: Path, offset: int, value: bytes,
                         args: tuple[str, ...]) -> None:
    """A damaged header: where qemu refuses, instar refuses too; where instar
    refuses, in one line with the file unchanged."""
    steps = [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
             *_qcow2("ov.qcow2", "1M", "base.raw")]
    for where in ("q", "i"):
        build_images(tmp_path / where, steps)
        with (tmp_path / where / "ov.qcow2").open("r+b") as file:
            file.seek(offset)
            file.write(value)
    path = tmp_path / "i" / "ov.qcow2"
    before = path.read_bytes()
    qemu = run_qemu_img("rebase", *args, "ov.qcow2", cwd=tmp_path / "q")
    ours = run_instar("rebase", *args, "ov.qcow2", cwd=tmp_path / "i")
    assert ours.rc == 1 or qemu.rc == 0, (qemu.stderr, ours.stderr)
    if ours.rc:
        assert ours.stderr.count("\n") == 1, ours.stderr
        assert path.read_bytes() == before


@pytest.mark.usefixtures("allow_own_directories")
def test_hostile_l2_refcount_zero(tmp_path: Path) -> None:
    """An L2 table whose refcount is 0 is refused before the copy is claimed."""
    build_images(tmp_path, [*_raw("base.raw", "1M", "write -P 1 0 1M"), *_raw("nb.raw", "1M"),
                      *_qcow2("ov.qcow2", "1M", "base.raw", writes=("write -P 2 0 4k",))])
    path = tmp_path / "ov.qcow2"
    data = bytearray(path.read_bytes())
    l2 = int.from_bytes(data[int.from_bytes(data[40:48], "big"):][:8], "big") & ((1 << 56) - 512)
    block = int.from_bytes(data[int.from_bytes(data[48:56], "big"):][:8], "big")
    data[block + 2 * (l2 // 65536) : block + 2 * (l2 // 65536) + 2] = bytes(2)
    path.write_bytes(bytes(data))
    ours = run_instar("rebase", "-b", "nb.raw", "-F", "raw", "ov.qcow2", cwd=tmp_path)
    assert ours.rc == 1 and ours.stderr.count("\n") == 1 and "refcount" in ours.stderr
    assert path.read_bytes() == bytes(data)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [("-b", "ov.qcow2", "-F", "qcow2"),
                                  ("-u", "-b", "ov.qcow2", "-F", "qcow2")])
def test_own_backing(tmp_path: Path, args: tuple[str, ...]) -> None:
    """The image as its own new backing file: qemu's lock refuses it in safe
    mode (instar sees the same file); -u writes the name, as qemu does."""
    _parity(tmp_path, _qcow2("ov.qcow2", "1M", writes=("write -P 2 0 4k",)), "ov.qcow2",
            *args)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [("-u", "-b", "nb.raw", "-F", "raw"),
                                  ("-b", "nb.raw", "-F", "raw"), ("-u", "-F", "bogus")])
def test_corrupt_bit(tmp_path: Path, args: tuple[str, ...]) -> None:
    """qemu opens no image with the corrupt bit for writing."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    for where in (qdir, idir):
        build_images(where, [*_raw("nb.raw", "1M"), *_qcow2("ov.qcow2", "1M")])
        with (where / "ov.qcow2").open("r+b") as file:
            file.seek(72)
            file.write((2).to_bytes(8, "big"))
    before = (idir / "ov.qcow2").read_bytes()
    _same(run_qemu_img("rebase", *args, "ov.qcow2", cwd=qdir),
          run_instar("rebase", *args, "ov.qcow2", cwd=idir))
    assert (idir / "ov.qcow2").read_bytes() == before


# --- crash safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,options,new,minimum", [
    ("qcow2", "cluster_size=4k", "nb.raw", 4),
    ("qcow2", "cluster_size=512", "nb.raw", 6),  # new refcount blocks and table
    ("qcow2", "cluster_size=4k", "", 4),
    ("qcow2", "extended_l2=on,cluster_size=16k", "nb.raw", 4),
    ("qed", "cluster_size=4k", "nb.raw", 3),
    ("qed", "cluster_size=4k", "", 3),
])
def test_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
                              options: str, new: str, minimum: int) -> None:
    """Safe mode stopped after k changes for every k until it finishes: every
    result reads as the image did (through the old or the new backing file),
    qemu-img check finds nothing worse than leaks, the header names the old
    backing file or the new one, and a snapshot reads as it did while the
    header names the old one (a snapshot reads through the image's backing file)."""
    steps: list[Step] = [
        *_raw("base.raw", "1M", "write -P 1 200k 16k", "write -P 4 600k 1k"),
        *_raw("nb.raw", "1M", "write -P 1 200k 8k", "write -P 6 500k 4k"),
        ("create", "-f", fmt, "-o", options, "-b", "base.raw", "-F", "raw", "o." + fmt, "1M"),
        *(("io", fmt, "o." + fmt, w)
          for w in ("write -P 2 0 4k", "write -P 3 600k 8k", "write -P 5 204k 1k"))]
    if fmt == "qcow2":
        steps.append(("snapshot", "-c", "s1", "o.qcow2"))
    build_images(tmp_path, steps)
    original = tmp_path / f"o.{fmt}"
    expected = qemu_read_raw(original, tmp_path, fmt)
    snapshot = b""
    if fmt == "qcow2":
        qemu_img_ok("convert", "-l", "s1", "-O", "raw", str(original), str(tmp_path / "s1.raw"))
        snapshot = (tmp_path / "s1.raw").read_bytes()
    seen: set[str | None] = set()
    image = tmp_path / f"k.{fmt}"
    for k, finished in stopped_runs(
            monkeypatch, original, image,
            lambda: rebase(str(image), new, backing_fmt="raw" if new else None,
                           allow=(str(tmp_path),), sandbox=SandboxSettings(mode="off")),
            across=False):
        checked = run_qemu_img("check", "--output=json", "-f", fmt, str(image))
        report = json.loads(checked.stdout)
        assert checked.rc in (0, 3), (k, checked.stdout, checked.stderr)
        assert not report.get("corruptions") and not report.get("check-errors"), (k, report)
        assert qemu_read_raw(image, tmp_path, fmt) == expected, k
        backing = json.loads(qemu_img_ok("info", "--output=json", str(image))).get(
            "backing-filename")
        assert backing in ("base.raw", new or None), k
        seen.add(backing)
        if backing == "base.raw" and snapshot:
            qemu_img_ok("convert", "-l", "s1", "-O", "raw", str(image),
                        str(tmp_path / "s1.raw"))
            assert (tmp_path / "s1.raw").read_bytes() == snapshot, k
        image.unlink()
        if finished:
            assert checked.rc == 0 and backing == (new or None)
    assert k >= minimum and seen == {"base.raw", new or None}


# --- the hostile corpus ------------------------------------------------------------------------

# Families of formats without backing files are refused after the open
# test_hostile covers.
_OTHER_FORMATS = ("parallels", "vdi", "vmdk_descriptor", "vhdx_log", "plists")


@pytest.mark.parametrize("case,mode", corpus_params([("-u", "-b", ""), ("-b", "")],
                                                    skip_families=_OTHER_FORMATS))
def test_hostile_corpus(case: corpus.Case, mode: tuple[str, ...],
                        hostile_bases: corpus.Bases, tmp_path: Path) -> None:
    """Every image of the hostile corpus, its backing file removed by a
    confined instar (header only, or safe mode, which reads the old chain and
    copies what it provided): rebased or refused in one line (`mutation_sweep`)."""
    check_run("rebase", lambda image: [*mode, image], case, hostile_bases, tmp_path)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("kind", ["killed", "leak", "low"])
@pytest.mark.parametrize("args", [("-b", "new.qcow2", "-F", "qcow2"),
                                  ("-u", "-b", "new.qcow2", "-F", "qcow2"), ("-b", ""),
                                  ("-u", "-b", "")])
def test_dirty_image_repaired_first(tmp_path: Path, kind: str, args: tuple[str, ...]) -> None:
    """A dirty qcow2 image (lazy refcounts, not closed cleanly) is repaired
    by the read-write open, its check's lines on stderr, then rebased."""
    steps = [*_qcow2("old.qcow2", "4M", writes=("write -P 3 0 4M",)),
             *_qcow2("new.qcow2", "4M", writes=("write -P 4 1M 2M",)),
             ("dirty", kind, "img.qcow2", "old.qcow2")]
    qemu, _, _ = _parity(tmp_path, steps, "img.qcow2", *args)
    assert qemu.rc == 0 and "cluster" in qemu.stderr
