"""What qemu-img does when it opens an image for writing, for the commands
that change an image in place (resize, snapshot -c/-a/-d, amend, rebase,
commit): the read-only formats fail the open ("Image is read-only", as
``check -r`` says too), a Parallels image with a format extension opens with
qemu's warning that the extension is ignored (qemu drops it when writing),
and a dirty qcow2 image (lazy refcounts, not closed cleanly) is repaired
first, as qemu's qcow2 open does (`repair_if_dirty`)."""

from __future__ import annotations

import os

from instar.errors import ImageOpenError, UnsupportedError
from instar.events import EventSink, Notice
from instar.opener import Broker, ImageOpener, OpenedNode
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.files import InputFile
    from instar.findings import CheckResult

READ_ONLY = frozenset({"dmg", "bochs", "cloop"})  # qemu's drivers that refuse read-write


def open_for_update(broker: Broker, path: str) -> tuple[InputFile, ImageOpener]:
    """The image the user named to change, open read-write through ``broker``,
    and an opener for it and its chain: qemu's words for no file name and for
    a file that cannot be opened. The caller closes the opener."""
    if not path:
        raise ImageOpenError(path, "The 'file' block driver requires a file name")
    try:
        file = broker.open_image_for_update(path)
    except OSError as error:
        raise ImageOpenError(path, f"Could not open '{path}': {error.strerror}") from None
    return file, ImageOpener(broker=broker)


def refuse_read_only(name: str, path: str) -> None:
    """qemu's read-only drivers fail a read-write open before they parse."""
    if name in READ_ONLY:
        raise ImageOpenError(path, "Image is read-only")


def opened_for_writing(node: OpenedNode, path: str, probed: bool) -> list[Notice]:
    """Refuse as qemu's read-write open of ``node`` refuses, or the warnings
    it prints (``probed``: the format was probed, not named), in order."""
    from instar.resize import _raw_probe_warning

    name = node.format.name
    refuse_read_only(name, path)
    notices = []
    header = getattr(node.image.driver, "header", None)
    if name == "parallels" and getattr(header, "ext_off", None):
        notices.append(Notice("instar: warning: Format Extension ignored in RW mode"))
    if probed and name == "raw":
        notices.append(Notice(_raw_probe_warning(path)))
    return notices


def repair_if_dirty(opener: ImageOpener, file: InputFile, path: str, node: OpenedNode,
                    send: EventSink, with_backing: bool = True) -> OpenedNode:
    """qemu's qcow2 open for writing: an image whose dirty bit is set (lazy
    refcounts, not closed cleanly) is checked with leaks and errors fixed and
    the bit cleared (`formats.qcow2.repair`, through `mutate.ImageUpdate`)
    before the command goes on; the check's lines go to stderr as qemu prints
    them. Returns ``node``, or the image opened again after a repair."""
    if node.format.name != "qcow2":
        return node
    from instar.formats.qcow2 import layout as L
    from instar.formats.qcow2.reader import Qcow2Driver
    from instar.formats.qcow2.repair import repair

    driver = node.image.driver
    assert isinstance(driver, Qcow2Driver)
    header = driver.header
    if header.version < 3 or not header.incompatible_features & L.INCOMPAT_DIRTY:
        return node
    if header.incompatible_features & L.INCOMPAT_CORRUPT:  # qemu refuses that first
        raise ImageOpenError(path, "qcow2: Image is corrupt; cannot be opened read/write")

    def reopen(checking: bool) -> OpenedNode:
        if file.is_regular:
            file.size = os.fstat(file.fd).st_size
        return opener.open_file_node(file, path, "qcow2", with_backing=with_backing, depth=0,
                                     checking=checking)

    def reopen_driver() -> Qcow2Driver:
        again = reopen(True).image.driver
        assert isinstance(again, Qcow2Driver)
        return again

    try:
        result = repair(driver, file.fd, "all", reopen_driver)
    except UnsupportedError as error:
        raise UnsupportedError(f"repairing the dirty qcow2 image: {error}") from None
    _show_lines(result, send)
    if result.failure is not None or result.check_errors:
        raise ImageOpenError(path, "Could not repair dirty image")
    return reopen(False)


def _show_lines(result: CheckResult, send: EventSink) -> None:
    """The check's lines, one `Notice` (a check may print a hundred thousand):
    prefixed as error_report prints, or as fprintf prints; controls escaped."""
    from instar.cli.output import PROGRAM, escape_controls
    lines = [f"{PROGRAM}: {escape_controls(f.message)}" if f.prefixed
             else escape_controls(f.message) for f in result.findings]
    if result.findings_dropped:
        lines.append(f"{PROGRAM}: {result.findings_dropped} more lines like these were not "
                     f"kept (instar keeps the first {len(result.findings)})")
    if lines:
        send(Notice("\n".join(lines)))
