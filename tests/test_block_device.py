"""A block device output is written in place, zeros included (needs root for losetup)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import pattern, run_instar

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
