"""qed ``check -r leaks|all`` as qemu 7.2 does it, for what instar supports.

qemu's qed check with a repair mode (either) zeroes the table entries that
name a bad offset (corruptions), and repairs no leak: an image with leaks
only is reported as the read-only check reports it. Closing the image it
opened read-write, qemu clears the header's "need check" mark. instar does
the same, and refuses an image with corruptions (not supported yet) before
writing anything.
"""

from __future__ import annotations

from instar.errors import UnsupportedError
from instar.findings import CheckResult
from instar.formats.qed import layout as L
from instar.formats.qed.reader import QedDriver
from instar.mutate import ImageUpdate

_FEATURES_OFFSET = 16  # header: magic, cluster size, table size, header size (4 each)


def repair(driver: QedDriver, result: CheckResult, fd: int) -> None:
    """Act on the read-only check's ``result`` as qemu's check -r would."""
    if result.corruptions:
        raise UnsupportedError("check -r: repairing qed corruptions is not supported yet "
                               "(qemu-img zeroes the bad entries)")
    features = driver.header.features
    if features & L.FEATURE_NEED_CHECK:
        update = ImageUpdate(fd, driver.file.name)
        update.phase("header")
        update.write(_FEATURES_OFFSET,
                     (features & ~L.FEATURE_NEED_CHECK).to_bytes(8, "little"))
        update.finish()
