"""``instar check -r leaks|all`` against ``qemu-img check -r`` (7.2): the
qcow2 repairs added after the first ones (tests/test_check_repair.py).

Images with an external data file, refcounts past the refcount width
(qemu's "overflow": the walk is qemu's, entry by entry), unaligned
preallocated clusters (qemu makes them zero clusters), and the repairs that
stay refused because qemu's own would write over metadata. Each damaged image
is made by qemu-img/qemu-io and a few poked bytes, then copied into two
directories (a data file is named relative to the directory qemu-img runs
in); qemu-img repairs one copy, instar the other, with the same command line.
Both must print the same (exit status, stdout, stderr after the program
name); afterwards both copies must check the same with the plain
``qemu-img check``, read the same (`_guest`, through qemu-img), list the same
snapshots. Then a stop at every write of instar's repair leaves an image that
reads as before and in which qemu-img finds nothing worse.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import Result, qemu_img_ok, qemu_io, run_instar, run_qemu_img, stopped_runs
from instar.check import repair_image
from instar.formats.qcow2 import layout as L
from instar.worker import SandboxSettings
from test_check import Qcow2, _append_cluster

pytestmark = pytest.mark.usefixtures("qemu_img", "allow_own_directories")

Make = Callable[[Path], None]
NAME = "t.qcow2"
DATA = "d.raw"


# --- poking -----------------------------------------------------------------------------------


def _refcount(image: Qcow2, cluster: int, value: int) -> None:
    """Set ``cluster``'s refcount on disk, at any refcount width."""
    width = 1 << image.header.refcount_order
    per_block = image.cluster * 8 // width
    table = image.header.refcount_table_offset
    block = image.u64(table + 8 * (cluster // per_block)) & L.REFTABLE_OFFSET_MASK
    bit = (cluster % per_block) * width
    if width >= 8:
        image.put(block + bit // 8, {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}[width], value)
        return
    byte = image.read(block + bit // 8, 1)[0]
    mask = ((1 << width) - 1) << (bit % 8)
    image.put(block + bit // 8, ">B", (byte & ~mask) | (value << (bit % 8)))


def _made(options: str = "", size: str = "10M", writes: tuple[str, ...] = (
        "write -P 1 0 1M", "write -P 2 5M 64k"), snapshot: bool = False,
          ) -> Callable[[Callable[[Qcow2], None]], Make]:
    """A maker: qemu-img's image (in the directory it is made in), then pokes."""
    def wrap(change: Callable[[Qcow2], None]) -> Make:
        def make(directory: Path) -> None:
            args = ["create", "-q", "-f", "qcow2"] + (["-o", options] if options else [])
            qemu_img_ok(*args, NAME, size, cwd=directory)
            for command in writes:
                qemu_io(NAME, command, "qcow2", cwd=directory)
            if snapshot:
                qemu_img_ok("snapshot", "-c", "s1", NAME, cwd=directory)
            change(Qcow2(directory / NAME))
        make.__name__ = change.__name__
        return make
    return wrap


def _clear_copied(image: Qcow2, slot: int) -> None:
    image.put(slot, ">Q", image.u64(slot) & ~L.OFLAG_COPIED)


def _l2_cluster(image: Qcow2, guest: int = 0) -> int:
    return (image.u64(image.l1_slot(guest)) & L.L1E_OFFSET_MASK) >> image.bits


def _add_snapshot(image: Qcow2) -> None:
    """A snapshot entry poked in (qemu-img makes none in an image with a data
    file): its own copy of the L1 table, the L2 tables shared (refcount 2,
    the active L1 entries without OFLAG_COPIED), consistent but for qemu's
    "snapshots in image with data file"."""
    header = image.header
    table, l1_copy = _append_cluster(image), _append_cluster(image)
    extra = struct.pack(">QQ", 0, 10 << 20)
    entry = struct.pack(">QIHHIIQII", l1_copy * image.cluster, header.l1_size, 1, 2, 0, 0, 0, 0,
                        len(extra)) + extra + b"1" + b"s1"
    with open(image.path, "r+b") as file:
        file.seek(l1_copy * image.cluster)
        file.write(image.read(header.l1_table_offset, header.l1_size * 8))
        file.seek(table * image.cluster)
        file.write(entry + bytes(-len(entry) % 8))
        file.seek(60)
        file.write(struct.pack(">IQ", 1, table * image.cluster))
    _refcount(image, table, 1)
    _refcount(image, l1_copy, 1)
    for index in range(header.l1_size):
        slot = header.l1_table_offset + 8 * index
        if image.u64(slot):
            _clear_copied(image, slot)
            _refcount(image, (image.u64(slot) & L.L1E_OFFSET_MASK) >> image.bits, 2)


# --- images with an external data file --------------------------------------------------------

WITH_DATA = f"data_file={DATA}"


@_made(WITH_DATA)
def data_file_leak(image: Qcow2) -> None:
    _refcount(image, _append_cluster(image), 1)


@_made(WITH_DATA)
def data_file_l2_refcount_zero(image: Qcow2) -> None:
    """An L2 table with refcount 0: -r all rebuilds (data clusters uncounted)."""
    _refcount(image, _l2_cluster(image), 0)



@_made(WITH_DATA + ",data_file_raw=on")
def data_file_raw_oflag_and_leak(image: Qcow2) -> None:
    _clear_copied(image, image.l2_slot(5 << 20))
    _refcount(image, _append_cluster(image), 1)


@_made(WITH_DATA)
def data_file_snapshot_and_leak(image: Qcow2) -> None:
    """qemu's "1 snapshots in image with data file" stays (it repairs no such
    thing); the leak is repaired."""
    _add_snapshot(image)
    _refcount(image, _append_cluster(image), 1)



# --- refcounts past the refcount width ---------------------------------------------------------

# 4 KiB clusters: an L1 entry covers 2 MiB, so a small image has several.
OVERFLOW = {"options": "refcount_bits=1,cluster_size=4k", "size": "8M",
            "writes": ("write -P 1 0 256k", "write -P 2 4M 8k")}


def _second_l1_entry(image: Qcow2) -> None:
    """Two L1 entries name one L2 table: its data clusters would have
    refcount 2, past 1 bit (qemu: "ERROR: overflow cluster offset=...")."""
    image.put(image.l1_slot(0) + 8, ">Q", image.u64(image.l1_slot(0)))


@_made(**OVERFLOW)  # type: ignore[arg-type]
def overflow_and_leak(image: Qcow2) -> None:
    _second_l1_entry(image)
    _refcount(image, _append_cluster(image), 1)


@_made(**OVERFLOW)  # type: ignore[arg-type]
def overflow_rebuilt(image: Qcow2) -> None:
    """The header's refcount 0: -r all rebuilds, the overflowed refcounts at the maximum."""
    _second_l1_entry(image)
    _refcount(image, 0, 0)


@_made(**OVERFLOW)  # type: ignore[arg-type]
def overflow_oflag(image: Qcow2) -> None:
    _second_l1_entry(image)
    _clear_copied(image, image.l1_slot(0))


@_made(options="refcount_bits=2,cluster_size=4k", size="16M", writes=("write -P 1 0 64k",),
       snapshot=True)
def overflow_with_snapshot(image: Qcow2) -> None:
    """2-bit refcounts, a snapshot, and three more L1 entries naming the
    shared L2 table: its refcount passes 3 in qemu's order of additions."""
    entry = image.u64(image.l1_slot(0)) & ~L.OFLAG_COPIED
    for index in (1, 2, 3):
        image.put(image.l1_slot(0) + 8 * index, ">Q", entry)
    _refcount(image, _append_cluster(image), 1)


# --- unaligned preallocated clusters -----------------------------------------------------------


def _preallocated_unaligned(image: Qcow2, guest: int = 0) -> None:
    """A zero cluster with its (preallocated) offset 512 bytes off."""
    slot = image.l2_slot(guest)
    image.put(slot, ">Q", (image.u64(slot) | L.OFLAG_ZERO) + 512)



@_made(writes=("write -P 1 0 1M", "write -z 2M 64k"))
def preallocated_unaligned_and_leak(image: Qcow2) -> None:
    _preallocated_unaligned(image)
    _refcount(image, _append_cluster(image), 1)


@_made(writes=("write -P 1 0 1M",), snapshot=True)
def preallocated_unaligned_shared(image: Qcow2) -> None:
    """In an L2 table a snapshot shares: qemu fixes it at the first visit; the
    second finds a zero cluster."""
    _preallocated_unaligned(image)


@_made(options="extended_l2=on,cluster_size=16k", writes=("write -P 1 0 1M",))
def preallocated_unaligned_extended(image: Qcow2) -> None:
    """Extended L2: no subcluster allocated (all zero): the entry becomes 0."""
    slot = image.l2_slot(0)
    image.put(slot, ">Q", image.u64(slot) + 512)
    image.put(slot + 8, ">Q", 0xFFFF_FFFF << 32)


@_made(**OVERFLOW)  # type: ignore[arg-type]
def preallocated_unaligned_overflow(image: Qcow2) -> None:
    """Walked entry by entry (refcounts overflow): each visit of the table
    after the first finds the entry fixed."""
    _preallocated_unaligned(image)
    _second_l1_entry(image)


# --- incomplete snapshot table entries ---------------------------------------------------------


def _new_extra(image: Qcow2, which: int, change: Callable[[bytes], bytes]) -> None:
    """Write the snapshot table anew, entry ``which``'s extra data changed,
    in a new cluster at the end (refcounts kept right: the old one freed)."""
    header = Qcow2(image.path).header
    raw = image.read(header.snapshots_offset, 1 << 16)
    table, position = b"", 0
    for index in range(header.nb_snapshots):
        position += -position % 8
        fields = list(struct.unpack_from(">QIHHIIQII", raw, position))
        id_size, name_size, extra_size = fields[2], fields[3], fields[8]
        body = position + 40
        extra = raw[body : body + extra_size]
        strings = raw[body + extra_size : body + extra_size + id_size + name_size]
        if index == which:
            extra = change(extra)
        fields[8] = len(extra)
        table += bytes(-len(table) % 8) + struct.pack(">QIHHIIQII", *fields) + extra + strings
        position = body + extra_size + id_size + name_size
    at = _append_cluster(image)
    with open(image.path, "r+b") as file:
        file.seek(at * image.cluster)
        file.write(table + bytes(-len(table) % image.cluster))
        file.seek(64)
        file.write(struct.pack(">Q", at * image.cluster))
    _refcount(image, at, 1)
    _refcount(image, header.snapshots_offset // image.cluster, 0)


def _cut_extra(image: Qcow2, which: int) -> None:
    """Entry ``which``'s extra data cut to 8 bytes (as a writer that knew only
    the VM state size wrote it): qemu's "snapshot table entry N is incomplete"."""
    _new_extra(image, which, lambda extra: extra[:8])


def _long_extra(image: Qcow2, which: int) -> None:
    """Entry ``which`` with 2 KiB more extra data (a newer writer's): over
    qemu's 1 KiB, which -r all cuts to 1 KiB."""
    _new_extra(image, which, lambda extra: extra + bytes(range(256)) * 8)


@_made(writes=("write -P 1 0 1M",), snapshot=True)
def snapshot_extra_too_large(image: Qcow2) -> None:
    _long_extra(image, 0)


def two_snapshots_extra_too_large_and_leak(directory: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "qcow2", NAME, "10M", cwd=directory)
    qemu_io(NAME, "write -P 1 0 1M", "qcow2", cwd=directory)
    qemu_img_ok("snapshot", "-c", "first", NAME, cwd=directory)
    qemu_img_ok("snapshot", "-c", "second", NAME, cwd=directory)
    image = Qcow2(directory / NAME)
    _long_extra(image, 1)
    _refcount(image, _append_cluster(image), 1)


@_made(writes=("write -P 1 0 1M",), snapshot=True)
def snapshot_incomplete(image: Qcow2) -> None:
    _cut_extra(image, 0)


@_made(writes=("write -P 1 0 1M",), snapshot=True)
def snapshot_incomplete_and_leak(image: Qcow2) -> None:
    """qemu frees the leak first, then puts the new table in the first free cluster."""
    _cut_extra(image, 0)
    _refcount(image, _append_cluster(image), 1)


@_made(writes=("write -P 1 0 1M",), snapshot=True)
def snapshot_incomplete_oflag(image: Qcow2) -> None:
    """-r leaks repairs OFLAG_COPIED: qemu counts the entry's corruption apart."""
    _cut_extra(image, 0)
    slot = image.l1_slot(0)
    image.put(slot, ">Q", image.u64(slot) ^ L.OFLAG_COPIED)


def two_snapshots_second_incomplete(directory: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "qcow2", NAME, "10M", cwd=directory)
    qemu_io(NAME, "write -P 1 0 1M", "qcow2", cwd=directory)
    qemu_img_ok("snapshot", "-c", "first", NAME, cwd=directory)
    qemu_io(NAME, "write -P 2 64k 64k", "qcow2", cwd=directory)
    qemu_img_ok("snapshot", "-c", "second", NAME, cwd=directory)
    _cut_extra(Qcow2(directory / NAME), 1)


REPAIRED = [data_file_leak, data_file_l2_refcount_zero, data_file_raw_oflag_and_leak,
            data_file_snapshot_and_leak, overflow_rebuilt, overflow_oflag, overflow_with_snapshot,
            preallocated_unaligned_and_leak, preallocated_unaligned_shared,
            preallocated_unaligned_extended, preallocated_unaligned_overflow,
            snapshot_incomplete, snapshot_incomplete_and_leak, snapshot_incomplete_oflag,
            two_snapshots_second_incomplete, snapshot_extra_too_large,
            two_snapshots_extra_too_large_and_leak]


# --- parity -----------------------------------------------------------------------------------


def _copies(tmp_path: Path, make: Make) -> tuple[Path, Path]:
    """The damaged image made in ``q/``, copied (data file too) to ``i/``."""
    theirs, ours = tmp_path / "q", tmp_path / "i"
    theirs.mkdir()
    make(theirs)
    shutil.copytree(theirs, ours)
    return ours, theirs


def _outputs(result: Result) -> tuple[int, str, str]:
    return result.rc, result.stdout, result.normalised_stderr()


def _guest(directory: Path) -> tuple[int, bytes, str]:
    """What qemu-img reads from the image: its bytes (or why it cannot)."""
    converted = run_qemu_img("convert", "-f", "qcow2", "-O", "raw", NAME, "guest.raw",
                             cwd=directory)
    raw = directory / "guest.raw"
    data = raw.read_bytes() if converted.rc == 0 else b""
    raw.unlink(missing_ok=True)
    return converted.rc, data, converted.normalised_stderr()


def _same_results(ours: Path, theirs: Path) -> None:
    """Both repaired copies check alike, read alike, list the same snapshots."""
    for args in (("check", "-f", "qcow2", NAME), ("snapshot", "-l", NAME)):
        assert _outputs(run_qemu_img(*args, cwd=ours)) == _outputs(run_qemu_img(*args,
                                                                                 cwd=theirs))
    assert _guest(ours) == _guest(theirs)
    assert Qcow2(ours / NAME).read(72, 8) == Qcow2(theirs / NAME).read(72, 8)
    if (theirs / DATA).exists():  # neither repair writes the data file
        assert (ours / DATA).read_bytes() == (theirs / DATA).read_bytes()


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("make", REPAIRED, ids=lambda make: make.__name__)
def test_repair_like_qemu(tmp_path: Path, make: Make, mode: str) -> None:
    ours, theirs = _copies(tmp_path, make)
    before = run_qemu_img("check", NAME, cwd=theirs)
    assert before.rc in (1, 2, 3), before.stdout  # damaged, as meant
    expected = run_qemu_img("check", "-r", mode, NAME, cwd=theirs)
    assert _outputs(run_instar("check", "-r", mode, NAME, cwd=ours)) == _outputs(expected)
    _same_results(ours, theirs)


def test_repair_json_like_qemu(tmp_path: Path) -> None:
    ours, theirs = _copies(tmp_path, overflow_and_leak)
    args = ("check", "--output=json", "-r", "all", NAME)
    assert _outputs(run_instar(*args, cwd=ours)) == _outputs(run_qemu_img(*args, cwd=theirs))
    _same_results(ours, theirs)


# --- refused: qemu's repair writes over metadata ----------------------------------------------


@_made(WITH_DATA)
def snapshot_l1_is_the_active_l1(image: Qcow2) -> None:
    """A snapshot naming the active L1 table: qemu's OFLAG_COPIED repair of
    the active L1 is stopped by its overlap check (the image marked corrupt,
    "Check failed"), some refcounts already written."""
    _add_snapshot(image)
    image.put(Qcow2(image.path).header.snapshots_offset, ">Q", image.header.l1_table_offset)
    for index in range(image.header.l1_size):
        slot = image.header.l1_table_offset + 8 * index
        if image.u64(slot):
            _refcount(image, (image.u64(slot) & L.L1E_OFFSET_MASK) >> image.bits, 1)
            image.put(slot, ">Q", image.u64(slot) | L.OFLAG_COPIED)


@_made()
def l2_table_is_the_refcount_table(image: Qcow2) -> None:
    image.put(image.l1_slot(0), ">Q", image.header.refcount_table_offset | L.OFLAG_COPIED)


@pytest.mark.parametrize(("make", "qemu_fails"), [(snapshot_l1_is_the_active_l1, True),
                                                  (l2_table_is_the_refcount_table, False)],
                         ids=["snapshot_l1_is_the_active_l1", "l2_table_is_the_refcount_table"])
def test_tables_over_metadata_refused(tmp_path: Path, make: Make, qemu_fails: bool) -> None:
    """qemu-img's repair fails half way (exit 1, "Check failed"), some of it
    written; instar refuses in one line, exit 1, the file unchanged. (An L2
    table over the refcount table: qemu's rebuild moves the table away
    before its OFLAG_COPIED repair writes there, and it completes; instar
    refuses all the same, not predicting that.)"""
    ours, theirs = _copies(tmp_path, make)
    qemu = run_qemu_img("check", "-r", "all", NAME, cwd=theirs)
    assert (qemu.rc == 1 and "Check failed" in qemu.stderr) == qemu_fails, qemu.stderr
    before = (ours / NAME).read_bytes()
    for mode in ("leaks", "all"):
        result = run_instar("check", "-r", mode, NAME, cwd=ours)
        assert (result.rc, result.stdout) == (1, ""), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "over other metadata is not supported yet" in result.stderr
        assert (ours / NAME).read_bytes() == before


# --- refused: qemu's repair frees guest data ---------------------------------------------------


@_made(writes=("write -P 1 0 1M",))
def l2_table_unaligned(image: Qcow2) -> None:
    slot = image.l1_slot(0)
    image.put(slot, ">Q", image.u64(slot) + 512)


def test_unaligned_l2_table_refused(tmp_path: Path) -> None:
    """qemu reads an L2 table at the unaligned offset, so the clusters the
    table at the aligned offset maps (the guest's data) are leaks to it, and
    it frees them: instar
    refuses, the file unchanged."""
    ours, theirs = _copies(tmp_path, l2_table_unaligned)
    qemu = run_qemu_img("check", "-r", "leaks", NAME, cwd=theirs)
    assert qemu.rc == 2 and "Repairing cluster 6 refcount=1 reference=0" in qemu.stderr
    assert _guest(theirs)[0] != 0  # and the guest's data is not readable either way
    before = (ours / NAME).read_bytes()
    for mode in ("leaks", "all"):
        result = run_instar("check", "-r", mode, NAME, cwd=ours)
        assert (result.rc, result.stdout) == (1, ""), result.stderr
        assert result.stderr.count("\n") == 1 and "not supported yet" in result.stderr
        assert (ours / NAME).read_bytes() == before


# --- the refcount table: where qemu's repair marks the image corrupt and fails -----------------


@_made(writes=("write -P 1 0 1M",))
def refcount_entry_reserved_bits(image: Qcow2) -> None:
    table = image.header.refcount_table_offset
    image.put(table, ">Q", image.u64(table) | 1)


@_made(writes=("write -P 1 0 1M",))
def refcount_block_unaligned(image: Qcow2) -> None:
    table = image.header.refcount_table_offset
    image.put(table, ">Q", image.u64(table) + 512)


def _marked_corrupt(directory: Path) -> bool:
    return bool(Qcow2(directory / NAME).u64(72) & L.INCOMPAT_CORRUPT)


def test_reserved_bits_leaks_like_qemu(tmp_path: Path) -> None:
    """Reserved bits in a refcount table entry, -r leaks: qemu stops before
    writing anything ("ERROR need to rebuild refcount structures"), and so
    does instar, with the same lines; both files unchanged."""
    ours, theirs = _copies(tmp_path, refcount_entry_reserved_bits)
    before = (ours / NAME).read_bytes()
    expected = run_qemu_img("check", "-r", "leaks", NAME, cwd=theirs)
    assert expected.rc == 1 and "need to rebuild" in expected.stderr
    assert _outputs(run_instar("check", "-r", "leaks", NAME, cwd=ours)) == _outputs(expected)
    assert (ours / NAME).read_bytes() == before == (theirs / NAME).read_bytes()


@pytest.mark.parametrize(("make", "modes"), [(refcount_entry_reserved_bits, ("all",)),
                                             (refcount_block_unaligned, ("leaks", "all"))],
                         ids=["reserved_bits", "unaligned_block"])
def test_qemu_marks_corrupt_refused(tmp_path: Path, make: Make, modes: tuple[str, ...]) -> None:
    """qemu's repair fails ("Check failed") and leaves the image marked
    corrupt (its rebuild's first write is stopped by its overlap check, or the
    unaligned block is a fatal corruption event): instar refuses in one line,
    the file unchanged."""
    ours, theirs = _copies(tmp_path, make)
    before = (ours / NAME).read_bytes()
    for mode in modes:
        shutil.rmtree(theirs)
        shutil.copytree(ours, theirs)
        qemu = run_qemu_img("check", "-r", mode, NAME, cwd=theirs)
        assert qemu.rc == 1 and "Marking image as corrupt" in qemu.stderr
        assert _marked_corrupt(theirs)
        result = run_instar("check", "-r", mode, NAME, cwd=ours)
        assert (result.rc, result.stdout) == (1, ""), result.stderr
        assert result.stderr.count("\n") == 1 and "not supported yet" in result.stderr
        assert (ours / NAME).read_bytes() == before


# --- snapshot tables qemu cannot read -----------------------------------------------------------


@_made(writes=("write -P 1 0 1M",), snapshot=True)
def snapshot_count_too_large(image: Qcow2) -> None:
    image.put(60, ">I", 70000)


def test_snapshot_count_too_large(tmp_path: Path) -> None:
    """Over 65536 snapshots: -r leaks fails reading the table as qemu does,
    nothing written; -r all (qemu drops the overhanging entries and reads
    the rest of the file as entries) is refused in one line, unchanged."""
    ours, theirs = _copies(tmp_path, snapshot_count_too_large)
    before = (ours / NAME).read_bytes()
    expected = run_qemu_img("check", "-r", "leaks", NAME, cwd=theirs)
    assert _outputs(run_instar("check", "-r", "leaks", NAME, cwd=ours)) == _outputs(expected)
    assert (ours / NAME).read_bytes() == before == (theirs / NAME).read_bytes()
    result = run_instar("check", "-r", "all", NAME, cwd=ours)
    assert (result.rc, result.stdout) == (1, ""), result.stderr
    assert result.stderr.count("\n") == 1 and "not supported yet" in result.stderr
    assert (ours / NAME).read_bytes() == before


@_made(writes=("write -P 1 0 1M",), snapshot=True)
def snapshot_l1_unreadable_and_leak(image: Qcow2) -> None:
    """A snapshot L1 table past qemu's I/O limit: its check fails ("I/O error in
    check_refcounts_l1") before comparing refcounts, so nothing is repaired."""
    image.put(Qcow2(image.path).header.snapshots_offset, ">Q", 0x7FFF_FFFF_C000_0000)
    _refcount(image, _append_cluster(image), 1)


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_failing_check_like_qemu(tmp_path: Path, mode: str) -> None:
    ours, theirs = _copies(tmp_path, snapshot_l1_unreadable_and_leak)
    before = (ours / NAME).read_bytes()
    expected = run_qemu_img("check", "-r", mode, NAME, cwd=theirs)
    assert expected.rc == 1 and "Check failed" in expected.stderr
    assert _outputs(run_instar("check", "-r", mode, NAME, cwd=ours)) == _outputs(expected)
    assert (ours / NAME).read_bytes() == before == (theirs / NAME).read_bytes()


# --- a stop at every write --------------------------------------------------------------------


def _check_json(directory: Path) -> tuple[int, dict[str, int]]:
    checked = run_qemu_img("check", "--output=json", "-f", "qcow2", NAME, cwd=directory)
    return checked.rc, json.loads(checked.stdout) if checked.stdout else {}


def _reads_as_before(directory: Path, original: tuple[int, bytes, str],
                     repaired: tuple[int, bytes, str], fixed: int) -> bool:
    """The image reads as the original, or (where the original cannot be read
    through, an unaligned cluster) as qemu's repaired copy; ``fixed``: the
    bytes the repair may have made readable (zeros) from guest 0."""
    now = _guest(directory)
    if now in (original, repaired):
        return True
    return now[0] == 0 and original[0] != 0 and now[1][fixed:] == repaired[1][fixed:]


@pytest.mark.parametrize("make", [data_file_snapshot_and_leak, data_file_l2_refcount_zero,
                                  overflow_rebuilt, preallocated_unaligned_and_leak,
                                  preallocated_unaligned_shared, snapshot_incomplete_and_leak,
                                  two_snapshots_extra_too_large_and_leak],
                         ids=lambda make: make.__name__)
def test_stop_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             make: Make) -> None:
    """Stopped after k changes, for every k until the repair completes: qemu-img
    reads the image as before (or, where it could not read a cluster, as
    after), and finds no more corruptions than before (or fails to check it
    as before: a snapshot table it cannot read until it is written anew)."""
    original, theirs = _copies(tmp_path, make)
    checked, found = _check_json(original)  # 1: qemu cannot read the snapshot table
    run_qemu_img("check", "-r", "all", NAME, cwd=theirs)
    before, after = _guest(original), _guest(theirs)
    directory = tmp_path / "k"

    def run() -> None:
        monkeypatch.chdir(directory)  # the copy made for this run
        repair_image(NAME, "all", "qcow2", allow=(str(directory),),
                     sandbox=SandboxSettings(mode="off"))

    for k, finished in stopped_runs(monkeypatch, original, directory, run, across=False):
        rc, report = _check_json(directory)
        assert rc in (0, 2, 3, checked), (k, report)
        assert not report.get("check-errors"), (k, report)
        assert report.get("corruptions", 0) <= found.get("corruptions", 0), (k, report)
        assert _reads_as_before(directory, before, after, 64 << 10), k
        if finished:
            assert k > 0
            assert _check_json(directory) == _check_json(theirs)
