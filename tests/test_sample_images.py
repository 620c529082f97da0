"""qemu's sample images (real Hyper-V, Virtual PC, Disk2VHD, ESXi, Parallels,
hdiutil, bximage and fuzzer output) through instar and qemu-img side by side.

For each image: ``info`` (human and JSON), ``convert -O raw`` and ``dd`` of a
window give what qemu-img gives, probed and with ``-f``; where qemu-img
refuses the image, instar refuses it too, in one line, with the same exit
status and nothing written. instar reads the format of every sample.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_instar, run_qemu_img, sample_image_names, unpack_sample_image

# A VHDX with a pending log: qemu-img refuses to open it read-only; instar replays
# the log in memory and reads what qemu reads once ``qemu-img check -r all`` has
# replayed it into the file (test_pending_log_reads_as_qemu_after_replay).
PENDING_LOG = "iotest-dirtylog-10G-4M.vhdx"
COMPARED = sorted(set(sample_image_names()) - {PENDING_LOG})


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("samples")
    for name in sample_image_names():
        unpack_sample_image(name, directory)
    return directory


def test_every_sample_is_present() -> None:
    assert len(sample_image_names()) == 16


def _qemu_format(image: Path) -> str | None:
    result = run_qemu_img("info", "--output=json", str(image))
    return json.loads(result.stdout)["format"] if result.rc == 0 else None


def _same(args: list[str], cwd: Path) -> None:
    """instar and qemu-img give the same status, stdout and stderr."""
    ours, theirs = run_instar(*args, cwd=cwd), run_qemu_img(*args, cwd=cwd)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        theirs.rc, theirs.stdout, theirs.normalised_stderr()), args


@pytest.mark.parametrize("name", COMPARED)
@pytest.mark.parametrize("output", ["human", "json"])
def test_info_matches_qemu(samples: Path, name: str, output: str) -> None:
    _same(["info", f"--output={output}", name], samples)
    fmt = _qemu_format(samples / name)
    if fmt is not None:
        _same(["info", f"--output={output}", "-f", fmt, name], samples)


@pytest.mark.parametrize("name", COMPARED)
def test_contents_match_qemu(samples: Path, name: str, tmp_path: Path) -> None:
    _convert_both(samples / name, samples / name, tmp_path)


def _convert_both(image: Path, qemu_image: Path, tmp_path: Path) -> None:
    """``convert -O raw``: instar of ``image`` and qemu-img of ``qemu_image``
    give the same status, message and bytes; nothing is left on failure."""
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    q = run_qemu_img("convert", "-O", "raw", str(qemu_image), str(theirs))
    i = run_instar("convert", "-O", "raw", str(image), str(ours))
    assert (i.rc, i.normalised_stderr()) == (q.rc, q.normalised_stderr())
    if q.rc != 0:
        assert not ours.exists() and i.stderr.count("\n") == 1
        return
    assert theirs.stat().st_size == ours.stat().st_size
    # qemu-img compare of two raw files walks their holes: fast on 127 GiB.
    assert run_qemu_img("compare", "-f", "raw", "-F", "raw", str(ours), str(theirs)).rc == 0


def test_pending_log_reads_as_qemu_after_replay(samples: Path, tmp_path: Path) -> None:
    refused = run_qemu_img("info", str(samples / PENDING_LOG))
    assert refused.rc == 1 and "contains a log that needs to be replayed" in refused.stderr
    replayed = tmp_path / "replayed.vhdx"
    shutil.copyfile(samples / PENDING_LOG, replayed)
    assert run_qemu_img("check", "-r", "all", str(replayed)).rc == 0
    ours = json.loads(run_instar("info", "--output=json", str(samples / PENDING_LOG)).stdout)
    assert ours["virtual-size"] == json.loads(
        run_qemu_img("info", "--output=json", str(replayed)).stdout)["virtual-size"]
    _convert_both(samples / PENDING_LOG, replayed, tmp_path)


@pytest.mark.parametrize("name", COMPARED)
@pytest.mark.parametrize("window", [["bs=512", "count=3"], ["bs=65536", "skip=3", "count=5"]])
def test_dd_window_matches_qemu(samples: Path, name: str, window: list[str],
                                tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    q = run_qemu_img("dd", f"if={samples / name}", f"of={theirs}", *window)
    i = run_instar("dd", f"if={samples / name}", f"of={ours}", *window)
    assert (i.rc, i.normalised_stderr()) == (q.rc, q.normalised_stderr())
    if q.rc == 0:
        assert ours.read_bytes() == theirs.read_bytes()
