"""``instar snapshot -l``: the internal snapshots of an image, as qemu-img lists them.

qemu-img snapshot opens the image with its backing chain (a missing backing
file fails the listing), then lists the top image's snapshots; a format
without internal snapshots lists nothing. The image is read in the sandboxed
worker, like every other read of an image; only the snapshot table crosses.

Creating (``-c``), applying (``-a``) and deleting (``-d``) open the image for
writing, probed and with its backing chain as qemu-img opens it, in the
worker; qcow2 changes in place (`instar.formats.qcow2.snapshots`), every other
format fails as qemu fails it. Messages are qemu-img's: "Could not create
snapshot 'NAME': ..." and so on.
"""

from __future__ import annotations

import os

from instar.errors import FormatError, ImageOpenError, SnapshotError
from instar.events import EventSink
from instar.formats.base import SnapshotDetails
from instar.opener import Broker, ImageOpener, open_error
from instar.runtime_types import NamedTuple
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job
from instar.writable import open_for_update, opened_for_writing, repair_if_dirty


class Listing(NamedTuple):
    format: str  # what the probe found
    snapshots: list[SnapshotDetails]  # in table order


def list_snapshots(path: str, *, allow: AllowedDirs = (), sandbox: SandboxSettings | None = None,
                   force_share: bool = False) -> Listing:
    """The internal snapshots of the image at ``path``, probed as qemu-img
    snapshot always probes it."""
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> list[object]:
        opener = ImageOpener(broker=broker)
        try:
            node = opener.open_node(path)
            try:
                details = node.format.describe(node.image.driver)
            except (FormatError, OSError) as error:
                raise open_error(node.path, error) from None
            return [node.format.name, list(details.snapshots)]  # each a JSON array
        finally:
            opener.close()

    name, rows = run_job(job, policy, sandbox, inputs=[path], force_share=force_share)
    return Listing(str(name), [SnapshotDetails(*row) for row in rows])


# What qemu-img says for each action, before the reason.
ACTION_PREFIX = {"-c": "Could not create snapshot '{}': ",
                 "-a": "Could not apply snapshot '{}': ",
                 "-d": "Could not delete snapshot '{}': "}
# qemu's reason for a format without internal snapshots.
NO_SNAPSHOTS = {"-c": "-95 (Operation not supported)",
                "-a": "Block driver does not support snapshots",
                "-d": "snapshot not found"}


def change_snapshots(path: str, action: str, name: str, *, allow: AllowedDirs = (),
                     sandbox: SandboxSettings | None = None,
                     events: EventSink | None = None,
                     now_ns: int | None = None) -> None:
    """``qemu-img snapshot ACTION NAME path`` for ``action`` -c, -a or -d.
    ``events`` gets qemu's warning for a probed raw image as a `Notice`;
    ``now_ns`` is the date a new snapshot records (now when None). Raises
    SnapshotError worded as qemu-img's message (its prefix included)."""
    if action not in ACTION_PREFIX:
        raise ValueError(f"unknown snapshot action {action!r}")
    policy = PathPolicy.from_allow(allow)
    if now_ns is None:
        import time

        now_ns = time.time_ns()
    when = now_ns

    def job(broker: Broker, send: EventSink) -> None:
        _change_job(broker, send, path, action, name, when)

    run_job(job, policy, sandbox, events, inputs=[path], outputs=[path])


def _change_job(broker: Broker, send: EventSink, path: str, action: str, name: str,
                now_ns: int) -> None:
    """The change itself, reaching files only through ``broker`` (it may run in a worker)."""
    from instar.mutate import ImageUpdate

    file, opener = open_for_update(broker, path)
    prefix = ACTION_PREFIX[action].format(name)
    try:
        fmt = opener.choose_format(file, path, None)
        node = opener.open_file_node(file, path, fmt.name, with_backing=True, depth=0)
        notices = opened_for_writing(node, path, probed=True)
        if action == "-a" and fmt.name != "qcow2":  # qemu's goto falls back to the
            notices += notices  # file: the image is opened again, warnings and all
        for notice in notices:
            send(notice)
        node = repair_if_dirty(opener, file, path, node, send)
        if fmt.name != "qcow2":
            raise SnapshotError(prefix + NO_SNAPSHOTS[action])
        from instar.formats.qcow2 import layout as L
        from instar.formats.qcow2 import snapshots as qcow2_snapshots
        from instar.formats.qcow2.reader import Qcow2Driver

        driver = node.image.driver
        assert isinstance(driver, Qcow2Driver)
        if driver.header.incompatible_features & L.INCOMPAT_CORRUPT:
            raise ImageOpenError(path, "qcow2: Image is corrupt; cannot be opened read/write")
        update = ImageUpdate(file.fd, path)
        raw_name = os.fsencode(name)
        try:
            if action == "-c":
                seconds, rest = divmod(now_ns, 10**9)
                qcow2_snapshots.create(driver, update, raw_name, seconds % (1 << 32),
                                       rest // 1000 * 1000)
            elif action == "-a":
                qcow2_snapshots.goto(driver, update, raw_name)
            else:
                qcow2_snapshots.delete(driver, update, raw_name)
        except SnapshotError as error:
            refusal = SnapshotError(prefix + str(error), error.errno)
            refusal.before = error.before
            raise refusal from None
        except FormatError as error:
            raise SnapshotError(prefix + str(error)) from None
        update.finish()
    finally:
        opener.close()
