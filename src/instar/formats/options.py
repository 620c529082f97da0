"""Shared handling of ``-o key=value`` creation options and ``-c``."""

from __future__ import annotations

from collections.abc import Iterable

from instar.errors import OptionError
from instar.formats.base import CreateOptions


def reject_unknown(options: CreateOptions, format_name: str, known: Iterable[str]) -> None:
    """Refuse options a format does not take, and compression where it has none."""
    allowed = set(known)
    for key in options.options:
        if key not in allowed:
            raise OptionError(f"Invalid parameter '{key}'")
    if options.compress and "compress" not in allowed:
        raise OptionError("Compression not supported for this file format")
