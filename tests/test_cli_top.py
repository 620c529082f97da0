"""The top-level command line: messages and exit codes as qemu-img's."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_instar, run_qemu_img


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", [[], ["foo"], ["info"], ["compare", "a"], ["convert"],
                                  ["dd"], ["info", "missing.img"], ["compare", "a", "b"]],
                         ids=lambda a: " ".join(a) or "<none>")
def test_matches_qemu(args: list[str], tmp_path: Path) -> None:
    ours = run_instar(*args, cwd=tmp_path)
    qemu = run_qemu_img(*args, cwd=tmp_path)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr())


def test_version_and_help() -> None:
    version = run_instar("--version")
    assert version.rc == 0 and version.stdout.startswith("instar version ")
    usage = run_instar("--help")
    assert usage.rc == 0
    for command in ("dd", "convert", "info", "compare"):
        assert f"\n  {command} " in usage.stdout
    # The wheel carries no docs: the help points to what is installed.
    assert "README" not in usage.stdout and "docs/" not in usage.stdout
    assert "'instar COMMAND --help'" in usage.stdout
