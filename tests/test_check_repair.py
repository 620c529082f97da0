"""``instar check -r leaks|all`` against ``qemu-img check -r`` (7.2).

Each damaged image is made by qemu-img/qemu-io and struct pokes, copied
twice; qemu-img repairs one copy, instar the other, with the same command
line. Both must print the same (exit status, stdout, stderr after the
program name and the file name), and afterwards both copies must check the
same with the plain ``qemu-img check`` and read the same (``qemu-img
compare``). Then: a stop at every write of instar's repair leaves an image
qemu-img reads as before and finds nothing worse in; what instar does not
repair yet is refused in one line with the file unchanged; the formats qemu
does not repair answer as qemu does.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import hostile_corpus as corpus
from confined import run_instar as run_confined
from helpers import (
    Result,
    qemu_img_ok,
    qemu_io,
    run_instar,
    run_qemu_img,
    sample_image_names,
    stopped_runs,
    unpack_sample_image,
)
from instar.check import repair_image
from instar.formats.qcow2 import layout as L
from instar.worker import SandboxSettings
from test_check import Qcow2, _append_cluster, make_qcow2

pytestmark = pytest.mark.usefixtures("qemu_img")

MiB = 1 << 20
Make = Callable[[Path], None]


# --- damaged images ---------------------------------------------------------------------------


def _data_cluster(image: Qcow2, guest: int = 0) -> int:
    return image.host(guest) // image.cluster


def _image(options: str = "", writes: tuple[str, ...] | None = None,
           size: str = "10M") -> Callable[[Callable[[Qcow2], None]], Make]:
    def wrap(change: Callable[[Qcow2], None]) -> Make:
        def make(path: Path) -> None:
            more = {"writes": writes} if writes is not None else {}
            image = make_qcow2(path.parent, path.name, size=size, options=options, **more)
            change(image)
        make.__name__ = change.__name__
        return make
    return wrap


@_image()
def leaked_cluster(image: Qcow2) -> None:
    image.set_refcount(_append_cluster(image), 1)


@_image()
def leaks_and_refcount_too_high(image: Qcow2) -> None:
    image.set_refcount(_append_cluster(image), 3)
    image.set_refcount(_data_cluster(image), 2)


@_image()
def refcount_zero(image: Qcow2) -> None:
    """A data cluster with refcount 0: only a rebuild repairs it."""
    image.set_refcount(_data_cluster(image), 0)


@_image()
def refcount_zero_and_leak(image: Qcow2) -> None:
    image.set_refcount(_append_cluster(image), 1)
    image.set_refcount(_data_cluster(image, 5 * MiB), 0)


@_image()
def oflag_copied_l2(image: Qcow2) -> None:
    slot = image.l2_slot(0)
    image.put(slot, ">Q", image.u64(slot) & ~L.OFLAG_COPIED)


@_image()
def oflag_copied_l1(image: Qcow2) -> None:
    slot = image.l1_slot(0)
    image.put(slot, ">Q", image.u64(slot) & ~L.OFLAG_COPIED)


@_image()
def oflag_and_leak(image: Qcow2) -> None:
    """-r leaks repairs the leak, and OFLAG_COPIED only once nothing else is wrong."""
    slot = image.l2_slot(5 * MiB)
    image.put(slot, ">Q", image.u64(slot) & ~L.OFLAG_COPIED)
    image.set_refcount(_append_cluster(image), 1)


@_image()
def refcount_block_missing(image: Qcow2) -> None:
    image.put(image.header.refcount_table_offset, ">Q", 0)


@_image()
def refcount_block_named_twice(image: Qcow2) -> None:
    table = image.header.refcount_table_offset
    image.put(table + 8, ">Q", image.u64(table))


@_image()
def refcount_entry_reserved_bits(image: Qcow2) -> None:
    table = image.header.refcount_table_offset
    image.put(table, ">Q", image.u64(table) | 1)


@_image()
def refcount_block_past_the_end(image: Qcow2) -> None:
    """-r all grows the file to hold it (4 GiB, sparse), then rebuilds."""
    image.put(image.header.refcount_table_offset, ">Q", 1 << 32)


@_image(options="cluster_size=512", writes=("write -P 1 0 1M",))
def small_clusters_block_past_the_end(image: Qcow2) -> None:
    """512-byte clusters, a refcount block 4 GiB in: 8M clusters to cover."""
    image.put(image.header.refcount_table_offset + 24, ">Q", (1 << 32) + 512 * 7)


@_image(options="cluster_size=512", writes=("write -P 1 0 1M",))
def small_clusters_block_far_past_the_end(image: Qcow2) -> None:
    """8 TiB in: the rebuilt refcount table would pass qemu's 8 MiB."""
    image.put(image.header.refcount_table_offset + 24, ">Q", (1 << 43) + 512 * 7)


@_image(options="cluster_size=512", writes=("write -P 1 0 300k", "write -P 2 2M 200k"))
def many_refcount_blocks_rebuilt(image: Qcow2) -> None:
    """512-byte clusters: refcount blocks of 256 clusters, a table that grows."""
    image.set_refcount(_data_cluster(image, 100 << 10), 0)


@_image(options="cluster_size=4k,refcount_bits=1", writes=("write -P 3 0 100k",))
def one_bit_refcounts_rebuilt(image: Qcow2) -> None:
    table = image.header.refcount_table_offset
    block = image.u64(table) & L.REFTABLE_OFFSET_MASK
    image.put(block, ">B", 0)  # clusters 0 to 7 lose their refcounts


@_image(options="cluster_size=4k,refcount_bits=64", writes=("write -P 3 0 100k",))
def wide_refcounts(image: Qcow2) -> None:
    table = image.header.refcount_table_offset
    block = image.u64(table) & L.REFTABLE_OFFSET_MASK
    data = _data_cluster(image)
    image.put(block + 8 * data, ">Q", 0)
    image.put(block + 8 * (data + 1), ">Q", 5)


@_image(options="cluster_size=16k,extended_l2=on")
def extended_l2_oflag(image: Qcow2) -> None:
    slot = image.l2_slot(0)
    image.put(slot, ">Q", image.u64(slot) & ~L.OFLAG_COPIED)


def snapshot_refcount_too_low(path: Path) -> None:
    """A cluster shared with a snapshot whose refcount says 1: -r all raises it."""
    image = make_qcow2(path.parent, path.name, writes=("write -P 0x11 0 1M",))
    qemu_img_ok("snapshot", "-c", "s1", str(path))
    image.set_refcount(_data_cluster(image), 1)


def dirty_lazy_refcounts(path: Path) -> None:
    """qemu-io's writes with lazy refcounts, stopped by abort: the dirty bit
    set and the refcounts behind."""
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "10M")
    qemu_io(path, "write -P 1 0 64k", "qcow2")
    qemu_io(path, "write -P 2 1M 192k", "qcow2")
    image = Qcow2(path)
    image.put(72, ">Q", L.INCOMPAT_DIRTY)
    image.set_refcount(_data_cluster(image, MiB), 0)
    image.set_refcount(_append_cluster(image), 1)


def version_2(path: Path) -> None:
    """compat=0.10: a leak and a cluster with refcount 0 (rebuilt)."""
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(path), "10M")
    qemu_io(path, "write -P 1 0 1M", "qcow2")
    image = Qcow2(path)
    image.set_refcount(_data_cluster(image), 0)
    image.set_refcount(_append_cluster(image), 1)


def _with_bitmaps(path: Path) -> Qcow2:
    make_qcow2(path.parent, path.name, writes=("write -P 1 0 1M",))
    qemu_img_ok("bitmap", "--add", str(path), "b0")
    qemu_img_ok("bitmap", "--add", str(path), "b1")
    qemu_io(path, "write -P 2 2M 1M", "qcow2")
    return Qcow2(path)


def bitmaps_and_leak(path: Path) -> None:
    """Persistent bitmaps (their clusters counted, kept through the repair)."""
    image = _with_bitmaps(path)
    image.set_refcount(_append_cluster(image), 1)


def bitmaps_rebuilt(path: Path) -> None:
    """With -r all only: qemu-img -r leaks stops (a rebuild is needed) and then
    stores its bitmaps through the broken refcounts, over guest data."""
    image = _with_bitmaps(path)
    image.set_refcount(_data_cluster(image), 0)


def dirty_clean(path: Path) -> None:
    make_qcow2(path.parent, path.name)
    Qcow2(path).put(72, ">Q", L.INCOMPAT_DIRTY)


def corrupt_bit_and_leak(path: Path) -> None:
    image = make_qcow2(path.parent, path.name)
    image.put(72, ">Q", L.INCOMPAT_CORRUPT)
    image.set_refcount(_append_cluster(image), 1)


def clean(path: Path) -> None:
    make_qcow2(path.parent, path.name)


DAMAGED: list[Make] = [
    clean, leaked_cluster, leaks_and_refcount_too_high, refcount_zero, refcount_zero_and_leak,
    oflag_copied_l2, oflag_copied_l1, oflag_and_leak, refcount_block_missing,
    refcount_block_named_twice, refcount_block_past_the_end, small_clusters_block_past_the_end,
    many_refcount_blocks_rebuilt,
    one_bit_refcounts_rebuilt, wide_refcounts, extended_l2_oflag, snapshot_refcount_too_low,
    dirty_lazy_refcounts, dirty_clean, corrupt_bit_and_leak, version_2, bitmaps_and_leak,
]


# --- parity -----------------------------------------------------------------------------------


def _copies(tmp_path: Path, make: Make) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "i.qcow2", tmp_path / "q.qcow2"
    make(theirs)
    shutil.copyfile(theirs, ours)
    return ours, theirs


def _same(ours: Result, theirs: Result) -> None:
    def clean(text: str) -> str:
        return text.replace("i.qcow2", "FILE").replace("q.qcow2", "FILE")

    assert (ours.rc, clean(ours.stdout), clean(ours.normalised_stderr())) == (
        theirs.rc, clean(theirs.stdout), clean(theirs.normalised_stderr()))


def _same_results(ours: Path, theirs: Path) -> None:
    """Both repaired copies check alike and read alike. (qemu stores an
    image's persistent bitmaps again when it closes it, in other clusters:
    there the image end offsets differ.)"""
    checks = [run_qemu_img("check", "-f", "qcow2", path.name, cwd=path.parent)
              for path in (ours, theirs)]
    if L.EXT_BITMAPS.to_bytes(4, "big") in theirs.read_bytes()[:4096]:  # bitmaps
        for check in checks:
            check.stdout = "".join(line for line in check.stdout.splitlines(True)
                                   if not line.startswith("Image end offset"))
    _same(*checks)
    compared = run_qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(ours), str(theirs))
    assert compared.rc == 0, compared.stdout + compared.stderr
    features = [Qcow2(path).read(72, 8) for path in (ours, theirs)]
    assert features[0] == features[1]


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("make", DAMAGED, ids=lambda make: make.__name__)
def test_repair_like_qemu(tmp_path: Path, make: Make, mode: str) -> None:
    ours, theirs = _copies(tmp_path, make)
    _same(run_instar("check", "-r", mode, ours.name, cwd=tmp_path),
          run_qemu_img("check", "-r", mode, theirs.name, cwd=tmp_path))
    _same_results(ours, theirs)


def test_bitmaps_rebuilt(tmp_path: Path) -> None:
    ours, theirs = _copies(tmp_path, bitmaps_rebuilt)
    _same(run_instar("check", "-r", "all", ours.name, cwd=tmp_path),
          run_qemu_img("check", "-r", "all", theirs.name, cwd=tmp_path))
    _same_results(ours, theirs)


@pytest.mark.parametrize("args", [("--output=json", "-r", "all"), ("--output=json", "-r", "leaks"),
                                  ("-q", "-r", "all"), ("-f", "qcow2", "--repair=leaks")])
@pytest.mark.parametrize("make", [leaked_cluster, refcount_zero, oflag_copied_l2,
                                  snapshot_refcount_too_low], ids=lambda make: make.__name__)
def test_repair_outputs(tmp_path: Path, make: Make, args: tuple[str, ...]) -> None:
    ours, theirs = _copies(tmp_path, make)
    _same(run_instar("check", *args, ours.name, cwd=tmp_path),
          run_qemu_img("check", *args, theirs.name, cwd=tmp_path))
    _same_results(ours, theirs)


def test_repaired_json_fields(tmp_path: Path) -> None:
    """The second check's object carries the first's fixed counts."""
    ours, _ = _copies(tmp_path, leaks_and_refcount_too_high)
    result = run_instar("check", "--output=json", "-r", "all", ours.name, cwd=tmp_path)
    report = json.loads(result.stdout)
    assert report["leaks-fixed"] == 2 and "leaks" not in report and result.rc == 0


def test_command_line(tmp_path: Path) -> None:
    ours, theirs = _copies(tmp_path, leaked_cluster)
    for args in (("-U", "-r", "leaks"), ("-r", "some")):
        _same(run_instar("check", *args, ours.name, cwd=tmp_path),
              run_qemu_img("check", *args, theirs.name, cwd=tmp_path))
    assert ours.read_bytes() == theirs.read_bytes()


# --- other formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qed", "vdi", "parallels", "vhdx", "vmdk", "vpc", "raw"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_other_formats_clean(tmp_path: Path, fmt: str, mode: str) -> None:
    """vdi, vmdk, vpc, raw: qemu's "does not support checks" (63); qed,
    parallels, vhdx: a clean image is checked, nothing changed."""
    theirs, ours = tmp_path / f"q.{fmt}", tmp_path / f"i.{fmt}"
    qemu_img_ok("create", "-q", "-f", fmt, str(theirs), "10M")
    qemu_io(theirs, "write -P 1 0 1M", fmt)
    shutil.copyfile(theirs, ours)
    before = ours.read_bytes()
    result = run_instar("check", "-r", mode, ours.name, cwd=tmp_path)
    expected = run_qemu_img("check", "-r", mode, theirs.name, cwd=tmp_path)
    assert (result.rc, result.stdout.replace("i.", "q."),
            result.normalised_stderr().replace("i.", "q.")) == (
        expected.rc, expected.stdout, expected.normalised_stderr())
    assert ours.read_bytes() == before


def _qed(path: Path, need_check: bool = False, leak: bool = True) -> None:
    qemu_img_ok("create", "-q", "-f", "qed", str(path), "10M")
    qemu_io(path, "write -P 1 0 1M", "qed")
    with path.open("r+b") as file:
        if leak:
            file.seek(0, 2)
            file.write(b"\1" * (64 << 10))
        if need_check:
            file.seek(16)
            file.write(struct.pack("<Q", 2))  # QED_F_NEED_CHECK


@pytest.mark.parametrize("need_check", [False, True])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_qed_like_qemu(tmp_path: Path, need_check: bool, mode: str) -> None:
    """qemu repairs no qed leak (the read-only check's report) and clears
    the "need check" mark: the same output, the same bytes."""
    theirs, ours = tmp_path / "q.qed", tmp_path / "i.qed"
    _qed(theirs, need_check)
    shutil.copyfile(theirs, ours)
    result = run_instar("check", "-r", mode, ours.name, cwd=tmp_path)
    expected = run_qemu_img("check", "-r", mode, theirs.name, cwd=tmp_path)
    assert (result.rc, result.stdout, result.normalised_stderr()) == (
        expected.rc, expected.stdout, expected.normalised_stderr())
    assert result.rc == 3 and ours.read_bytes() == theirs.read_bytes()


def _refused_unchanged(path: Path, words: str) -> None:
    before = path.read_bytes()
    for mode in ("leaks", "all"):
        result = run_instar("check", "-r", mode, path.name, cwd=path.parent)
        assert (result.rc, result.stdout) == (1, ""), result.stderr
        assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
        assert path.read_bytes() == before


def test_qed_corruption_refused(tmp_path: Path) -> None:
    """qemu zeroes a qed L2 entry past the end of the file: not supported yet."""
    path = tmp_path / "c.qed"
    _qed(path, leak=False)
    l1 = struct.unpack("<Q", path.read_bytes()[40:48])[0]
    l2 = struct.unpack("<Q", path.read_bytes()[l1:l1 + 8])[0]
    with path.open("r+b") as file:
        file.seek(l2 + 8)
        file.write(struct.pack("<Q", 1 << 40))
    assert run_qemu_img("check", str(path)).rc == 2
    _refused_unchanged(path, "not supported yet")


def _parallels(path: Path, inuse: bool = False, tail: int = 0, outside: bool = False) -> None:
    qemu_img_ok("create", "-q", "-f", "parallels", str(path), "10M")
    qemu_io(path, "write -P 1 0 1M", "parallels")
    qemu_io(path, "write -P 2 3M 1M", "parallels")
    with path.open("r+b") as file:
        if inuse:
            file.seek(44)  # the header's inuse field
            file.write(struct.pack("<I", 0x746F6E59))
        if outside:
            file.seek(64 + 4 * 5)  # catalog entry 5, far past the end
            file.write(struct.pack("<I", 100000))
        file.seek(0, 2)
        file.write(b"\1" * tail)


@pytest.mark.parametrize("damage", [{"inuse": True}, {"tail": 3 << 19},
                                    {"inuse": True, "tail": 1000}, {}],
                         ids=["inuse", "leak", "inuse-and-leak", "clean"])
@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_parallels_like_qemu(tmp_path: Path, damage: dict[str, int], mode: str) -> None:
    """The "inuse" mark and the leaked end: the same output, the same bytes."""
    theirs, ours = tmp_path / "q.parallels", tmp_path / "i.parallels"
    _parallels(theirs, **damage)
    shutil.copyfile(theirs, ours)
    result = run_instar("check", "-r", mode, ours.name, cwd=tmp_path)
    expected = run_qemu_img("check", "-r", mode, theirs.name, cwd=tmp_path)
    assert (result.rc, result.stdout, result.normalised_stderr()) == (
        expected.rc, expected.stdout, expected.normalised_stderr())
    assert ours.read_bytes() == theirs.read_bytes()


def test_parallels_entry_outside_refused(tmp_path: Path) -> None:
    """A catalog entry past the end of the file: qemu zeroes it and grows the
    file to where it pointed; not supported yet."""
    path = tmp_path / "p.parallels"
    _parallels(path, outside=True)
    assert run_qemu_img("check", str(path)).rc == 2
    _refused_unchanged(path, "not supported yet")


def test_vhdx_pending_log_refused(tmp_path: Path) -> None:
    """qemu-img check -r all replays a pending log: not supported yet."""
    from test_check import _pattern_file
    from test_vhdx_reader import dirty_image

    qemu_img_ok("convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M",
                *_pattern_file(tmp_path, 3 * MiB), str(tmp_path / "bs1.vhdx"))
    image, _ = dirty_image(tmp_path, tmp_path)
    shutil.move(image, tmp_path / "log.vhdx")
    _refused_unchanged(tmp_path / "log.vhdx", "replaying a VHDX log is not supported yet")


# qemu-img check -r on these writes what instar refuses to write (a VHDX log
# replayed; a parallels format extension cut off as leaked space, which leaves
# an image qemu itself cannot open): instar refuses them in one line.
_SAMPLES_REFUSED = {"iotest-dirtylog-10G-4M.vhdx": "replaying a VHDX log",
                    "parallels-with-bitmap": "format extension"}


@pytest.mark.parametrize("name", sample_image_names())
def test_sample_images(tmp_path: Path, name: str) -> None:
    """qemu's sample images: -r all answers as qemu-img (read-only formats
    included: "Image is read-only"), and leaves the file as qemu does, or
    is refused in one line with the file unchanged."""
    ours = unpack_sample_image(name, tmp_path)
    (tmp_path / "q").mkdir()
    theirs = unpack_sample_image(name, tmp_path / "q")
    if name in _SAMPLES_REFUSED:
        _refused_unchanged(ours, _SAMPLES_REFUSED[name])
        return
    result = run_instar("check", "-r", "all", name, cwd=tmp_path)
    expected = run_qemu_img("check", "-r", "all", name, cwd=tmp_path / "q")
    assert (result.rc, result.stdout, result.normalised_stderr()) == (
        expected.rc, expected.stdout, expected.normalised_stderr())
    assert filecmp.cmp(ours, theirs, shallow=False)


# --- refused before anything is written -------------------------------------------------------


@_image()
def refcount_block_unaligned(image: Qcow2) -> None:
    table = image.header.refcount_table_offset
    image.put(table, ">Q", image.u64(table) + 512)


@_image()
def refcount_block_past_16_tib(image: Qcow2) -> None:
    image.put(image.header.refcount_table_offset, ">Q", 1 << 45)


@_image()
def preallocated_unaligned(image: Qcow2) -> None:
    slot = image.l2_slot(0)
    image.put(slot, ">Q", (image.u64(slot) | L.OFLAG_ZERO) + 512)


@_image(options="refcount_bits=1", size="1G")
def refcount_overflow(image: Qcow2) -> None:
    """Two L1 entries name one L2 table: its refcount would be 2, past 1 bit."""
    image.put(image.l1_slot(0) + 8, ">Q", image.u64(image.l1_slot(0)))


@_image()
def l2_table_is_the_l1_table(image: Qcow2) -> None:
    """qemu's overlap check stops its OFLAG_COPIED repair half way; instar refuses."""
    image.put(image.l1_slot(0), ">Q", image.header.l1_table_offset | L.OFLAG_COPIED)


@pytest.mark.parametrize("make", [refcount_block_unaligned,
                                  l2_table_is_the_l1_table],
                         ids=lambda make: make.__name__)
def test_not_supported_yet(tmp_path: Path, make: Make) -> None:
    """What qemu repairs in ways instar does not yet: one line, exit 1, the
    file as it was."""
    path = tmp_path / "i.qcow2"
    make(path)
    before = path.read_bytes()
    for mode in ("leaks", "all"):
        result = run_instar("check", "-r", mode, path.name, cwd=tmp_path)
        assert (result.rc, result.stdout) == (1, ""), result.stderr
        assert result.stderr.count("\n") == 1 and "not supported yet" in result.stderr
        assert path.read_bytes() == before


@pytest.mark.parametrize("make", [refcount_block_past_16_tib,
                                  small_clusters_block_far_past_the_end],
                         ids=lambda make: make.__name__)
def test_refcount_block_too_far_refused(tmp_path: Path, make: Make) -> None:
    """-r all would grow the file past 16 TiB, or need a refcount table
    larger than qemu opens: refused, unchanged (-r leaks fails as qemu's
    does, needing a rebuild, nothing written)."""
    path = tmp_path / "i.qcow2"
    make(path)
    before = path.read_bytes()
    for mode in ("all",):
        result = run_instar("check", "-r", mode, path.name, cwd=tmp_path)
        assert (result.rc, result.stdout) == (1, ""), result.stderr
        assert result.stderr.count("\n") == 1 and "not supported yet" in result.stderr
        assert path.read_bytes() == before


# --- a stop at every write --------------------------------------------------------------------


def _check_json(path: Path) -> tuple[int, dict[str, int]]:
    checked = run_qemu_img("check", "--output=json", "-f", "qcow2", str(path))
    return checked.rc, json.loads(checked.stdout) if checked.stdout else {}


@pytest.mark.parametrize("make", [leaks_and_refcount_too_high, refcount_zero_and_leak,
                                  oflag_and_leak, many_refcount_blocks_rebuilt,
                                  snapshot_refcount_too_low, corrupt_bit_and_leak,
                                  refcount_block_past_the_end],
                         ids=lambda make: make.__name__)
def test_stop_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             make: Make) -> None:
    """Stopped after k changes, for every k until the repair completes: qemu-img
    reads the image as before, and finds no more corruptions than before
    (a rebuilt structure switched to but not yet cleaned leaves leaks)."""
    original = tmp_path / "o.qcow2"
    make(original)
    _, found = _check_json(original)
    image = tmp_path / "k.qcow2"
    for k, finished in stopped_runs(
            monkeypatch, original, image,
            lambda: repair_image(str(image), "all", "qcow2", sandbox=SandboxSettings(mode="off")),
            most=200, across=False):
        rc, report = _check_json(image)
        assert rc in (0, 2, 3), (k, report)
        assert not report.get("check-errors"), (k, report)
        assert report.get("corruptions", 0) <= found.get("corruptions", 0), (k, report)
        compared = run_qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(image),
                                str(original))
        assert compared.rc == 0, (k, compared.stdout, compared.stderr)
        image.unlink()
        if finished:
            assert rc == 0, (k, report)
            assert k > 0


def test_parallels_stop_at_every_write(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The inuse mark and the leaked end: stopped after each write, the image
    reads the same and qemu-img finds at most what it found before."""
    original = tmp_path / "o.parallels"
    _parallels(original, inuse=True, tail=3 << 19)
    image = tmp_path / "k.parallels"
    for k, finished in stopped_runs(
            monkeypatch, original, image,
            lambda: repair_image(str(image), "all", "parallels",
                                 sandbox=SandboxSettings(mode="off")),
            most=10, across=False):
        checked = run_qemu_img("check", "-f", "parallels", str(image))
        assert checked.rc in (0, 2, 3), (k, checked.stdout, checked.stderr)
        compared = run_qemu_img("compare", "-f", "parallels", "-F", "parallels", str(image),
                                str(original))
        assert compared.rc == 0, (k, compared.stdout, compared.stderr)
        if finished:
            assert checked.rc == 0 and k == 2


# --- hostile images ---------------------------------------------------------------------------


QCOW2_CASES = [case for case in corpus.CASES
               if case.qemu and case.allow == "none" and "qcow2" in case.name
               and case.fmt in (None, "qcow2")]


@pytest.mark.parametrize("case", QCOW2_CASES, ids=lambda case: case.name)
def test_hostile(case: corpus.Case, hostile_bases: corpus.Bases, tmp_path: Path) -> None:
    """The hostile qcow2 images: ``check -r all`` bounded (5 s, 512 MiB), never a
    traceback; refused in one line with the file unchanged, or repaired."""
    place = corpus.Place.make(tmp_path, hostile_bases)
    path = place.img / case.build(place)
    before = path.read_bytes()
    args = ["check", "-r", "all", "img/" + path.name]
    run = run_confined("check -r", args, place)
    assert not run.hung and run.seconds < 30, run
    stderr = run.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "sandbox layer" not in line]
    if run.rc == 1 and not run.stdout and len(lines) == 1:
        assert path.read_bytes() == before, lines
    for token in corpus.forbidden(neighbour_allowed=False):
        assert token not in run.stdout and token not in run.stderr


def test_hostile_cases_found() -> None:
    assert len(QCOW2_CASES) >= 10


def test_struct_sanity() -> None:
    """The header offsets this module writes (incompatible features at 72)."""
    assert struct.calcsize(">QIIQQI") == 36
