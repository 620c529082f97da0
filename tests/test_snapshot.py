"""``instar snapshot`` against qemu-img snapshot 7.2: listing (``-l``), the
command line's errors, and creating (``-c``), applying (``-a``) and deleting
(``-d``) qcow2 snapshots: the same commands on copies of one image in two
directories (qemu-img in one, instar in the other), then the same output, the
same listing (but the dates), both images clean for ``qemu-img check`` and
equal for ``qemu-img compare``; each one's snapshots applied by the other
program; a crash at every write; hostile images refused, unchanged.

Images with internal snapshots are made by qemu-img itself (``snapshot -c``)
over data written by qemu-io; every listing is compared with qemu-img's on the
same file (stdout, stderr after the program name, exit status).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

import hostile_corpus as corpus
from helpers import (
    Result,
    make_dirty_qcow2,
    pattern,
    qemu_img_ok,
    qemu_io,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
    sample_image_names,
    stopped_runs,
    unpack_sample_image,
)
from mutation_sweep import check_run, corpus_params

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


# --- creating, applying and deleting ---------------------------------------------------------

_DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


class Pair:
    """The same image as q/IMG (changed by qemu-img) and i/IMG (by instar)."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.qemu_dir, self.our_dir = root / "q", root / "i"
        for directory in (self.qemu_dir, self.our_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def qemu(self) -> Path:
        return self.qemu_dir / self.name

    @property
    def ours(self) -> Path:
        return self.our_dir / self.name

    def copy(self) -> None:
        """instar's directory becomes a copy of qemu's."""
        for item in self.qemu_dir.iterdir():
            shutil.copyfile(item, self.our_dir / item.name)

    def both(self, *args: str) -> Result:
        """``snapshot ARGS IMG`` by each program; the same outcome, or the test fails."""
        qemu = run_qemu_img("snapshot", *args, self.name, cwd=self.qemu_dir)
        ours = run_instar("snapshot", *args, self.name, cwd=self.our_dir)
        assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
            qemu.rc, qemu.stdout, qemu.normalised_stderr()), args
        return qemu

    def io(self, command: str) -> None:
        for image in (self.qemu, self.ours):
            qemu_io(image, command, "qcow2", cwd=image.parent)

    def assert_same(self) -> None:
        """Listings equal but the dates, both clean, both read the same."""
        listings = [_DATE.sub("DATE", qemu_img_ok("snapshot", "-l", self.name, cwd=d))
                    for d in (self.qemu_dir, self.our_dir)]
        assert listings[0] == listings[1]
        for directory in (self.qemu_dir, self.our_dir):
            checked = run_qemu_img("check", self.name, cwd=directory)
            assert checked.rc == 0 and "No errors were found" in checked.stdout, checked
        compared = run_qemu_img("compare", str(self.qemu), str(self.ours))
        assert compared.rc == 0, compared.stdout
        for snapshot in _snapshot_ids(self.qemu):
            assert _snapshot_data(self.qemu, snapshot) == _snapshot_data(self.ours, snapshot)


def _snapshot_ids(image: Path) -> list[str]:
    info = json.loads(qemu_img_ok("info", "--output=json", "-U", str(image)))
    return [entry["id"] for entry in info.get("snapshots", [])]


def _snapshot_data(image: Path, snapshot: str) -> bytes:
    """What the snapshot holds, as qemu-img reads it (convert -l)."""
    target = image.parent / f"snapshot-{snapshot}.raw"
    qemu_img_ok("convert", "-U", "-l", f"snapshot.id={snapshot}", "-O", "raw", str(image),
                str(target))
    try:
        return target.read_bytes()
    finally:
        target.unlink()


# name -> (create options, image size, data written before the first snapshot)
VARIANTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "v3": ("", "8M", ("write -P 1 0 64k", "write -P 2 3M 200k")),
    "v2": ("compat=0.10", "8M", ("write -P 1 0 64k", "write -P 2 3M 200k")),
    "512-byte clusters": ("cluster_size=512", "4M", ("write -P 1 0 300k", "write -P 2 3M 200k")),
    "refcount_bits=64": ("refcount_bits=64", "8M", ("write -P 1 0 64k",)),
    "refcount_bits=2": ("refcount_bits=2", "8M", ("write -P 1 0 64k",)),
    "extended L2": ("extended_l2=on,cluster_size=64k", "8M",
                    ("write -P 1 0 4k", "write -P 2 100k 8k", "write -z 1M 64k")),
    "zero clusters": ("", "8M", ("write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 64k")),
    "no data": ("", "8M", ()),
    "empty": ("", "0", ()),
}


def _made(pair: Pair, options: str, size: str, writes: tuple[str, ...]) -> None:
    args = ["create", "-q", "-f", "qcow2"] + (["-o", options] if options else [])
    qemu_img_ok(*args, pair.name, size, cwd=pair.qemu_dir)
    for command in writes:
        qemu_io(pair.qemu, command, "qcow2")
    pair.copy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_create_apply_delete_like_qemu(variant: str, tmp_path: Path) -> None:
    """A sequence of -c, -a and -d with writes between, compared after each step."""
    options, size, writes = VARIANTS[variant]
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, options, size, writes)
    writing = size != "0"
    steps: list[tuple[str, ...]] = [
        ("-c", "first"), ("write -P 7 0 32k",), ("-c", "second"), ("-c", "first"),
        ("write -P 8 2M 64k",), ("-a", "first"), ("-a", "2"), ("write -P 9 16k 64k",),
        ("-d", "first"), ("-c", "3"), ("-d", "3"), ("-a", "missing"), ("-d", "missing"),
        ("-a", "second"), ("-d", "second"), ("-d", "1"), ("-c", "\u00e9t\u00e9 " + "x" * 300),
        ("-d", "1"),
    ]
    for step in steps:
        if step[0].startswith("write"):
            if writing:
                pair.io(step[0])
        else:
            pair.both(*step)
        pair.assert_same()
    assert _snapshot_ids(pair.ours)  # the last name was cut to 255 bytes, as qemu cuts it


@pytest.mark.parametrize("variant", ["v3", "512-byte clusters", "extended L2"])
def test_each_applies_the_others_snapshots(variant: str, tmp_path: Path) -> None:
    """Snapshots instar makes, applied by qemu-img, and the other way round:
    the data each snapshot held comes back."""
    options, size, writes = VARIANTS[variant]
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, options, size, writes)
    pair.both("-c", "s1")
    pair.io("write -P 0x33 0 100k")
    pair.both("-c", "s2")
    pair.io("write -P 0x44 50k 100k")
    held = {snapshot: _snapshot_data(pair.qemu, snapshot) for snapshot in ("1", "2")}
    # qemu-img applies instar's snapshots, instar applies qemu-img's.
    for snapshot in ("s1", "s2"):
        assert run_qemu_img("snapshot", "-a", snapshot, str(pair.ours)).rc == 0
        assert run_instar("snapshot", "-a", snapshot, str(pair.qemu)).rc == 0
        pair.assert_same()
        expected = held["1" if snapshot == "s1" else "2"]
        assert qemu_read_raw(pair.ours, tmp_path, "qcow2") == expected
    # and each deletes the other's
    assert run_qemu_img("snapshot", "-d", "s1", str(pair.ours)).rc == 0
    assert run_instar("snapshot", "-d", "s1", str(pair.qemu)).rc == 0
    pair.assert_same()


def test_compressed_clusters(tmp_path: Path) -> None:
    """Compressed clusters (convert -c) are shared and freed by byte range, as qemu does."""
    pair = Pair(tmp_path, "img.qcow2")
    source = tmp_path / "source.raw"
    source.write_bytes(pattern(3 << 20) + bytes(1 << 20))
    qemu_img_ok("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k",
                str(source), str(pair.qemu))
    pair.copy()
    for step in (("-c", "a"), ("-c", "b"), ("-d", "a"), ("-a", "b"), ("-d", "b")):
        pair.both(*step)
        pair.assert_same()
        pair.io("write -P 5 8k 8k")


@pytest.mark.parametrize("options", ["", "cluster_size=4k"])
def test_applying_a_snapshot_of_another_size(options: str, tmp_path: Path) -> None:
    """qemu 7.2 gives the image the snapshot's size back (grown or shrunk since)."""
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, options, "3M", ("write -P 1 0 64k", "write -P 2 2M 1M"))
    pair.both("-c", "small")
    for image in (pair.qemu, pair.ours):
        qemu_img_ok("resize", "-q", str(image), "64M")
    pair.io("write -P 3 40M 64k")
    pair.both("-c", "large")
    pair.assert_same()
    pair.both("-a", "small")
    pair.assert_same()
    assert json.loads(qemu_img_ok("info", "--output=json", str(pair.ours)))[
        "virtual-size"] == 3 << 20
    pair.both("-a", "large")
    pair.assert_same()
    pair.both("-d", "small")
    pair.assert_same()


def test_with_a_backing_file(tmp_path: Path) -> None:
    """An overlay's own snapshots; its backing file is opened and left alone."""
    pair = Pair(tmp_path, "top.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=pair.qemu_dir)
    qemu_io(pair.qemu_dir / "base.qcow2", "write -P 1 0 1M", "qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                "top.qcow2", cwd=pair.qemu_dir)
    qemu_io(pair.qemu, "write -P 2 64k 64k", "qcow2", cwd=pair.qemu_dir)
    pair.copy()
    base = (pair.our_dir / "base.qcow2").read_bytes()
    for step in (("-c", "s"), ("write -P 3 0 64k",), ("-a", "s"), ("-d", "s")):
        if step[0].startswith("write"):
            pair.io(step[0])
        else:
            pair.both(*step)
        pair.assert_same()
    assert (pair.our_dir / "base.qcow2").read_bytes() == base


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "vpc", "vhdx", "vdi", "qed", "parallels"])
@pytest.mark.parametrize("action", ["-c", "-a", "-d"])
def test_formats_without_snapshots(fmt: str, action: str, tmp_path: Path) -> None:
    """qemu's messages (and the probed-raw warning), the file unchanged."""
    pair = Pair(tmp_path, f"img.{fmt}")
    qemu_img_ok("create", "-q", "-f", fmt, pair.name, "1M", cwd=pair.qemu_dir)
    pair.copy()
    before = pair.ours.read_bytes()
    assert pair.both(action, "x").rc == 1
    assert pair.ours.read_bytes() == before


@pytest.mark.parametrize("args", [
    ["-U", "-c", "x"], ["-U", "-a", "first"], ["-U", "-d", "first"], ["-c", "x", "-U"],
])
def test_force_share_is_refused_for_changes(args: list[str], tmp_path: Path) -> None:
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, "", "1M", ())
    before = pair.ours.read_bytes()
    pair.both(*args)
    assert pair.ours.read_bytes() == before
    missing = Pair(tmp_path / "missing", "none.qcow2")
    missing.both(*args)  # refused before anything is opened


def test_missing_images_and_backing_files(tmp_path: Path) -> None:
    pair = Pair(tmp_path, "top.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                "top.qcow2", "1M", cwd=pair.qemu_dir)
    pair.copy()
    for action in ("-c", "-a", "-d"):
        pair.both(action, "x")
        Pair(tmp_path / "none", "none.qcow2").both(action, "x")


def test_corrupt_images_are_not_opened_for_writing(tmp_path: Path) -> None:
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, "", "1M", ())
    for image in (pair.qemu, pair.ours):
        with image.open("r+b") as file:
            file.seek(79)
            file.write(b"\x02")  # the corrupt bit
    before = pair.ours.read_bytes()
    for action in ("-c", "-a", "-d"):
        pair.both(action, "x")
    assert pair.ours.read_bytes() == before


def test_persistent_bitmaps_are_left_as_they_are(tmp_path: Path) -> None:
    pair = Pair(tmp_path, "img.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", pair.name, "8M", cwd=pair.qemu_dir)
    qemu_img_ok("bitmap", "--add", pair.name, "bm0", cwd=pair.qemu_dir)
    qemu_io(pair.qemu, "write -P 1 0 128k", "qcow2")
    pair.copy()
    for step in (("-c", "s"), ("write -P 2 64k 64k",), ("-a", "s"), ("-a", "nope"),
                 ("-c", "t"), ("-d", "s")):
        if step[0].startswith("write"):
            pair.io(step[0])
        else:  # -a: qemu's "Device has active dirty bitmaps"
            assert pair.both(*step).rc == (step[0] == "-a")
        pair.assert_same()
        infos = [json.loads(qemu_img_ok("info", "--output=json", str(image)))
                 for image in (pair.qemu, pair.ours)]
        assert infos[0]["format-specific"] == infos[1]["format-specific"]


def test_snapshot_ids_follow_qemu(tmp_path: Path) -> None:
    """The next id is one more than the largest, as qemu's strtoul reads the ids."""
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, "", "1M", ())
    for step in (("-c", "a"), ("-c", "b"), ("-c", "c"), ("-d", "2"), ("-d", "c"),
                 ("-c", "d"), ("-c", "1"), ("-d", "1"), ("-a", "1"), ("-c", "e")):
        pair.both(*step)
        pair.assert_same()


def test_refcount_bits_1_cannot_hold_a_snapshot(tmp_path: Path) -> None:
    """qemu fails with EINVAL (and leaks a cluster); instar fails the same, leaking nothing."""
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, "refcount_bits=1", "1M", ("write -P 1 0 64k",))
    before = pair.ours.read_bytes()
    assert pair.both("-c", "x").rc == 1
    assert pair.ours.read_bytes() == before


def test_applying_past_the_refcount_width_fails_as_qemu(tmp_path: Path) -> None:
    """2-bit refcounts: two snapshots and the active image hold a cluster 3
    times, the most 2 bits count; applying one must count it a 4th time first:
    qemu's goto fails with EINVAL, worded as every goto failure ("Failed to load
    snapshot: Invalid argument"), not as -c's "-22 (Invalid argument)"."""
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, "refcount_bits=2", "1M", ("write -P 1 0 64k",))
    for tag in ("a", "b"):
        qemu_img_ok("snapshot", "-c", tag, pair.name, cwd=pair.qemu_dir)
    pair.copy()
    before = pair.ours.read_bytes()
    result = pair.both("-a", "b")
    assert (result.rc, result.stderr) == (
        1, "qemu-img: Could not apply snapshot 'b': Failed to load snapshot: Invalid argument\n")
    assert pair.ours.read_bytes() == before


# --- crash safety ----------------------------------------------------------------------------


def _state(image: Path) -> tuple[object, ...]:
    """What a user sees: the snapshots (but dates), the image's data, each snapshot's data."""
    info = json.loads(qemu_img_ok("info", "--output=json", "-U", str(image)))
    listed = [(entry["id"], entry["name"]) for entry in info.get("snapshots", [])]
    data = qemu_read_raw(image, image.parent, "qcow2")
    held = {snapshot: _snapshot_data(image, snapshot) for snapshot, _ in listed}
    return info["virtual-size"], listed, data, held


def _clean_or_leaking(image: Path, k: int) -> None:
    """qemu-img check finds leaks at most; a COPIED flag may disagree with a
    leaked refcount, and then repairing the leaks (-r leaks) leaves it clean."""
    checked = run_qemu_img("check", "--output=json", "-f", "qcow2", str(image))
    report = json.loads(checked.stdout)
    assert checked.rc in (0, 2, 3) and not report.get("check-errors"), (k, checked)
    if not report.get("corruptions"):
        assert checked.rc in (0, 3), (k, checked)
        return
    assert all("OFLAG_COPIED" in line or line.startswith("Leaked cluster ")
               for line in checked.stderr.splitlines()), (k, checked)
    repaired = image.parent / "repaired.qcow2"
    shutil.copyfile(image, repaired)
    qemu_img_ok("check", "-q", "-r", "leaks", "-f", "qcow2", str(repaired))
    again = run_qemu_img("check", "-f", "qcow2", str(repaired))
    assert again.rc == 0 and "No errors were found" in again.stdout, (k, again)
    repaired.unlink()


def _stop_at_every_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, original: Path,
                          action: str, name: str) -> int:
    """``snapshot ACTION NAME`` on copies of ``original``, stopped after k
    changes for every k until one finishes: each result the old image or the
    new one, leaking at most. Returns how many changes the whole command makes."""
    from instar.snapshot import change_snapshots
    from instar.worker import SandboxSettings

    def change(image: Path) -> None:
        change_snapshots(str(image), action, name, sandbox=SandboxSettings(mode="off"))

    finished_image = tmp_path / "new.qcow2"
    shutil.copyfile(original, finished_image)
    change(finished_image)
    old, new = _state(original), _state(finished_image)
    assert old != new
    seen = set()
    image = tmp_path / "k.qcow2"
    for k, finished in stopped_runs(monkeypatch, original, image, lambda: change(image),
                                    across=False):
        _clean_or_leaking(image, k)
        state = _state(image)
        assert state in (old, new), k
        seen.add(state == new)
        image.unlink()
        if finished:
            assert state == new
            checked = run_qemu_img("check", "-f", "qcow2", str(finished_image))
            assert checked.rc == 0 and "No errors were found" in checked.stdout
    assert seen == {False, True}
    return k


def _original(tmp_path: Path, options: str = "cluster_size=4k") -> Path:
    """A qcow2 image with two snapshots and data changed between them."""
    original = tmp_path / "o.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", options, str(original), "2M")
    qemu_io(original, "write -P 1 0 300k", "qcow2")
    qemu_img_ok("snapshot", "-c", "one", str(original))
    qemu_io(original, "write -P 2 100k 100k", "qcow2")
    qemu_img_ok("snapshot", "-c", "two", str(original))
    qemu_io(original, "write -P 3 200k 400k", "qcow2")
    return original


@pytest.mark.parametrize("options", ["cluster_size=4k", "cluster_size=512",
                                     "cluster_size=512,refcount_bits=64"])
@pytest.mark.parametrize("action,name", [("-c", "three"), ("-a", "one"), ("-d", "one"),
                                         ("-d", "two")])
def test_crash_at_every_write(options: str, action: str, name: str, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    original = _original(tmp_path, options)
    assert _stop_at_every_change(tmp_path, monkeypatch, original, action, name) >= 3


def test_crash_while_applying_a_snapshot_of_another_size(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    original = _original(tmp_path)
    qemu_img_ok("resize", "-q", str(original), "200M")
    qemu_io(original, "write -P 4 150M 64k", "qcow2")
    assert _stop_at_every_change(tmp_path, monkeypatch, original, "-a", "two") >= 3


# --- hostile images --------------------------------------------------------------------------


def _header(image: Path) -> tuple[int, ...]:
    return struct.unpack(">4sIQIIQIIQQIIQ", image.read_bytes()[:72])[1:]


def _poke(image: Path, offset: int, data: bytes) -> None:
    with image.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def _snapshot_l1(image: Path) -> tuple[int, int]:
    """(offset of the first snapshot's table entry, its L1 table offset)."""
    entry = _header(image)[-1]
    return entry, struct.unpack(">Q", image.read_bytes()[entry : entry + 8])[0]


def _unaligned_l1(image: Path) -> None:
    entry, l1 = _snapshot_l1(image)
    _poke(image, entry, struct.pack(">Q", l1 + 8))


def _huge_l1(image: Path) -> None:
    entry, _ = _snapshot_l1(image)
    _poke(image, entry + 8, struct.pack(">I", 0x7FFF_FFFF))


def _l1_past_the_end(image: Path) -> None:
    entry, _ = _snapshot_l1(image)
    _poke(image, entry, struct.pack(">Q", 1 << 40))


def _l2_past_the_end(image: Path) -> None:
    _, l1 = _snapshot_l1(image)
    _poke(image, l1, struct.pack(">Q", 1 << 40))


def _l1_is_the_active_one(image: Path) -> None:
    entry, _ = _snapshot_l1(image)
    _poke(image, entry, struct.pack(">Q", _header(image)[7]))


def _refcount_zero(image: Path) -> None:
    """The refcount of the first data cluster set to 0 (16-bit refcounts)."""
    header = _header(image)
    data = image.read_bytes()
    reftable = header[8]
    block = struct.unpack(">Q", data[reftable : reftable + 8])[0]
    l1 = struct.unpack(">Q", data[header[7] : header[7] + 8])[0] & L1_MASK
    cluster = struct.unpack(">Q", data[l1 : l1 + 8])[0] & L1_MASK
    _poke(image, block + 2 * (cluster >> header[3]), b"\0\0")


L1_MASK = 0x00FF_FFFF_FFFF_FE00
HOSTILE = {
    "unaligned snapshot L1": _unaligned_l1,
    "huge snapshot L1": _huge_l1,
    "snapshot L1 past the end": _l1_past_the_end,
    "snapshot L2 past the end": _l2_past_the_end,
    "snapshot L1 is the active one": _l1_is_the_active_one,
    "refcount 0 in use": _refcount_zero,
}


@pytest.mark.parametrize("damage", list(HOSTILE))
@pytest.mark.parametrize("action,name", [("-c", "new"), ("-a", "one"), ("-d", "one")])
def test_hostile_images_are_refused_unchanged(damage: str, action: str, name: str,
                                              tmp_path: Path) -> None:
    """Refused in one line (or done where the damage is not on the way), the
    file unchanged when refused; where qemu-img refuses too, so does instar."""
    image = _original(tmp_path)
    HOSTILE[damage](image)
    qemu_copy = tmp_path / "q.qcow2"
    shutil.copyfile(image, qemu_copy)
    before = image.read_bytes()
    ours = run_instar("snapshot", action, name, str(image))
    qemu = run_qemu_img("snapshot", action, name, str(qemu_copy))
    if ours.rc:
        assert ours.stderr.count("\n") == 1 and ours.stderr.startswith("instar: ")
        assert "internal error" not in ours.stderr
        assert image.read_bytes() == before
    else:
        assert qemu.rc == 0, qemu.stderr
        _clean_or_leaking(image, 0)
    if qemu.rc:
        assert ours.rc == 1, (qemu.stderr, ours.stderr)


# Families of formats without internal snapshots are refused after the open
# test_hostile covers.
_OTHER_FORMATS = ("parallels", "vdi", "vmdk_descriptor", "vhdx_log", "plists")


@pytest.mark.parametrize("case,mode", corpus_params(skip_families=_OTHER_FORMATS))
def test_hostile_corpus(case: corpus.Case, mode: None, hostile_bases: corpus.Bases,
                        tmp_path: Path) -> None:
    """Every image of the hostile corpus given a snapshot by a confined instar:
    done (the image then clean, or only leaking) or refused in one line
    (`mutation_sweep`)."""
    run, target = check_run("snapshot", lambda image: ["-c", "new", image], case,
                            hostile_bases, tmp_path)
    if run.rc == 0:
        _clean_or_leaking(target, 0)


def test_a_v2_image_cannot_take_another_size_back(tmp_path: Path) -> None:
    """qemu cannot resize a v2 image with snapshots: applying one whose disk
    size differs fails with qemu's two lines (the entry's size edited here,
    as qemu-img never makes such an image)."""
    pair = Pair(tmp_path, "img.qcow2")
    _made(pair, "compat=0.10", "8M", ("write -P 1 0 64k",))
    qemu_img_ok("snapshot", "-c", "s", pair.name, cwd=pair.qemu_dir)
    entry = _header(pair.qemu)[-1]
    _poke(pair.qemu, entry + 40 + 8, struct.pack(">Q", 4 << 20))  # disk_size
    pair.copy()
    before = pair.ours.read_bytes()
    assert pair.both("-a", "s").stderr.count("\n") == 2
    assert pair.ours.read_bytes() == before


@pytest.mark.parametrize("name", sample_image_names())
def test_qemu_sample_images(name: str, tmp_path: Path) -> None:
    """qemu's own sample images (read-only formats, Parallels' format
    extension, fuzzed headers): each action fails or succeeds as qemu's does,
    in qemu's words; a refused image is unchanged."""
    pair = Pair(tmp_path, "img")
    shutil.copyfile(unpack_sample_image(name, tmp_path), pair.qemu)
    pair.copy()
    for action in ("-c", "-a", "-d"):
        before = pair.ours.read_bytes()
        if pair.both(action, "x").rc:
            assert pair.ours.read_bytes() == before


@pytest.mark.parametrize("kind", ["killed", "leak", "low"])
def test_dirty_images_are_repaired_first(kind: str, tmp_path: Path) -> None:
    """A dirty qcow2 image (lazy refcounts, not closed cleanly) is repaired
    by the read-write open, its check's lines on stderr, then changed; a
    listing opens it read-only and leaves it dirty."""
    pair = Pair(tmp_path, "img.qcow2")
    make_dirty_qcow2(pair.qemu, kind)
    pair.copy()
    assert "cluster" not in pair.both("-l").stderr
    assert "cluster" in pair.both("-c", "new").stderr
    pair.assert_same()
    for steps in ([("-a", "missing")], [("-d", "missing")], [("-a", "new"), ("-d", "new")]):
        make_dirty_qcow2(pair.qemu, kind)
        pair.copy()
        for step in steps:
            pair.both(*step)
        pair.assert_same()
