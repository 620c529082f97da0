"""commit as qemu-img 7.2 does it: an overlay's data written into its backing file.

qemu-img's order (``img_commit``): the image opened read-write with its
chain, refused without a backing file ("Image does not have a backing
file"), the base found (``-b``: an image of the chain below the top one,
named relative to the image above it and compared as the file it names, or
the top image's backing file), then qemu's commit job: the base grown to the
image's size if it is smaller, and every range that the top image or an
image between it and the base allocates (data, or zeros) written into the
base as the top image reads it. Then, unless ``-d`` or ``-b`` (which implies
``-d``), the top image is emptied if its format can be (qcow2, qcow: `EMPTIED`);
qemu leaves an image of another format (qed, vmdk) as it is.

The base is a file an image names: it is opened for writing through the
broker, so the policy applies (its directory must be allowed). Its writes go
through one `instar.mutate.ImageUpdate` (raw: ``pwrite``; every other
format: its `instar.formats.base.GuestUpdater`), the top image's emptying
through another, after the base is complete on disk. Everything instar
cannot do (a base it cannot write in place, an overlay it cannot empty as
qemu does) is refused before the first write.
"""

from __future__ import annotations

import importlib
import os

from instar.errors import (
    FormatError,
    ImageCommitError,
    ImageOpenError,
    InstarError,
    ResizeError,
    UnsupportedError,
)
from instar.events import Advance, EventSink, Line, Notice
from instar.image import DATA, ZERO, Image
from instar.mutate import ImageUpdate
from instar.opener import Broker, ImageOpener, OpenedNode
from instar.resize import _raw_probe_warning
from instar.runtime_types import TYPE_CHECKING
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job
from instar.writable import open_for_update, repair_if_dirty

if TYPE_CHECKING:
    from instar.files import InputFile
    from instar.formats.base import GuestUpdater
    from instar.formats.qcow2.reader import Qcow2Driver
    from instar.image import Driver

STEP = 2 << 20  # bytes read from the chain at a time, at most
# The formats qemu 7.2 empties after a commit (bdrv_make_empty), and the
# module that does it as qemu does (``check_emptiable(driver)`` refuses before
# anything is written, ``make_empty(driver, update, data_update)``); qemu
# leaves the others as they are.
EMPTIED = {"qcow2": "instar.formats.qcow2.make_empty",
           "qcow": "instar.formats.qcow.make_empty"}
PARALLELS_REFUSAL = ("Block format 'parallels' used by node '#block315' does not support "
                     "reopening files")


def commit(
    path: str,
    *,
    fmt: str | None = None,
    base: str | None = None,
    drop: bool = False,
    quiet: bool = False,
    allow: AllowedDirs = (),
    events: EventSink | None = None,
    sandbox: SandboxSettings | None = None,
) -> None:
    """Commit ``path`` into its backing file (or ``base``, further down its
    chain), as ``qemu-img commit [-f fmt] [-b base] [-d] path``; ``events``
    gets "Image committed." as a `Line` unless ``quiet``, an `Advance` of 0
    where qemu's meter is drawn at 0 (the image open, the job started) and
    qemu's warning for a probed raw image as a `Notice`."""
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> None:
        _commit_job(broker, send, path, fmt, base, drop)
        if not quiet:
            send(Line("Image committed."))

    run_job(job, policy, sandbox, events, inputs=[path], outputs=[path])


def _commit_job(broker: Broker, send: EventSink, path: str, fmt_name: str | None,
                base_name: str | None, drop: bool) -> None:
    """commit itself, reaching files only through ``broker`` (it may run in a worker)."""
    file, opener = open_for_update(broker, path)
    try:
        fmt = opener.choose_format(file, path, fmt_name)
        top = opener.open_file_node(file, path, fmt.name, with_backing=True, depth=0)
        if fmt_name is None and fmt.name == "raw":
            send(Notice(_raw_probe_warning(path)))
        top = repair_if_dirty(opener, file, path, top, send)
        send(Advance(0, 1))  # qemu's meter starts once the image is open
        chain = _chain(opener, top)
        if len(chain) < 2:
            raise ImageCommitError("Image does not have a backing file")
        if fmt.name == "qcow2":
            _check_qcow2(top)
        if base_name is None:
            depth = 1
        else:
            depth = _find_base(broker, chain, base_name)
            drop = True  # qemu: whether to empty the top image is unclear then
        base = chain[depth]
        data: InputFile | None = None  # the top image's data file, to empty too
        if base.format.name == "parallels":
            # qemu reopens the base read-write, which its parallels driver
            # cannot do; qemu's node name varies from run to run (docs/cli.md)
            raise ImageCommitError(PARALLELS_REFUSAL)
        if fmt.name not in EMPTIED:
            drop = True  # qemu: the format cannot be emptied (ENOTSUP), which it ignores
        if not drop:
            emptier = importlib.import_module(EMPTIED[fmt.name])
            emptier.check_emptiable(top.image.driver)
            data = _open_data_file(opener, top)
        target = _open_base(opener, base)
        send(Advance(0, 1))  # and is drawn again when its job starts
        _write_base(opener, chain[:depth], base, target)
        if not drop:
            update = ImageUpdate(file.fd, path)
            data_update = None if data is None else ImageUpdate(data.fd, data.name)
            emptier.make_empty(top.image.driver, update, data_update)
            update.finish()
    except FormatError as error:
        raise ImageCommitError(str(error)) from None
    finally:
        opener.close()


def _chain(opener: ImageOpener, top: OpenedNode) -> list[OpenedNode]:
    """The top image's chain as opened, from the top down."""
    chain = [top]
    while True:
        below = chain[-1].image.backing
        node = next((n for n in opener.nodes if n.image is below), None)
        if node is None:
            return chain
        chain.append(node)


def _check_qcow2(node: OpenedNode) -> None:
    """qemu's refusal to open a corrupt qcow2 image read-write."""
    from instar.formats.qcow2 import layout as L

    header = node.image.driver.header  # type: ignore[attr-defined]
    if header.incompatible_features & L.INCOMPAT_CORRUPT:
        raise ImageOpenError(node.path, "qcow2: Image is corrupt; cannot be opened read/write")


def _find_base(broker: Broker, chain: list[OpenedNode], name: str) -> int:
    """The index in ``chain`` of the image ``-b name`` names: at each level,
    ``name`` relative to the image above is opened and compared, as a file,
    with that image's backing file (qemu compares canonical paths)."""
    for depth in range(1, len(chain)):
        above, below = chain[depth - 1], chain[depth]
        if not name or "\0" in name:
            continue
        try:
            candidate = broker.open_named_file(name, above.path, "base image")
        except (InstarError, OSError):
            continue
        same = candidate.identity == below.file.identity
        if same:
            return depth
    raise ImageCommitError(f"Did not find '{name}' in the backing chain of '{chain[0].path}'")


def _open_base(opener: ImageOpener, base: OpenedNode) -> InputFile:
    """The base opened again, for writing, through the broker's policy; it
    must be the file the chain read."""
    target = _reopen_for_update(opener, base, base.path, base.file, what="backing file")
    if not target.is_regular and base.format.name != "raw":
        # its writer appends to the file, which a device cannot grow
        raise UnsupportedError(f"committing into a {base.format.name} image on a block "
                               "device is not supported yet")
    return target


def _open_data_file(opener: ImageOpener, node: OpenedNode) -> InputFile | None:
    """The top image's external data file (if any) opened again for writing,
    through the broker's policy: emptying the image discards its clusters."""
    driver = node.image.driver
    if getattr(driver, "data_file", None) is None:
        return None
    name = driver.extensions.data_file  # type: ignore[attr-defined]
    return _reopen_for_update(opener, node, name, driver.data_file,  # type: ignore[attr-defined]
                              what="data file", relative_to=node.path, label="data file ")


def _reopen_for_update(opener: ImageOpener, node: OpenedNode, name: str, read: InputFile, *,
                       what: str, relative_to: str = "", label: str = "") -> InputFile:
    """``name`` (relative to ``relative_to``; ``what`` it is, in the broker's
    refusals) opened again for writing through the broker's policy: it must
    still be ``read``, the file ``node``'s chain read. ``label`` goes before
    the name in qemu's "Could not open" message."""
    try:
        target = opener.broker.open_named_for_update(name, relative_to, what)
    except OSError as error:
        raise ImageOpenError(node.path, f"Could not open {label}'{name}': "
                                        f"{error.strerror}") from None
    if target.identity != read.identity:
        raise ImageCommitError(f"'{name}' changed while it was opened")
    return target


def _allocated(layers: list[OpenedNode], size: int) -> list[tuple[int, int]]:
    """The ranges below ``size`` that any of ``layers`` allocates (data or
    zeros), merged and in order."""
    ranges: list[tuple[int, int]] = []
    for layer in layers:
        for run in layer.image.status_runs():
            if run.start >= size:
                break
            if run.flags & (DATA | ZERO):
                ranges.append((run.start, min(run.end, size)))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _write_base(opener: ImageOpener, above: list[OpenedNode], base: OpenedNode,
                target: InputFile) -> None:
    """Every range ``above`` allocates, as the top image reads it, into the base."""
    top = above[0].image
    size = top.virtual_size
    ranges = _allocated(above, size)
    update = ImageUpdate(target.fd, base.path)
    if base.format.name == "raw":
        _write_raw(top, ranges, size, target, update)
    else:
        if base.format.name == "qcow2":
            _prepare_qcow2(opener, base, size, target)
        elif base.format.name == "qed" and base.image.virtual_size < size:
            _grow_qed(opener, base, size, target)
        elif base.image.virtual_size < size:
            # qemu's job cannot grow the base of this format (no truncate)
            raise ImageCommitError("Block job failed: Operation not supported")
        driver = _base_driver(opener, base, target)
        writer = base.format.open_updater(driver, update, "commit into the base")
        base_size = driver.virtual_size
        cluster = base.format.describe(driver).cluster_size
        try:
            _write_units(top, base, ranges, size, base_size, writer, cluster)
        except BaseException:
            writer.abandon()
            raise
        writer.finish()
        writer.write_header()
        writer.release()
    update.finish()


def _write_raw(top: Image, ranges: list[tuple[int, int]], size: int, target: InputFile,
               update: ImageUpdate) -> None:
    """A raw base: grown to ``size`` if shorter, then the ranges written over.
    A block device cannot grow: shorter than ``size``, it gets qemu's failure
    (its job's truncate fails with EINVAL) before anything is written."""
    if target.size < size and not target.is_regular:
        raise ImageCommitError("Block job failed: Invalid argument")
    update.phase("data")
    if target.size < size:
        update.truncate(size)
    for start, end in ranges:
        for offset in range(start, end, STEP):
            length = min(STEP, end - offset)
            update.write(offset, top.read(offset, length))


def _prepare_qcow2(opener: ImageOpener, base: OpenedNode, size: int,
                   target: InputFile) -> None:
    """qemu's refusals for a qcow2 base, then the base grown to ``size`` if
    smaller (a resize of its own, complete on disk before the data)."""
    from instar.formats.qcow2 import layout as L
    from instar.formats.qcow2.guest_writes import check_writable

    driver: Qcow2Driver = _base_driver(opener, base, target)  # type: ignore[assignment]
    _check_qcow2(base)
    check_writable(driver, "commit into the base")
    if driver.extensions.has_bitmaps or driver.header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        raise UnsupportedError("committing into a qcow2 image with persistent bitmaps is "
                               "not supported yet")
    if driver.header.incompatible_features & L.INCOMPAT_DIRTY:
        raise UnsupportedError("the base is a dirty qcow2 image (lazy refcounts); instar "
                               "does not repair it before a commit yet: run 'qemu-img "
                               "check -r all'")
    old_size = driver.header.size
    if old_size < size:
        from instar.formats.qcow2.resize import resize_qcow2

        backing = base.image.backing
        zero_fill = backing is not None and backing.virtual_size > old_size
        grow = ImageUpdate(target.fd, base.path)
        try:
            resize_qcow2(driver, grow, size, "off", zero_fill)
        except ResizeError as error:
            raise _job_failure(error) from None
        grow.finish()
        target.size = os.fstat(target.fd).st_size


def _job_failure(error: ResizeError) -> InstarError:
    """A base qemu's job fails to grow: the job reports only the errno
    ("Block job failed: Operation not supported"), not the resize's words."""
    if not error.errno:
        return error
    return ImageCommitError(f"Block job failed: {os.strerror(error.errno)}")


def _grow_qed(opener: ImageOpener, base: OpenedNode, size: int, target: InputFile) -> None:
    """qemu grows a QED base smaller than the top image (its header's size,
    a resize of its own, complete on disk before the data)."""
    from instar.formats.qed.reader import QedDriver
    from instar.formats.qed.resize import resize_qed

    driver = _base_driver(opener, base, target)
    assert isinstance(driver, QedDriver)
    for _ in driver.map(0, driver.virtual_size):  # a damaged base refused before the growth
        pass
    backing = base.image.backing
    zero_fill = backing is not None and backing.virtual_size > driver.virtual_size
    grow = ImageUpdate(target.fd, base.path)
    try:
        resize_qed(driver, grow, size, "off", zero_fill)
    except ResizeError as error:
        raise _job_failure(error) from None
    grow.finish()


def _write_units(top: Image, base: OpenedNode, ranges: list[tuple[int, int]], size: int,
                 base_size: int, writer: GuestUpdater, cluster: int | None) -> None:
    """Each base unit a range touches rewritten with what the top image
    reads there (its part past the top image's end as the base reads it);
    as zeros where qemu's job writes zeros (`instar.commit_zeros`: the base's
    clusters are ``cluster`` bytes), else as data, zeros or not."""
    from instar.commit_zeros import zero_regions

    unit = writer.unit
    zeros = zero_regions(top, ranges, size, cluster)
    region = 0
    done = -1  # the last unit written (two ranges may share one)
    for start, end in ranges:
        for number in range(max(start // unit, done + 1), -(-end // unit)):
            at = number * unit
            while region < len(zeros) and zeros[region][1] <= at:
                region += 1
            if region < len(zeros) and zeros[region][0] <= at and at + unit <= zeros[region][1]:
                writer.overwrite(number, None)  # qemu writes zeros there
            else:
                data = top.read(at, min(unit, size - at))
                if at + unit > size and base_size > size:
                    data += base.image.read(size, min(at + unit, base_size) - size)
                writer.overwrite(number, data.ljust(unit, b"\0"))  # copied, zeros too
            done = number


def _base_driver(opener: ImageOpener, base: OpenedNode, target: InputFile) -> Driver:
    """The base's layer as it is on disk now, read from ``target``."""
    node = opener.open_file_node(target, base.path, base.format.name, with_backing=False,
                                 depth=0)
    return node.image.driver

