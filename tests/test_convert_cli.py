"""instar convert: messages, exit codes and results against qemu-img convert."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_io, qemu_read_raw, run_instar, run_qemu_img

ROWS: list[list[str]] = [
    [],
    ["in.raw"],
    ["in.raw", "out.raw"],
    ["-O", "foo", "in.raw", "out.raw"],
    ["-O", "raw", "-c", "in.raw", "out.raw"],
    ["-S", "1000", "in.raw", "out.raw"],
    ["-S", "x", "in.raw", "out.raw"],
    ["-S", "17M", "in.raw", "out.raw"],
    ["-S", "0", "in.raw", "out.raw"],
    ["-S", "1k", "in.raw", "out.raw"],
    ["-o", "foo=1", "in.raw", "out.raw"],
    ["-O", "raw", "-o", "help"],
    ["missing.raw", "out.raw"],
    ["-f", "foo", "in.raw", "out.raw"],
    ["-f", "qcow2", "in.raw", "out.raw"],
    ["-n", "in.raw", "missing-target.raw"],
    ["-n", "in.raw", "small.raw"],
    ["-n", "in.raw", "big.raw"],
    ["in.raw", "in.raw", "out.raw"],
    ["-x", "in.raw", "out.raw"],
    ["-q", "-U", "in.raw", "out.raw"],
    ["in.raw", "nodir/out.raw"],
    ["-t", "foo", "in.raw", "out.raw"],
    ["-T", "foo", "in.raw", "out.raw"],
    ["-t", "writeback", "-T", "none", "in.raw", "out.raw"],
    ["-t", "none", "-S", "0", "in.raw", "out.raw"],
    ["in.raw", ""],
    ["-O", "qcow2", "in.raw", ""],
    ["-c", "-O", "vmdk", "in.raw", ""],
    ["-O", "vhdx", "in.raw", "in.raw", ""],
    ["-n", "in.raw", ""],
    ["-n", "-O", "qcow2", "in.raw", ""],
    *(["-m", m, "in.raw", "out.raw"] for m in ("0", "1", "16", "17", "-1", "-0", "abc", "", "8k",
                                               "1.5", " 5", "+5", "5 ", "017", "021", "08",
                                               "0x10", "0x11", "0x", "99999999999999999999")),
    ["-m", "0", "-t", "foo", "in.raw", "out.raw"],
    ["-t", "foo", "-m", "0", "in.raw", "out.raw"],
    ["-T", "foo", "-S", "x", "in.raw", "out.raw"],
    ["-T", "foo", "-t", "bar", "in.raw", "out.raw"],
    ["-t", "foo", "in.raw"],
    ["-T", "foo", "-O", "foo", "in.raw", "out.raw"],
    ["-m", "0", "in.raw"],
    ["-W", "-m", "4", "in.raw", "out.raw"],
    # (a small valid rate limit would slow qemu-img down to it)
    *(["-r", r, "in.raw", "out.raw"] for r in ("0", "-1", "abc", "", "1G", "1.5", "1.5G", "1kb",
                                               "8E", "99999999999999999999", "0x10M", " 1G")),
    ["-r", "x", "-m", "0", "in.raw", "out.raw"],
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("convert")
    with open(directory / "in.raw", "wb") as file:
        file.write(pattern(300_000))
        file.seek(1 << 20)
        file.write(pattern(70_000, seed=9))
    return directory / "in.raw"


def _prepare(directory: Path, source: Path) -> None:
    directory.mkdir()
    (directory / "in.raw").symlink_to(source)
    (directory / "small.raw").write_bytes(b"\x01" * 1000)
    (directory / "big.raw").write_bytes(b"\x01" * (2 << 20))


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("row", ROWS, ids=lambda row: " ".join(row) or "<none>")
def test_convert_matches_qemu(row: list[str], source: Path, tmp_path: Path) -> None:
    qemu_dir, ours_dir = tmp_path / "q", tmp_path / "i"
    _prepare(qemu_dir, source)
    _prepare(ours_dir, source)
    qemu = run_qemu_img("convert", *row, cwd=qemu_dir)
    ours = run_instar("convert", *row, cwd=ours_dir)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    if "help" in row:
        assert ours.stdout.splitlines()[0] == qemu.stdout.splitlines()[0]
        return
    assert ours.stdout == qemu.stdout
    for name in ("out.raw", "small.raw", "big.raw", "missing-target.raw"):
        ours_file, qemu_file = ours_dir / name, qemu_dir / name
        if qemu.rc == 0:
            assert ours_file.exists() == qemu_file.exists(), name
            if qemu_file.exists():
                assert ours_file.read_bytes() == qemu_file.read_bytes(), name
        else:
            assert not (name == "out.raw" and ours_file.exists())


def test_sparse_zero_fully_allocates(source: Path, tmp_path: Path) -> None:
    sparse, full = tmp_path / "sparse.raw", tmp_path / "full.raw"
    assert run_instar("convert", str(source), str(sparse)).rc == 0
    assert run_instar("convert", "-S", "0", str(source), str(full)).rc == 0
    assert sparse.read_bytes() == full.read_bytes()
    assert full.stat().st_blocks * 512 >= full.stat().st_size
    assert sparse.stat().st_blocks * 512 < full.stat().st_size // 2


def test_progress_meter_format(source: Path, tmp_path: Path) -> None:
    result = run_instar("convert", "-p", str(source), str(tmp_path / "o.raw"))
    assert result.rc == 0
    assert result.stdout.startswith("    (0.00/100%)\r")
    assert result.stdout.endswith("    (100.00/100%)\r\n")


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc", "vhdx"])
def test_option_help_lists_options_instar_accepts(fmt: str, qemu_img: str) -> None:
    ours = run_instar("convert", "-O", fmt, "-o", "help")
    qemu = run_qemu_img("convert", "-O", fmt, "-o", "help")
    assert ours.rc == qemu.rc == 0
    lines = ours.stdout.splitlines()
    assert lines[0] == qemu.stdout.splitlines()[0] == f"Supported {fmt} options:"
    qemu_lines = qemu.stdout.splitlines()[1:]
    qemu_names = {line.split("=")[0].strip() for line in qemu_lines if "=" in line}
    for line in lines[1:]:
        name = line.split("=")[0].strip()
        assert name in qemu_names, f"{name} is not a qemu-img {fmt} option"


@pytest.mark.parametrize(("cache", "fsyncs"), [([], False), (["-t", "unsafe"], False),
                                               (["-t", "writeback"], True)])
def test_cache_mode_decides_fsync(cache: list[str], fsyncs: bool, source: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img convert's default target cache mode is unsafe (no flush); others flush."""
    import instar.output

    calls: list[int] = []
    monkeypatch.setattr(instar.output.os, "fsync", lambda fd: calls.append(fd))
    assert run_instar("convert", *cache, str(source), str(tmp_path / "o.raw")).rc == 0
    assert bool(calls) == fsyncs


def test_dd_always_fsyncs(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import instar.output

    calls: list[int] = []
    monkeypatch.setattr(instar.output.os, "fsync", lambda fd: calls.append(fd))
    assert run_instar("dd", f"if={source}", f"of={tmp_path / 'o.raw'}").rc == 0
    assert calls


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx"])
def test_no_create_into_structured_target(fmt: str, source: Path, tmp_path: Path,
                                          qemu_img: str) -> None:
    """-n into an existing image: the source over its start, its old tail kept, as qemu."""
    results = {}
    for side in ("ours", "qemu"):
        target = tmp_path / f"{side}.{fmt}"
        qemu_img_ok("create", "-q", "-f", fmt, str(target), "4M")
        qemu_io(target, "write -P 0x77 0 4M", fmt)  # old data under and past the source
        args = ["convert", "-n", "-O", fmt, str(source), str(target)]
        result = run_instar(*args) if side == "ours" else run_qemu_img(*args)
        assert result.rc == 0, result.stderr
        results[side] = qemu_read_raw(target, tmp_path, fmt)
    assert results["ours"] == results["qemu"]
    assert results["ours"][(4 << 20) - 1000 : 4 << 20] == b"\x77" * 1000  # the old tail


def test_no_create_into_smaller_structured_target(source: Path, tmp_path: Path,
                                                  qemu_img: str) -> None:
    for side in ("ours", "qemu"):
        target = tmp_path / f"{side}.qcow2"
        qemu_img_ok("create", "-q", "-f", "qcow2", str(target), "64k")
    ours = run_instar("convert", "-n", "-O", "qcow2", str(source), str(tmp_path / "ours.qcow2"))
    qemu = run_qemu_img("convert", "-n", "-O", "qcow2", str(source), str(tmp_path / "qemu.qcow2"))
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())


@pytest.mark.parametrize("fmt", ["qcow2", "vpc"])
def test_size_refused_by_the_format(tmp_path: Path, fmt: str) -> None:
    """A size the format cannot hold: convert shows the driver's own words
    (create replaces them, tests/test_create.py)."""
    qemu_img_ok("create", "-q", "-f", "raw", str(tmp_path / "huge.raw"), "2041G")
    args = ["convert", "-O", fmt, "-o", "cluster_size=512" if fmt == "qcow2" else "force_size=on",
            "huge.raw", "out"]
    qemu = run_qemu_img(*args, cwd=tmp_path)
    ours = run_instar(*args, cwd=tmp_path)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr())
    assert qemu.rc == 1
