"""``-f file`` and ``-O file``: qemu's file protocol driver named as a format.

qemu-img takes it wherever a format goes and reads or writes the file's bytes
under the name "file". Each command is run by qemu-img and instar on the same
inputs (a file whose length is not a multiple of 512, one with a hole, an
empty one) and compared: exit status, stdout, stderr after the program name,
and the bytes of what was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import pattern, run_instar, run_qemu_img, write_pieces

KiB = 1 << 10


@pytest.fixture
def files(tmp_path: Path) -> Path:
    write_pieces(tmp_path / "odd.bin", [(0, pattern(1000, seed=3))])
    write_pieces(tmp_path / "holes.bin", [(64 * KiB, pattern(4 * KiB, seed=4))], 1 << 20)
    write_pieces(tmp_path / "empty.bin", [], 0)
    return tmp_path


def _same(args: list[str], cwd: Path) -> None:
    ours = run_instar(*args, cwd=cwd)
    qemu = run_qemu_img(*args, cwd=cwd)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr()), args


@pytest.mark.parametrize("name", ["odd.bin", "holes.bin", "empty.bin"])
def test_reading_commands_match_qemu(name: str, files: Path) -> None:
    for args in (["info", "-f", "file", name], ["info", "-f", "file", "--output=json", name],
                 ["map", "-f", "file", name], ["map", "-f", "file", "--output=json", name],
                 ["check", "-f", "file", name], ["compare", "-f", "file", "-F", "raw", name, name],
                 ["measure", "-O", "file", name], ["measure", "-f", "file", "-O", "raw", name]):
        _same(args, files)


@pytest.mark.parametrize("window", [[], ["bs=100", "count=3"], ["bs=512", "skip=1"],
                                    ["bs=1k", "count=0"]])
@pytest.mark.parametrize("name", ["odd.bin", "holes.bin"])
def test_dd_into_file_matches_qemu(name: str, window: list[str], files: Path) -> None:
    for side, run in (("qemu", run_qemu_img), ("instar", run_instar)):
        result = run("dd", "-O", "file", f"if={name}", f"of={side}.out", *window, cwd=files)
        assert result.rc == 0, result.stderr
    assert (files / "instar.out").read_bytes() == (files / "qemu.out").read_bytes()


@pytest.mark.parametrize("name", ["odd.bin", "holes.bin", "empty.bin"])
def test_convert_to_and_from_file_matches_qemu(name: str, files: Path) -> None:
    for args in (["-O", "file"], ["-f", "file", "-O", "raw"], ["-f", "file", "-O", "qcow2"]):
        for side, run in (("qemu", run_qemu_img), ("instar", run_instar)):
            result = run("convert", *args, name, f"{side}.out", cwd=files)
            assert result.rc == 0, result.stderr
        _same(["compare", "qemu.out", "instar.out"], files)
        if args[-1] != "qcow2":
            assert (files / "instar.out").read_bytes() == (files / "qemu.out").read_bytes()


def test_file_is_never_probed(files: Path) -> None:
    for args in (["info", "odd.bin"], ["info", "--output=json", "holes.bin"]):
        _same(args, files)
    assert '"format": "raw"' in run_instar("info", "--output=json", "odd.bin", cwd=files).stdout


def test_creation_options_are_the_files(files: Path) -> None:
    """qemu's file options are known to instar (not "Invalid parameter"); the
    ones instar does not implement are refused in one line."""
    result = run_instar("convert", "-O", "file", "-o", "nocow=on", "odd.bin", "x.out", cwd=files)
    assert result.rc == 1 and result.stderr.count("\n") == 1
    assert "Invalid parameter" not in result.stderr
    assert not (files / "x.out").exists()
    _same(["convert", "-O", "file", "-o", "bogus=1", "odd.bin", "y.out"], files)
