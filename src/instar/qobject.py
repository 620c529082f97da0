"""Printing QObjects as qemu does: QDict key order, the JSON writer, the human dump.

qemu prints its QAPI data through QObjects, so every command that mirrors a
``qemu-img`` output (info today; map, check and measure later) needs the same
three things: the iteration order of a QDict (a 512-bucket hash table, which is
why qemu's JSON starts with "virtual-size"), ``qobject_to_json_pretty`` and
block/qapi.c's ``dump_qobject``. Values are plain Python (`QValue`: bool, int,
str, list, dict), stated in QAPI schema order; this module reorders them.

Kept free of heavy imports: ``instar info`` should start fast.
"""

from __future__ import annotations

from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.formats.base import QValue

# ---------------------------------------------------------------------------
# qemu's QDict iteration order

QDICT_BUCKETS = 512


_HASHES: dict[str, int] = {}  # keys repeat (every snapshot has "id", "name"...)


def _tdb_hash(key: str) -> int:
    """qemu's ``tdb_hash`` (qobject/qdict.c) over the key's bytes, 32-bit."""
    known = _HASHES.get(key)
    if known is not None:
        return known
    value = _HASHES[key] = _tdb_hash_of(key)
    return value


def _tdb_hash_of(key: str) -> int:
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_items(mapping: dict[str, QValue]) -> list[tuple[str, QValue]]:
    """``mapping``'s items in the order qemu iterates a QDict built from it.

    Buckets come in index order; inside a bucket the last key inserted comes
    first (``QLIST_INSERT_HEAD``), so insertion order only breaks ties.
    """
    indexed = [
        (_tdb_hash(key) % QDICT_BUCKETS, -position, key, value)
        for position, (key, value) in enumerate(mapping.items())
    ]
    indexed.sort(key=lambda item: (item[0], item[1]))
    return [(key, value) for _, _, key, value in indexed]


# ---------------------------------------------------------------------------
# qemu's pretty JSON writer (qobject/json-writer.c)


def _mod_utf8_codepoint(data: bytes, pos: int) -> tuple[int, int]:
    """qemu's ``mod_utf8_codepoint``: (code point or -1, position after it)."""
    byte = data[pos]
    pos += 1
    if byte < 0x80:
        return byte, pos
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = data[pos] if pos < len(data) else 0
        if nxt & 0xC0 != 0x80:
            return -1, pos
        pos += 1
        cp = (cp << 6) | (nxt & 0x3F)
    min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
    if (
        cp > 0x10FFFF
        or 0xFDD0 <= cp <= 0xFDEF
        or cp & 0xFFFE == 0xFFFE
        or 0xD800 <= cp <= 0xDFFF
        or (cp < min_cp and not (cp == 0 and length == 2))
    ):
        return -1, pos
    return cp, pos


_JSON_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n",
                 0x0D: "\\r", 0x09: "\\t"}


def json_quote(text: str) -> str:
    """A JSON string as qemu writes it: ASCII only, ``\\uXXXX`` for the rest.

    Text is taken as the bytes qemu would hold (file names keep undecodable
    bytes through surrogateescape); invalid sequences become U+FFFD.
    """
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # nothing to escape: the common case, at C speed
    data = text.encode("utf-8", "surrogateescape")
    out = ['"']
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # a C string ends here
            break
        cp, pos = _mod_utf8_codepoint(data, pos)
        if cp in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[cp])
            continue
        if cp < 0:
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(chr(cp))
    out.append('"')
    return "".join(out)


def to_json(value: QValue, depth: int = 0) -> str:
    """``qobject_to_json_pretty``: 4-space indent, QDict key order."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json_quote(value)
    inner = "\n" + " " * (4 * (depth + 1))
    if isinstance(value, dict):
        members = [f"{json_quote(k)}: {to_json(v, depth + 1)}" for k, v in qdict_items(value)]
        opening, closing = "{", "}"
    else:
        members = [to_json(item, depth + 1) for item in value]
        opening, closing = "[", "]"
    body = inner + ("," + inner).join(members) if members else ""
    return opening + body + "\n" + " " * (4 * depth) + closing


# ---------------------------------------------------------------------------
# qemu's human dump of format-specific data (block/qapi.c dump_qobject)


def _is_composite(value: QValue) -> bool:
    return isinstance(value, dict | list)


def dump_human(value: QValue, indentation: int) -> str:
    """``dump_qobject``: keys with '-' shown as ' ', list items as ``[i]:``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    pad = " " * (4 * indentation)
    if isinstance(value, dict):
        labelled = [(key.replace("-", " "), item) for key, item in qdict_items(value)]
    else:
        labelled = [(f"[{i}]", item) for i, item in enumerate(value)]
    parts = []
    for label, item in labelled:
        if _is_composite(item):
            parts.append(f"{pad}{label}:\n{dump_human(item, indentation + 1)}")
        else:
            parts.append(f"{pad}{label}: {dump_human(item, indentation + 1)}\n")
    return "".join(parts)
