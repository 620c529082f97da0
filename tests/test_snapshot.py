"""``instar snapshot`` against qemu-img snapshot 7.2: listing (``-l``), the
command line's errors, and the refusal of what changes an image.

Images with internal snapshots are made by qemu-img itself (``snapshot -c``)
over data written by qemu-io; every listing is compared with qemu-img's on the
same file (stdout, stderr after the program name, exit status).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import qemu_img_ok, qemu_io, run_instar, run_qemu_img

pytestmark = pytest.mark.usefixtures("allow_own_directories")

NAMES = ["first", "a-tag-longer-than-sixteen-bytes", "\u00e9t\u00e9 \u2603", "", "x" * 200]


def _same(args: list[str], cwd: Path) -> None:
    ours = run_instar("snapshot", *args, cwd=cwd)
    qemu = run_qemu_img("snapshot", *args, cwd=cwd)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr()), args


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("snapshots")
    for compat in ("1.1", "0.10"):
        name = f"snaps-{compat}.qcow2"
        qemu_img_ok("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(d / name), "8M")
        for index, tag in enumerate(NAMES):
            qemu_io(d / name, f"write -P {index + 1} {index}M 64k")
            if tag:
                qemu_img_ok("snapshot", "-c", tag, str(d / name))
    qemu_img_ok("create", "-q", "-f", "qcow2", str(d / "none.qcow2"), "1M")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "snaps-1.1.qcow2", "-F", "qcow2",
                str(d / "overlay.qcow2"))
    qemu_img_ok("snapshot", "-c", "on-top", str(d / "overlay.qcow2"))
    for fmt in ("raw", "vmdk", "vpc", "vhdx", "vdi", "qed", "parallels"):
        qemu_img_ok("create", "-q", "-f", fmt, str(d / f"plain.{fmt}"), "1M")
    return d


@pytest.mark.parametrize("name", ["snaps-1.1.qcow2", "snaps-0.10.qcow2", "none.qcow2",
                                  "overlay.qcow2", "plain.raw", "plain.vmdk", "plain.vpc",
                                  "plain.vhdx", "plain.vdi", "plain.qed", "plain.parallels"])
def test_listing_matches_qemu(name: str, images: Path) -> None:
    for args in (["-l", name], ["-q", "-l", name], ["-U", "-l", name], [name]):
        _same(args, images)


def test_a_listing_shows_every_snapshot(images: Path) -> None:
    """Not only equal to qemu's: the listing has the snapshots made (a test
    that would pass on two empty outputs proves nothing)."""
    listing = run_instar("snapshot", "-l", "snaps-1.1.qcow2", cwd=images).stdout
    assert listing.startswith("Snapshot list:\nID        TAG")
    assert len(listing.splitlines()) == 2 + sum(1 for tag in NAMES if tag)
    assert "a-tag-longer-than-sixteen-bytes" in listing


@pytest.mark.parametrize("args", [
    [], ["-l"], ["-l", "a", "b"], ["-l", "-c", "x", "none.qcow2"], ["-a"], ["-x", "none.qcow2"],
    ["-l", "--output=json", "none.qcow2"], ["-l", "-f", "raw", "none.qcow2"],
    ["-l", "missing.qcow2"], ["-l", "--image-opts", "none.qcow2"],
], ids=" ".join)
def test_command_line_errors_match_qemu(args: list[str], images: Path) -> None:
    if "--image-opts" in args:  # refused by instar, a different error in qemu
        result = run_instar("snapshot", *args, cwd=images)
        assert result.rc == 1 and result.stderr.count("\n") == 1
        return
    _same(args, images)


@pytest.mark.parametrize("action", [["-c", "new"], ["-a", "first"], ["-d", "first"]])
def test_changing_snapshots_is_refused_and_changes_nothing(action: list[str],
                                                           images: Path) -> None:
    image = images / "snaps-1.1.qcow2"
    before = image.read_bytes()
    result = run_instar("snapshot", *action, image.name, cwd=images)
    assert result.rc == 1 and result.stdout == ""
    assert result.stderr == (f"instar: snapshot {action[0]}: changing an image's snapshots is "
                             "not supported yet\n")
    assert image.read_bytes() == before


def test_the_backing_file_is_opened_through_the_policy(images: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img snapshot opens the chain: a backing file outside the allowed
    directories is refused (nothing listed) unless --allow names its directory."""
    monkeypatch.delenv("INSTAR_ALLOW")  # the policy's default: no directory allowed
    overlay = tmp_path / "overlay.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", str(images / "snaps-1.1.qcow2"),
                "-F", "qcow2", str(overlay))
    refused = run_instar("snapshot", "-l", str(overlay))
    assert refused.rc == 1 and "--allow" in refused.stderr and refused.stdout == ""
    allowed = run_instar("snapshot", "-l", "--allow", str(images), str(overlay))
    assert (allowed.rc, allowed.stdout) == (0, "")
