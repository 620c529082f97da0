"""Parallels ``check -r leaks|all`` as qemu 7.2 does it, for what instar supports.

On the read-only check's findings (`formats/parallels/check.py`), qemu's
repairs:

- the "inuse" mark (``image was not closed correctly``): with ``all``,
  "Repairing ..." and a corruption fixed; with ``leaks`` the ERROR stays.
  Either way the mark is cleared, as qemu clears it when it closes an image
  it opened read-write (with ``leaks``, after the second check, which still
  reports it: qemu's second check reads its own state, not the file);
- the space past the last cluster (``space leaked at the end of the
  image``): "Repairing ...", the file cut to the end of the last cluster,
  the clusters counted as leaks fixed, with either mode.

An image with a format extension (dirty bitmaps) is refused: qemu ignores
the extension when it opens read-write, counts its cluster as leaked space
and cuts it off, leaving a header that names a cluster past the end of the
file (qemu-img then refuses to open the image). A catalog entry past the
end of the file (qemu zeroes it with ``all``, and,
with either mode, its close grows the file to where the entry pointed) is
refused before anything is written, as is a leak on a block device.
"""

from __future__ import annotations

from collections.abc import Callable

from instar.errors import UnsupportedError
from instar.findings import REPAIRED, CheckResult, Finding
from instar.formats.parallels.reader import ParallelsDriver
from instar.mutate import ImageUpdate

_INUSE_OFFSET = 44  # the header's inuse field (little-endian u32)


def repair(driver: ParallelsDriver, result: CheckResult, fd: int, mode: str,
           regular_file: bool) -> Callable[[], None]:
    """Act on the read-only check's ``result`` as qemu's check -r would,
    turning the lines it repairs into "Repairing" ones; returns what closing
    the image does (after the second check)."""
    codes = {finding.code for finding in result.findings}
    if driver.header.ext_off:
        raise UnsupportedError(
            "check -r of a parallels image with a format extension is refused: qemu-img 7.2 "
            "ignores the extension when it opens for writing and cuts it off as leaked "
            "space, leaving an image it cannot open")
    if "cluster-outside-image" in codes:
        raise UnsupportedError("check -r: repairing a parallels catalog entry past the end "
                               "of the file is not supported yet")
    if "leaked-space" in codes and not regular_file:
        raise UnsupportedError("check -r: cutting the leaked end of a block device is not "
                               "supported")
    findings: list[Finding] = []
    for finding in result.findings:
        if finding.code == "image-not-closed" and mode == "all":
            finding = Finding(REPAIRED, finding.code,
                              "Repairing image was not closed correctly")
            result.corruptions -= 1
            result.corruptions_fixed += 1
        elif finding.code == "leaked-space":
            finding = Finding(REPAIRED, finding.code,
                              finding.message.replace("ERROR", "Repairing", 1))
            result.leaks_fixed, result.leaks = result.leaks, 0
        findings.append(finding)
    result.findings = findings
    update = ImageUpdate(fd, driver.file.name)
    if driver.header.inuse and mode == "all":
        update.phase("header")
        update.write(_INUSE_OFFSET, bytes(4))
    if "leaked-space" in codes:
        update.phase("release")
        update.truncate(result.image_end_offset)
    update.finish()

    def close() -> None:
        if driver.header.inuse and mode != "all":
            closing = ImageUpdate(fd, driver.file.name)
            closing.changes = update.changes
            closing.phase("header")
            closing.write(_INUSE_OFFSET, bytes(4))
            closing.finish()

    return close
