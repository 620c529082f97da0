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

from instar.errors import (
    FormatError,
    ImageOpenError,
    RebaseError,
    StoppedUpdate,
    UnsupportedError,
)
from instar.events import Advance, EventSink, Notice
from instar.formats import registry
from instar.image import DATA, ZERO, Image, Window
from instar.mutate import ImageUpdate
from instar.opener import Broker, ImageOpener, OpenedNode
from instar.resize import _raw_probe_warning
from instar.runtime_types import TYPE_CHECKING
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job
from instar.writable import open_for_update, repair_if_dirty

if TYPE_CHECKING:
    from instar.formats.qcow2.guest_writes import GuestWriter as Qcow2Writer
    from instar.formats.qed.guest_writes import GuestWriter as QedWriter

    GuestWriter = Qcow2Writer | QedWriter

# Formats qemu 7.2 opens read-only only: "Could not open 'F': Image is read-only".
READ_ONLY_FORMATS = ("bochs", "cloop", "dmg")
IO_BUF_SIZE = 2 << 20  # qemu-img's step: bytes compared at a time, at most
# Steps past both backing files' ends counted one by one for qemu's meter;
# the rest (a huge image over short backing files) are counted at once.
_COUNTED_TAIL = 1 << 14


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
    ``events`` gets an `Advance` per step of qemu's meter and its warning for a
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
    file, opener = open_for_update(broker, path)
    try:
        fmt = opener.choose_format(file, path, fmt_name)
        if fmt.name in READ_ONLY_FORMATS:  # qemu's drivers refuse before they parse
            raise ImageOpenError(path, "Image is read-only")
        node = opener.open_file_node(file, path, fmt.name, with_backing=not unsafe, depth=0)
        if fmt_name is None and fmt.name == "raw":
            send(Notice(_raw_probe_warning(path)))
        if fmt.name == "qcow2":
            _check_qcow2(node)
            node = repair_if_dirty(opener, file, path, node, send, with_backing=not unsafe)
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
        raise RebaseError(f"Could not open new backing file '{backing}': {error.reason}") \
            from None
    if new.file.identity == node.file.identity:  # qemu: its own write lock is in the way
        refusal = RebaseError(f"Could not open new backing file '{backing}': Failed to get "
                              'shared "write" lock')
        refusal.hint = f"Is another process using the image [{new.path}]?"
        raise refusal
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
    """qemu's refusal to open a qcow2 image read-write, and instar's own
    (what it cannot rewrite faithfully yet)."""
    from instar.formats.qcow2 import layout as L

    header = node.image.driver.header  # type: ignore[attr-defined]
    extensions = node.image.driver.extensions  # type: ignore[attr-defined]
    if header.incompatible_features & L.INCOMPAT_CORRUPT:
        raise ImageOpenError(node.path, "qcow2: Image is corrupt; cannot be opened read/write")
    if extensions.has_bitmaps or header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        raise UnsupportedError("rebasing a qcow2 image with persistent bitmaps is not "
                               "supported yet")


def _copy(node: OpenedNode, new_backing: Image | None, update: ImageUpdate,
          send: EventSink) -> GuestWriter | None:
    """Safe mode's copy, in qemu's steps: from each offset, up to 2 MiB of
    what the image's own layer answers alike; where it holds nothing, cut at
    the old and the new backing file's ends, every cluster whose old and new
    backing content differ gets the old content (zeros past the old backing
    file's end: a zero cluster where the format has them). Each such step is
    one `Advance` of qemu's meter. Returns the writer (None: nothing written)."""
    image = node.image
    size = image.virtual_size
    old_size = image.backing.virtual_size if image.backing is not None else 0
    new_size = new_backing.virtual_size if new_backing is not None else 0
    old = Window(image.backing, 0, size) if image.backing is not None else None
    new = Window(new_backing, 0, size) if new_backing is not None else None
    writers: list[GuestWriter] = []  # made when the first cluster needs one
    try:
        _scan(node, old, new, old_size, new_size, update, send, writers)
        if writers:
            writers[0].finish()
    except StoppedUpdate:
        raise  # the tests' crash: nothing is tidied up after it
    except BaseException:
        if writers:
            writers[0].abandon()
        raise
    return writers[0] if writers else None


def _scan(node: OpenedNode, old: Window | None, new: Window | None, old_size: int,
          new_size: int, update: ImageUpdate, send: EventSink,
          writers: list[GuestWriter]) -> None:
    """The steps of `_copy`: compare, and write what differs."""
    image = node.image
    size = image.virtual_size
    steps = size // min(size, IO_BUF_SIZE) if size else 0
    unit = _unit(node)
    last = -1  # the last cluster written (a step may end inside a cluster)
    limit = max(old_size, new_size)  # nothing differs past both backing files
    counted = 0  # steps past ``limit``
    runs = image.status_runs()
    run = next(runs, None)
    offset = 0
    while offset < size:
        while run is not None and run.end <= offset:
            run = next(runs, None)
        if run is None:
            raise FormatError("the image's map ends before its size")
        length = min(IO_BUF_SIZE, size - offset, run.piece_end(offset) - offset)
        if run.flags & (DATA | ZERO):
            offset += length
            continue
        if offset >= limit:  # both backing files read zeros from here on
            counted += 1
            if counted > _COUNTED_TAIL:  # qemu's remaining steps, at once
                send(Advance(-(-(size - offset) // IO_BUF_SIZE), steps))
                return
            send(Advance(1, steps))
            offset += length
            continue
        if offset < old_size:
            length = min(length, old_size - offset)
        if new is not None and offset < new_size:
            length = min(length, new_size - offset)
        end = offset + length
        old_data = old.read(offset, length) if old is not None else bytes(length)
        new_data = new.read(offset, length) if new is not None else bytes(length)
        if old_data != new_data:
            for at in range(offset // unit * unit, end, unit):
                start, stop = max(at, offset), min(at + unit, end)
                if at // unit == last or old_data[start - offset : stop - offset] == \
                        new_data[start - offset : stop - offset]:
                    continue
                if not writers:
                    writers.append(_writer(node, update))
                writers[0].write(at // unit, _cluster(old, at, unit, size, old_size))
                last = at // unit
        send(Advance(1, steps))
        offset = end


def _cluster(old: Window | None, at: int, unit: int, size: int, old_size: int) -> bytes | None:
    """What the image reads in the cluster at ``at`` now (through the old
    backing file; zeros past the image's end): None where that is all zeros
    because the old backing file ends before it (qemu writes zeros there)."""
    if at >= old_size or old is None:
        return None
    inside = min(unit, size - at)
    return old.read(at, inside).ljust(unit, b"\0")


def _unit(node: OpenedNode) -> int:
    """The granularity the image allocates in: its cluster, or its subcluster
    with qcow2's extended L2 entries."""
    header = getattr(node.image.driver, "header", None)
    size = getattr(header, "cluster_size", 0)
    if getattr(header, "extended_l2", False):
        size //= 32
    return size if isinstance(size, int) and size > 0 else 65536


def _writer(node: OpenedNode, update: ImageUpdate) -> GuestWriter:
    """The format's in-place guest writer, made when the first cluster needs one."""
    driver = node.image.driver
    if node.format.name == "qed":
        from instar.formats.qed.guest_writes import GuestWriter as QedWriter

        return QedWriter(driver, update, "rebase")  # type: ignore[arg-type]
    if node.format.name != "qcow2":
        raise UnsupportedError(f"rebase in safe mode of a {node.format.name} image whose "
                               "data must be copied is not supported yet")
    from instar.formats.qcow2.guest_writes import GuestWriter as Qcow2Writer

    return Qcow2Writer(driver, update, "rebase")  # type: ignore[arg-type]
