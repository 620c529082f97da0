"""Every command's --help lists every option its getopt spec takes, and names the refused ones.

The options come from each command module's ``SHORT_OPTIONS``/``LONG_OPTIONS``
(what the parser accepts), so an option added without help fails here; every
option qemu-img 7.2 lists for the command must be accepted (used, ignored or
refused by name), never "unrecognized".
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

import pytest

from helpers import run_instar, run_qemu_img
from instar.cli import COMMANDS, QEMU_COMMANDS, USAGE

REFUSED_HEADING = "Not supported (refused): "


def _module(command: str) -> ModuleType:
    return importlib.import_module(COMMANDS[command])


def _accepted(module: ModuleType) -> dict[str, bool]:
    """Every option the command's parser takes, and whether it takes an argument."""
    short: str = module.SHORT_OPTIONS
    options = {f"-{char}": short[i + 1 : i + 2] == ":" for i, char in enumerate(short)
               if char != ":"}
    options.update({f"--{name}": takes for name, takes in module.LONG_OPTIONS.items()})
    return options


def _mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_option(command: str) -> None:
    result = run_instar(command, "--help")
    assert (result.rc, result.stderr) == (0, "")
    assert result.stdout.startswith(f"usage: instar {command} ")
    options = _accepted(_module(command))
    assert len(options) >= 8
    assert [option for option in options if not _mentions(result.stdout, option)] == []
    assert run_instar(command, "-h").stdout == result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_usage_line_is_the_top_level_one(command: str) -> None:
    """``instar --help`` shows the same syntax as ``instar COMMAND --help``."""
    help_text = run_instar(command, "--help").stdout
    synopsis = " ".join(help_text.split("\n\n")[0].split()[2:])
    lines = [line.strip() for line in USAGE.splitlines() if line.startswith(f"  {command} ")]
    assert lines == [synopsis]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_refused_options_are_named_and_refused(command: str) -> None:
    help_text = run_instar(command, "--help").stdout
    refused = re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text.split(REFUSED_HEADING)[1])
    # qemu-img create has no --image-opts (its getopt refuses it as unknown).
    assert {"--object", "--image-opts"} - ({"--image-opts"} if command == "create" else set()
                                           ) <= set(refused)
    options = _accepted(_module(command))
    for option in refused:
        args = [option, "x"] if options[option] else [option]
        result = run_instar(command, *args, "a.img", "b.img")
        assert (result.rc, result.stdout, result.stderr) == (
            1, "", f"instar: {option} is not supported\n")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("command", sorted(set(COMMANDS) & set(QEMU_COMMANDS)))
def test_every_qemu_option_is_accepted(command: str) -> None:
    usage = run_qemu_img("--help").stdout
    syntax = [line for line in usage.splitlines() if line.startswith(f"  {command} ")]
    assert len(syntax) == 1
    qemu_options = {match.split("=")[0] for match in
                    re.findall(r"(?<![\w-])(--?[A-Za-z][\w=-]*)", syntax[0])}
    assert qemu_options & {"-f", "-U"}  # the line was found and parsed (snapshot has no -f)
    assert sorted(qemu_options - set(_accepted(_module(command)))) == []
