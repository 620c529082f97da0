"""``instar amend`` against ``qemu-img amend`` (7.2): copies of one image in
two directories, the same command line on each (qemu-img in one, instar in
the other), then the same stdout, exit status and stderr, the same
``qemu-img info`` (but sizes on disk), both clean for ``qemu-img check`` and
equal for ``qemu-img compare``. Refusals leave instar's copy unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import hostile_corpus as corpus
from helpers import (
    Result,
    make_dirty_qcow2,
    qemu_img_ok,
    qemu_io,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
    sample_image_names,
    stopped_runs,
    unpack_sample_image,
    without_keys,
)
from mutation_sweep import check_run, corpus_params

pytestmark = pytest.mark.usefixtures("allow_own_directories")

_VOLATILE = ("actual-size", "dirty-flag")


def _normalised(info: Any) -> Any:
    return without_keys(info, _VOLATILE)


class Pair:
    """The same image as q/IMG (amended by qemu-img) and i/IMG (by instar)."""

    def __init__(self, root: Path, name: str = "img.qcow2") -> None:
        self.name = name
        self.qemu_dir, self.our_dir = root / "q", root / "i"
        for directory in (self.qemu_dir, self.our_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def make(self, *create: str, writes: tuple[str, ...] = (), snapshot: bool = False) -> None:
        qemu_img_ok("create", "-q", *create, cwd=self.qemu_dir)
        for command in writes:
            qemu_io(self.qemu_dir / self.name, command, cwd=self.qemu_dir)
        if snapshot:
            qemu_img_ok("snapshot", "-c", "s", self.name, cwd=self.qemu_dir)
        for item in self.qemu_dir.iterdir():
            shutil.copyfile(item, self.our_dir / item.name)

    def both(self, *args: str) -> Result:
        image = self.our_dir / self.name
        before = image.read_bytes() if image.exists() else None
        qemu = run_qemu_img("amend", *args, cwd=self.qemu_dir)
        ours = run_instar("amend", *args, cwd=self.our_dir)
        assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
            qemu.rc, qemu.stdout, qemu.normalised_stderr()), args
        if ours.rc and before is not None:
            assert image.read_bytes() == before, "a refusal changed it"
        return qemu

    def assert_same(self, qemu_clean: bool = True) -> None:
        """The same info, both clean (``qemu_clean`` False: instar's only), the same data."""
        infos = [_normalised(json.loads(qemu_img_ok("info", "--output=json", self.name,
                                                    cwd=d)))
                 for d in (self.qemu_dir, self.our_dir)]
        assert infos[0] == infos[1]
        for directory in (self.qemu_dir, self.our_dir)[0 if qemu_clean else 1 :]:
            checked = run_qemu_img("check", self.name, cwd=directory)
            assert checked.rc == 0 and "No errors were found" in checked.stdout, checked
        compared = run_qemu_img("compare", str(self.qemu_dir / self.name),
                                str(self.our_dir / self.name))
        assert compared.rc == 0, compared.stdout


_DATA = ("write -P 1 0 64k", "write -P 2 3M 200k")


@pytest.mark.parametrize("create,steps", [
    (("-o", "compat=1.1"), [["lazy_refcounts=on"], ["lazy_refcounts=off"],
                            ["lazy_refcounts=off"], ["compat=0.10"], ["compat=1.1"],
                            ["compat=v2"], ["compat=v3,lazy_refcounts=on"]]),
    (("-o", "compat=0.10"), [["compat=1.1"], ["lazy_refcounts=on"], ["compat=0.10"],
                             ["lazy_refcounts=off"]]),
    (("-o", "compat=1.1,lazy_refcounts=on"), [["compat=0.10"]]),
    (("-o", "compat=1.1"), [["size=16M"], ["size=2M"], ["size=0"], ["size=8M",
                                                                    "lazy_refcounts=on"]]),
    (("-o", "compat=1.1,cluster_size=4k"), [["size=1G"], ["size=3M"]]),
    (("-o", "compat=1.1"), [["refcount_bits=16"], ["data_file_raw=off"], ["compat=1.1"]]),
], ids=["v3", "v2", "lazy-v3-down", "size", "size-4k", "unchanged"])
def test_amend_like_qemu(create: tuple[str, ...], steps: list[list[str]],
                         tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", *create, pair.name, "8M", writes=_DATA)
    for step in steps:
        args = [arg for option in step for arg in ("-o", option)]
        assert pair.both(*args, pair.name).rc == 0
        pair.assert_same()


def test_with_snapshots_and_a_backing_file(tmp_path: Path) -> None:
    """The header rewritten around the backing format extension and name; snapshots kept."""
    pair = Pair(tmp_path, "top.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=pair.qemu_dir)
    qemu_io(pair.qemu_dir / "base.qcow2", "write -P 1 0 1M")
    pair.make("-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2",
              pair.name, writes=("write -P 2 64k 64k",), snapshot=True)
    for step, status in (("compat=1.1", 0), ("lazy_refcounts=on", 0), ("compat=0.10", 0),
                         ("compat=1.1", 0), ("backing_file=base.qcow2", 1),
                         ("backing_file=base.qcow2,backing_fmt=qcow2", 0), ("size=16M", 0)):
        assert pair.both("-o", step, pair.name).rc == status, step
        pair.assert_same()


@pytest.mark.parametrize("args", [
    ["-o", "compat=foo"], ["-o", "compat=v2", "-o", "lazy_refcounts=on"],
    ["-o", "cluster_size=4k"], ["-o", "lazy_refcounts=maybe"],
    ["-o", "lazy_refcounts=on,cluster_size=4k"], ["-o", "bogus=1"],
    ["-o", "encrypt.keyslot=1"], ["-o", "refcount_bits=3"], ["-o", "backing_file=x"],
    ["-o", "backing_fmt=qcow2"], ["-o", "size=1000"], ["-o", "size=-1"],
    ["-o", "data_file=g.raw"], ["-o", "data_file_raw=on"], ["-o", ""], ["-o", "help"],
    ["-q", "-o", "help"], ["-t", "bad", "-o", "size=8M"], ["-t", "none", "-o", "size=8M"],
    ["-U", "-o", "size=8M"], ["-f", "raw", "-o", "size=8M"], ["-o", "extended_l2=on"],
    ["-o", "preallocation=full"], ["-o", "compression_type=zstd"], [],
    ["-p", "-q", "-o", "lazy_refcounts=on"], ["--force", "-o", "compat=1.1"],
], ids=" ".join)
def test_options_and_refusals_like_qemu(args: list[str], tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", pair.name, "8M", writes=_DATA)
    pair.both(*args, pair.name)
    pair.assert_same()


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "-o", "help"], ["-f", "raw", "-o", "help"], ["-f", "bogus", "-o", "help"],
    ["-o", "help"], ["-o", "size=8M"], ["-o", "size=8M", "missing.qcow2"],
    ["-o", "size=8M", "a.qcow2", "b.qcow2"],
], ids=" ".join)
def test_command_line_without_an_image(args: list[str], tmp_path: Path) -> None:
    Pair(tmp_path).both(*args)


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "vpc", "vhdx", "vdi", "qed", "parallels"])
def test_formats_without_amendment(fmt: str, tmp_path: Path) -> None:
    pair = Pair(tmp_path, f"img.{fmt}")
    pair.make("-f", fmt, pair.name, "1M")
    for args in (["-o", "size=2M"], ["-o", "help"], ["-f", fmt, "-o", "help"]):
        assert pair.both(*args, pair.name).rc == 1


@pytest.mark.parametrize("create,option", [
    ("refcount_bits=64", "compat=0.10"), ("extended_l2=on", "compat=0.10"),
    ("data_file=d.raw", "compat=0.10"), ("compat=0.10", "refcount_bits=64"),
    ("compat=0.10", "lazy_refcounts=on"),
])
def test_downgrade_refusals_like_qemu(create: str, option: str, tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M")
    assert pair.both("-o", option, pair.name).rc == 1


@pytest.mark.parametrize("options", ["cluster_size=64k", "cluster_size=512"])
def test_downgrade_expands_zero_clusters(options: str, tmp_path: Path) -> None:
    """Zero clusters, with and without a host cluster, in the image and in a
    snapshot: unallocated or zeroed, as qemu makes them; the data the same."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", options, pair.name, "8M",
              writes=("write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 64k",
                      "write -z -u 2M 64k"), snapshot=True)
    for directory in (pair.qemu_dir, pair.our_dir):
        qemu_io(directory / pair.name, "write -z 0 64k")
        qemu_io(directory / pair.name, "write -P 9 3M 64k")
        qemu_io(directory / pair.name, "write -z 3M 64k")
    assert pair.both("-o", "compat=0.10", pair.name).rc == 0
    # qemu 7.2 leaves OFLAG_COPIED on the zeroed clusters the snapshot shares
    # (refcount 2): "ERROR OFLAG_COPIED data cluster"; instar's image is clean.
    assert run_qemu_img("check", pair.name, cwd=pair.qemu_dir).rc == 2
    pair.assert_same(qemu_clean=False)
    for directory in (pair.qemu_dir, pair.our_dir):
        qemu_img_ok("convert", "-l", "s", "-O", "raw", pair.name, "s.raw", cwd=directory)
    assert (pair.qemu_dir / "s.raw").read_bytes() == (pair.our_dir / "s.raw").read_bytes()


def test_a_v2_image_with_snapshots_keeps_its_size(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", "compat=0.10", pair.name, "8M", snapshot=True)
    assert pair.both("-o", "size=16M", pair.name).rc == 1


@pytest.mark.parametrize("create,writes,option,refusal", [
    ("compression_type=zstd", (), "compat=0.10", "zstd"),
    ("compat=1.1,backing_file=base.qcow2,backing_fmt=qcow2", ("write -z 0 64k",),
     "compat=0.10", "zero clusters"),
])
def test_not_supported_yet(create: str, writes: tuple[str, ...], option: str, refusal: str,
                           tmp_path: Path) -> None:
    """What qemu does and instar does not yet: one line, the image unchanged,
    and qemu-img does it (so the refusal is instar's own)."""
    pair = Pair(tmp_path)
    qemu_img_ok("create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=pair.qemu_dir)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=writes)
    image = pair.our_dir / pair.name
    before = image.read_bytes()
    ours = run_instar("amend", "-o", option, pair.name, cwd=pair.our_dir)
    assert ours.rc == 1 and ours.stderr.count("\n") == 1 and refusal in ours.stderr
    assert "not supported yet" in ours.stderr
    assert image.read_bytes() == before
    assert run_qemu_img("amend", "-o", option, pair.name, cwd=pair.qemu_dir).rc == 0


@pytest.mark.parametrize("create", ["cluster_size=64k", "cluster_size=512"])
@pytest.mark.parametrize("widths", [["1", "16"], ["64", "2"], ["64"], ["2", "32", "8", "16"]],
                         ids="-".join)
def test_refcount_bits_like_qemu(create: str, widths: list[str], tmp_path: Path) -> None:
    """The refcount width changed (16 -> 1 -> 16, 16 -> 64 -> 2, ...) on an
    image with data and a snapshot sharing some of it: the same info
    (refcount-bits among it), both clean, the same data."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M",
              writes=("write -P 1 0 1M", "write -P 2 5M 100k"), snapshot=True)
    for directory in (pair.qemu_dir, pair.our_dir):
        qemu_io(directory / pair.name, "write -P 3 64k 64k")
    for width in widths:
        qemu = pair.both("-o", f"refcount_bits={width}", pair.name)
        if width == "1":  # the snapshot's clusters have refcount 2
            assert qemu.rc == 1 and "Cannot decrease refcount entry width" in qemu.stderr
            # qemu leaves the new refcount blocks it allocated leaked; instar wrote nothing
            pair.assert_same(qemu_clean=False)
            continue
        assert qemu.rc == 0, qemu
        pair.assert_same()
        info = json.loads(qemu_img_ok("info", "--output=json", pair.name, cwd=pair.our_dir))
        assert info["format-specific"]["data"]["refcount-bits"] == int(width)


@pytest.mark.parametrize("create", ["cluster_size=64k", "cluster_size=512,compat=1.1"])
@pytest.mark.parametrize("widths", [["1", "16"], ["64", "2"]], ids="-".join)
def test_refcount_bits_without_snapshots(create: str, widths: list[str],
                                         tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=_DATA)
    for width in widths:
        assert pair.both("-o", f"refcount_bits={width}", pair.name).rc == 0
        pair.assert_same()


@pytest.mark.parametrize("create,option", [
    ("compat=1.1", "refcount_bits=128"), ("compat=1.1", "refcount_bits=0"),
    ("compat=1.1", "refcount_bits=12"), ("compat=0.10", "refcount_bits=8"),
    ("compat=0.10", "refcount_bits=16"), ("compat=1.1", "refcount_bits=x"),
    ("compat=1.1", "refcount_bits=64,backing_file=b.qcow2"),
])
def test_refcount_bits_refusals_like_qemu(create: str, option: str, tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=_DATA)
    qemu = pair.both("-o", option, pair.name)
    if "backing_file" in option:
        # qemu has changed the width when it refuses the backing file; instar,
        # refusing before its first write, leaves the image as it was.
        assert qemu.rc == 1
        widths = [json.loads(qemu_img_ok("info", "--output=json", pair.name, cwd=d))
                  ["format-specific"]["data"]["refcount-bits"]
                  for d in (pair.qemu_dir, pair.our_dir)]
        assert widths == [64, 16]
        return
    pair.assert_same()


# Families of formats qemu cannot amend are refused after the open test_hostile covers.
_OTHER_FORMATS = ("parallels", "vdi", "vmdk_descriptor", "vhdx_log", "plists")


@pytest.mark.parametrize("case,option", corpus_params(["compat=0.10", "refcount_bits=1"],
                                                      skip_families=_OTHER_FORMATS))
def test_hostile_corpus(case: corpus.Case, option: str, hostile_bases: corpus.Bases,
                        tmp_path: Path) -> None:
    """Every image of the hostile corpus downgraded (the header rewritten,
    every table walked for zero clusters) or given 1-bit refcounts (every
    refcount block read) by a confined instar: done, or refused in one line
    (`mutation_sweep`)."""
    check_run("amend", lambda image: ["-o", option, image], case, hostile_bases, tmp_path,
              try_line=True)


# --- crash safety ----------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["compat=0.10", "lazy_refcounts=on", "size=3M",
                                    "refcount_bits=1", "refcount_bits=64"])
def test_crash_at_every_write(option: str, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after k changes for every k: the image is the old one or the
    new one (qemu-img info, check, the data), never a mix. A shrink is
    resize's: data past the new end may be dropped before the size changes
    (qemu's order too), so only the data up to the new end is compared."""
    from instar.amend import amend
    from instar.worker import SandboxSettings

    original = tmp_path / "o.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(original), "8M")
    for command in ("write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 64k",
                    "write -P 2 5M 100k"):
        qemu_io(original, command)
    key, _, value = option.partition("=")

    def state(image: Path) -> tuple[Any, Any]:
        checked = run_qemu_img("check", str(image))
        assert checked.rc in (0, 3), checked  # a shrink stopped before its release leaks
        info = _normalised(json.loads(qemu_img_ok("info", "--output=json", str(image))))
        del info["filename"]
        data = qemu_read_raw(image, tmp_path, "qcow2")
        if key == "size":
            return info["virtual-size"], data[: 3 << 20]
        return info, data

    finished = tmp_path / "new.qcow2"
    shutil.copyfile(original, finished)
    amend(str(finished), [(key, value)], sandbox=SandboxSettings(mode="off"))
    old, new = state(original), state(finished)
    assert old != new
    image = tmp_path / "k.qcow2"
    for k, done in stopped_runs(
            monkeypatch, original, image,
            lambda: amend(str(image), [(key, value)], sandbox=SandboxSettings(mode="off")),
            across=False):
        now = state(image)
        assert now in (old, new) and (now == new or not done), k
        if key == "size":
            assert now[1] == old[1], k
        image.unlink()


@pytest.mark.parametrize("name", sample_image_names())
def test_qemu_sample_images(name: str, tmp_path: Path) -> None:
    """qemu's own sample images: refused (or amended) as qemu does, in its words."""
    pair = Pair(tmp_path, "img")
    shutil.copyfile(unpack_sample_image(name, tmp_path), pair.qemu_dir / "img")
    shutil.copyfile(pair.qemu_dir / "img", pair.our_dir / "img")
    for args in (["-o", "size=1M"], ["-o", "help"], ["-o", "compat=1.1"]):
        pair.both(*args, "img")


@pytest.mark.parametrize("create", ["compat=0.10", "compat=0.10,cluster_size=512",
                                    "compat=0.10,cluster_size=2M", "compat=1.1,cluster_size=4k",
                                    "compat=1.1,lazy_refcounts=on"])
@pytest.mark.parametrize("target", ["compat=1.1", "compat=0.10", "compat=1.1,lazy_refcounts=on"])
def test_first_cluster_is_qemus_byte_for_byte(create: str, target: str,
                                              tmp_path: Path) -> None:
    """Over a backing file (its name and format extension move with the
    header): the whole first cluster as qemu-img writes it."""
    pair = Pair(tmp_path)
    qemu_img_ok("create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=pair.qemu_dir)
    pair.make("-f", "qcow2", "-o", create, "-b", "base.qcow2", "-F", "qcow2", pair.name)
    assert pair.both("-o", target, pair.name).rc == 0
    cluster = qemu_info_cluster(pair.qemu_dir / pair.name)
    ours = (pair.our_dir / pair.name).read_bytes()
    assert ours[:cluster] == (pair.qemu_dir / pair.name).read_bytes()[:cluster]
    pair.assert_same()


def qemu_info_cluster(image: Path) -> int:
    size: int = json.loads(qemu_img_ok("info", "--output=json", str(image)))["cluster-size"]
    return size


@pytest.mark.parametrize("kind", ["killed", "leak", "low"])
@pytest.mark.parametrize("option", ["compat=0.10", "lazy_refcounts=off", "size=16M",
                                    "compat=1.1"])
def test_dirty_images_are_repaired_first(kind: str, option: str, tmp_path: Path) -> None:
    """A dirty qcow2 image (lazy refcounts, not closed cleanly) is repaired
    by the read-write open, its check's lines on stderr, then amended."""
    pair = Pair(tmp_path)
    make_dirty_qcow2(pair.qemu_dir / pair.name, kind)
    shutil.copyfile(pair.qemu_dir / pair.name, pair.our_dir / pair.name)
    qemu = pair.both("-o", option, pair.name)
    assert qemu.rc == 0 and "cluster" in qemu.stderr
    pair.assert_same()
