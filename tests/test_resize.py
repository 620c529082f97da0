"""``instar resize`` against ``qemu-img resize`` (7.2): copies of one image,
the same command line on each, then the same stdout, exit status and stderr
(modulo the file name), the same ``qemu-img info`` (modulo names and sizes on
disk), a clean ``qemu-img check`` and ``qemu-img compare`` of the two results
equal. Then what instar refuses where qemu resizes (nothing changed on disk),
hostile images, and a crash at every write of a qcow2 L1 table's growth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hostile_corpus as corpus
from helpers import (
    Result,
    make_dirty_qcow2,
    pattern,
    qemu_img_ok,
    qemu_io,
    qemu_io_path,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
    stopped_runs,
    unpack_sample_image,
)
from instar.locks import write_conflict
from instar.resize import resize
from instar.worker import SandboxSettings
from mutation_sweep import check_run, corpus_params

pytestmark = pytest.mark.usefixtures("qemu_img")

_VOLATILE = ("filename", "actual-size", "dirty-flag", "full-backing-filename")
# qemu-img check's exit status for formats it has no check for.
UNCHECKED = ("raw", "file")


def _normalised(info: Any) -> Any:
    if isinstance(info, dict):
        return {key: _normalised(value) for key, value in info.items() if key not in _VOLATILE}
    if isinstance(info, list):
        return [_normalised(item) for item in info]
    return info


def _info(path: Path, fmt: str) -> Any:
    result = run_qemu_img("info", "--output=json", "-f", fmt, str(path))
    assert result.rc == 0, result.stderr
    return _normalised(json.loads(result.stdout))


def _stderr(result: Result, name: str) -> str:
    return result.normalised_stderr().replace(name, "FILE")


def _same_output(qemu: Result, ours: Result) -> None:
    assert ours.rc == qemu.rc, (qemu.stderr, ours.stderr)
    assert ours.stdout == qemu.stdout
    assert _stderr(ours, "i.") == _stderr(qemu, "q.")


Maker = Callable[[Path], None]


def _copies(tmp_path: Path, fmt: str, make: Maker) -> tuple[Path, Path]:
    """The image ``make`` writes, as q.FMT (for qemu-img) and i.FMT (for instar)."""
    qemu_path, our_path = tmp_path / f"q.{fmt}", tmp_path / f"i.{fmt}"
    make(qemu_path)
    shutil.copyfile(qemu_path, our_path)
    return qemu_path, our_path


def _compare(tmp_path: Path, fmt: str, make: Maker, *args: str, probe: bool = False,
             repaired: bool = False) -> tuple[Result, Result]:
    """``resize [-f fmt] ARGS[:-1] FILE ARGS[-1]`` by both programs on copies of one image
    (``repaired``: a dirty image, repaired by the open even when the resize is refused)."""
    qemu_path, our_path = _copies(tmp_path, fmt, make)
    before = our_path.read_bytes()
    given = () if probe else ("-f", fmt)
    *options, size = args
    qemu = run_qemu_img("resize", *given, *options, qemu_path.name, size, cwd=tmp_path)
    ours = run_instar("resize", *given, *options, our_path.name, size, cwd=tmp_path)
    _same_output(qemu, ours)
    if qemu.rc and not repaired:
        assert our_path.read_bytes() == before, "a refused resize changed the image"
        return qemu, ours
    assert _info(our_path, fmt) == _info(qemu_path, fmt)
    checked = run_qemu_img("check", "-f", fmt, str(our_path))
    assert checked.rc == (63 if fmt in UNCHECKED else 0), checked.stdout + checked.stderr
    compared = run_qemu_img("compare", "-f", fmt, "-F", fmt, str(qemu_path), str(our_path))
    assert compared.rc == 0, compared.stdout + compared.stderr
    return qemu, ours


def _raw(size: int = 1 << 20) -> Maker:
    def make(path: Path) -> None:
        path.write_bytes(pattern(size))
    return make


def _qcow2(size: str = "1M", options: str = "", data: tuple[str, ...] = ("0 64k",),
           backing: str | None = None, snapshot: bool = False) -> Maker:
    def make(path: Path) -> None:
        args = ["create", "-q", "-f", "qcow2"]
        if options:
            args += ["-o", options]
        if backing is not None:
            base = path.parent / backing
            if not base.exists():
                qemu_img_ok("create", "-q", "-f", "qcow2", str(base), size)
                qemu_io(base, "write -P 0x33 0 1M", "qcow2")
            args += ["-b", backing, "-F", "qcow2"]
        qemu_img_ok(*args, str(path), size)
        for seed, span in enumerate(data):
            qemu_io(path, f"write -P {0x40 + seed} {span}", "qcow2")
        if snapshot:
            qemu_img_ok("snapshot", "-c", "s1", str(path))
    return make


def _qed(path: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "qed", str(path), "1M")
    qemu_io(path, "write -P 0x11 0 64k", "qed")


# --- raw -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("+1M",), ("3M",), ("1048576",), ("1.5M",), ("+0",), ("+512",), ("1049000",),
    ("-512",), ("512k",), ("--shrink", "512k"), ("--shrink", "-1k"), ("--shrink", "1000"),
    ("--shrink", "1"), ("0",), ("-1M",), ("--shrink", "-2M"), ("1x",), ("+1x",), ("",),
    ("+",), ("18446744073709551615",), ("18446744073709551616",), ("9223372036854775807",),
    ("+9223372036854775807",), ("-q", "2M"), ("-q", "-q", "2M"), ("--", "2M"),
    ("--preallocation=falloc", "3M"), ("--preallocation=full", "3M"),
    ("--preallocation=off", "3M"), ("--preallocation=metadata", "3M"),
    ("--preallocation=bogus", "3M"), ("--preallocation=full", "512k"),
    ("--shrink", "--preallocation=falloc", "512k"), ("-U", "2M"), ("--bogus", "2M"),
])
def test_raw(tmp_path: Path, args: tuple[str, ...]) -> None:
    _compare(tmp_path, "raw", _raw(), *args)


@pytest.mark.parametrize("fmt", ["raw", "file"])
def test_raw_odd_length(tmp_path: Path, fmt: str) -> None:
    """A raw file of 1001 bytes is 1024 to qemu: growing to 1024 is no shrink."""
    _compare(tmp_path, fmt, _raw(1001), "1024")
    _compare(tmp_path, fmt, _raw(1001), "+1000")


def test_raw_probed(tmp_path: Path) -> None:
    """Probed as raw: qemu's three-line warning, then the resize."""
    qemu, _ = _compare(tmp_path, "raw", _raw(), "+1M", probe=True)
    assert "probing guessed raw" in qemu.stderr


def test_preallocation_allocates(tmp_path: Path) -> None:
    for mode in ("falloc", "full"):
        path = tmp_path / f"{mode}.raw"
        path.write_bytes(b"")
        assert run_instar("resize", "-f", "raw", f"--preallocation={mode}", str(path),
                          "4M").rc == 0
        assert path.stat().st_blocks * 512 >= 4 << 20
        assert path.read_bytes() == bytes(4 << 20)


def test_usage(tmp_path: Path) -> None:
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(512))
    for args in ((), ("x.raw",), ("-f", "raw", "x.raw"), ("x.raw", "1M", "2M"),
                 ("-f", "raw", "nonexistent", "1M"), ("-f", "raw", "nonexistent", "1x"),
                 ("-f", "bogus", "x.raw", "1M"), ("-f", "qcow2", "x.raw", "1M"),
                 ("-f", "raw", "", "1M")):
        qemu = run_qemu_img("resize", *args, cwd=tmp_path)
        ours = run_instar("resize", *args, cwd=tmp_path)
        assert ours.rc == qemu.rc == 1, args
        assert ours.normalised_stderr() == qemu.normalised_stderr(), args


# --- formats qemu does not resize ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vhdx", "vdi", "parallels", "qcow"])
@pytest.mark.parametrize("args", [("+1M",), ("--shrink", "512k"), ("512k",)])
@pytest.mark.parametrize("probe", [False, True])
def test_refused_formats(tmp_path: Path, fmt: str, args: tuple[str, ...], probe: bool) -> None:
    def make(path: Path) -> None:
        qemu_img_ok("create", "-q", "-f", fmt, str(path), "1M")
    _compare(tmp_path, fmt, make, *args, probe=probe)


# --- qed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("+1M",), ("1G",), ("1000000",), ("100T",), ("--shrink", "512k"), ("512k",),
    ("--preallocation=full", "4M"), ("--preallocation=metadata", "4M"),
])
def test_qed(tmp_path: Path, args: tuple[str, ...]) -> None:
    _compare(tmp_path, "qed", _qed, *args)


# --- qcow2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("+1G",), ("10G",), ("2M",), ("1048576",), ("1000000",), ("--shrink", "1000000"),
    ("+1",), ("--shrink", "512k"), ("--shrink", "66048"), ("--shrink", "-1000k"),
    ("--shrink", "512"), ("--preallocation=bogus", "2M"),
    ("--preallocation=full", "512k"), ("-q", "4G"), ("100P",), ("9223372036854775296",),
])
def test_qcow2(tmp_path: Path, args: tuple[str, ...]) -> None:
    _compare(tmp_path, "qcow2", _qcow2(data=("0 64k", "512k 300k", "960k 64k")), *args)


@pytest.mark.parametrize("options", [
    "cluster_size=512", "cluster_size=512,refcount_bits=1", "cluster_size=512,refcount_bits=64",
    "cluster_size=1024,compat=0.10", "cluster_size=16k,extended_l2=on", "compat=0.10",
])
@pytest.mark.parametrize("args", [("100M",), ("+3M",), ("--shrink", "300k"),
                                  ("--shrink", "1k")])
def test_qcow2_small_clusters(tmp_path: Path, options: str, args: tuple[str, ...]) -> None:
    """Small clusters: the L1 table grows (and new refcount blocks appear)."""
    _compare(tmp_path, "qcow2", _qcow2(options=options, data=("0 200k", "700k 100k")), *args)


def _near_reftable_end(path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: the one-cluster refcount table
    covers 2 MiB of file, and the data leaves less than 100 KiB of it free,
    so an L1 table for 400M (100 KiB) needs a larger refcount table."""
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
                str(path), "8M")
    qemu_io(path, "write -P 5 0 1888k", "qcow2")
    header = path.read_bytes()[:72]
    assert int.from_bytes(header[56:60], "big") == 1 and path.stat().st_size > 1900 << 10


def _reftable(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[48:56], "big")


@pytest.mark.parametrize("args", [("400M",), ("+1G",), ("4G",)])
def test_qcow2_refcount_table_grows(tmp_path: Path, args: tuple[str, ...]) -> None:
    _compare(tmp_path, "qcow2", _near_reftable_end, *args)
    original = tmp_path / "o.qcow2"
    _near_reftable_end(original)
    assert _reftable(tmp_path / "i.qcow2") != _reftable(original)


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
@pytest.mark.parametrize("args", [("1G",), ("+0",), ("+512",)])
def test_empty_image(tmp_path: Path, fmt: str, args: tuple[str, ...]) -> None:
    """An image of size 0 (a qcow2 one has no L1 table at all)."""
    def make(path: Path) -> None:
        qemu_img_ok("create", "-q", "-f", fmt, str(path), "0")
    _compare(tmp_path, fmt, make, *args)


def test_qcow2_compressed_shrink(tmp_path: Path) -> None:
    def make(path: Path) -> None:
        source = path.parent / "source.raw"
        source.write_bytes(pattern(1 << 20)[:600 << 10] + bytes(424 << 10))
        qemu_img_ok("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k",
                    str(source), str(path))
    _compare(tmp_path, "qcow2", make, "--shrink", "300k")


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("args", [("+1M",), ("100M",), ("--shrink", "512k")])
def test_qcow2_backing(tmp_path: Path, args: tuple[str, ...]) -> None:
    _compare(tmp_path, "qcow2", _qcow2(options="cluster_size=4k", backing="base.qcow2",
                                       data=("64k 64k",)), *args)


def _over_longer_backing(fmt: str, options: str, size: str = "1M",
                         data: tuple[str, ...] = ("0 300k",)) -> Maker:
    """An image of ``size`` over a 4M backing file full of data."""
    def make(path: Path) -> None:
        base = path.parent / "long.qcow2"
        if not base.exists():
            qemu_img_ok("create", "-q", "-f", "qcow2", str(base), "4M")
            qemu_io(base, "write -P 0x33 0 4M", "qcow2")
        qemu_img_ok("create", "-q", "-f", fmt, "-o", options, "-b", "long.qcow2", "-F", "qcow2",
                    str(path), size)
        for span in data:
            qemu_io(path, f"write -P 0x44 {span}", fmt)
    return make


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("fmt,options", [
    ("qcow2", "compat=0.10"), ("qed", "cluster_size=64k"), ("qcow2", "compat=1.1"),
    ("qcow2", "cluster_size=4k"), ("qcow2", "cluster_size=16k,extended_l2=on"),
    ("qcow2", "cluster_size=512,refcount_bits=1"),
])
@pytest.mark.parametrize("args", [("3M",), ("+512",), ("4M",), ("100M",), ("--shrink", "512k")])
def test_longer_backing(tmp_path: Path, fmt: str, options: str, args: tuple[str, ...]) -> None:
    """Growing over a longer backing file: the new part reads as zeros (qemu
    writes zero clusters), which v2 qcow2 and qed cannot do (qemu's messages)."""
    _compare(tmp_path, fmt, _over_longer_backing(fmt, options), *args)


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("options", ["compat=1.1", "cluster_size=16k,extended_l2=on",
                                     "compat=0.10"])
@pytest.mark.parametrize("args", [("3M",), ("+512",), ("1000k",)])
def test_longer_backing_unaligned(tmp_path: Path, options: str, args: tuple[str, ...]) -> None:
    """An old size inside a cluster the image holds: zeros written after it
    (v2 too: qemu needs zero clusters only past the old end's cluster)."""
    make = _over_longer_backing("qcow2", options, size="999k", data=("0 300k", "960k 39k"))
    _compare(tmp_path, "qcow2", make, *args)


def test_longer_backing_unaligned_unheld(tmp_path: Path) -> None:
    """The old end inside a cluster only the backing file holds: qemu copies
    it up to write the zeros; instar refuses, nothing written."""
    image = tmp_path / "a.qcow2"
    _over_longer_backing("qcow2", "compat=1.1", size="999k")(image)
    _refused(image, "--allow", str(tmp_path), "3M", words="does not hold")


def test_qcow2_backing_refused_by_policy(tmp_path: Path) -> None:
    """Without --allow, the backing file is refused before anything is written."""
    _, path = _copies(tmp_path, "qcow2", _qcow2(backing="base.qcow2"))
    before = path.read_bytes()
    result = run_instar("resize", str(path), "+1M")
    assert result.rc == 1 and "allowed directories" in result.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("args", [("2M",), ("--shrink", "512k")])
def test_qcow2_v2_snapshots(tmp_path: Path, args: tuple[str, ...]) -> None:
    _compare(tmp_path, "qcow2", _qcow2(options="compat=0.10", snapshot=True), *args)


@pytest.mark.parametrize("options", ["", "cluster_size=512", "cluster_size=4k,refcount_bits=2"])
@pytest.mark.parametrize("args", [("100M",), ("--shrink", "300k"), ("--shrink", "710k"),
                                  ("--shrink", "1k")])
def test_qcow2_v3_snapshots(tmp_path: Path, options: str, args: tuple[str, ...]) -> None:
    """Shrinking copies the L2 tables the snapshot shares; the snapshot keeps its data."""
    def make(path: Path) -> None:
        _qcow2(options=options, data=("0 200k", "700k 100k"), snapshot=True)(path)
        qemu_io(path, "write -P 0x77 100k 200k", "qcow2")  # the active image diverges
    _compare(tmp_path, "qcow2", make, *args)
    for name in ("q", "i"):  # the snapshot reads the same in both
        snapshot = tmp_path / f"{name}.snap.raw"
        qemu_img_ok("convert", "-f", "qcow2", "-l", "s1", "-O", "raw",
                    str(tmp_path / f"{name}.qcow2"), str(snapshot))
    assert (tmp_path / "q.snap.raw").read_bytes() == (tmp_path / "i.snap.raw").read_bytes()


# --- what instar refuses where qemu resizes -----------------------------------------------


def _refused(path: Path, *args: str, words: str) -> None:
    before = path.read_bytes()
    result = run_instar("resize", *args[:-1], str(path), args[-1])
    assert result.rc == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and words in result.stderr, result.stderr
    assert path.read_bytes() == before


def test_refused_where_qemu_resizes(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    _qcow2(options="cluster_size=16k,extended_l2=on")(image)
    _refused(image, "--preallocation=full", "4M", words="preallocation=full")
    _refused(image, "--preallocation=metadata", "4M", words="preallocation=metadata")
    image.unlink()
    _qcow2(backing="b.qcow2")(image)
    _refused(image, "--allow", str(tmp_path), "--preallocation=falloc", "4M",
             words="preallocation=falloc")
    image.unlink()
    _qcow2()(image)
    qemu_img_ok("bitmap", "--add", str(image), "b0")
    _refused(image, "4M", words="persistent bitmaps")



# --- hostile images --------------------------------------------------------------------------


def _patched(tmp_path: Path, offset: int, value: bytes, options: str = "") -> Path:
    path = tmp_path / "h.qcow2"
    _qcow2(options=options)(path)
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(value)
    return path


@pytest.mark.parametrize("offset,value,words", [
    (40, (1 << 40).to_bytes(8, "big"), "L1 table"),  # L1 past the end of the file
    (48, (1 << 40).to_bytes(8, "big"), "refcount table"),  # reftable past the end
    (4, (7).to_bytes(4, "big"), "version"),
    (20, (30).to_bytes(4, "big"), "cluster size"),
])
def test_hostile_refused(tmp_path: Path, offset: int, value: bytes, words: str) -> None:
    """A damaged header is refused in one line before a byte is written."""
    path = _patched(tmp_path, offset, value)
    _refused(path, "-f", "qcow2", "100G", words="")
    result = run_instar("resize", "-f", "qcow2", str(path), "100G")
    assert words.lower() in result.stderr.lower(), result.stderr


def test_hostile_refblock_outside(tmp_path: Path) -> None:
    """A refcount table entry naming a block past the end of the file."""
    path = tmp_path / "h.qcow2"
    _qcow2(options="cluster_size=512")(path)
    header = path.read_bytes()[:72]
    reftable = int.from_bytes(header[48:56], "big")
    with path.open("r+b") as file:
        file.seek(reftable + 8)
        file.write((1 << 30).to_bytes(8, "big"))
    _refused(path, "100M", words="refcount block")


def test_hostile_refcounts_past_the_end(tmp_path: Path) -> None:
    """A refcount block (2 MiB clusters, 1-bit refcounts) claiming its 16M
    clusters, far past the end of the file: the free space past them is found
    in one pass (not cluster by cluster). Writing there (32 TiB in) fails in
    one line with nothing changed where the file system cannot hold it."""
    path = tmp_path / "big.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,refcount_bits=1",
                str(path), "1M")
    with path.open("r+b") as file:
        reftable = int.from_bytes(path.read_bytes()[48:56], "big")
        file.seek(reftable)
        block = int.from_bytes(file.read(8), "big")
        file.seek(block)
        file.write(b"\xff" * (2 << 20))
    before = path.read_bytes()
    started = time.monotonic()
    result = run_instar("resize", str(path), "1T")
    assert time.monotonic() - started < 5
    if result.rc:
        assert result.stderr.count("\n") == 1 and "File too large" in result.stderr
        assert path.read_bytes() == before
    else:
        assert result.stdout == "Image resized.\n" and path.stat().st_size > 32 << 40


# --- crash safety ----------------------------------------------------------------------------


def _stop_at_every_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, original: Path,
                          new: int, shrink: bool, allow: tuple[str, ...] = (),
                          preallocation: str = "off") -> int:
    """Resize copies of ``original`` to ``new``, stopped after k changes for
    every k until one finishes: each result clean or only leaking, of the old
    or the new size, reading as the original up to the smaller size (and
    zeros after it when growing), its snapshots (if any) as they were. Returns how many changes
    the whole resize makes."""
    reference = tmp_path / "reference.raw"
    expected = qemu_read_raw(original, tmp_path, "qcow2")
    reference.write_bytes(expected)
    old = len(expected)
    snapshots = json.loads(qemu_img_ok("info", "--output=json", str(original))).get(
        "snapshots", [])
    if snapshots:
        qemu_img_ok("convert", "-l", "s1", "-O", "raw", str(original), str(tmp_path / "s1.raw"))
    sizes_seen = set()
    image = tmp_path / "k.qcow2"
    for k, finished in stopped_runs(
            monkeypatch, original, image,
            lambda: resize(str(image), new, fmt="qcow2", quiet=True, shrink=shrink, allow=allow,
                           preallocation=preallocation, sandbox=SandboxSettings(mode="off")),
            across=False):
        checked = run_qemu_img("check", "--output=json", "-f", "qcow2", str(image))
        report = json.loads(checked.stdout)
        assert checked.rc in (0, 3), (k, checked.stdout, checked.stderr)
        assert not report.get("corruptions") and not report.get("check-errors"), (k, report)
        size = json.loads(qemu_img_ok("info", "--output=json", "-f", "qcow2",
                                      str(image)))["virtual-size"]
        assert size in (old, new), k
        sizes_seen.add(size)
        if new > old:  # the same data, zeros past it (compare's default)
            compared = run_qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image),
                                    str(reference))
            assert compared.rc == 0, (k, compared.stdout)
        else:  # the same data up to the new end (past it: dropped, or not yet)
            assert qemu_read_raw(image, tmp_path, "qcow2")[:new] == expected[:new], k
        if snapshots:
            kept = tmp_path / "kept.raw"
            qemu_img_ok("convert", "-l", "s1", "-O", "raw", str(image), str(kept))
            # qemu-img reads a snapshot at the image's current size
            data = kept.read_bytes()
            assert data == (tmp_path / "s1.raw").read_bytes()[:size], k
            kept.unlink()
        image.unlink()
        if finished:
            assert checked.rc == 0 and size == new
    assert sizes_seen == {old, new}, (sizes_seen, k)
    return k


@pytest.mark.parametrize("options,new,changes", [
    ("cluster_size=512", 400 << 20, 6),  # new refcount blocks: every phase writes
    ("cluster_size=512,refcount_bits=1", 100 << 20, 4),
])
def test_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              options: str, new: int, changes: int) -> None:
    """qcow2 grown from 1M with 512-byte clusters (its L1 table grows)."""
    original = tmp_path / "o.qcow2"
    _qcow2(options=options, data=("0 200k", "700k 100k"))(original)
    assert _stop_at_every_change(tmp_path, monkeypatch, original, new, False) == changes


def test_crash_while_the_refcount_table_grows(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The L1 table and the refcount table both grow: one header write switches both."""
    original = tmp_path / "o.qcow2"
    _near_reftable_end(original)
    assert _stop_at_every_change(tmp_path, monkeypatch, original, 400 << 20, False) >= 8


@pytest.mark.parametrize("options,size,data,changes", [
    ("cluster_size=4k", "1M", ("0 300k",), 6),  # a new L2 table, the L1 grows
    ("cluster_size=4k", "999k", ("0 300k", "960k 39k"), 7),  # zeros after the old end
    ("cluster_size=16k,extended_l2=on", "999k", ("0 300k", "960k 39k"), 2),  # in place
])
def test_crash_while_zero_filling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  options: str, size: str, data: tuple[str, ...],
                                  changes: int) -> None:
    """Grown over a longer backing file: the new part is zeros once the size is new."""
    original = tmp_path / "o.qcow2"
    _over_longer_backing("qcow2", options, size=size, data=data)(original)
    assert _stop_at_every_change(tmp_path, monkeypatch, original, 4 << 20, False,
                                 allow=(str(tmp_path),)) == changes


@pytest.mark.parametrize("new", [710 << 10, 300 << 10])
def test_crash_while_shrinking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               new: int) -> None:
    """qcow2 with a snapshot shrunk: shared L2 tables copied, refcounts lowered."""
    original = tmp_path / "o.qcow2"
    _qcow2(options="cluster_size=512", data=("0 200k", "700k 100k"), snapshot=True)(original)
    qemu_io(original, "write -P 0x77 100k 200k", "qcow2")
    assert _stop_at_every_change(tmp_path, monkeypatch, original, new, True) >= 4


# --- the hostile corpus ------------------------------------------------------------------------

# Families of formats qemu cannot resize are refused after the open test_hostile covers.
_OTHER_FORMATS = ("parallels", "vdi", "vmdk_descriptor", "vhdx_log", "plists")


@pytest.mark.parametrize("case,mode", corpus_params(skip_families=_OTHER_FORMATS))
def test_hostile_corpus(case: corpus.Case, mode: None, hostile_bases: corpus.Bases,
                        tmp_path: Path) -> None:
    """Every image of the hostile corpus, resized by 1M by a confined instar:
    resized ("Image resized.") or refused in one line (`mutation_sweep`)."""
    check_run("resize", lambda image: [image, "+1M"], case, hostile_bases, tmp_path,
              success=b"Image resized.\n")


@pytest.mark.parametrize("read_only", [False, True])
def test_locked_by_a_running_qemu(tmp_path: Path, read_only: bool) -> None:
    """An image qemu-io holds open (reading or writing) is refused as qemu-img refuses it."""
    path = tmp_path / "l.qcow2"
    _qcow2()(path)
    holder = subprocess.Popen([qemu_io_path(), *(["-r"] if read_only else []), str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:  # until qemu-io holds its locks (asking takes none, unlike qemu-img)
            for _ in range(600):
                if write_conflict(fd) is not None or holder.poll() is not None:
                    break
                time.sleep(0.05)
        finally:
            os.close(fd)
        qemu = run_qemu_img("resize", str(path), "1M")
        assert qemu.rc == 1 and "lock" in qemu.stderr
        before = path.read_bytes()
        ours = run_instar("resize", str(path), "2M")
        assert ours.rc == 1 and ours.normalised_stderr() == qemu.normalised_stderr()
        assert path.read_bytes() == before
    finally:
        holder.communicate(b"quit\n", timeout=30)


# --- dirty images (lazy refcounts, not closed cleanly) ----------------------------------------


@pytest.mark.parametrize("kind", ["killed", "leak", "low"])
@pytest.mark.parametrize("args", [("8M",), ("+1G",), ("--shrink", "3M"), ("1M",), ("-1",)])
def test_dirty_qcow2_repaired_first(tmp_path: Path, kind: str, args: tuple[str, ...]) -> None:
    """qemu's read-write open repairs a dirty image (its check's lines on
    stderr) before resizing it; a refusal after the open leaves it repaired."""
    def make(path: Path) -> None:
        make_dirty_qcow2(path, kind)
    qemu, _ = _compare(tmp_path, "qcow2", make, *args, repaired=True)
    assert "cluster" in qemu.stderr  # the repair's lines were printed, and matched


@pytest.mark.parametrize("name", ["empty.bochs", "simple-dmg.dmg", "simple-pattern.cloop"])
@pytest.mark.parametrize("probe", [False, True])
def test_read_only_formats(tmp_path: Path, name: str, probe: bool) -> None:
    """qemu's read-only drivers fail the read-write open: "Image is read-only"."""
    path = unpack_sample_image(name, tmp_path)
    before = path.read_bytes()
    given = () if probe else ("-f", name.rsplit(".", 1)[1])
    qemu = run_qemu_img("resize", *given, path.name, "+1M", cwd=tmp_path)
    ours = run_instar("resize", *given, path.name, "+1M", cwd=tmp_path)
    assert qemu.rc == 1 and "Image is read-only" in qemu.stderr
    _same_output(qemu, ours)
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["killed", "leak", "low"])
def test_dirty_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    kind: str) -> None:
    """Stopped after k changes (the repair's and the resize's, counted
    together) for every k: the image reads as before, of the old or the new
    size; still dirty, qemu's repair makes it clean; else it is clean or only
    leaks. The last run is the whole resize: clean, the new size."""
    original = tmp_path / "original.qcow2"
    make_dirty_qcow2(original, kind)
    expected = qemu_read_raw(original, tmp_path, "qcow2")
    old, new = len(expected), 8 << 20
    sizes_seen = set()
    image = tmp_path / "k.qcow2"
    for k, finished in stopped_runs(
            monkeypatch, original, image,
            lambda: resize(str(image), new, fmt="qcow2", quiet=True,
                           sandbox=SandboxSettings(mode="off")), most=200):
        info = json.loads(qemu_img_ok("info", "--output=json", "-f", "qcow2", str(image)))
        size = info["virtual-size"]
        assert size in (old, new), k
        sizes_seen.add(size)
        if info["dirty-flag"]:
            assert size == old, k
            repaired = run_qemu_img("check", "-r", "all", "-f", "qcow2", str(image))
            assert repaired.rc == 0, (k, repaired.stdout, repaired.stderr)
        checked = run_qemu_img("check", "--output=json", "-f", "qcow2", str(image))
        report = json.loads(checked.stdout)
        assert checked.rc in (0, 3), (k, checked.stdout, checked.stderr)
        assert not report.get("corruptions") and not report.get("check-errors"), (k, report)
        assert qemu_read_raw(image, tmp_path, "qcow2")[:old] == expected, k
        image.unlink()
        if finished:
            assert checked.rc == 0 and size == new
    assert sizes_seen == {old, new}, (sizes_seen, k)
    assert k > 2
