"""rebase as qemu-img 7.2 does it: an image's backing file changed in place.

qemu-img's order (``img_rebase``): the image opened read-write (its old
backing chain too, unless ``-u``), the new backing format's name checked, the
new backing file opened (safe mode, when one is named: relative to the
image's directory, as the backing file name will be read), then the copy,
then the header (``bdrv_change_backing_file``).

Safe mode copies into the image, for every region it does not hold itself
(the backing file answers there), what the old backing chain reads wherever
the new backing file reads differently (zeros past either one's end), so the
image reads the same before and after. Unsafe mode (``-u``) changes the
header only.

Differences from qemu-img, each safer and each leaving the image reading the
same: every refusal qemu makes when changing the header (a format without a
backing file, a missing ``-F``, a name too long or without room) is made
before anything is copied, where qemu copies first and then refuses.

Every file is reached through the broker: the image as the one to change,
the old and new backing files as files the image names (the policy applies).
All writes go through one `instar.mutate.ImageUpdate`: copied clusters and
their tables first, the header last.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from instar.errors import FormatError, ImageOpenError, InstarError, UnsupportedError
from instar.events import EventSink, Notice, Progress
from instar.formats import registry
from instar.image import DATA, ZERO, Image, Window
from instar.mutate import ImageUpdate
from instar.opener import Broker, ImageOpener, OpenedNode
from instar.resize import _raw_probe_warning
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job

if TYPE_CHECKING:
    from instar.formats.qcow2.guest_writes import GuestWriter

CHUNK = 1 << 20  # bytes compared at a time (whole clusters)


class RebaseError(InstarError):
    """rebase refused or failed, in qemu-img's words."""


def rebase(
    path: str,
    backing: str | None,
    *,
    fmt: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    allow: AllowedDirs = (),
    force_share: bool = False,
    events: EventSink | None = None,
    sandbox: SandboxSettings | None = None,
) -> None:
    """Make ``backing`` (None or "": none) of format ``backing_fmt`` the backing
    file of ``path``, as ``qemu-img rebase [-u] [-f fmt] -b backing [-F fmt]``.
    ``events`` gets `Progress` as the copy goes and qemu's warning for a
    probed raw image as a `Notice`."""
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> None:
        _rebase_job(broker, send, path, backing, fmt, backing_fmt, unsafe)

    run_job(job, policy, sandbox, events, inputs=[path], outputs=[path],
            force_share=force_share)


def _change_error(backing: str | None, backing_fmt: str | None, error: OSError) -> RebaseError:
    """qemu-img's line for a failed ``bdrv_change_backing_file``."""
    name = "(null)" if backing is None else backing
    prefix = f"Could not change the backing file to '{name}'"
    if error.errno == errno.ENOSPC:
        return RebaseError(f"{prefix}: No space left in the file header")
    if error.errno == errno.EINVAL and backing is not None and backing_fmt is None:
        return RebaseError(f"{prefix}: backing format must be specified")
    return RebaseError(f"{prefix}: {error.strerror}")


def _rebase_job(broker: Broker, send: EventSink, path: str, backing: str | None,
                fmt_name: str | None, backing_fmt: str | None, unsafe: bool) -> None:
    """rebase itself, reaching files only through ``broker`` (it may run in a worker)."""
    if not path:
        raise ImageOpenError(path, "The 'file' block driver requires a file name")
    try:
        file = broker.open_image_for_update(path)
    except OSError as error:
        raise ImageOpenError(path, f"Could not open '{path}': {error.strerror}") from None
    opener = ImageOpener(broker=broker)
    try:
        fmt = opener.choose_format(file, path, fmt_name)
        node = opener.open_file_node(file, path, fmt.name, with_backing=not unsafe, depth=0)
        if fmt_name is None and fmt.name == "raw":
            send(Notice(_raw_probe_warning(path)))
        if backing_fmt is not None and registry.get(backing_fmt) is None \
                and not registry.is_recognised_only(backing_fmt):
            raise RebaseError(f"Invalid format name: '{backing_fmt}'")
        new_backing: Image | None = None
        if not unsafe and backing:
            new_backing = _open_new_backing(opener, node, backing, backing_fmt)
        # The header change's refusals first (qemu makes them after the copy).
        target = backing or None
        header = _Header(node, target, backing_fmt if target else None, backing, backing_fmt)
        update = ImageUpdate(file.fd, path)
        writer = None
        if not unsafe:
            writer = _copy(node, new_backing, update, send)
        header.write(update, writer)
        update.finish()
    except FormatError as error:
        raise RebaseError(str(error)) from None
    finally:
        opener.close()


def _open_new_backing(opener: ImageOpener, node: OpenedNode, backing: str,
                      backing_fmt: str | None) -> Image:
    """The new backing file, named relative to the image as its header will
    name it, opened through the policy (qemu opens it read-only, probed
    unless ``-F`` names its format)."""
    try:
        new = opener.open_named_node(backing, node.path, backing_fmt, with_backing=True)
    except ImageOpenError as error:
        raise RebaseError(f"Could not open new backing file '{backing}': {error}") from None
    if new.file.identity == node.file.identity:
        raise RebaseError(f"Could not open new backing file '{backing}': Could not open "
                          f"'{new.path}': the image cannot be its own backing file")
    return new.image


class _Header:
    """The image's new header, computed (and so refused) before anything is written."""

    def __init__(self, node: OpenedNode, target: str | None, target_fmt: str | None,
                 backing: str | None, backing_fmt: str | None) -> None:
        self.node = node
        self.target, self.target_fmt = target, target_fmt
        self.format = node.format.name
        try:
            if target is not None and target_fmt is None:
                raise OSError(errno.EINVAL, "Invalid argument")  # qemu's require flag
            if self.format == "qcow2":
                _check_qcow2(node)
                self.data = self._qcow2(None)
            elif self.format == "qed":
                from instar.formats.qed.backing import backing_header

                self.data = backing_header(node.image.driver,  # type: ignore[arg-type]
                                           target, target_fmt)
            else:
                raise OSError(errno.ENOTSUP, "Operation not supported")
        except OSError as error:
            raise _change_error(backing, backing_fmt, error) from None

    def _qcow2(self, table: tuple[int, int] | None) -> bytes:
        from instar.formats.qcow2.header_update import header_area, header_bytes_in_use

        driver = self.node.image.driver
        data = header_area(driver, self.target, self.target_fmt,  # type: ignore[arg-type]
                           table)
        # Over whatever the old header used: qemu writes the whole cluster.
        used = header_bytes_in_use(driver)  # type: ignore[arg-type]
        return data.ljust(used, b"\0")

    def write(self, update: ImageUpdate, writer: GuestWriter | None) -> None:
        """The header, in one write (after the copy's pointers); then what
        the copy releases."""
        data = self.data
        table = writer.refcount_table() if writer is not None else None
        if table is not None:
            data = self._qcow2(table)
        update.phase("header")
        update.write(0, data)
        if writer is not None:
            writer.release()


def _check_qcow2(node: OpenedNode) -> None:
    """qemu's refusals to open a qcow2 image read-write, and instar's own."""
    from instar.formats.qcow2 import layout as L

    header = node.image.driver.header  # type: ignore[attr-defined]
    extensions = node.image.driver.extensions  # type: ignore[attr-defined]
    if header.incompatible_features & L.INCOMPAT_CORRUPT:
        raise RebaseError("qcow2: Image is corrupt; cannot be opened read/write")
    if extensions.has_bitmaps or header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        raise UnsupportedError("rebasing a qcow2 image with persistent bitmaps is not "
                               "supported yet")
    if header.incompatible_features & L.INCOMPAT_DIRTY:
        raise UnsupportedError("the qcow2 image is dirty (lazy refcounts); instar does not "
                               "repair it before a rebase yet: run 'qemu-img check -r all'")


def _copy(node: OpenedNode, new_backing: Image | None, update: ImageUpdate,
          send: EventSink) -> GuestWriter | None:
    """Safe mode's copy: every cluster the image does not hold whose old and
    new backing content differ gets the old content (zeros past the old
    backing file's end). Returns the writer (None when nothing was written)."""
    image = node.image
    size = image.virtual_size
    old = Window(image.backing, 0, size) if image.backing is not None else None
    new = Window(new_backing, 0, size) if new_backing is not None else None
    old_size = image.backing.virtual_size if image.backing is not None else 0
    unit = _unit(node)
    writer: GuestWriter | None = None
    send(Progress(0, size))
    for run in image.status_runs():
        if run.flags & (DATA | ZERO):
            continue
        start = run.start // unit * unit
        while start < run.end:
            stop = min(start + max(CHUNK // unit, 1) * unit, -(-run.end // unit) * unit)
            end = min(stop, size)
            old_data = old.read(start, end - start) if old is not None else bytes(end - start)
            new_data = new.read(start, end - start) if new is not None else bytes(end - start)
            if old_data != new_data:
                for at in range(start, end, unit):
                    piece = slice(at - start, min(at + unit, end) - start)
                    if old_data[piece] == new_data[piece]:
                        continue
                    if writer is None:
                        writer = _writer(node, update)
                    content = None if at >= old_size else old_data[piece].ljust(unit, b"\0")
                    writer.write(at // unit, content)
            send(Progress(end, size))
            start = stop
    if writer is not None:
        writer.finish()
    send(Progress(size, size))
    return writer


def _unit(node: OpenedNode) -> int:
    """The granularity the image allocates in (its cluster)."""
    driver = node.image.driver
    header = getattr(driver, "header", None)
    size = getattr(header, "cluster_size", 0)
    return size if isinstance(size, int) and size > 0 else 65536


def _writer(node: OpenedNode, update: ImageUpdate) -> GuestWriter:
    """The format's in-place guest writer, made when the first cluster needs one."""
    if node.format.name != "qcow2":
        raise UnsupportedError(f"rebase in safe mode of a {node.format.name} image whose "
                               "data must be copied is not supported yet")
    from instar.formats.qcow2.guest_writes import GuestWriter

    return GuestWriter(node.image.driver, update, "rebase")  # type: ignore[arg-type]
