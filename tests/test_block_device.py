"""A block device output is written in place, zeros included (needs root for losetup)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_io, run_instar, run_qemu_img

DEVICE_SIZE = 4 << 20


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup to attach a loop device")
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xff" * DEVICE_SIZE)
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"no loop device here: {proc.stderr.strip()}")
    device = Path(proc.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


def test_dd_to_block_device_writes_zeros(loop_device: Path, tmp_path: Path) -> None:
    source = tmp_path / "sparse.raw"
    with open(source, "wb") as file:
        file.write(pattern(100_000))
        file.truncate(2 << 20)  # the rest is a hole: it must overwrite the 0xff bytes
    result = run_instar("dd", "bs=64k", f"if={source}", f"of={loop_device}")
    assert result.rc == 0, result.stderr
    with open(loop_device, "rb") as device:
        written = device.read(DEVICE_SIZE)
    assert written[: 2 << 20] == source.read_bytes()
    assert written[2 << 20 :] == b"\xff" * (DEVICE_SIZE - (2 << 20))  # beyond: untouched
    assert not list(tmp_path.glob("*.instar-tmp"))


def _commit_chain(directory: Path, device: Path, size: str | None) -> None:
    """An overlay of ``device`` (a raw base) with data and zeros written into it."""
    directory.mkdir()
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", str(device), "-F", "raw", "ov.qcow2",
                *([size] if size else []), cwd=directory)
    qemu_io(directory / "ov.qcow2", "write -P 5 64k 100k", "qcow2", cwd=directory)
    qemu_io(directory / "ov.qcow2", "write -z 1M 64k", "qcow2", cwd=directory)


def test_commit_into_a_block_device(loop_device: Path, tmp_path: Path) -> None:
    """A raw base that is a block device is written in place, as qemu-img
    commit writes it: the device then reads what qemu's commit leaves in a
    regular file of the same bytes."""
    reference = tmp_path / "reference.raw"
    reference.write_bytes(loop_device.read_bytes())
    _commit_chain(tmp_path / "q", reference, None)
    qemu = run_qemu_img("commit", "ov.qcow2", cwd=tmp_path / "q")
    _commit_chain(tmp_path / "i", loop_device, None)
    ours = run_instar("commit", "--allow", str(loop_device.parent), "--allow",
                      str(tmp_path / "i"), "ov.qcow2", cwd=tmp_path / "i")
    assert (ours.rc, ours.stdout, ours.stderr) == (qemu.rc, qemu.stdout, qemu.stderr)
    assert loop_device.read_bytes() == reference.read_bytes()
    assert b"\x05" * 1000 in reference.read_bytes()  # the commit wrote something


def test_commit_into_a_shorter_block_device(loop_device: Path, tmp_path: Path) -> None:
    """A device shorter than the top image cannot grow: qemu's job fails
    (``Block job failed: Invalid argument``), and nothing is written."""
    before = loop_device.read_bytes()
    _commit_chain(tmp_path / "i", loop_device, str(2 * DEVICE_SIZE))
    ours = run_instar("commit", "--allow", str(loop_device.parent), "--allow",
                      str(tmp_path / "i"), "ov.qcow2", cwd=tmp_path / "i")
    assert ours.rc == 1 and ours.stdout == ""
    assert ours.stderr == "instar: Block job failed: Invalid argument\n"
    assert loop_device.read_bytes() == before


def test_commit_into_a_qcow2_on_a_block_device_refused(loop_device: Path,
                                                      tmp_path: Path) -> None:
    """A qcow2 base on a device would have to grow: refused in one line
    (not supported yet), the device and the overlay unchanged."""
    qemu_img_ok("create", "-q", "-f", "qcow2", str(loop_device), "1M")
    directory = tmp_path / "i"
    directory.mkdir()
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", str(loop_device), "-F", "qcow2",
                "ov.qcow2", cwd=directory)
    qemu_io(directory / "ov.qcow2", "write -P 5 0 64k", "qcow2", cwd=directory)
    before = loop_device.read_bytes(), (directory / "ov.qcow2").read_bytes()
    ours = run_instar("commit", "--allow", str(loop_device.parent), "--allow", str(directory),
                      "ov.qcow2", cwd=directory)
    assert ours.rc == 1 and ours.stdout == ""
    assert ours.stderr == ("instar: committing into a qcow2 image on a block device is not "
                           "supported yet\n")
    assert (loop_device.read_bytes(), (directory / "ov.qcow2").read_bytes()) == before
