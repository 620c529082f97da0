"""dd command-line grammar, messages and exit codes: instar against qemu-img.

Every row runs both programs in the same directory on the same input and
compares exit status and stderr (after the program prefix); on success the
outputs must be identical byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import pattern, run_instar, run_qemu_img

INPUT_SIZE = 1 << 20  # byte i is i % 251, as in the reference

# Operand lists; "if=in.raw of=out.raw" is added unless the row names its own.
GRAMMAR_ROWS: list[list[str]] = [
    # numbers: accepted forms
    ["bs=00512"], ["bs= 512"], ["bs=+512"], ["bs=0x200"], ["bs=1b", "count=3000"], ["bs=0.5k"],
    ["bs=1.5k", "count=3"], ["bs=1k"], ["bs=1K"], ["bs=1M", "count=1"], ["bs=1.", "count=7"],
    ["bs=1.k", "count=2"], ["bs=0.0005k", "count=9"], ["bs=0X10", "count=3"],
    ["bs=0x10k", "count=2"], ["bs=  +1k", "count=1"], ["count=1k"], ["count=0x2", "bs=4k"],
    ["skip=0x10", "bs=1k"], ["bs=1.9999999999999999999k", "count=1"],
    # numbers: syntax errors
    ["bs=-1"], ["bs=abc"], ["bs="], ["bs=1.5"], ["bs=1.5b"], ["bs=1kb"], ["bs=1KiB"],
    ["bs=1e3"], ["bs=512 "], ["bs=.5k"], ["bs=0x"], ["bs=-0"], ["bs=1.k5"], ["bs=0x1.5"],
    ["bs=0x10kb"], ["count=-1"], ["count=abc"], ["skip=1.5"], ["skip=x"], ["count="],
    ["bs=99999999999999999999k"],
    # numbers: range errors
    ["bs=0"], ["bs=2G"], ["bs=1t"], ["bs=1e"], ["bs=1.5e"], ["bs=2147483648"],
    ["bs=2147483647", "count=0"], ["count=8E"], ["skip=8E"], ["bs=0.0004k"],
    ["bs=99999999999999999999"], ["bs=-99999999999999999999"], ["count=0x8000000000000000"],
    # operands
    ["foo=1"], ["foo"], ["=5"], ["BS=1k"], ["seek=1"], ["conv=notrunc"], ["bs=1k", "bs=4k"],
    ["if=in.raw", "if=in.raw", "of=out.raw"], ["bs=1k", "foo=1", "bs=x"],
    ["bs=x", "foo=1"], ["count=1", "count=2", "bs=64k"],
    # options
    ["-x"], ["-n"], ["-q"], ["--foo"], ["--foo=1"], ["--help=3"], ["-Ux"],
    ["-U"], ["--force-share"], ["--force"], ["-f", "raw"], ["-fraw"], ["-O", "raw"], ["-Oraw"],
    ["-f", "foo"], ["-f", "qcow2"], ["-f", "vmdk"], ["-f", "vpc"], ["-f", "vhdx"],
    ["-O", "foo"], ["-O", "foo", "if=missing.raw", "of=o"],
    ["-f", "foo", "-O", "bar"], ["-U", "-f", "raw", "-O", "raw", "bs=4k"],
    ["bs=4k", "-f", "raw", "count=2", "-U"], ["--", "bs=4k"], ["bs=4k", "--", "-U"],
    # if / of
    ["only-if", "if=in.raw"], ["only-of", "of=out.raw"], ["only-none"],
    ["only-none", "if=missing.raw", "of=out.raw"], ["only-none", "if=", "of=out.raw"],
    ["only-none", "if=.", "of=out.raw"], ["only-none", "of=out.raw", "if=missing.raw", "bs=x"],
    ["only-none", "if=in.raw", "of=nodir/out.raw"], ["only-none", "if=in.raw", "of=."],
    ["only-none", "-O", "foo", "if=in.raw", "of=nodir/out.raw"],
    ["only-none", "-f", "qcow2", "if=missing.raw", "of=out.raw"],
    ["only-none", "if=in.raw", "of="], ["only-none", "-O", "vmdk", "if=in.raw", "of="],
    ["only-none", "-O", "qcow2", "if=in.raw", "of=", "count=0"],
    ["only-none", "-O", "vpc", "if=in.raw", "of=", "skip=99999"],
    # skipping past the end: a message, exit 0, empty output
    ["bs=512", "skip=2049"], ["skip=100", "count=50"], ["bs=512", "skip=2048"],
    ["bs=8E", "skip=2"], ["skip=9223372036854775807", "bs=2"],
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("grammar")
    (directory / "in.raw").write_bytes(pattern(INPUT_SIZE))
    return directory


def _split(row: list[str]) -> list[str]:
    if row and row[0] == "only-none":
        return row[1:]
    if row and row[0] == "only-if":
        return row[1:]
    if row and row[0] == "only-of":
        return row[1:]
    names = {arg.split("=", 1)[0] for arg in row}
    extra = [] if "if" in names else ["if=in.raw"]
    extra += [] if "of" in names else ["of=out.raw"]
    return row + extra


def _output_name(args: list[str]) -> str | None:
    outputs = [a[3:] for a in args if a.startswith("of=")]
    return outputs[-1] if outputs else None


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("row", GRAMMAR_ROWS, ids=lambda row: " ".join(row) or "<none>")
def test_grammar_matches_qemu(row: list[str], workdir: Path, tmp_path: Path) -> None:
    args = _split(row)
    out_name = _output_name(args)
    qemu_dir, instar_dir = tmp_path / "q", tmp_path / "i"
    for directory in (qemu_dir, instar_dir):
        directory.mkdir()
        (directory / "in.raw").symlink_to(workdir / "in.raw")
    qemu = run_qemu_img("dd", *args, cwd=qemu_dir)
    ours = run_instar("dd", *args, cwd=instar_dir)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert ours.stdout == qemu.stdout == ""
    if out_name is None or out_name in ("", "."):
        assert sorted(path.name for path in instar_dir.iterdir()) == ["in.raw"]
        return
    ours_out, qemu_out = instar_dir / out_name, qemu_dir / out_name
    if qemu.rc == 0:
        assert ours_out.read_bytes() == qemu_out.read_bytes()
    else:
        # qemu may leave a broken file behind; instar never does.
        assert not ours_out.exists()
    leftovers = [p.name for p in instar_dir.iterdir() if "instar-tmp" in p.name]
    assert leftovers == []


def test_help_exits_zero() -> None:
    result = run_instar("dd", "-h", "if=x")
    assert result.rc == 0
    assert "usage: instar dd" in result.stdout
    assert result.stderr == ""


def test_missing_option_argument_matches_qemu(workdir: Path, qemu_img: str) -> None:
    for args in (["if=in.raw", "-O"], ["-f"], ["if=in.raw", "of=o", "--allow"]):
        ours = run_instar("dd", *args, cwd=workdir)
        assert ours.rc == 1
        if args[-1] != "--allow":  # qemu-img has no --allow
            qemu = run_qemu_img("dd", *args, cwd=workdir)
            assert ours.normalised_stderr() == qemu.normalised_stderr()
        assert "missing argument for option" in ours.stderr
