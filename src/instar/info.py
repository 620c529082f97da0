"""``instar info``: what ``qemu-img info`` prints, byte for byte.

Collecting follows qemu-img's ``collect_image_info_list``: each image of a
chain is opened on its own without its backing file (qemu's
BDRV_O_NO_BACKING), described from its metadata only (never a data cluster),
and the next one is found through its full backing file name.

Rendering follows qemu's ``bdrv_image_info_dump`` (7.2) and
``bdrv_node_info_dump`` with child nodes (8.0 and later). The order of keys is
the iteration order of qemu's QDict, a 512-bucket hash table, which is why the
JSON starts with "virtual-size": `instar.qobject` reproduces it, so format
modules state their data in QAPI schema order and never think about it.
"""

from __future__ import annotations

import fcntl
import struct
import time

from instar.cli.output import escape_controls as shown
from instar.errors import FormatError, InstarError
from instar.events import EventSink
from instar.files import InputFile
from instar.formats.base import (
    ChildFile,
    FormatDetails,
    QValue,
    SnapshotDetails,
)
from instar.opener import Broker, HostBroker, ImageOpener, OpenedNode, open_error
from instar.qobject import dump_human, to_json
from instar.record import Record
from instar.runtime_types import TYPE_CHECKING
from instar.safety import MAX_CHAIN_DEPTH, AllowedDirs, PathPolicy
from instar.sizes import round_up, size_to_str
from instar.worker import SandboxSettings, run_job

if TYPE_CHECKING:
    from typing import Any

QEMU_7_2 = (7, 2)
QEMU_8_0 = (8, 0)
SECTOR = 512

# ---------------------------------------------------------------------------
# What is known about one node (an image, or in the 8.0 form a file under it)


class NodeInfo(Record):
    """qemu's BlockNodeInfo for one node, plus its children (8.0+ form).

    ``files`` are the node's own file ("file") and the files its driver uses,
    by identity: the host turns them into ``actual_size`` and, for 8.0+,
    ``children`` (`add_file_facts`), since facts about files are the host's.
    """

    __slots__ = ("actual_size", "children", "details", "filename", "files", "format",
                 "full_backing_filename", "virtual_size")

    def __init__(
        self,
        filename: str,
        format: str,
        virtual_size: int,
        actual_size: int | None,
        details: FormatDetails,
        full_backing_filename: str | None = None,
        children: list[tuple[str, NodeInfo]] | None = None,
        files: list[ChildFile] | None = None,
    ) -> None:
        self.filename = filename
        self.format = format
        self.virtual_size = virtual_size
        self.actual_size = actual_size
        self.details = details
        self.full_backing_filename = full_backing_filename
        self.children: list[tuple[str, NodeInfo]] = [] if children is None else children
        self.files: list[ChildFile] = [] if files is None else files


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
    return file.allocated_size()


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


def describe(node: OpenedNode) -> NodeInfo:
    """NodeInfo for an opened image, from its format's ``describe`` hook
    (metadata only); file facts are left for the host (`add_file_facts`)."""
    try:
        details = node.format.describe(node.image.driver)
    except (FormatError, OSError) as error:  # metadata only info reads (snapshots...)
        raise open_error(node.path, error) from None
    info = NodeInfo(
        filename=node.path,
        format=node.format.name,
        virtual_size=node.image.virtual_size,
        actual_size=None,
        details=details,
        files=[ChildFile.of("file", node.file, counts_in_disk_size=True), *details.children],
    )
    if details.backing_filename:
        info.full_backing_filename = full_backing_filename(node.path, details.backing_filename)
    return info


def add_file_facts(info: NodeInfo, files: dict[tuple[int, int], InputFile],
                   qemu_version: tuple[int, int]) -> None:
    """Host side: qemu's "disk size" (the image file's allocation plus the
    child files the driver counts, each file once) and the 8.0+ file nodes."""
    counted = {child.identity for child in info.files if child.counts_in_disk_size}
    info.actual_size = sum(allocated_bytes(files[identity]) for identity in counted)
    if qemu_version >= QEMU_8_0:
        # qemu links children at the head of its list: the last opened comes first.
        info.children = [(child.name, file_node(files[child.identity]))
                         for child in reversed(info.files)]


def collect(
    path: str,
    fmt: str | None = None,
    *,
    chain: bool = False,
    allow: AllowedDirs = (),
    qemu_version: tuple[int, int] = QEMU_7_2,
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> list[NodeInfo]:
    """The images ``qemu-img info [--backing-chain]`` would show, top first.

    The images are described in a worker (`_collect_job`, metadata only); the
    host adds what it knows of the files (`add_file_facts`).
    """
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> list[dict[str, Any]]:
        return [node_to_data(node) for node in _collect_job(broker, path, fmt, chain)]

    def facts(host: HostBroker, result: Any) -> list[NodeInfo]:
        files = {file.identity: file for file in host.opened}
        infos = [node_from_data(item) for item in result]
        for node in infos:
            add_file_facts(node, files, qemu_version)
        return infos

    infos: list[NodeInfo] = run_job(job, policy, sandbox, host_side=facts,
                                      inputs=[path], force_share=force_share)
    return infos


def _collect_job(broker: Broker, path: str, fmt: str | None, chain: bool) -> list[NodeInfo]:
    """Open each image of the chain on its own, without its backing file (as
    qemu-img does), and describe it; the next through the broker's policy."""
    opener = ImageOpener(broker=broker)
    seen: set[str] = set()
    infos: list[NodeInfo] = []
    try:
        node = opener.open_node(path, fmt, with_backing=False)
        while True:
            info = describe(node)
            infos.append(info)
            seen.add(node.path)
            backing = info.details.backing_filename
            if not chain or not backing or info.full_backing_filename is None:
                return infos
            if info.full_backing_filename in seen:
                raise InstarError(
                    f"Backing file '{info.full_backing_filename}' creates an infinite loop."
                )
            if len(infos) > MAX_CHAIN_DEPTH:
                raise FormatError(f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
            node = opener.open_named_node(backing, node.path, info.details.backing_format,
                                          with_backing=False)
    finally:
        opener.close()


def node_to_data(node: NodeInfo) -> dict[str, Any]:
    """What the worker answers for ``node`` (`node_from_data` reads it). No
    deep copy (``dataclasses.asdict``'s took seconds over qcow2's 65,536
    snapshots); a snapshot travels as the list of its fields (a NamedTuple is
    a JSON array)."""
    details = node.details.as_dict() | {
        "snapshots": list(node.details.snapshots),
        "children": [child._asdict() for child in node.details.children],
    }
    return node.as_dict() | {"details": details, "children": [],
                             "files": [child._asdict() for child in node.files]}


def node_from_data(data: dict[str, Any]) -> NodeInfo:
    """A NodeInfo from what `node_to_data` made of it (a worker's answer)."""
    details = dict(data["details"])
    details["snapshots"] = [SnapshotDetails(*snap) for snap in details["snapshots"]]
    details["children"] = [_child_from_data(child) for child in details["children"]]
    return NodeInfo(
        filename=str(data["filename"]),
        format=str(data["format"]),
        virtual_size=int(data["virtual_size"]),
        actual_size=None,
        details=FormatDetails(**details),
        full_backing_filename=data["full_backing_filename"],
        files=[_child_from_data(child) for child in data["files"]],
    )


def _child_from_data(data: dict[str, Any]) -> ChildFile:
    device, inode = data["identity"]
    return ChildFile(str(data["name"]), (int(device), int(inode)),
                     bool(data["counts_in_disk_size"]))


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
    if text.isascii():  # one byte a character: str's own padding counts the same
        return f"{text:<{width}}" if left else f"{text:>{width}}"
    pad = " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))
    return text + pad if left else pad + text


def _snapshot_header() -> str:
    columns = (("ID", 10), ("TAG", 17))
    left = "".join(_c_width(text, width, True) for text, width in columns)
    right = (("VM SIZE", 8), ("DATE", 20), ("VM CLOCK", 13), ("ICOUNT", 11))
    return left + "".join(_c_width(text, width, False) for text, width in right)


def snapshot_list(snapshots: list[SnapshotDetails], indentation: str = "") -> str:
    """qemu's ``dump_snapshots``: the "Snapshot list:" table of info, and all
    that ``snapshot -l`` prints."""
    lines = ["Snapshot list:", _snapshot_header(), *map(_snapshot_row, snapshots)]
    return "".join(f"{indentation}{line}\n" for line in lines)


def _snapshot_row(snap: SnapshotDetails) -> str:
    try:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.date_sec))
    except (OverflowError, OSError, ValueError):
        date = "(null)"  # glib cannot represent it; printf prints NULL so
    secs = snap.vm_clock_nsec // 1_000_000_000
    millis = (snap.vm_clock_nsec // 1_000_000) % 1000
    clock = f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}.{millis:03d}"
    icount = "" if snap.icount is None else str(snap.icount)
    # The last four columns are ASCII (digits, a size's unit, "(null)").
    return (
        _c_width(shown(snap.id), 9, True) + " " + _c_width(shown(snap.name), 16, True) + " "
        + f"{size_to_str(snap.vm_state_size):>8}{date:>20}{clock:>13}{icount:>11}"
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
        out.append(snapshot_list(details.snapshots, ind))
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
    allow: AllowedDirs = (),
    qemu_version: tuple[int, int] = QEMU_7_2,
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> str:
    """The text ``qemu-img info`` prints for ``path``."""
    infos = collect(path, fmt, chain=chain, allow=allow, qemu_version=qemu_version,
                    sandbox=sandbox, force_share=force_share)
    if output == "json":
        return render_json(infos, chain=chain, qemu_version=qemu_version)
    return render_human(infos, qemu_version)
