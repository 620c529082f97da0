"""``instar snapshot -l``: the internal snapshots of an image, as qemu-img lists them.

qemu-img snapshot opens the image with its backing chain (a missing backing
file fails the listing), then lists the top image's snapshots; a format
without internal snapshots lists nothing. The image is read in the sandboxed
worker, like every other read of an image; only the snapshot table crosses.
Creating, applying and deleting snapshots change the image: not done yet.
"""

from __future__ import annotations

from typing import NamedTuple

from instar.errors import FormatError
from instar.events import EventSink
from instar.formats.base import SnapshotDetails
from instar.opener import Broker, ImageOpener, open_error
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job


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
