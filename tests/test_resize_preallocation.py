"""``instar resize --preallocation=metadata|falloc|full`` of a qcow2 image
against ``qemu-img resize`` (7.2), on copies of one image: the same stdout,
exit status and stderr, the same ``qemu-img info`` (but sizes on disk), the
same guest ranges allocated (``qemu-img map``'s runs with their depth and
data flags; the host offsets and which parts of the file are holes differ
with the layout, docs/cli.md), a clean ``qemu-img check``, ``qemu-img
compare`` equal; and a crash at every write leaves the old or the new image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import qemu_img_ok, run_instar, run_qemu_img
from test_resize import _compare, _qcow2, _stop_at_every_change

pytestmark = pytest.mark.usefixtures("qemu_img")

MODES = ("metadata", "falloc", "full")


def _allocated(path: Path) -> list[tuple[Any, ...]]:
    """map's runs as (start, length, depth, present, data), adjacent ones merged."""
    runs: list[tuple[Any, ...]] = []
    for run in json.loads(qemu_img_ok("map", "--output=json", "-f", "qcow2", str(path))):
        key = (run["depth"], run["present"], run["data"])
        if runs and runs[-1][2:] == key and runs[-1][0] + runs[-1][1] == run["start"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + run["length"], *key)
        else:
            runs.append((run["start"], run["length"], *key))
    return runs


CASES = [
    ("", ("0 4k",), "3M"),
    ("", ("0 64k",), "1000000"),
    ("", (), "+1G"),
    ("cluster_size=512", ("0 200k", "700k 100k"), "5M"),
    ("cluster_size=4k", ("0 300k", "960k 39k"), "4M"),
    ("cluster_size=4k", ("0 300k",), "+1000k"),
    ("compat=0.10", ("0 64k",), "2M"),
    ("cluster_size=512,refcount_bits=1", ("0 200k",), "3M"),
    ("cluster_size=512,refcount_bits=64", ("0 200k",), "30M"),
    ("", ("0 64k",), "1M"),  # the same size: qemu's refusal
    ("", ("0 64k",), "512k"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("options", "data", "size"), CASES)
def test_qcow2_preallocation_is_qemus(tmp_path: Path, mode: str, options: str,
                                      data: tuple[str, ...], size: str) -> None:
    qemu, _ = _compare(tmp_path, "qcow2", _qcow2(size="999k" if "960k" in str(data) else "1M",
                                                 options=options, data=data),
                       f"--preallocation={mode}", size)
    if qemu.rc == 0:
        assert _allocated(tmp_path / "i.qcow2") == _allocated(tmp_path / "q.qcow2")


def test_empty_image(tmp_path: Path) -> None:
    for mode in MODES:
        directory = tmp_path / mode
        directory.mkdir()
        qemu, _ = _compare(directory, "qcow2", _qcow2(size="0", data=()),
                           f"--preallocation={mode}", "1M")
        assert qemu.rc == 0
        assert _allocated(directory / "i.qcow2") == _allocated(directory / "q.qcow2")


def test_metadata_file_is_qemus(tmp_path: Path) -> None:
    """With one L2 table, metadata preallocation gives qemu's very file length
    and holes: the data after the old data, zeros written over the part of
    the old end's cluster before the end (qemu's copy-on-write)."""
    _compare(tmp_path, "qcow2", _qcow2(size="1000000", data=("0 4k",)),
             "--preallocation=metadata", "3M")
    ours, theirs = tmp_path / "i.qcow2", tmp_path / "q.qcow2"
    assert ours.stat().st_size == theirs.stat().st_size
    maps = [run_qemu_img("map", "--output=json", str(path)).stdout for path in (theirs, ours)]
    assert maps[0] == maps[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("options", "size", "new"), [
    ("cluster_size=512", "1M", 2200 << 10),  # new L2 tables, the L1 and refcounts grow
    ("cluster_size=4k", "999k", 3 << 20),  # the old end's cluster mapped, zeros before it
])
def test_crash_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                              options: str, size: str, new: int) -> None:
    original = tmp_path / "o.qcow2"
    _qcow2(size=size, options=options, data=("0 200k",))(original)
    assert _stop_at_every_change(tmp_path, monkeypatch, original, new, False,
                                 preallocation=mode) >= 3


def test_refused_in_a_table_shared_with_a_snapshot(tmp_path: Path) -> None:
    """qemu copies the shared L2 table first; instar refuses, changing nothing."""
    image = tmp_path / "s.qcow2"
    _qcow2(data=("0 4k",), snapshot=True)(image)
    before = image.read_bytes()
    result = run_instar("resize", "--preallocation=metadata", str(image), "3M")
    assert result.rc == 1 and result.stdout == ""
    assert result.stderr == ("instar: preallocating in a qcow2 L2 table shared with a "
                             "snapshot is not supported yet\n")
    assert image.read_bytes() == before
