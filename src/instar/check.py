"""``instar check``: qemu-img check 7.2's walk, output and exit codes.

The image is opened in the sandboxed worker as qemu-img check opens it
(backing files included, qemu's BDRV_O_CHECK: a format may leave to the
check what it would refuse when opening), and its format's checker
(`FormatBase.check`) returns a `CheckResult`; the host prints it:

- every line qemu prints on stderr while checking, in order (those qemu
  prints with error_report carry the program's prefix);
- on stdout, qemu-img's summary (``dump_human_image_check``) or its
  ImageCheck object as JSON (QDict order, qemu's pretty printer);
- "Check failed" when the walk stopped or met internal errors.

Exit codes: 0 clean, 2 corruptions, 3 leaks only, 1 could not check, 63 the
format has no check (raw, vpc, qcow...: "This image format does not support
checks"). Every format instar reads that qemu checks has a check (qcow2, qed,
vmdk, vhdx, vdi, parallels); one added later without its check would be
refused in one line, exit 1, never said to have none.

``check -r leaks|all`` (`repair_image`) opens the image read-write in the
worker, as resize does, and repairs what qemu-img 7.2 repairs (qcow2 on the
check's walk, parallels, qed), then checks it again; what instar does not
repair yet is refused in one line before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from instar.errors import ChecksNotSupportedError, ImageOpenError, UnsupportedError
from instar.events import EventSink, Notice
from instar.findings import CheckResult
from instar.opener import Broker, ImageOpener, OpenedNode
from instar.runtime_types import TYPE_CHECKING, NamedTuple
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job
from instar.writable import open_for_update, refuse_read_only

if TYPE_CHECKING:
    from typing import Any


def check_image(
    path: str,
    fmt: str | None = None,
    *,
    allow: AllowedDirs = (),
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> CheckResult:
    """What ``qemu-img check`` finds in the image ``path`` (read only).

    Raises ImageOpenError and the like when the image cannot be opened, and
    ChecksNotSupportedError for a format qemu has no check for.
    """
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> dict[str, Any]:
        return _check_job(broker, path, fmt).to_data()

    data = run_job(job, policy, sandbox, inputs=[path], force_share=force_share)
    return CheckResult.from_data(data)


# qemu 7.2's drivers with a check (bdrv_co_check): a format among them that
# instar reads but cannot check (none today) is refused as such, never said to
# have none.
QEMU_CHECKED = frozenset({"qcow2", "qed", "vdi", "vhdx", "vmdk", "parallels"})


def _check_job(broker: Broker, path: str, fmt: str | None) -> CheckResult:
    opener = ImageOpener(broker=broker)
    try:
        node = opener.open_node(path, fmt, checking=True)
        name = node.format.name
        if getattr(node.format, "checker", None) is None and name in QEMU_CHECKED:
            raise UnsupportedError(f"instar cannot check {name} images yet (qemu-img can)")
        result = node.format.check(node.image.driver)
        result.filename = path
        result.format = node.format.name
        return result
    finally:
        opener.close()


# ---------------------------------------------------------------------------
# check -r leaks|all


class Repaired(NamedTuple):
    """What ``check -r`` found and fixed (``first``), and, when it fixed
    something, qemu-img's second check of the fixed image (``second``, its
    *_fixed counters the first's)."""

    first: CheckResult
    second: CheckResult | None


REPAIR_MODES = ("leaks", "all")
# Formats whose check qemu 7.2 runs read-write but instar does not repair yet:
# checked, and refused when the check finds something qemu would change.
_REPAIR_NOT_YET = frozenset({"vhdx"})
_VHDX_LOG = "contains a log that needs to be replayed"  # the vhdx reader's read-only refusal


def repair_image(
    path: str,
    mode: str,
    fmt: str | None = None,
    *,
    allow: AllowedDirs = (),
    events: EventSink | None = None,
    sandbox: SandboxSettings | None = None,
) -> Repaired:
    """``qemu-img check -r mode``: the image ``path`` opened read-write in the
    sandboxed worker, checked and repaired as qemu 7.2 repairs it (qcow2;
    see `formats/qcow2/repair.py`), then checked again if anything was fixed.
    Raises ChecksNotSupportedError where qemu has no repairing check (vdi,
    vmdk, raw...), UnsupportedError where instar does not repair yet (nothing
    written). ``events`` gets qemu's warning for a probed raw image."""
    if mode not in REPAIR_MODES:
        raise UnsupportedError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                               f"{mode}")
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> dict[str, Any]:
        first, second = _repair_job(broker, send, path, fmt, mode)
        return {"first": first.to_data(),
                "second": None if second is None else second.to_data()}

    data = run_job(job, policy, sandbox, events, inputs=[path], outputs=[path])
    second = data["second"]
    return Repaired(CheckResult.from_data(data["first"]),
                    None if second is None else CheckResult.from_data(second))


def _repair_job(broker: Broker, send: EventSink, path: str, fmt: str | None,
                mode: str) -> tuple[CheckResult, CheckResult | None]:
    file, opener = open_for_update(broker, path)
    close: Callable[[], None] = lambda: None  # noqa: E731 - what closing the image does

    def reopen() -> OpenedNode:
        if file.is_regular:
            file.size = os.fstat(file.fd).st_size
        return opener.open_file_node(file, path, name, with_backing=True, depth=0,
                                     checking=True)

    try:
        try:
            node = opener.open_file_node(file, path, fmt, with_backing=True, depth=0,
                                         checking=True)
        except ImageOpenError as error:
            if _VHDX_LOG in str(error):  # qemu replays it, opening read-write
                raise UnsupportedError("check -r: replaying a VHDX log is not supported "
                                       "yet (qemu-img check -r all replays it)") from None
            raise
        name = node.format.name
        refuse_read_only(name, path)
        if fmt is None and name == "raw":
            from instar.resize import _raw_probe_warning

            send(Notice(_raw_probe_warning(path)))
        if name == "qcow2":
            from instar.formats.qcow2.repair import repair

            first = repair(node.image.driver, file.fd, mode,  # type: ignore[arg-type]
                           lambda: reopen().image.driver)  # type: ignore[arg-type,return-value]
        elif name == "qed":
            from instar.formats.qed.repair import repair as repair_qed

            first = node.format.check(node.image.driver)
            repair_qed(node.image.driver, first, file.fd)  # type: ignore[arg-type]
        elif name == "parallels":
            from instar.formats.parallels.repair import repair as repair_parallels

            first = node.format.check(node.image.driver)
            close = repair_parallels(node.image.driver, first,  # type: ignore[arg-type]
                                     file.fd, mode, file.is_regular)
        elif name in _REPAIR_NOT_YET:
            first = node.format.check(node.image.driver)
            if first.corruptions or first.leaks or first.check_errors:
                raise UnsupportedError(f"check -r: repairing {name} images is not supported "
                                       "yet (qemu-img can)")
        else:  # qemu's vdi and vmdk checks refuse to fix: "does not support checks"
            raise ChecksNotSupportedError()
        first.filename, first.format = path, name
        second = None
        if first.failure is None and (first.corruptions_fixed or first.leaks_fixed):
            again = reopen()
            second = again.format.check(again.image.driver)
            second.filename, second.format = path, name
            second.corruptions_fixed = first.corruptions_fixed
            second.leaks_fixed = first.leaks_fixed
        close()
        return first, second
    finally:
        opener.close()


# ---------------------------------------------------------------------------
# Rendering, as qemu-img's dump_human_image_check and dump_json_image_check


def render_human(result: CheckResult) -> str:
    out: list[str] = []
    if not (result.corruptions or result.leaks or result.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if result.corruptions:
            out.append(f"\n{result.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if result.leaks:
            out.append(f"\n{result.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if result.check_errors:
            out.append(f"\n{result.check_errors} internal errors have occurred during the "
                       "check.\n")
    total, allocated = result.total_clusters, result.allocated_clusters
    if total and allocated:
        out.append(
            f"{allocated}/{total} = {allocated * 100.0 / total:0.2f}% allocated, "
            f"{result.fragmented_clusters * 100.0 / allocated:0.2f}% fragmented, "
            f"{result.compressed_clusters * 100.0 / allocated:0.2f}% compressed clusters\n"
        )
    if result.image_end_offset:
        out.append(f"Image end offset: {result.image_end_offset}\n")
    return "".join(out)


def image_check_qobject(result: CheckResult) -> dict[str, Any]:
    """ImageCheck's members in QAPI order; optional ones only when not 0."""
    data: dict[str, Any] = {"filename": result.filename, "format": result.format,
                            "check-errors": result.check_errors}
    for key, value in (
        ("image-end-offset", result.image_end_offset),
        ("corruptions", result.corruptions),
        ("leaks", result.leaks),
        ("corruptions-fixed", result.corruptions_fixed),
        ("leaks-fixed", result.leaks_fixed),
        ("total-clusters", result.total_clusters),
        ("allocated-clusters", result.allocated_clusters),
        ("fragmented-clusters", result.fragmented_clusters),
        ("compressed-clusters", result.compressed_clusters),
    ):
        if value:
            data[key] = value
    return data


def render_json(result: CheckResult) -> str:
    from instar.qobject import to_json

    return to_json(image_check_qobject(result)) + "\n"
