"""Backing chains across formats resolve like qemu's and stop at the allowlist.

qemu-img makes the chains (qcow2 over vmdk, vpc, vhdx and raw; vmdk over vmdk);
`instar dd` to raw must equal `qemu-img dd` to raw. A backing file outside the
image's directory is refused, naming the path, until `--allow` admits it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import both, pattern, qemu_img_ok, qemu_io, require_qemu, run_instar, run_qemu_img
from instar.safety import MAX_CHAIN_DEPTH

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

BASE_SIZE = 4 << 20


def _base(directory: Path, fmt: str) -> Path:
    raw = directory / "base-source.raw"
    raw.write_bytes(pattern(BASE_SIZE, seed=21))
    base = directory / f"base.{fmt}"
    qemu_img_ok("convert", "-f", "raw", "-O", fmt, str(raw), str(base))
    raw.unlink()
    return base


def _overlay(directory: Path, top_fmt: str, base: Path, base_fmt: str) -> Path:
    top = directory / f"top.{top_fmt}"
    qemu_img_ok("create", "-q", "-f", top_fmt, "-b", os.path.relpath(base, directory),
                "-F", base_fmt, str(top))
    qemu_io(top, "write -P 0xa5 64k 128k", top_fmt)
    qemu_io(top, "write -z 1M 64k", top_fmt)
    return top


CHAINS = [("qcow2", "vmdk"), ("qcow2", "vpc"), ("qcow2", "vhdx"), ("qcow2", "raw"),
          ("qcow2", "qcow2"), ("vmdk", "vmdk")]


@pytest.mark.parametrize(("top_fmt", "base_fmt"), CHAINS)
def test_chain_reads_like_qemu(top_fmt: str, base_fmt: str, tmp_path: Path) -> None:
    require_qemu()
    top = _overlay(tmp_path, top_fmt, _base(tmp_path, base_fmt), base_fmt)
    for window in ([], ["bs=65536", "skip=1", "count=20"], ["bs=1000", "skip=1000"]):
        ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
        result = run_instar("dd", *window, f"if={top}", f"of={ours}")
        assert result.rc == 0, result.stderr
        qemu = run_qemu_img("dd", *window, f"if={top}", f"of={theirs}")
        assert qemu.rc == 0, qemu.stderr
        assert ours.read_bytes() == theirs.read_bytes(), window


@pytest.mark.parametrize(("top_fmt", "base_fmt"), [("qcow2", "vmdk"), ("vmdk", "vmdk"),
                                                    ("qcow2", "raw")])
def test_backing_outside_the_directory_is_refused(
    top_fmt: str, base_fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_qemu()
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path / "here"))  # the image's own directory
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    base = _base(tmp_path / "elsewhere", base_fmt)
    top = _overlay(tmp_path / "here", top_fmt, base, base_fmt)
    out = tmp_path / "here" / "out.raw"
    refused = run_instar("dd", f"if={top}", f"of={out}")
    assert refused.rc == 1
    assert len(refused.stderr.splitlines()) == 1
    assert "base." + base_fmt in refused.stderr and "outside the allowed" in refused.stderr
    assert not out.exists()
    allowed = run_instar("dd", "--allow", str(tmp_path / "elsewhere"), f"if={top}", f"of={out}")
    assert allowed.rc == 0, allowed.stderr
    qemu_img_ok("dd", f"if={top}", f"of={tmp_path / 'theirs.raw'}")
    assert out.read_bytes() == (tmp_path / "theirs.raw").read_bytes()


def test_symlink_escaping_the_directory_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    require_qemu()
    monkeypatch.setenv("INSTAR_ALLOW", str(tmp_path / "here"))  # the image's own directory
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    base = _base(tmp_path / "elsewhere", "raw")
    (tmp_path / "here" / "base.raw").symlink_to(base)
    top = _overlay(tmp_path / "here", "qcow2", tmp_path / "here" / "base.raw", "raw")
    result = run_instar("dd", f"if={top}", f"of={tmp_path / 'here' / 'out.raw'}")
    assert result.rc == 1 and "outside the allowed" in result.stderr


def _qcow2_chain(directory: Path, images: int) -> Path:
    """``images`` qcow2 files, each backed by the previous; returns the top one."""
    (directory / "base.raw").write_bytes(pattern(1 << 20, seed=5))
    below, below_fmt = "base.raw", "raw"
    for level in range(images):
        name = f"level{level}.qcow2"
        qemu_img_ok("create", "-q", "-f", "qcow2", "-b", below, "-F", below_fmt, name,
                    cwd=directory)
        below, below_fmt = name, "qcow2"
    return directory / below


def test_chain_at_the_depth_limit_opens(tmp_path: Path) -> None:
    """16 backing files below the top image: read as qemu reads them."""
    require_qemu()
    top = _qcow2_chain(tmp_path, MAX_CHAIN_DEPTH)  # 15 qcow2 and base.raw below the top
    result = run_instar("dd", "bs=64k", f"if={top.name}", "of=ours.raw", cwd=tmp_path)
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", "bs=64k", f"if={top.name}", "of=theirs.raw", cwd=tmp_path)
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "theirs.raw").read_bytes()


def test_chain_deeper_than_the_limit_is_one_message(tmp_path: Path) -> None:
    require_qemu()
    top = _qcow2_chain(tmp_path, MAX_CHAIN_DEPTH + 3)
    message = f"Could not open '{top.name}': backing chain is deeper than 16 images"
    for command, args, status in (("dd", [f"if={top.name}", "of=out.raw"], 1),
                                  ("convert", [top.name, "out.raw"], 1),
                                  ("compare", [top.name, "base.raw"], 2)):
        result = run_instar(command, *args, cwd=tmp_path)
        assert (result.rc, result.stdout, result.stderr) == (status, "", f"instar: {message}\n")
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("broken", ["raw-as-qcow2", "truncated-qed", "missing"])
def test_a_backing_file_that_fails_is_reported_as_qemu_does(broken: str,
                                                            tmp_path: Path) -> None:
    """A backing file whose format refuses it is "Could not open backing file:
    REASON", once per level, without its name (qemu names a file only where its
    file layer fails to open it: a missing file)."""
    require_qemu()
    if broken == "raw-as-qcow2":
        (tmp_path / "base").write_bytes(bytes(1 << 20))
        base_fmt = "qcow2"
    else:
        qemu_img_ok("create", "-q", "-f", "qed", "base", "1M", cwd=tmp_path)
        base_fmt = "qed"
    below = ("base", base_fmt)
    for name, fmt in (("mid.qcow2", "qcow2"), ("mid.qed", "qed"), ("top.qcow2", "qcow2")):
        qemu_img_ok("create", "-q", "-f", fmt, "-b", below[0], "-F", below[1], "-u", name, "1M",
                    cwd=tmp_path)
        below = (name, fmt)
    if broken == "truncated-qed":
        os.truncate(tmp_path / "base", 100)
    elif broken == "missing":
        (tmp_path / "base").unlink()
    for args in (["map", "mid.qcow2"], ["map", "top.qcow2"], ["check", "top.qcow2"],
                 ["info", "--backing-chain", "top.qcow2"], ["measure", "top.qcow2"],
                 ["compare", "top.qcow2", "mid.qed"]):
        ours, theirs = both(args, tmp_path)
        assert ours == theirs, args
        assert theirs[0] != 0
