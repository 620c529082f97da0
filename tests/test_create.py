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

from helpers import Result, qemu_img_ok, run_instar, run_qemu_img

pytestmark = pytest.mark.usefixtures("qemu_img")

FORMATS = ("raw", "file", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels", "qed", "qcow")
SIZES = ("0", "512", "1000", "1048577", "1G", "64G")
# Formats qemu-img check has no check for (exit 63 for both images).
UNCHECKED = ("raw", "file", "vpc", "qcow")
# What differs between two images created alike: names, allocation, random ids.
_VOLATILE = ("filename", "actual-size", "cid", "dirty-flag")


def _normalised_info(info: Any) -> Any:
    if isinstance(info, dict):
        return {key: _normalised_info(value) for key, value in info.items()
                if key not in _VOLATILE}
    if isinstance(info, list):
        return [_normalised_info(item) for item in info]
    return info


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
    ("raw", ("-o", "preallocation=foo"), "1M"),
    ("vpc", ("-o", "preallocation=foo"), "1M"),
    ("qcow2", ("-o", "size=1M"), "1M"),
    ("qcow2", ("-o", ",,"), "1M"),
    ("qcow2", ("-o", "compat=0.10,lazy_refcounts=on"), "1M"),
    ("qcow2", (), "1Q"),
    ("qcow2", (), "9E"),
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


@pytest.mark.parametrize(("fmt", "mode"), [("qcow2", "metadata"), ("qcow2", "falloc"),
                                           ("qcow2", "full"), ("raw", "falloc"), ("raw", "full")])
def test_preallocation_is_refused_after_the_formatting_line(tmp_path: Path, fmt: str,
                                                             mode: str) -> None:
    """qemu preallocates; no writer of instar does yet: the same line, then a refusal."""
    args = ("create", "-f", fmt, "-o", f"preallocation={mode}")
    qemu = run_qemu_img(*args, "q.img", "1M", cwd=tmp_path)
    ours = run_instar(*args, "i.img", "1M", cwd=tmp_path)
    assert qemu.rc == 0 and ours.rc == 1
    assert ours.stdout.replace("i.img", "q.img") == qemu.stdout
    assert ours.stderr == f"instar: i.img: preallocation={mode} is not supported yet\n"
    assert not (tmp_path / "i.img").exists()


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


@pytest.mark.parametrize("fmt", ["qed", "qcow", "vmdk"])
def test_backing_not_written_yet_is_refused(tmp_path: Path, fmt: str) -> None:
    """qemu writes these; instar's writers cannot record a backing file yet."""
    ours = run_instar("create", "-f", fmt, "-u", "-b", "b.raw", "-F", "raw", "x", "1M",
                      cwd=tmp_path)
    assert (ours.rc, ours.stdout) == (1, "")
    assert ours.stderr == (f"instar: x: creating a {fmt} image with a backing file is "
                           "not supported yet\n")
    assert not (tmp_path / "x").exists()


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
