"""Numbers as qemu-img reads and prints them.

`parse_size` follows qemu's ``qemu_strtosz`` (qemu 7.2 as Debian ships it),
measured against the real qemu-img: decimal or ``0x`` hex, leading white space
and ``+``, one binary suffix (b k M G T P E), fractions that need a suffix and
round half up. It returns a `ParsedSize` instead of printing, so the CLI can
word errors and the hex-suffix warning exactly as qemu-img does.
"""

from __future__ import annotations

import math

from instar.runtime_types import Enum, NamedTuple

UINT64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1

_SUFFIXES = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_C_SPACE = " \t\n\v\f\r"
_HEX_DIGITS = "0123456789abcdefABCDEF"
_SMALLEST_NORMAL_DOUBLE = 2.2250738585072014e-308


class SizeStatus(Enum):
    OK = "ok"
    SYNTAX = "syntax"
    RANGE = "range"


class ParsedSize(NamedTuple):
    status: SizeStatus
    value: int = 0
    hex_with_suffix: bool = False  # qemu warns that this form is deprecated


def _suffix_multiplier(char: str) -> int:
    """qemu's suffix_mul with unit 1024: 0 for a character that is no suffix."""
    exponent = _SUFFIXES.get(char.upper()) if char else None
    return 0 if exponent is None else 1024**exponent


def _strtoull(text: str, pos: int, base: int) -> tuple[int, int, bool]:
    """C strtoull from ``pos``: (value, end position, overflowed).

    No conversion returns end == pos. Like C, a leading ``-`` negates modulo 2**64.
    """
    i = pos
    while i < len(text) and text[i] in _C_SPACE:
        i += 1
    negative = False
    if i < len(text) and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    digits = "0123456789" if base == 10 else "0123456789abcdefABCDEF"
    if base == 16 and text[i : i + 2] in ("0x", "0X") and text[i + 2 : i + 3] in tuple(digits):
        i += 2
    start = i
    while i < len(text) and text[i] in digits:
        i += 1
    if i == start:
        return 0, pos, False
    value = int(text[start:i], base)
    if value > UINT64_MAX:
        return UINT64_MAX, i, True
    if negative:
        value = (-value) & UINT64_MAX
    return value, i, False


def _strtod_fraction(text: str, pos: int) -> tuple[float, int] | None:
    """C strtod for a string starting at ``.``: (value, end) or None on failure."""
    i = pos + 1
    start = i
    while i < len(text) and text[i].isdigit() and text[i].isascii():
        i += 1
    if i == start:
        return None
    mantissa_end = i
    if i < len(text) and text[i] in "eE":
        j = i + 1
        if j < len(text) and text[j] in "+-":
            j += 1
        exp_start = j
        while j < len(text) and text[j].isdigit() and text[j].isascii():
            j += 1
        if j > exp_start:
            i = j
    value = float("0" + text[pos:i])
    if value != 0.0 and value < _SMALLEST_NORMAL_DOUBLE:
        return None  # glibc reports ERANGE on underflow
    if value == 0.0 and text[start:mantissa_end].strip("0"):
        return None
    return value, i


def parse_size(text: str) -> ParsedSize:
    """Parse ``text`` exactly as qemu-img's ``qemu_strtosz`` does."""
    val, end, overflow = _strtoull(text, 0, 10)
    if end == 0:
        return ParsedSize(SizeStatus.SYNTAX)
    if overflow:
        return ParsedSize(SizeStatus.RANGE if end == len(text) else SizeStatus.SYNTAX)
    if "-" in text[:end]:
        return ParsedSize(SizeStatus.SYNTAX)
    fraction_bits = 0
    is_hex = False
    if val == 0 and text[end : end + 1] in ("x", "X"):
        val, end, overflow = _strtoull(text, 0, 16)
        if overflow:
            return ParsedSize(SizeStatus.RANGE if end == len(text) else SizeStatus.SYNTAX)
        if text[end : end + 1] == ".":
            return ParsedSize(SizeStatus.SYNTAX)
        is_hex = True
    elif text[end : end + 1] == ".":
        parsed = _strtod_fraction(text, end)
        if parsed is None:
            end += 1
        else:
            fraction, new_end = parsed
            if "e" in text[end:new_end].lower():
                return ParsedSize(SizeStatus.SYNTAX)
            end = new_end
            scaled = int(fraction * 2.0**64)
            # x86-64 turns an out-of-range double-to-uint64 conversion into 0.
            fraction_bits = scaled if scaled <= UINT64_MAX else 0
    multiplier = _suffix_multiplier(text[end : end + 1])
    with_suffix = multiplier > 0
    if with_suffix:
        end += 1
    else:
        multiplier = 1
    if multiplier == 1:
        if fraction_bits:
            return ParsedSize(SizeStatus.SYNTAX, hex_with_suffix=is_hex and with_suffix)
        result = val
    else:
        fraction_product = fraction_bits * multiplier
        round_half_up = (fraction_product >> 63) & 1
        result = val * multiplier + (fraction_product >> 64) + round_half_up
    hex_with_suffix = is_hex and with_suffix
    if end != len(text):
        return ParsedSize(SizeStatus.SYNTAX, hex_with_suffix=hex_with_suffix)
    if result > UINT64_MAX:
        return ParsedSize(SizeStatus.RANGE, hex_with_suffix=hex_with_suffix)
    return ParsedSize(SizeStatus.OK, result, hex_with_suffix=hex_with_suffix)


def parse_long(text: str) -> int | None:
    """qemu's ``qemu_strtol(text, NULL, 0, ...)``: all of ``text`` as a C long, else None.

    Base 0 as C reads it: ``0x`` hex, a leading ``0`` octal (``017`` is 15),
    after optional white space and sign; nothing may follow the digits.
    """
    rest = text.lstrip(_C_SPACE)
    sign = -1 if rest[:1] == "-" else 1
    if rest[:1] in ("+", "-"):
        rest = rest[1:]
    if rest[:2] in ("0x", "0X") and rest[2:3] and rest[2] in _HEX_DIGITS:
        base, digits, allowed = 16, rest[2:], _HEX_DIGITS
    elif rest[:1] == "0":
        base, digits, allowed = 8, rest, "01234567"
    else:
        base, digits, allowed = 10, rest, "0123456789"
    if not digits or any(char not in allowed for char in digits):
        return None
    value = sign * int(digits, base)
    return value if -(1 << 63) <= value <= INT64_MAX else None  # ERANGE


def round_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment``."""
    return -(-value // alignment) * alignment


def size_to_str(value: int) -> str:
    """qemu's ``size_to_str``: a binary unit chosen from 1000 up, then ``%0.3g``.

    The unit switches at 1000, not 1024, which is why qemu prints ``0.977 KiB``.
    """
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = int((exponent - 1) / 10)  # C division truncates toward zero
    scaled = value / float(1 << (index * 10))
    unit = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][index]
    return f"{scaled:0.3g} {unit}B"
