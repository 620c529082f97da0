"""``instar create`` against ``qemu-img create`` (7.2): the same command line into
two files, then the same stdout (modulo the file name), exit status and stderr,
the same ``qemu-img info`` (modulo names, allocation and random ids), a clean
``qemu-img check`` of instar's image where qemu checks the format, and
``qemu-img compare`` of the two images equal."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from helpers import Result, qemu_img_ok, qemu_io, run_instar, run_qemu_img, without_keys

pytestmark = pytest.mark.usefixtures("qemu_img")

FORMATS = ("raw", "file", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels", "qed", "qcow")
SIZES = ("0", "512", "1000", "1048577", "1G", "64G")
# Formats qemu-img check has no check for (exit 63 for both images).
UNCHECKED = ("raw", "file", "vpc", "qcow")
# What differs between two images created alike: names, allocation, random ids.
_VOLATILE = ("filename", "actual-size", "cid", "dirty-flag")


def _normalised_info(info: Any) -> Any:
    return without_keys(info, _VOLATILE)


def _info(path: Path) -> Any:
    """info's JSON (the image's directory named DIR), or its error."""
    result = run_qemu_img("info", "--output=json", str(path))
    if result.rc:
        return result.rc, result.stderr.replace(str(path), "FILE")
    return _normalised_info(json.loads(result.stdout.replace(str(path.parent), "DIR")))


def _same_output(qemu: Result, ours: Result, qemu_name: str, our_name: str) -> None:
    """stdout, exit status and stderr alike, once each file name is the same.

    qemu-img ends "Detected format of FMT." without a newline (its hint has
    none); instar ends the line: that newline is the only difference allowed.
    """
    def stderr(result: Result, name: str) -> str:
        text = result.normalised_stderr().replace(name, "FILE")
        return text if text.endswith("\n") or not text else text + "\n"

    assert ours.rc == qemu.rc, (qemu.stderr, ours.stderr)
    assert ours.stdout.replace(our_name, "FILE") == qemu.stdout.replace(qemu_name, "FILE")
    assert stderr(ours, our_name) == stderr(qemu, qemu_name)


def _compare_create(tmp_path: Path, fmt: str, *args: str, size: str | None = None,
                    before: tuple[str, ...] = ()) -> tuple[Result, Result]:
    """``create -f fmt ARGS FILE [size]`` by both programs into q.FMT and i.FMT."""
    qemu_name, our_name = f"q.{fmt}", f"i.{fmt}"
    tail = (size,) if size is not None else ()
    qemu = run_qemu_img("create", *before, "-f", fmt, *args, qemu_name, *tail, cwd=tmp_path)
    ours = run_instar("create", *before, "-f", fmt, *args, our_name, *tail, cwd=tmp_path)
    _same_output(qemu, ours, qemu_name, our_name)
    if qemu.rc == 0:
        _same_image(tmp_path / qemu_name, tmp_path / our_name, fmt)
    return qemu, ours


def _same_image(qemu_path: Path, our_path: Path, fmt: str) -> None:
    info = _info(qemu_path)
    assert _info(our_path) == info
    if isinstance(info, tuple):  # neither opens: nothing to check or compare
        return
    checked = run_qemu_img("check", str(our_path))
    if fmt in UNCHECKED:
        assert checked.rc == 63, checked.stderr
    else:
        assert checked.rc == 0, checked.stdout + checked.stderr
    compared = run_qemu_img("compare", "-f", fmt, "-F", fmt, str(qemu_path), str(our_path))
    assert compared.rc == 0, compared.stdout + compared.stderr


# Where an image of 0 bytes is not qemu's (docs/formats/vmdk.md, vhdx.md): see below.
_ZERO_SIZE_DIVERGES = ("vmdk", "vhdx")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_image_is_qemus(tmp_path: Path, fmt: str, size: str) -> None:
    if size == "0" and fmt in _ZERO_SIZE_DIVERGES:
        return  # test_zero_size_vmdk_and_vhdx
    _compare_create(tmp_path, fmt, size=size)


def test_zero_size_vmdk_and_vhdx(tmp_path: Path) -> None:
    """qemu-img 7.2 writes a vmdk of 0 bytes it cannot open, and a vhdx of 0 bytes
    with 8 MiB blocks and a 74 MB BAT; instar's (convert's layout) open, check
    clean, and differ from qemu's vhdx only in the block size."""
    qemu_img_ok("create", "-q", "-f", "vmdk", str(tmp_path / "q.vmdk"), "0")
    assert "Unsupported image type" in run_qemu_img("info", str(tmp_path / "q.vmdk")).stderr
    for fmt in _ZERO_SIZE_DIVERGES:
        ours = run_instar("create", "-f", fmt, "i." + fmt, "0", cwd=tmp_path)
        assert ours.rc == 0, ours.stderr
        info = json.loads(qemu_img_ok("info", "--output=json", str(tmp_path / f"i.{fmt}")))
        assert info["virtual-size"] == 0
        assert run_qemu_img("check", str(tmp_path / f"i.{fmt}")).rc == 0
    qemu_img_ok("create", "-q", "-f", "vhdx", str(tmp_path / "q.vhdx"), "0")
    theirs, ours_info = _info(tmp_path / "q.vhdx"), _info(tmp_path / "i.vhdx")
    assert (theirs.pop("cluster-size"), ours_info.pop("cluster-size")) == (8 << 20, 1 << 20)
    assert ours_info == theirs


OPTIONS = [
    ("qcow2", "cluster_size=512"), ("qcow2", "cluster_size=2M"), ("qcow2", "compat=0.10"),
    ("qcow2", "extended_l2=on"), ("qcow2", "lazy_refcounts=on,refcount_bits=1"),
    ("qcow2", "refcount_bits=64,compression_type=zstd"), ("qcow2", "compat=1.1,cluster_size=4k"),
    ("qcow2", "preallocation=off"), ("raw", "preallocation=off"),
    ("file", "preallocation=off"), ("file", "size=2M"),
    ("vmdk", "adapter_type=lsilogic,hwversion=6"), ("vmdk", "compat6=on"),
    ("vmdk", "subformat=streamOptimized"), ("vmdk", "zeroed_grain=on,toolsversion=10240"),
    ("vpc", "subformat=fixed"), ("vpc", "force_size=on"), ("vpc", "subformat=dynamic"),
    ("vhdx", "subformat=fixed"), ("vhdx", "block_size=8M,log_size=2M"),
    ("vhdx", "block_state_zero=off"), ("vdi", "static=on"), ("parallels", "cluster_size=64k"),
    ("qed", "cluster_size=4k,table_size=8"), ("qed", "table_size=2"),
    ("qcow2", "size=3M"), ("vdi", "size=5M"),
]


@pytest.mark.parametrize(("fmt", "options"), OPTIONS)
def test_options_are_qemus(tmp_path: Path, fmt: str, options: str) -> None:
    size = None if "size=" in options.replace("_size=", "") else "70M"
    _compare_create(tmp_path, fmt, "-o", options, size=size)


def test_qed_table_size_1_is_refused(tmp_path: Path) -> None:
    """qemu-img creates it and then cannot open it; instar refuses it with the
    message qemu's open gives, after the same Formatting line, leaving nothing."""
    qemu = run_qemu_img("create", "-f", "qed", "-o", "table_size=1", "q.qed", "1M",
                        cwd=tmp_path)
    ours = run_instar("create", "-f", "qed", "-o", "table_size=1", "i.qed", "1M", cwd=tmp_path)
    assert qemu.rc == 0 and ours.rc == 1
    assert ours.stdout.replace("i.qed", "q.qed") == qemu.stdout
    assert run_qemu_img("info", "q.qed", cwd=tmp_path).stderr.replace("qemu-img", "instar") == \
        ours.stderr.replace("i.qed", "q.qed")
    assert not (tmp_path / "i.qed").exists()


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    _, ours = _compare_create(tmp_path, "qcow2", size="1M", before=("-q",))
    assert ours.stdout == "" and ours.rc == 0


def test_existing_file_is_replaced(tmp_path: Path) -> None:
    for name in ("q.qcow2", "i.qcow2"):
        (tmp_path / name).write_bytes(b"\xff" * 3_000_000)
    _compare_create(tmp_path, "qcow2", size="1M")
    assert (tmp_path / "i.qcow2").stat().st_size < 3_000_000


ERRORS = [
    ("raw", ()),  # no size
    ("qcow2", ("-o", "bogus=1"), "1M"),
    ("qcow2", ("-o", "lazy_refcounts=maybe"), "1M"),
    ("qcow2", ("-o", "cluster_size=3k"), "1M"),
    ("qcow2", ("-o", "cluster_size=x"), "1M"),
    ("qcow2", ("-o", "preallocation=foo"), "1M"),
    ("qcow2", ("-b", "b.raw", "-F", "raw", "-o", "preallocation=metadata")),
    ("qcow2", ("-b", "b.raw", "-F", "raw", "-o", "preallocation=falloc,extended_l2=on")),
    ("qcow2", ("-u", "-b", "b.raw", "-F", "raw", "-o", "preallocation=full,extended_l2=on"),
     "2M"),
    ("qed", ("-b", "b.raw", "-F", "raw", "-o", "preallocation=metadata")),
    ("qcow", ("-b", "b.raw", "-F", "raw", "-o", "preallocation=full")),
    ("vmdk", ("-o", "preallocation=bad,subformat=bad"), "1M"),
    ("vmdk", ("-o", "preallocation=metadata,adapter_type=lsilogic"), "1M"),
    ("raw", ("-o", "preallocation=foo"), "1M"),
    ("vpc", ("-o", "preallocation=foo"), "1M"),
    ("qcow2", ("-o", "size=1M"), "1M"),
    ("qcow2", ("-o", ",,"), "1M"),
    ("qcow2", ("-o", "compat=0.10,lazy_refcounts=on"), "1M"),
    ("qcow2", (), "1Q"),
    ("qcow2", (), "9E"),
    ("qcow2", ("-o", "cluster_size=512"), "200G"),
    ("vpc", (), "2041G"),  # the driver's EFBIG: qemu-img create's own words
    ("vpc", ("-o", "subformat=fixed"), "3T"),
    ("vpc", ("-o", "force_size=on"), "100T"),
    ("qcow2", (), "1.5k"),
    ("qcow2", (), "0x10"),
    ("qcow2", (), "1M", "extra"),
    ("foo", (), "1M"),
    ("dmg", (), "1M"),
    ("vpc", ("-o", "subformat=bogus"), "1M"),
    ("vhdx", ("-o", "block_size=3M"), "1M"),
    ("vmdk", ("-o", "adapter_type=bogus"), "1M"),
    ("qed", ("-o", "cluster_size=3k"), "1M"),
    ("vpc", ("-o", "backing_file=x"), "1M"),
    ("raw", ("-F", "raw"), "1M"),
    ("vpc", ("-b", "b.raw"), "1M"),
    ("vhdx", ("-b", "b.raw", "-F", "raw"), "1M"),
    ("qcow2", ("-b", "", "-F", "raw"), "1M"),
    ("qcow2", ("-u", "-b", "b.raw", "-F", "raw")),
    ("qcow2", ("-u", "-b", "b.raw"), "1M"),
    ("qcow2", ("-b", "b.raw")),
    ("qcow2", ("-b", "nope", "-F", "raw")),
    ("qcow2", ("-b", "b.raw", "-F", "qcow2")),
    ("qcow2", ("-b", "b.raw", "-F", "foo")),
    ("qcow2", ("-u", "-b", "a" * 1100, "-F", "raw"), "1M"),
    ("qcow2", ("-u", "-b", "a" * 1000, "-F", "raw", "-o", "cluster_size=512"), "1M"),
    ("qcow2", ("-u", "-b", "b.raw", "-F", "raw", "-o", "cluster_size=512"), "1M"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[(" ".join(case[1]) + " " + " ".join(case[2:])
                                               )[:60] + f" ({case[0]})" for case in ERRORS])
def test_errors_are_qemus(tmp_path: Path, case: tuple[Any, ...],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))
    qemu_img_ok("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "3M")
    fmt, args, *operands = case
    qemu = run_qemu_img("create", "-f", fmt, *args, "q.img", *operands, cwd=tmp_path)
    ours = run_instar("create", "-f", fmt, *args, "i.img", *operands, cwd=tmp_path)
    _same_output(qemu, ours, "q.img", "i.img")
    if qemu.rc == 0:
        _same_image(tmp_path / "q.img", tmp_path / "i.img", fmt)


# --- preallocation ---------------------------------------------------------------------------

PREALLOCATION_MODES = ("metadata", "falloc", "full", "bad")


def _map(path: Path) -> list[dict[str, Any]]:
    """qemu-img map's runs without host offsets (instar's layout puts the
    data elsewhere in the file, docs/cli.md), each run's kind and extent kept."""
    runs = json.loads(qemu_img_ok("map", "--output=json", str(path)))
    return [{key: value for key, value in run.items() if key != "offset"} for run in runs]


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("mode", PREALLOCATION_MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_preallocation_is_qemus(tmp_path: Path, fmt: str, mode: str) -> None:
    """Every format and mode: the same Formatting line, refusal or image (info,
    check, compare); raw and qcow2 also the same map runs and file length, and
    the same order of magnitude of allocated space."""
    qemu, _ = _compare_create(tmp_path, fmt, "-o", f"preallocation={mode}", size="64M")
    if qemu.rc:
        assert not (tmp_path / f"i.{fmt}").exists()
        return
    q, i = tmp_path / f"q.{fmt}", tmp_path / f"i.{fmt}"
    if fmt in ("qcow2", "raw", "file"):
        assert i.stat().st_size == q.stat().st_size
        assert _allocated(q) // 2 <= _allocated(i) <= _allocated(q) * 2 + (1 << 20)
        if not (fmt != "qcow2" and mode == "falloc"):  # raw's first block: below
            assert _map(i) == _map(q)


def test_raw_falloc_reserves_the_file(tmp_path: Path) -> None:
    """qemu writes the first 4 KiB of a new raw file (its alignment probe), so
    its map starts with 4 KiB of data; instar writes nothing (docs/cli.md):
    both files are fully reserved and read as zeros."""
    _compare_create(tmp_path, "raw", "-o", "preallocation=falloc", size="64M")
    for name in ("q.raw", "i.raw"):
        assert _allocated(tmp_path / name) >= 64 << 20


@pytest.mark.parametrize("options", ["extended_l2=on", "cluster_size=4k",
                                     "refcount_bits=1,compat=1.1", "compat=0.10"])
@pytest.mark.parametrize("mode", ["metadata", "falloc"])
def test_qcow2_preallocation_with_options(tmp_path: Path, options: str, mode: str) -> None:
    _compare_create(tmp_path, "qcow2", "-o", f"{options},preallocation={mode}", size="9M")
    assert _map(tmp_path / "i.qcow2") == _map(tmp_path / "q.qcow2")


@pytest.mark.parametrize("mode", ["metadata", "falloc"])
def test_qcow2_preallocation_over_several_tables(tmp_path: Path, mode: str) -> None:
    """Over one L2 table's range (512 MiB): metadata puts each table before the
    data it maps (a run per table), falloc all tables first (one run), as qemu."""
    _compare_create(tmp_path, "qcow2", "-o", f"preallocation={mode}", size="1G")
    assert _map(tmp_path / "i.qcow2") == _map(tmp_path / "q.qcow2")
    assert len(_map(tmp_path / "i.qcow2")) == (2 if mode == "metadata" else 1)
    assert (tmp_path / "i.qcow2").stat().st_size == (tmp_path / "q.qcow2").stat().st_size


@pytest.mark.parametrize(("fmt", "options"), [
    ("raw", "preallocation=falloc"), ("raw", "preallocation=full"),
    ("qcow2", "preallocation=metadata"), ("qcow2", "preallocation=falloc"),
    ("qcow2", "preallocation=full"), ("qcow2", "preallocation=bad"),
    ("vmdk", "preallocation=full"), ("vmdk", "preallocation=metadata"),
    ("vpc", "preallocation=bad"), ("qcow2", "preallocation=metadata,extended_l2=on"),
])
@pytest.mark.parametrize("compress", [(), ("-c",)])
def test_convert_preallocation_is_qemus(tmp_path: Path, fmt: str, options: str,
                                        compress: tuple[str, ...]) -> None:
    """convert -o preallocation: the same output or refusal (with -c, qemu's
    "Compression and preallocation" first), the same guest data, and for qcow2
    the same map runs (data written, the rest preallocated)."""
    source = tmp_path / "src.raw"
    qemu_img_ok("create", "-q", "-f", "raw", str(source), "9M")
    qemu_io(source, "write -P 0xab 64k 1M", "raw")
    qemu_io(source, "write -P 0xcd 5M 4k", "raw")
    args = ("convert", *compress, "-O", fmt, "-o", options, "src.raw")
    qemu = run_qemu_img(*args, f"q.{fmt}", cwd=tmp_path)
    ours = run_instar(*args, f"i.{fmt}", cwd=tmp_path)
    _same_output(qemu, ours, f"q.{fmt}", f"i.{fmt}")
    if qemu.rc:
        return
    compared = run_qemu_img("compare", str(tmp_path / f"q.{fmt}"), str(tmp_path / f"i.{fmt}"))
    assert compared.rc == 0, compared.stdout
    if fmt == "qcow2":
        assert _map(tmp_path / "i.qcow2") == _map(tmp_path / "q.qcow2")
        assert run_qemu_img("check", str(tmp_path / "i.qcow2")).rc == 0


def test_missing_file_name_is_qemus(tmp_path: Path) -> None:
    qemu = run_qemu_img("create", "-f", "qcow2", cwd=tmp_path)
    ours = run_instar("create", "-f", "qcow2", cwd=tmp_path)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr())


# --- backing files ---------------------------------------------------------------------------

@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2", "vmdk"])
@pytest.mark.parametrize("size", [None, "1M", "9M"])
def test_qcow2_backing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            backing_fmt: str, size: str | None) -> None:
    """-b/-F: the size from the backing file when none is given; the new image
    reads as its backing file (compare against qemu's own and the backing)."""
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))
    base = tmp_path / "d" / f"base.{backing_fmt}"
    base.parent.mkdir()
    qemu_img_ok("create", "-q", "-f", backing_fmt, str(base), "5M")
    for name in ("q", "i"):  # the images live in d/, the name is relative to them
        os.makedirs(tmp_path / name, exist_ok=True)
        (tmp_path / name / base.name).symlink_to(base)
    args = ("create", "-f", "qcow2", "-b", base.name, "-F", backing_fmt)
    tail = (size,) if size else ()
    qemu = run_qemu_img(*args, "q/top.qcow2", *tail, cwd=tmp_path)
    ours = run_instar(*args, "i/top.qcow2", *tail, cwd=tmp_path)
    _same_output(qemu, ours, "q/top.qcow2", "i/top.qcow2")
    assert ours.rc == 0
    _same_image(tmp_path / "q/top.qcow2", tmp_path / "i/top.qcow2", "qcow2")


def test_backing_with_compat_0_10_and_u(tmp_path: Path) -> None:
    """-u: the backing file is not opened (no --allow needed), so a size is required."""
    qemu_img_ok("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "3M")
    _compare_create(tmp_path, "qcow2", "-u", "-b", "b.raw", "-F", "raw", "-o",
                    "compat=0.10", size="2M")


def test_backing_outside_allowed_directories_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTAR_ALLOW", raising=False)
    qemu_img_ok("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    ours = run_instar("create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "x.qcow2",
                      cwd=tmp_path)
    assert ours.rc == 1
    assert "outside the allowed directories" in ours.stderr
    assert ours.stderr.count("\n") == 2  # the refusal and qemu's hint line
    assert not (tmp_path / "x.qcow2").exists()
    allowed = run_instar("create", "-q", "-f", "qcow2", "--allow", str(tmp_path), "-b",
                         "b.raw", "-F", "raw", "x.qcow2", cwd=tmp_path)
    assert allowed.rc == 0, allowed.stderr


BACKINGS = [("qed", "raw"), ("qed", "qcow2"), ("qcow", "raw"), ("qcow", "qcow2"),
            ("vmdk", "vmdk"), ("qcow2", "qcow2")]


@pytest.mark.parametrize("size", [None, "3M", "9M"])
@pytest.mark.parametrize(("fmt", "backing_fmt"), BACKINGS)
def test_backing_file_reads_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    fmt: str, backing_fmt: str, size: str | None) -> None:
    """-b/-F for every format qemu gives a backing file: the same output and
    image (info, check, compare), and the overlay reads its backing file's
    data as qemu's overlay does (data written into the backing file first)."""
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))
    base = tmp_path / f"base.{backing_fmt}"
    qemu_img_ok("create", "-q", "-f", backing_fmt, str(base), "5M")
    qemu_io(base, "write -P 0x5a 0 64k", backing_fmt)
    qemu_io(base, "write -P 0xa5 4M 1M", backing_fmt)
    _compare_create(tmp_path, fmt, "-b", base.name, "-F", backing_fmt, size=size)
    q, i = tmp_path / f"q.{fmt}", tmp_path / f"i.{fmt}"
    info = json.loads(qemu_img_ok("info", "--output=json", str(i)))
    assert info["backing-filename"] == base.name
    assert info["virtual-size"] == (5 << 20 if size is None else int(size[:-1]) << 20)
    mapped = json.loads(qemu_img_ok("map", "--output=json", str(i)))
    assert any(run["depth"] == 1 and run["data"] for run in mapped)
    compared = run_qemu_img("compare", str(q), str(i))
    assert compared.rc == 0, compared.stdout
    if size is None:  # the overlay reads as its backing file
        assert run_qemu_img("compare", str(base), str(i)).rc == 0


@pytest.mark.parametrize(("fmt", "name", "message"), [
    ("qed", "b" * 65500, "a backing file name that does not fit in the QED header cluster "
     "is not supported"),
    ("qcow", "b" * 1024, "a qcow backing file name over 1023 bytes is not supported"),
    ("vmdk", 'a"b.vmdk', "a vmdk backing file name with a quote, a line break or a NUL is "
     "not supported"),
])
def test_backing_names_qemu_cannot_reopen_are_refused(tmp_path: Path, fmt: str, name: str,
                                                      message: str) -> None:
    """Names qemu writes into an image it then cannot open (or whose
    descriptor they break): one line after the Formatting line, no file."""
    ours = run_instar("create", "-f", fmt, "-u", "-b", name, "-F", fmt, "x", "1M",
                      cwd=tmp_path)
    assert ours.rc == 1 and ours.stdout.startswith("Formatting 'x'")
    assert ours.stderr == f"instar: x: {message}\n"
    assert not (tmp_path / "x").exists()


def test_backing_file_with_u_is_qemus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-u: qed and qcow do not open the backing file (no --allow needed);
    qemu's vmdk driver opens it anyway for its CID (a missing one fails after
    the Formatting line), so instar's needs the directory allowed."""
    monkeypatch.delenv("INSTAR_ALLOW", raising=False)
    qemu_img_ok("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "3M")
    for fmt in ("qed", "qcow"):
        _compare_create(tmp_path, fmt, "-u", "-b", "b.raw", "-F", "raw", size="2M")
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))
    _compare_create(tmp_path, "vmdk", "-u", "-b", "none.vmdk", "-F", "vmdk", size="2M")


VMDK_BACKING_ERRORS = [
    (("-b", "b.raw", "-F", "raw"), None), (("-u", "-b", "b.raw", "-F", "vmdk"), "5M"),
    (("-b", "b.raw", "-F", "vmdk"), None), (("-b", "b.vmdk"), None),
    (("-o", "adapter_type=bad", "-b", "b.raw", "-F", "raw"), None),
    (("-u", "-b", "b.vmdk", "-F", "vmdk"), "5M"),
    (("-o", "subformat=streamOptimized", "-b", "b.vmdk", "-F", "vmdk"), None),
    (("-o", "zeroed_grain=on", "-b", "b.vmdk", "-F", "vmdk"), "9M"),
]


@pytest.mark.parametrize(("args", "size"), VMDK_BACKING_ERRORS,
                         ids=[" ".join(args) for args, _ in VMDK_BACKING_ERRORS])
def test_vmdk_backing_is_qemus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               args: tuple[str, ...], size: str | None) -> None:
    """A vmdk names only a vmdk parent, with its CID as parentCID and the name
    as given as parentFileNameHint (the descriptors equal but for the CID)."""
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path))
    qemu_img_ok("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "5M")
    qemu_img_ok("create", "-q", "-f", "vmdk", str(tmp_path / "b.vmdk"), "5M")
    qemu, _ = _compare_create(tmp_path, "vmdk", *args, size=size)
    if qemu.rc == 0 and "subformat=streamOptimized" not in args:
        def descriptor(path: Path) -> list[str]:
            text = path.read_bytes()[0x200:0x200 + 0x2800].split(b"\0")[0].decode()
            return [line for line in text.splitlines() if not line.startswith("CID=")]
        ours, theirs = descriptor(tmp_path / "i.vmdk"), descriptor(tmp_path / "q.vmdk")
        assert [line.replace("i.vmdk", "F") for line in ours] == [
            line.replace("q.vmdk", "F") for line in theirs]
        assert any(line.startswith("parentFileNameHint=") for line in ours)


# --- -o help -----------------------------------------------------------------------------------

def _help_options(text: str) -> dict[str, str]:
    lines = text.splitlines()[1:]
    return {line.split("=<")[0].strip(): line.split("=<")[1].split(">")[0]
            for line in lines if "=<" in line}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("filename", [(), ("x.img",)])
def test_option_help(tmp_path: Path, fmt: str, filename: tuple[str, ...]) -> None:
    """The first line and the frame as qemu's; every option listed is one qemu
    lists, with its type."""
    qemu = run_qemu_img("create", "-f", fmt, "-o", "help", *filename, cwd=tmp_path)
    ours = run_instar("create", "-f", fmt, "-o", "help", *filename, cwd=tmp_path)
    assert (ours.rc, ours.stderr) == (qemu.rc, "") and ours.rc == 0
    assert ours.stdout.splitlines()[0] == qemu.stdout.splitlines()[0]
    assert ours.stdout.endswith("filename to include those options.\n") == (not filename)
    theirs = _help_options(qemu.stdout)
    listed = _help_options(ours.stdout)
    assert "size" in listed
    assert {name: theirs.get(name) for name in listed} == listed
    assert not (tmp_path / "x.img").exists()
