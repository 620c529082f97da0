"""dd from raw inputs to raw output: byte-for-byte parity with qemu-img dd,
qemu-iotests 159/160/170 restated, and instar's safer output handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import pattern, run_instar, run_qemu_img

ODD_SIZE = (1 << 20) + 1000

WINDOWS: list[list[str]] = [
    [],
    ["bs=65536", "skip=2", "count=4"],
    ["bs=1000", "count=3"],
    ["bs=513", "skip=1", "count=3"],
    ["count=0"],
    ["bs=1000000", "skip=1"],
    ["bs=65536", "skip=4", "count=5"],
    ["bs=512", "skip=2050"],  # exactly the (padded) end
    ["bs=512", "skip=2051"],  # past the end: warning, exit 0
    ["skip=100", "count=50"],
    ["bs=1M", "count=2"],
    ["bs=1999"],
    ["count=1k"],
    ["bs=0x10000", "skip=0x3"],
    ["bs=1.5k", "skip=0.5k"],
    ["bs=4M"],
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("raw-inputs")
    (directory / "odd.raw").write_bytes(pattern(ODD_SIZE))
    # Sparse: data, a 512 KiB hole, data, and a hole at the end.
    with open(directory / "sparse.raw", "wb") as file:
        file.write(pattern(300_000, seed=7))
        file.seek(300_000 + (512 << 10))
        file.write(pattern(100_000, seed=3))
        file.truncate(3 << 20)
    return directory


def dd_both(tmp_path: Path, source: Path, operands: list[str]) -> tuple[Path, Path]:
    """Run qemu-img dd and instar dd with the same operands; assert same status and stderr."""
    qemu_out, ours_out = tmp_path / "qemu.raw", tmp_path / "instar.raw"
    qemu = run_qemu_img("dd", *operands, f"if={source}", f"of={qemu_out}", cwd=tmp_path)
    ours = run_instar("dd", *operands, f"if={source}", f"of={ours_out}", cwd=tmp_path)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    return qemu_out, ours_out


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", ["odd.raw", "sparse.raw"])
@pytest.mark.parametrize("operands", WINDOWS, ids=lambda w: " ".join(w) or "whole")
def test_raw_window_parity(name: str, operands: list[str], inputs: Path, tmp_path: Path) -> None:
    qemu_out, ours_out = dd_both(tmp_path, inputs / name, operands)
    assert ours_out.read_bytes() == qemu_out.read_bytes()


@pytest.mark.usefixtures("qemu_img")
def test_bs5_on_small_input(tmp_path: Path) -> None:
    source = tmp_path / "small.raw"
    source.write_bytes(pattern(20_000))
    qemu_out, ours_out = dd_both(tmp_path, source, ["bs=5", "skip=3", "count=3001"])
    assert ours_out.read_bytes() == qemu_out.read_bytes()


def test_zero_runs_stay_holes(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    assert run_instar("dd", "bs=4M", f"if={inputs / 'sparse.raw'}", f"of={out}").rc == 0
    assert out.stat().st_size == 3 << 20
    allocated = out.stat().st_blocks * 512
    assert allocated < 1 << 20, f"{allocated} bytes allocated for 400 kB of data"


# qemu-iotests 159: many block sizes over a 1 MiB image of 0x0a, then compare.
@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotest_159(bs: str, tmp_path: Path) -> None:
    source, out = tmp_path / "t.raw", tmp_path / "t.raw.out"
    source.write_bytes(b"\x0a" * (1 << 20))
    assert run_instar("dd", f"bs={bs}", f"if={source}", f"of={out}").rc == 0
    compare = run_qemu_img("compare", "-f", "raw", "-F", "raw", str(source), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout


# qemu-iotests 160: skip in 1, 2, 30, 30K blocks, output identical to GNU dd's.
@pytest.mark.parametrize("skip", ["1", "2", "30", "30K"])
def test_iotest_160_against_gnu_dd(skip: str, tmp_path: Path) -> None:
    source = tmp_path / "t.raw"
    source.write_bytes(pattern(32 << 20, seed=11)[: 16 << 20] + bytes(16 << 20))
    ours, gnu = tmp_path / "ours.raw", tmp_path / "gnu.raw"
    assert run_instar("dd", f"skip={skip}", f"if={source}", f"of={ours}").rc == 0
    gnu_skip = str(int(skip[:-1]) * 1024) if skip.endswith("K") else skip
    subprocess.run(
        ["dd", f"if={source}", f"of={gnu}", "bs=512", f"skip={gnu_skip}", "status=none"],
        check=True,
    )
    assert ours.read_bytes() == gnu.read_bytes()


# qemu-iotests 170: a plain dd copies the whole image.
def test_iotest_170_plain_copy(tmp_path: Path) -> None:
    source, out = tmp_path / "t.raw", tmp_path / "out.raw"
    source.write_bytes(pattern(1 << 20, seed=5))
    assert run_instar("dd", f"if={source}", f"of={out}").rc == 0
    assert out.read_bytes() == source.read_bytes()


def test_existing_output_replaced_atomically(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    out.write_bytes(b"old contents")
    out.chmod(0o600)
    assert run_instar("dd", "bs=1000", "count=3", f"if={inputs / 'odd.raw'}", f"of={out}").rc == 0
    assert out.read_bytes() == pattern(ODD_SIZE)[:3000] + bytes(72)
    assert out.stat().st_mode & 0o777 == 0o600


def test_failed_run_keeps_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    out.write_bytes(b"precious")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(100))  # a truncated qcow2 header
    result = run_instar("dd", f"if={bad}", f"of={out}")
    assert result.rc == 1
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.qcow2", "out.raw"]


@pytest.mark.parametrize("spelling", ["same", "dot-path", "symlink", "hardlink"])
def test_same_file_refused(spelling: str, tmp_path: Path) -> None:
    source = tmp_path / "in.raw"
    data = pattern(64 << 10)
    source.write_bytes(data)
    if spelling == "same":
        target = str(source)
    elif spelling == "dot-path":
        target = str(tmp_path / "." / "in.raw")
    elif spelling == "symlink":
        os.symlink(source, tmp_path / "link.raw")
        target = str(tmp_path / "link.raw")
    else:
        os.link(source, tmp_path / "hard.raw")
        target = str(tmp_path / "hard.raw")
    result = run_instar("dd", f"if={source}", f"of={target}")
    assert result.rc == 1
    assert "same file as input" in result.stderr
    assert source.read_bytes() == data


def test_symlinked_output_writes_through(inputs: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.raw"
    real.write_bytes(b"x")
    os.symlink(real, tmp_path / "link.raw")
    args = ["bs=1000", "count=1", f"if={inputs / 'odd.raw'}", f"of={tmp_path / 'link.raw'}"]
    assert run_instar("dd", *args).rc == 0
    assert (tmp_path / "link.raw").is_symlink()
    assert real.read_bytes() == pattern(ODD_SIZE)[:1000] + bytes(24)


def test_python_module_entry_point(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.raw"
    proc = subprocess.run(
        [sys.executable, "-m", "instar", "dd", "bs=1k", "count=1", f"if={inputs / 'odd.raw'}",
         f"of={out}"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == pattern(1024)


def test_nothing_is_visible_while_writing(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output is an unnamed file until it is complete (O_TMPFILE where supported)."""
    import instar.output

    seen: list[list[str]] = []
    real_copy = instar.output.copy_image

    def spying_copy(*args: object, **kwargs: object) -> None:
        seen.append(sorted(os.listdir(tmp_path)))
        real_copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(instar.output, "copy_image", spying_copy)
    out = tmp_path / "out.raw"
    # The spy looks at the directory from inside the copy: in-process, no worker.
    assert run_instar("--sandbox=off", "dd", f"if={inputs / 'odd.raw'}", f"of={out}").rc == 0
    assert seen == [[]]
    assert out.read_bytes()[:ODD_SIZE] == pattern(ODD_SIZE)
