"""Without qemu-img, parity tests skip (INSTAR_REQUIRE_QEMU=0) or fail (=1), never error.

README promises ``make test REQUIRE_QEMU=0`` on a machine without qemu-utils:
every run of qemu-img or qemu-io goes through `helpers.require_qemu`, module
fixtures included, and the Makefile's ``qemu`` step tolerates a failed install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

ROOT = Path(__file__).parents[1]
QEMU_TOOLS = ("qemu-img", "qemu-io", "qemu-nbd")
# Modules reaching qemu every way the suite does: module fixtures through helpers,
# the qemu_img fixture, fixtures calling require_qemu, qemu-io run directly.
MODULES = ["test_compare.py", "test_cli_top.py", "test_qcow2_reader.py", "test_vmdk_reader.py"]


@pytest.mark.parametrize(("required", "outcome"), [("0", pytest.skip.Exception),
                                                   ("1", pytest.fail.Exception)])
def test_helpers_skip_or_fail_without_qemu(
    required: str, outcome: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helpers, "QEMU_IMG", None)
    monkeypatch.setattr(helpers, "QEMU_IO", None)
    monkeypatch.setenv("INSTAR_REQUIRE_QEMU", required)
    for call in (lambda: helpers.run_qemu_img("--version"),
                 lambda: helpers.qemu_io("x.img", "read 0 1"), helpers.qemu_img_path):
        with pytest.raises(outcome, match="not installed"):
            call()


def _path_without_qemu(directory: Path) -> str:
    """A PATH holding every program of this one except qemu's."""
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(entry):
            continue
        for name in os.listdir(entry):
            link = directory / name
            if name not in QEMU_TOOLS and not link.exists() and not link.is_symlink():
                link.symlink_to(os.path.join(entry, name))
    return str(directory)


def _summary(output: str) -> dict[str, int]:
    last = output.strip().splitlines()[-1]
    return {word: int(count) for count, word in re.findall(r"(\d+) (\w+)", last)}


@pytest.mark.parametrize("required", ["0", "1"])
def test_suite_without_qemu(required: str, tmp_path: Path) -> None:
    """A pytest run on a PATH without qemu: skips only (0), failures (1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": _path_without_qemu(bin_dir), "INSTAR_REQUIRE_QEMU": required}
    modules = MODULES if required == "0" else MODULES[1::2]  # failing runs are slower
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--tb=no", "-p", "no:xdist", "-p",
         "no:cacheprovider",
         "--rootdir", str(ROOT), *(str(ROOT / "tests" / name) for name in modules)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    counts = _summary(proc.stdout)
    if required == "0":
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert counts.get("skipped", 0) > 100
        assert "errors" not in counts and "failed" not in counts
        assert "qemu-img not installed" in proc.stdout
    else:
        assert proc.returncode == 1
        assert counts.get("failed", 0) + counts.get("errors", 0) > 50, proc.stdout[-3000:]
        assert "skipped" not in counts


def test_make_qemu_tolerates_a_failed_install_only_when_not_required(tmp_path: Path) -> None:
    """``make qemu`` as root with apt-get failing: fine with REQUIRE_QEMU=0, an error with 1."""
    make = shutil.which("make")
    assert make is not None, "make is needed for the README's entry points"
    (tmp_path / "id").write_text("#!/bin/sh\necho 0\n")  # pretend to be root
    (tmp_path / "apt-get").write_text("#!/bin/sh\necho 'E: no network' >&2\nexit 100\n")
    for tool in ("id", "apt-get"):
        (tmp_path / tool).chmod(0o755)
    results = {}
    for required in ("0", "1"):
        proc = subprocess.run(
            [make, "-s", "-C", str(ROOT), "qemu", f"REQUIRE_QEMU={required}"],
            env={**os.environ, "PATH": str(tmp_path)}, capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert "could not install qemu-utils" in proc.stderr
        results[required] = proc.returncode
    assert results["0"] == 0 and results["1"] != 0
