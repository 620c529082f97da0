"""``instar info``: what ``qemu-img info`` prints, byte for byte.

Collecting follows qemu-img's ``collect_image_info_list``: each image of a
chain is opened on its own without its backing file (qemu's
BDRV_O_NO_BACKING), described from its metadata only (never a data cluster),
and the next one is found through its full backing file name.

Rendering follows qemu's ``bdrv_image_info_dump`` (7.2) and
``bdrv_node_info_dump`` with child nodes (8.0 and later). The order of keys is
the iteration order of qemu's QDict, a 512-bucket hash table, which is why the
JSON starts with "virtual-size": `qdict_items` reproduces it, so format
modules state their data in QAPI schema order and never think about it.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from dataclasses import dataclass, field

from instar.cli.output import escape_controls as shown
from instar.errors import FormatError, ImageOpenError, InstarError
from instar.files import InputFile
from instar.formats.base import (
    ChildFile,
    Describable,
    FormatDetails,
    QValue,
    SnapshotDetails,
)
from instar.opener import ImageOpener, OpenedNode
from instar.safety import MAX_CHAIN_DEPTH, PathPolicy
from instar.sizes import round_up, size_to_str

QEMU_7_2 = (7, 2)
QEMU_8_0 = (8, 0)
SECTOR = 512

# ---------------------------------------------------------------------------
# qemu's QDict iteration order

QDICT_BUCKETS = 512


def _tdb_hash(key: str) -> int:
    """qemu's ``tdb_hash`` (qobject/qdict.c) over the key's bytes, 32-bit."""
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


# ---------------------------------------------------------------------------
# What is known about one node (an image, or in the 8.0 form a file under it)


@dataclass
class NodeInfo:
    """qemu's BlockNodeInfo for one node, plus its children (8.0+ form)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    details: FormatDetails
    full_backing_filename: str | None = None
    children: list[tuple[str, NodeInfo]] = field(default_factory=list)


def path_has_protocol(path: str) -> bool:
    """qemu's ``path_has_protocol``: a ':' before any '/'."""
    for char in path:
        if char == "/":
            return False
        if char == ":":
            return True
    return False


def full_backing_filename(image_filename: str, backing: str) -> str:
    """qemu's ``bdrv_make_absolute_filename``: the backing name relative to
    the directory of the image as named (text only, no file system look-up)."""
    if path_has_protocol(backing) or backing.startswith("/"):
        return backing
    head = image_filename[: image_filename.rfind("/") + 1]
    return head + backing


def allocated_bytes(file: InputFile) -> int:
    """"disk size": the bytes the file system allocated (st_blocks * 512)."""
    return os.fstat(file.fd).st_blocks * 512


_FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr), 28 bytes
_FSXATTR = struct.Struct("=5I8x")


def extent_size_hint(file: InputFile) -> int:
    """The file's extent size hint (XFS); 0 where unset or unsupported."""
    try:
        raw = fcntl.ioctl(file.fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    except OSError:
        return 0
    hint: int = _FSXATTR.unpack(raw)[1]
    return hint


def file_node(file: InputFile) -> NodeInfo:
    """The protocol node qemu 8.0+ shows as ``Child node '/file'``."""
    specific: dict[str, QValue] = {}
    hint = extent_size_hint(file)
    if hint:
        specific["extent-size-hint"] = hint
    details = FormatDetails(specific_type="file", specific=specific)
    return NodeInfo(
        filename=file.name,
        format="host_device" if file.is_block_device else "file",
        virtual_size=round_up(file.size, SECTOR),
        actual_size=allocated_bytes(file),
        details=details,
    )


def disk_size(node: OpenedNode, details: FormatDetails) -> int:
    """qemu's "disk size": the image file's allocation, plus the child files
    the driver counts (``ChildFile.counts_in_disk_size``), each file once."""
    files: dict[tuple[int, int], InputFile] = {node.file.identity: node.file}
    for child in details.children:
        if child.counts_in_disk_size:
            files.setdefault(child.file.identity, child.file)
    return sum(allocated_bytes(file) for file in files.values())


def describe(node: OpenedNode, qemu_version: tuple[int, int]) -> NodeInfo:
    """NodeInfo for an opened image, from its format's ``describe`` hook."""
    if isinstance(node.format, Describable):
        try:
            details = node.format.describe(node.image)
        except FormatError as error:  # metadata only info reads (snapshots, bitmaps)
            raise ImageOpenError(node.path, str(error)) from None
        except OSError as error:
            raise ImageOpenError(node.path, error.strerror or str(error)) from None
    else:
        details = FormatDetails(dirty=None)  # only the common lines
    info = NodeInfo(
        filename=node.path,
        format=node.format.name,
        virtual_size=node.image.virtual_size,
        actual_size=disk_size(node, details),
        details=details,
    )
    if details.backing_filename:
        info.full_backing_filename = full_backing_filename(node.path, details.backing_filename)
    if qemu_version >= QEMU_8_0:
        attached = [ChildFile("file", node.file, counts_in_disk_size=True), *details.children]
        # qemu links children at the head of its list: the last opened comes first.
        info.children = [(child.name, file_node(child.file)) for child in reversed(attached)]
    return info


def collect(
    path: str,
    fmt: str | None = None,
    *,
    chain: bool = False,
    allow: tuple[str, ...] = (),
    qemu_version: tuple[int, int] = QEMU_7_2,
) -> list[NodeInfo]:
    """The images ``qemu-img info [--backing-chain]`` would show, top first."""
    opener = ImageOpener(PathPolicy.for_image(path, allow))
    seen: set[str] = set()
    infos: list[NodeInfo] = []
    name: str | None = path
    try:
        while name is not None:
            if name in seen:
                raise InstarError(f"Backing file '{name}' creates an infinite loop.")
            if len(infos) > MAX_CHAIN_DEPTH:
                raise FormatError(f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
            seen.add(name)
            if infos:
                opener.policy.check(name, "backing file")
            node = opener.open_node(name, fmt, with_backing=False)
            info = describe(node, qemu_version)
            infos.append(info)
            if not chain:
                break
            name = info.full_backing_filename
            fmt = info.details.backing_format
    finally:
        opener.close()
    return infos


# ---------------------------------------------------------------------------
# Rendering


def _snapshot_qobject(snap: SnapshotDetails) -> dict[str, QValue]:
    result: dict[str, QValue] = {
        "id": snap.id,
        "name": snap.name,
        "vm-state-size": snap.vm_state_size,
        "date-sec": snap.date_sec,
        "date-nsec": snap.date_nsec,
        "vm-clock-sec": snap.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": snap.vm_clock_nsec % 1_000_000_000,
    }
    if snap.icount is not None:
        result["icount"] = snap.icount
    return result


def node_qobject(info: NodeInfo, qemu_version: tuple[int, int]) -> dict[str, QValue]:
    """BlockNodeInfo (7.2: ImageInfo) members in QAPI visiting order."""
    details = info.details
    result: dict[str, QValue] = {"filename": info.filename, "format": info.format}
    if details.dirty is not None:
        result["dirty-flag"] = details.dirty
    if info.actual_size is not None:
        result["actual-size"] = info.actual_size
    result["virtual-size"] = info.virtual_size
    if details.cluster_size:
        result["cluster-size"] = details.cluster_size
    if details.encrypted:
        result["encrypted"] = True
    if details.backing_filename:
        result["backing-filename"] = details.backing_filename
        if info.full_backing_filename is not None:
            result["full-backing-filename"] = info.full_backing_filename
        if details.backing_format:
            result["backing-filename-format"] = details.backing_format
    if details.snapshots:
        result["snapshots"] = [_snapshot_qobject(snap) for snap in details.snapshots]
    if details.specific_type is not None:
        result["format-specific"] = {
            "type": details.specific_type,
            "data": details.specific if details.specific is not None else {},
        }
    if qemu_version >= QEMU_8_0:
        result["children"] = [
            {"name": name, "info": node_qobject(child, qemu_version)}
            for name, child in info.children
        ]
    return result


def render_json(infos: list[NodeInfo], *, chain: bool,
                qemu_version: tuple[int, int] = QEMU_7_2) -> str:
    """``qemu-img info --output=json``: one object, or a list with --backing-chain."""
    objects: list[QValue] = [node_qobject(info, qemu_version) for info in infos]
    return to_json(objects if chain else objects[0]) + "\n"


def _c_width(text: str, width: int, left: bool) -> str:
    """printf's ``%-Ns`` / ``%Ns``: padding counts bytes, as C does."""
    pad = " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))
    return text + pad if left else pad + text


def _snapshot_header() -> str:
    columns = (("ID", 10), ("TAG", 17))
    left = "".join(_c_width(text, width, True) for text, width in columns)
    right = (("VM SIZE", 8), ("DATE", 20), ("VM CLOCK", 13), ("ICOUNT", 11))
    return left + "".join(_c_width(text, width, False) for text, width in right)


def _snapshot_row(snap: SnapshotDetails) -> str:
    try:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.date_sec))
    except (OverflowError, OSError, ValueError):
        date = "(null)"  # glib cannot represent it; printf prints NULL so
    secs = snap.vm_clock_nsec // 1_000_000_000
    millis = (snap.vm_clock_nsec // 1_000_000) % 1000
    clock = f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}.{millis:03d}"
    icount = "" if snap.icount is None else str(snap.icount)
    return (
        _c_width(shown(snap.id), 9, True) + " " + _c_width(shown(snap.name), 16, True) + " "
        + _c_width(size_to_str(snap.vm_state_size), 8, False)
        + _c_width(date, 20, False) + _c_width(clock, 13, False) + _c_width(icount, 11, False)
    )


def _shown_values(value: QValue) -> QValue:
    """Format-specific data with control characters in its strings escaped (`shown`)."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {key: _shown_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shown_values(item) for item in value]
    return value


def _human_node(info: NodeInfo, indentation: int, protocol: bool,
                qemu_version: tuple[int, int]) -> str:
    """``bdrv_node_info_dump`` (7.2: ``bdrv_image_info_dump`` at indentation 0).

    Names from the image (or the command line) have their control characters
    escaped (`shown`), unlike qemu-img's, so an image cannot drive the terminal.
    """
    ind = " " * (4 * indentation)
    protocol = protocol and indentation > 0
    details = info.details
    disk = "unavailable" if info.actual_size is None else size_to_str(info.actual_size)
    out = [
        f"{ind}{'filename' if protocol else 'image'}: {shown(info.filename)}\n",
        f"{ind}{'protocol type' if protocol else 'file format'}: {info.format}\n",
        f"{ind}{'file length' if protocol else 'virtual size'}: "
        f"{size_to_str(info.virtual_size)} ({info.virtual_size} bytes)\n",
        f"{ind}disk size: {disk}\n",
    ]
    if details.encrypted:
        out.append(f"{ind}encrypted: yes\n")
    if details.cluster_size:
        out.append(f"{ind}cluster_size: {details.cluster_size}\n")
    if details.dirty:
        out.append(f"{ind}cleanly shut down: no\n")
    if details.backing_filename:
        line = f"{ind}backing file: {shown(details.backing_filename)}"
        if info.full_backing_filename is None:
            line += " (cannot determine actual path)"
        elif info.full_backing_filename != details.backing_filename:
            line += f" (actual path: {shown(info.full_backing_filename)})"
        out.append(line + "\n")
        if details.backing_format:
            out.append(f"{ind}backing file format: {shown(details.backing_format)}\n")
    if details.snapshots:
        out.append(f"{ind}Snapshot list:\n{ind}{_snapshot_header()}\n")
        out.extend(f"{ind}{_snapshot_row(snap)}\n" for snap in details.snapshots)
    if details.specific_type is not None:
        data: dict[str, QValue] = details.specific if details.specific is not None else {}
        # 8.0 leaves out an empty section; 7.2 prints the header regardless.
        if data or qemu_version < QEMU_8_0:
            out.append(f"{ind}Format specific information:\n")
            out.append(dump_human(_shown_values(data), indentation + 1))
    return "".join(out)


def _human_graph(info: NodeInfo, indentation: int, path: str,
                 qemu_version: tuple[int, int]) -> str:
    """qemu-img's ``dump_human_image_info``: the node, then each child node."""
    out = [_human_node(info, indentation, not info.children, qemu_version)]
    for name, child in info.children:
        out.append(f"{' ' * (4 * indentation)}Child node '{path}{name}':\n")
        out.append(_human_graph(child, indentation + 1, f"{path}{name}/", qemu_version))
    return "".join(out)


def render_human(infos: list[NodeInfo], qemu_version: tuple[int, int] = QEMU_7_2) -> str:
    """``qemu-img info``: the images of a chain separated by a blank line."""
    return "\n".join(_human_graph(info, 0, "/", qemu_version) for info in infos)


def info(
    path: str,
    fmt: str | None = None,
    *,
    output: str = "human",
    chain: bool = False,
    allow: tuple[str, ...] = (),
    qemu_version: tuple[int, int] = QEMU_7_2,
) -> str:
    """The text ``qemu-img info`` prints for ``path``."""
    infos = collect(path, fmt, chain=chain, allow=allow, qemu_version=qemu_version)
    if output == "json":
        return render_json(infos, chain=chain, qemu_version=qemu_version)
    return render_human(infos, qemu_version)
