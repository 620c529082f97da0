"""Shared handling of ``-o key=value`` creation options and ``-c``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from instar.errors import OptionError
from instar.formats.base import CreateOptions
from instar.sizes import SizeStatus, parse_size

# What the Python API takes as ``options=``: the dataclass, or ``-o``'s pairs.
OptionsArgument = CreateOptions | Mapping[str, str] | None


def as_create_options(options: OptionsArgument) -> CreateOptions:
    """``options`` as CreateOptions: a mapping is ``-o key=value,...`` (no ``-c``).

    Keys and values must be strings, as on the command line; anything else is
    refused here rather than failing deep inside a writer.
    """
    if options is None:
        return CreateOptions()
    if isinstance(options, CreateOptions):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be CreateOptions or a dict, not {type(options).__name__}")
    pairs = dict(options)
    for key, value in pairs.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"options take str keys and values, as -o does: {key!r}={value!r}")
    return CreateOptions(options=pairs)


def reject_unknown(options: CreateOptions, format_name: str, known: Iterable[str]) -> None:
    """Refuse options a format does not take, and compression where it has none."""
    allowed = set(known)
    for key in options.options:
        if key not in allowed:
            raise OptionError(f"Invalid parameter '{key}'")
    if options.compress and "compress" not in allowed:
        raise OptionError("Compression not supported for this file format")


# qemu's qapi_bool_parse spellings.
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def option_bool(options: CreateOptions, name: str, default: bool = False) -> bool:
    """An on/off option, refused with qemu's option-parser message."""
    text = options.options.get(name)
    if text is None:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")


def option_number(options: CreateOptions, name: str, default: int) -> int:
    """A plain number option (qemu: strtoull base 0: decimal, 0x hex, 0 octal)."""
    text = options.options.get(name)
    if text is None:
        return default
    body = text.lstrip(" \t\n\v\f\r")
    body = body[1:] if body.startswith("+") else body
    try:
        if body[:2] in ("0x", "0X"):
            return int(body[2:], 16)
        if body.startswith("0") and len(body) > 1:
            return int(body[1:], 8)
        if body.isdigit() and body.isascii():
            return int(body)
    except ValueError:
        pass
    raise OptionError(f"Parameter '{name}' expects a number")


_SIZE_HINT = (
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)


def option_size(options: CreateOptions, name: str, default: int) -> int:
    """A size option with suffixes (qemu_strtosz); qemu's parser messages on error.

    A syntax error is followed by qemu's two unprefixed lines about suffixes.
    """
    text = options.options.get(name)
    if text is None:
        return default
    parsed = parse_size(text)
    if parsed.status is SizeStatus.RANGE:
        raise OptionError(f"Value '{text}' is out of range for parameter '{name}'")
    if parsed.status is SizeStatus.SYNTAX:
        error = OptionError(f"Parameter '{name}' expects a non-negative number below 2^64")
        error.hint = _SIZE_HINT
        raise error
    return parsed.value
