"""``instar commit`` into VMDK bases against ``qemu-img commit`` (7.2): for
each subformat a qcow2 overlay over a vmdk base (grains the base holds and
grains it does not, zeros written with ``write -z``, a range across grain
edges, stored zeros), copied into two directories and committed by each
program: the same stdout, stderr and exit status, the bases equal by
``qemu-img compare`` (and to what the overlay read), the same ``qemu-img
map`` of the base, the same descriptor but for the CID (a new random one in
both), a clean ``qemu-img check``. Then a crash at every write, and hostile
bases refused in one line with every file unchanged."""

from __future__ import annotations

import json
import re
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
from instar.worker import SandboxSettings

pytestmark = pytest.mark.usefixtures("qemu_img")

GRAIN = 64 << 10
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
BASE_WRITES = ("write -P 1 0 64k", "write -P 2 1M 64k", "write -P 3 192k 64k")
# Grains the base holds (0, 192k, 1M) and not (64k, 512k, 3M...), zeros over
# both, a range across three grains, stored zeros.
TOP_WRITES = ("write -P 5 32k 64k", "write -z 192k 64k", "write -z 512k 64k",
              "write -P 7 1000k 100k", "write -P 0 3M 64k", "write -z 3200k 4k")
# A stream base takes new grains only (qemu refuses to rewrite one).
STREAM_BASE = ("write -P 1 0 64k", "write -P 2 1M 64k")
STREAM_TOP = ("write -P 5 128k 64k", "write -z 256k 64k", "write -P 7 2000k 100k",
              "write -P 0 3M 64k")
_CID = re.compile(rb"\nCID=[0-9a-f]+\n")


def _build(directory: Path, subformat: str, base_writes: tuple[str, ...],
           top_writes: tuple[str, ...], size: str = "4M", options: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    qemu_img_ok("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}{options}",
                "base.vmdk", size, cwd=directory)
    for command in base_writes:
        qemu_io(directory / "base.vmdk", command, "vmdk")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", "top.qcow2",
                cwd=directory)
    for command in top_writes:
        qemu_io(directory / "top.qcow2", command, "qcow2")


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def _map(image: Path) -> list[tuple[Any, ...]]:
    """qemu-img map's runs without host offsets, neighbours alike merged."""
    runs: list[tuple[Any, ...]] = []
    for run in json.loads(qemu_img_ok("map", "--output=json", "-f", "vmdk", str(image))):
        key = (run["depth"], run["present"], run["zero"], run["data"])
        if runs and runs[-1][2:] == key:
            runs[-1] = (runs[-1][0], runs[-1][1] + run["length"], *key)
        else:
            runs.append((run["start"], run["length"], *key))
    return runs


def _same(qemu: Result, ours: Result) -> None:
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == \
        (qemu.rc, qemu.stdout, qemu.normalised_stderr())


def _descriptor(directory: Path) -> bytes:
    """The descriptor's bytes (embedded, or the descriptor file) with the CID cut out."""
    data = (directory / "base.vmdk").read_bytes()
    text = data[512 : 512 + 10240] if data[:4] == b"KDMV" else data
    assert _CID.search(text), text[:200]
    return _CID.sub(b"\nCID=\n", text).rstrip(b"\0")  # the CIDs' lengths differ


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("subformat,options", [(name, "") for name in SUBFORMATS]
                         + [("monolithicSparse", ",zeroed_grain=on")])
def test_parity(tmp_path: Path, subformat: str, options: str) -> None:
    qdir, idir = tmp_path / "q", tmp_path / "i"
    stream = subformat == "streamOptimized"
    _build(qdir, subformat, STREAM_BASE if stream else BASE_WRITES,
           STREAM_TOP if stream else TOP_WRITES, options=options)
    expected = qemu_read_raw(qdir / "top.qcow2", tmp_path, "qcow2")
    shutil.copytree(qdir, idir)
    before = _CID.search((idir / "base.vmdk").read_bytes()[:20480])
    qemu = run_qemu_img("commit", "top.qcow2", cwd=qdir)
    ours = run_instar("commit", "top.qcow2", cwd=idir)
    _same(qemu, ours)
    assert ours.rc == 0 and ours.stdout == "Image committed.\n"
    for name, fmt in (("top.qcow2", "qcow2"), ("base.vmdk", "vmdk")):
        compared = run_qemu_img("compare", "-f", fmt, "-F", fmt, str(qdir / name),
                                str(idir / name))
        assert compared.rc == 0, (name, compared.stdout, compared.stderr)
    assert qemu_read_raw(idir / "base.vmdk", tmp_path, "vmdk") == expected
    checked = run_qemu_img("check", "-f", "vmdk", "base.vmdk", cwd=idir)
    assert checked.rc == 0 and "No errors were found" in checked.stdout, checked.stdout
    if "Flat" not in subformat:  # (qemu punches holes for zeros in a flat extent,
        # instar writes zeros: the map says data where qemu's says zero; docs/cli.md)
        assert _map(idir / "base.vmdk") == _map(qdir / "base.vmdk")
    assert _descriptor(idir) == _descriptor(qdir)
    after = _CID.search((idir / "base.vmdk").read_bytes()[:20480])
    assert before is not None and after is not None and before.group() != after.group()


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentFlat"])
def test_three_images_with_b(tmp_path: Path, subformat: str) -> None:
    """``-b base.vmdk`` under two qcow2 images: both written into the base."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    _build(qdir, subformat, BASE_WRITES, ("write -P 5 32k 64k", "write -z 1M 64k"))
    (qdir / "top.qcow2").rename(qdir / "mid.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2",
                cwd=qdir)
    qemu_io(qdir / "top.qcow2", "write -P 6 100k 200k", "qcow2")
    expected = qemu_read_raw(qdir / "top.qcow2", tmp_path, "qcow2")
    shutil.copytree(qdir, idir)
    _same(run_qemu_img("commit", "-b", "base.vmdk", "top.qcow2", cwd=qdir),
          run_instar("commit", "-b", "base.vmdk", "top.qcow2", cwd=idir))
    assert qemu_read_raw(idir / "base.vmdk", tmp_path, "vmdk") == expected
    assert qemu_read_raw(qdir / "base.vmdk", tmp_path, "vmdk") == expected
    for name in ("top.qcow2", "mid.qcow2"):  # kept (-b implies -d)
        assert (idir / name).read_bytes() == (qdir / name).read_bytes()


@pytest.mark.usefixtures("allow_own_directories")
def test_nothing_to_commit_keeps_the_cid(tmp_path: Path) -> None:
    """No unit written: qemu leaves the descriptor as it is, so does instar."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    _build(qdir, "monolithicSparse", BASE_WRITES, ())
    shutil.copytree(qdir, idir)
    _same(run_qemu_img("commit", "top.qcow2", cwd=qdir),
          run_instar("commit", "top.qcow2", cwd=idir))
    assert (idir / "base.vmdk").read_bytes() == (qdir / "base.vmdk").read_bytes()


@pytest.mark.usefixtures("allow_own_directories")
def test_stream_allocated_grain(tmp_path: Path) -> None:
    """A grain a stream base holds: qemu's two lines and exit status; instar
    has changed nothing (qemu may have written other grains and the CID)."""
    qdir, idir = tmp_path / "q", tmp_path / "i"
    _build(qdir, "streamOptimized", STREAM_BASE[:1], ("write -P 2 128k 64k", "write -P 5 0 64k"),
           size="1M")
    shutil.copytree(qdir, idir)
    before = _files(idir)
    qemu = run_qemu_img("commit", "top.qcow2", cwd=qdir)
    ours = run_instar("commit", "top.qcow2", cwd=idir)
    _same(qemu, ours)
    assert ours.rc == 1 and "Could not write to allocated cluster" in ours.stderr
    assert _files(idir) == before


def _refused(directory: Path, *args: str, words: str) -> None:
    before = _files(directory)
    result = run_instar("commit", *args, cwd=directory)
    assert result.rc == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and words in result.stderr, result.stderr
    assert _files(directory) == before


@pytest.mark.usefixtures("allow_own_directories")
def test_stream_with_footer_refused(tmp_path: Path) -> None:
    """A stream whose grain directory is at the end (instar's own, VMware's):
    qemu 7.2 appends past the footer and the image no longer opens."""
    qemu_img_ok("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    qemu_io(tmp_path / "r.raw", "write -P 1 0 64k", "raw")
    result = run_instar("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                        "r.raw", "base.vmdk", cwd=tmp_path)
    assert result.rc == 0, result.stderr
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", "top.qcow2",
                cwd=tmp_path)
    qemu_io(tmp_path / "top.qcow2", "write -P 2 128k 64k", "qcow2")
    _refused(tmp_path, "top.qcow2", words="footer) is not supported yet")


# --- hostile bases ----------------------------------------------------------------------------


def _header(path: Path) -> tuple[int, ...]:
    """(gtes per GT, rgd offset, gd offset) of a sparse extent, in sectors."""
    fields = struct.unpack_from("<4sIIQQQQIQQQ", path.read_bytes())
    return fields[7], fields[8], fields[9]


def _set_gte(path: Path, grain: int, value: int) -> None:
    """Set grain ``grain``'s entry in the grain table (the first table only)."""
    data = bytearray(path.read_bytes())
    _, _, gd = _header(path)
    table = struct.unpack_from("<I", data, gd * 512)[0]
    struct.pack_into("<I", data, table * 512 + grain * 4, value)
    path.write_bytes(bytes(data))


@pytest.mark.usefixtures("allow_own_directories")
@pytest.mark.parametrize("case", ["past-eof", "twice", "gt-over-grain", "gd-zero", "rgd-zero"])
def test_hostile_sparse(tmp_path: Path, case: str) -> None:
    _build(tmp_path, "monolithicSparse", BASE_WRITES, TOP_WRITES)
    base = tmp_path / "base.vmdk"
    data = bytearray(base.read_bytes())
    _, rgd, gd = _header(base)
    table = struct.unpack_from("<I", data, gd * 512)[0]
    held = struct.unpack_from("<I", data, table * 512)[0]  # grain 0's sector
    if case == "past-eof":  # a grain the commit does not touch
        _set_gte(base, 40, 1 << 30)
    elif case == "twice":  # grain 40 names grain 0's sectors
        _set_gte(base, 40, held)
    elif case == "gt-over-grain":  # the redundant table lies on grain 0
        struct.pack_into("<I", data, rgd * 512, held)
        base.write_bytes(bytes(data))
    elif case == "gd-zero":  # qemu writes the grain and loses it
        struct.pack_into("<I", data, gd * 512, 0)
        struct.pack_into("<I", data, rgd * 512, 0)
        base.write_bytes(bytes(data))
        assert run_qemu_img("check", "base.vmdk", cwd=tmp_path).rc == 0
    else:  # qemu would write the entry into the header
        struct.pack_into("<I", data, rgd * 512, 0)
        base.write_bytes(bytes(data))
    _refused(tmp_path, "top.qcow2", words="")


@pytest.mark.usefixtures("allow_own_directories")
def test_two_extents_one_file(tmp_path: Path) -> None:
    """Two flat extents over the same bytes of one file (two guest ranges,
    one host range): refused."""
    _build(tmp_path, "twoGbMaxExtentFlat", BASE_WRITES, TOP_WRITES)
    text = (tmp_path / "base.vmdk").read_text()
    line = next(line for line in text.splitlines() if line.startswith("RW "))
    half = line.replace("RW 8192 ", "RW 4096 ")
    (tmp_path / "base.vmdk").write_text(text.replace(line, f"{half}\n{half}"))
    _refused(tmp_path, "top.qcow2", words="naming one file")


@pytest.mark.usefixtures("allow_own_directories")
def test_descriptor_without_parent_cid(tmp_path: Path) -> None:
    """qemu cannot write the new CID without a parentCID line (it fails after
    the data is written): refused before."""
    _build(tmp_path, "monolithicFlat", BASE_WRITES, TOP_WRITES)
    descriptor = tmp_path / "base.vmdk"
    descriptor.write_text(descriptor.read_text().replace("parentCID=ffffffff\n", ""))
    _refused(tmp_path, "top.qcow2", words="no CID line before its parentCID line")


def test_extent_outside_allowed(tmp_path: Path) -> None:
    """The extent lies in a directory the policy does not allow: refused,
    nothing written (the base's own directory is allowed)."""
    _build(tmp_path / "d", "monolithicFlat", BASE_WRITES, TOP_WRITES)
    (tmp_path / "other").mkdir()
    (tmp_path / "d" / "base-flat.vmdk").rename(tmp_path / "other" / "base-flat.vmdk")
    descriptor = tmp_path / "d" / "base.vmdk"
    descriptor.write_text(descriptor.read_text().replace('"base-flat.vmdk"',
                                                         '"../other/base-flat.vmdk"'))
    extent = (tmp_path / "other" / "base-flat.vmdk").read_bytes()
    _refused(tmp_path / "d", "--allow", str(tmp_path / "d"), "top.qcow2",
             words="outside the allowed directories")
    assert (tmp_path / "other" / "base-flat.vmdk").read_bytes() == extent


# --- crash safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              subformat: str) -> None:
    """commit stopped after k changes (counted across every file it writes)
    for every k until it finishes: the base opens, qemu-img check finds
    nothing, and every grain reads as before or as committed."""
    stream = subformat == "streamOptimized"
    origin = tmp_path / "origin"
    _build(origin, subformat, STREAM_BASE[:1] if stream else BASE_WRITES[:1],
           ("write -P 5 128k 64k", "write -z 256k 64k", "write -P 7 900k 70k") if stream
           else ("write -P 5 32k 64k", "write -z 256k 64k", "write -P 7 900k 70k"), size="2M")
    expected = qemu_read_raw(origin / "top.qcow2", tmp_path, "qcow2")
    old = qemu_read_raw(origin / "base.vmdk", tmp_path, "vmdk")
    work = tmp_path / "work"
    for k, finished in stopped_runs(
            monkeypatch, origin, work,
            lambda: commit(str(work / "top.qcow2"), allow=(str(work),),
                           sandbox=SandboxSettings(mode="off"))):
        checked = run_qemu_img("check", "-f", "vmdk", str(work / "base.vmdk"))
        assert checked.rc == 0, (k, checked.stdout, checked.stderr)
        now = qemu_read_raw(work / "base.vmdk", tmp_path, "vmdk")
        assert qemu_read_raw(work / "top.qcow2", tmp_path, "qcow2") == expected, k
        assert_units_old_or_new(now, old, expected, GRAIN, k)
        if finished:
            assert now == expected
    assert k >= 4
