"""The options that come before the command: how the worker is confined.

    instar [--sandbox=auto|require|off] [--max-memory SIZE] [--max-cpu SECONDS]
           [--timeout SECONDS] COMMAND ...
    instar --sandbox-status

Each also reads its environment variable (INSTAR_SANDBOX, INSTAR_MAX_MEMORY,
INSTAR_MAX_CPU, INSTAR_TIMEOUT); an option wins over the variable.
"""

from __future__ import annotations

import os
import sys

from instar.errors import UsageError
from instar.sandbox import DEFAULT_MAX_CPU, DEFAULT_MAX_MEMORY, DEFAULT_TIMEOUT, Limits, status
from instar.sizes import SizeStatus, parse_size
from instar.worker import SandboxSettings

MODES = ("auto", "require", "off")
_OPTIONS = {"--sandbox": "INSTAR_SANDBOX", "--max-memory": "INSTAR_MAX_MEMORY",
            "--max-cpu": "INSTAR_MAX_CPU", "--timeout": "INSTAR_TIMEOUT"}


def take_sandbox_options(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split the leading ``--option=value`` / ``--option value`` pairs off."""
    values: dict[str, str] = {}
    index = 0
    while index < len(args):
        name, equals, value = args[index].partition("=")
        if name not in _OPTIONS:
            break
        if not equals:
            if index + 1 >= len(args):
                raise UsageError(f"option '{name}' requires an argument")
            index += 1
            value = args[index]
        values[name] = value
        index += 1
    return args[index:], values


def settings_from(values: dict[str, str]) -> SandboxSettings:
    """The settings the options (or their variables) ask for, checked."""
    def get(name: str) -> str | None:
        return values.get(name, os.environ.get(_OPTIONS[name]))

    mode = get("--sandbox") or "auto"
    if mode not in MODES:
        raise UsageError(f"--sandbox must be one of {', '.join(MODES)}: {mode}")
    memory = DEFAULT_MAX_MEMORY
    text = get("--max-memory")
    if text is not None:
        parsed = parse_size(text)
        if parsed.status is not SizeStatus.OK or parsed.value < 64 << 20:
            raise UsageError(f"--max-memory must be a size of at least 64M: {text}")
        memory = parsed.value
    return SandboxSettings(
        mode=mode,
        limits=Limits(memory=memory, cpu=int(_number(get("--max-cpu"), "--max-cpu",
                                                     DEFAULT_MAX_CPU))),
        timeout=_number(get("--timeout"), "--timeout", DEFAULT_TIMEOUT),
    )


def _number(text: str | None, name: str, default: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"{name} must be a positive number of seconds: {text}")
    return value


def print_status(settings: SandboxSettings) -> int:
    """``instar --sandbox-status``: each layer, on or not and why; exit 1 if
    one is missing and the mode is require."""
    states = status(settings.limits)
    for state in states:
        word = "on" if state.on else "not available"
        sys.stdout.write(f"{state.name}: {word} ({state.detail})\n")
    sys.stdout.write(f"mode: {settings.mode}; wall-clock limit {settings.timeout:g} s\n")
    missing = any(not state.on for state in states)
    return 1 if missing and settings.mode == "require" else 0
