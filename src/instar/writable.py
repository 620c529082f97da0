"""What qemu-img says when it opens an image for writing, for the commands
that change an image in place (snapshot -c/-a/-d, amend): the read-only
formats fail the open ("Image is read-only", as ``check -r`` says too), and
a Parallels image with a format extension opens with qemu's warning that the
extension is ignored (qemu drops it when writing)."""

from __future__ import annotations

from instar.errors import ImageOpenError
from instar.events import Notice
from instar.opener import OpenedNode


def opened_for_writing(node: OpenedNode, path: str, probed: bool) -> list[Notice]:
    """Refuse as qemu's read-write open of ``node`` refuses, or the warnings
    it prints (``probed``: the format was probed, not named), in order."""
    from instar.check import _READ_ONLY  # check -r's list of qemu's read-only formats
    from instar.resize import _raw_probe_warning

    name = node.format.name
    if name in _READ_ONLY:
        raise ImageOpenError(path, "Image is read-only")
    notices = []
    header = getattr(node.image.driver, "header", None)
    if name == "parallels" and getattr(header, "ext_off", None):
        notices.append(Notice("instar: warning: Format Extension ignored in RW mode"))
    if probed and name == "raw":
        notices.append(Notice(_raw_probe_warning(path)))
    return notices
