"""instar compare against the real qemu-img compare (7.2).

Each row names two images (built once per module) and options; stdout, stderr
and the exit code must be qemu-img's, progress lines included. A format is
added by building its images in PAIRS' builders (e.g. with qemu-img convert).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import QEMU_IMG, Result, pattern, run_instar, run_qemu_img
from instar.compare import first_difference

MIB = 1 << 20
Builder = Callable[[Path], None]


def _write(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    with open(path, "wb") as file:
        for offset, data in pieces:
            file.seek(offset)
            file.write(data)
        if size is not None:
            file.truncate(size)


BASE = pattern(3 * MIB)

IMAGES: dict[str, Builder] = {
    "base.raw": lambda p: _write(p, [(0, BASE)]),
    "same.raw": lambda p: _write(p, [(0, BASE)]),
    "first-byte.raw": lambda p: _write(p, [(0, b"\xff" + BASE[1:])]),
    "last-byte.raw": lambda p: _write(p, [(0, BASE[:-1] + b"\xff")]),
    "middle.raw": lambda p: _write(p, [(0, BASE), (MIB + 4097, b"\xee")]),
    "longer-zero.raw": lambda p: _write(p, [(0, BASE)], 5 * MIB),
    "longer-data.raw": lambda p: _write(p, [(0, BASE), (4 * MIB + 1000, b"\x01")], 5 * MIB),
    "shorter.raw": lambda p: _write(p, [(0, BASE[: 2 * MIB])]),
    "k1000.raw": lambda p: _write(p, [(0, BASE[:1000])]),
    "k1000-tail.raw": lambda p: _write(p, [(0, BASE[:1000] + bytes(10) + b"\x02")]),
    "k1601.raw": lambda p: _write(p, [(0, BASE[:1000] + bytes(600) + b"\x02")]),
    "k1601-zero.raw": lambda p: _write(p, [(0, BASE[:1000] + bytes(601))]),
    "empty.raw": lambda p: _write(p, []),
    "hole-64m.raw": lambda p: _write(p, [], 64 * MIB),
    "written-zeros-64m.raw": lambda p: _write(p, [(30 * MIB, bytes(4 * MIB))], 64 * MIB),
    "dot-in-hole-64m.raw": lambda p: _write(p, [(33 * MIB + 12345, b"\x01")], 64 * MIB),
    "dot-in-zeros-64m.raw": lambda p: _write(
        p, [(30 * MIB, bytes(4 * MIB)), (33 * MIB + 12345, b"\x01")], 64 * MIB
    ),
    "half-hole.raw": lambda p: _write(p, [(0, BASE[: MIB + 512])], 3 * MIB),
}

PAIRS: list[tuple[str, str]] = [
    ("base.raw", "same.raw"),
    ("base.raw", "first-byte.raw"),
    ("base.raw", "last-byte.raw"),
    ("last-byte.raw", "base.raw"),
    ("base.raw", "middle.raw"),
    ("base.raw", "longer-zero.raw"),
    ("longer-zero.raw", "base.raw"),
    ("base.raw", "longer-data.raw"),
    ("longer-data.raw", "base.raw"),
    ("base.raw", "shorter.raw"),
    ("shorter.raw", "base.raw"),
    ("k1000.raw", "k1000-tail.raw"),
    ("k1000.raw", "k1601.raw"),
    ("k1601.raw", "k1601-zero.raw"),
    ("k1000.raw", "k1601-zero.raw"),
    ("empty.raw", "empty.raw"),
    ("empty.raw", "k1000.raw"),
    ("hole-64m.raw", "written-zeros-64m.raw"),
    ("hole-64m.raw", "dot-in-hole-64m.raw"),
    ("dot-in-zeros-64m.raw", "hole-64m.raw"),
    ("written-zeros-64m.raw", "dot-in-zeros-64m.raw"),
    ("base.raw", "half-hole.raw"),
    ("half-hole.raw", "half-hole.raw"),
]

OPTIONS: list[list[str]] = [[], ["-s"], ["-q"], ["-p"], ["-s", "-p"], ["-f", "raw", "-F", "raw"]]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("compare")
    for name, build in IMAGES.items():
        build(directory / name)
    return directory


def _qemu_compare(args: list[str], cwd: Path) -> Result:
    """qemu-img compare with its output kept byte for byte (the progress
    meter's carriage returns too, which text mode would turn into newlines)."""
    assert QEMU_IMG is not None
    proc = subprocess.run([QEMU_IMG, "compare", *args], cwd=cwd, capture_output=True,
                          timeout=300, check=False)
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def _same_as_qemu(args: list[str], cwd: Path) -> None:
    qemu = _qemu_compare(args, cwd)
    ours = run_instar("compare", *args, cwd=cwd)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr()
    )


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: " ".join(o) or "plain")
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}~{p[1]}")
def test_compare_matches_qemu(pair: tuple[str, str], options: list[str], images: Path) -> None:
    _same_as_qemu([*options, *pair], images)


ERROR_ROWS: list[list[str]] = [
    [],
    ["base.raw"],
    ["base.raw", "same.raw", "third.raw"],
    ["base.raw", "missing.raw"],
    ["missing.raw", "base.raw"],
    ["-q", "missing.raw", "base.raw"],
    ["-p", "base.raw", "missing.raw"],
    ["-f", "foo", "base.raw", "same.raw"],
    ["-F", "foo", "base.raw", "same.raw"],
    ["-T", "bogus", "base.raw", "same.raw"],
    ["-T", "none", "base.raw", "same.raw"],
    ["-x", "base.raw", "same.raw"],
    ["--strict", "base.raw", "same.raw"],
    ["-f"],
    [".", "base.raw"],
    ["", "base.raw"],
    ["-U", "--", "base.raw", "same.raw"],
]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", ERROR_ROWS, ids=lambda a: " ".join(a) or "<none>")
def test_compare_errors_match_qemu(args: list[str], images: Path) -> None:
    _same_as_qemu(args, images)


@pytest.mark.usefixtures("qemu_img")
def test_compare_sparse_terabyte_is_fast(tmp_path: Path) -> None:
    """Holes are skipped from extents, never read."""
    _write(tmp_path / "a.raw", [], 1 << 40)
    _write(tmp_path / "b.raw", [((1 << 40) - 5000, b"\x01")], 1 << 40)
    started = time.perf_counter()
    ours = run_instar("compare", "a.raw", "b.raw", cwd=tmp_path)
    assert time.perf_counter() - started < 2
    qemu = run_qemu_img("compare", "a.raw", "b.raw", cwd=tmp_path)
    assert (ours.rc, ours.stdout) == (qemu.rc, qemu.stdout) == (
        1, "Content mismatch at offset 1099511622656!\n"
    )


def test_first_difference_is_sector_granular() -> None:
    data = os.urandom(3 * MIB + 100)
    for position in (0, 511, 512, 65535, 65536, 3 * MIB + 99):
        changed = bytearray(data)
        changed[position] ^= 0xFF
        assert first_difference(data, bytes(changed)) == position // 512 * 512
