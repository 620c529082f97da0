"""qemu's image locks: an image a running qemu writes is refused, as qemu-img
refuses it, unless -U shares it. A qemu-io holding the image open read-write
(sleeping) stands in for the running VM."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import qemu_img_ok, qemu_io_path, run_instar, run_qemu_img

COMMANDS = (
    ["info", "{img}"],
    ["info", "--output=json", "{img}"],
    ["convert", "-O", "raw", "{img}", "{out}"],
    ["dd", "if={img}", "of={out}"],
    ["compare", "{img}", "{img}"],
    ["map", "{img}"],
    ["map", "--output=json", "{img}"],
)


def _hold(image: Path, log: Path) -> subprocess.Popen[bytes]:
    """A qemu-io holding ``image`` open read-write for a minute (its locks held)."""
    with log.open("ab") as errors:
        return subprocess.Popen([qemu_io_path(), "-f", "qcow2", str(image), "-c", "sleep 60000"],
                                stdout=subprocess.DEVNULL, stderr=errors)


@pytest.fixture
def image_in_use(tmp_path: Path) -> Iterator[Path]:
    image = tmp_path / "busy.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", str(image), "1M")
    log = tmp_path / "qemu-io.log"
    holder = _hold(image, log)
    try:
        deadline = time.monotonic() + 60  # a loaded machine starts qemu-io slowly
        while run_qemu_img("info", str(image)).rc == 0:  # until qemu-io holds its locks
            if holder.poll() is not None:  # it could not start: once more, then say why
                assert holder.returncode is not None
                holder = _hold(image, log)
            assert time.monotonic() < deadline, f"qemu-io never locked it: {log.read_text()}"
            time.sleep(0.05)
        yield image
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_an_image_a_running_qemu_writes_is_refused_as_qemu_refuses_it(
    command: list[str], image_in_use: Path, tmp_path: Path
) -> None:
    args = [part.format(img=image_in_use, out=tmp_path / "out.raw") for part in command]
    qemu = run_qemu_img(*args)
    ours = run_instar(*args)
    assert qemu.rc != 0
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr())
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_force_share_reads_it_anyway(command: list[str], image_in_use: Path,
                                     tmp_path: Path) -> None:
    args = [part.format(img=image_in_use, out=tmp_path / "out.raw") for part in command]
    args.insert(1, "-U")
    qemu = run_qemu_img(*args)
    ours = run_instar(*args)
    assert qemu.rc == 0 and ours.rc == 0, (qemu.stderr, ours.stderr)
    assert ours.stdout == qemu.stdout
