"""The top-level command line: messages and exit codes as qemu-img's."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_instar, run_qemu_img
from instar.cli import COMMANDS, QEMU_COMMANDS


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


def test_qemu_commands_instar_lacks_are_named_as_such(qemu_img: str) -> None:
    """qemu-img's commands are qemu-img 7.2's list; one instar lacks is not a typo."""
    usage = run_qemu_img("--help").stdout
    syntax = usage.split("Command syntax:\n")[1].split("\n\n")[0]
    assert sorted(line.split()[0] for line in syntax.splitlines()) == sorted(QEMU_COMMANDS)
    lacking = [command for command in QEMU_COMMANDS if command not in COMMANDS]
    ours = set(COMMANDS) & set(QEMU_COMMANDS)  # instar has commands of its own (inspect)
    assert "bench" in lacking and len(lacking) == len(QEMU_COMMANDS) - len(ours)
    for command in lacking:
        result = run_instar(command, "disk.img")
        assert (result.rc, result.stdout, result.stderr) == (
            1, "", f"instar: '{command}' is a qemu-img command instar does not implement yet\n"
            "Try 'instar --help' for more information\n")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("typo", ["chek", "Info", "converter"])
def test_typo_is_qemus_command_not_found(typo: str, tmp_path: Path) -> None:
    ours = run_instar(typo, "disk.img", cwd=tmp_path)
    qemu = run_qemu_img(typo, "disk.img", cwd=tmp_path)
    assert ours.stderr.startswith(f"instar: Command not found: {typo}\n")
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr())
