"""Reading qcow2: `instar dd` to raw against `qemu-img dd` to raw, byte for byte.

Every input is made by qemu-img and qemu-io (patterned data, holes, written
zeros, discards, compression, subclusters, backing chains, data files), and
each window runs through both programs with the same operands. Damaged
images (corrupted headers and tables) are rows of tests/test_conformance.py.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import (
    assert_same,
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_io,
    qemu_io_path,
    require_qemu,
    run_instar,
    run_qemu_img,
)
from hostile_corpus import COPIED, Qcow2
from test_compare import compare_same_as_qemu

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

RAW_SIZE = (3 << 20) + 1000  # qcow2 images of an odd size: the last cluster is partial
COMMON_WRITES = [
    "write -z 64k 128k",  # zero clusters over data
    "discard 2560k 128k",
    "write -P 0x33 1100k 10k",  # a partial cluster in the zero stretch
    "write -z -u 384k 64k",
]


def _source_raw(path: Path) -> None:
    data = bytearray(pattern(RAW_SIZE, seed=11))
    data[1 << 20 : 2 << 20] = bytes(1 << 20)  # a zero stretch that convert leaves unallocated
    path.write_bytes(bytes(data))


def _convert(directory: Path, name: str, *options: str, writes: list[str] = COMMON_WRITES) -> None:
    qemu_img_ok("convert", "-f", "raw", "-O", "qcow2", *options, str(directory / "source.raw"),
                str(directory / name))
    for command in writes:
        qemu_io(directory / name, command, "qcow2")


def _create(directory: Path, name: str, size: str, *options: str, writes: list[str]) -> None:
    # qemu names the data file relative to its working directory: create it beside the image.
    qemu_img_ok("create", "-q", "-f", "qcow2", *options, name, size, cwd=directory)
    for command in writes:
        proc = subprocess.run([qemu_io_path(), "-f", "qcow2", "-c", command, name], cwd=directory,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout


def _drop_backing_format(path: Path) -> None:
    """Rename the backing-format extension to an unknown type: qemu then probes the backing."""
    data = bytearray(path.read_bytes())
    index = data.index(struct.pack(">I", 0xE2792ACA))
    data[index : index + 4] = struct.pack(">I", 0x12345678)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every reader input, built once for the module."""
    require_qemu()
    d = tmp_path_factory.mktemp("qcow2-inputs")
    _source_raw(d / "source.raw")
    _convert(d, "c64k.qcow2")
    _convert(d, "c512.qcow2", "-o", "cluster_size=512")
    _convert(d, "c2m.qcow2", "-o", "cluster_size=2M")
    compressed_writes = ["write -z 64k 128k", "write -P 0x44 200k 4k", "discard 2560k 64k"]
    _convert(d, "zlib.qcow2", "-c", writes=compressed_writes)
    _convert(d, "zstd.qcow2", "-c", "-o", "compression_type=zstd", writes=compressed_writes)
    _convert(d, "v2.qcow2", "-o", "compat=0.10")
    # A chain: a shorter raw base, a qcow2 over it, a qcow2 over that.
    (d / "base.raw").write_bytes(pattern(2 << 20, seed=5))
    size = str((3 << 20) + 1536)
    _create(d, "mid.qcow2", size, "-b", "base.raw", "-F", "raw", writes=[
        "write -P 0x61 0 64k", "write -P 0x62 1536k 100k", "write -z 256k 64k",
        "write -P 0x63 2100k 64k",
    ])
    _create(d, "top.qcow2", size, "-b", "mid.qcow2", "-F", "qcow2", writes=[
        "write -P 0x71 32k 64k", "write -z 1536k 32k", "discard 0 64k", "write -P 0x72 3m 1k",
    ])
    shutil.copy(d / "top.qcow2", d / "top-nofmt.qcow2")
    _drop_backing_format(d / "top-nofmt.qcow2")
    _create(d, "extl2.qcow2", size, "-o", "extended_l2=on,cluster_size=64k", "-b", "base.raw",
            "-F", "raw", writes=[
                "write -P 0x11 4k 2k", "write -P 0x22 70k 1k", "write -z 8k 4k",
                "write -P 0x33 1M 200k", "write -z 2600k 6k", "write -P 0x34 2200k 3k",
            ])
    data_writes = ["write -P 0x81 0 64k", "write -P 0x82 1M 100k", "write -z 100k 64k"]
    _create(d, "datafile.qcow2", "3M", "-o", "data_file=datafile.data", writes=data_writes)
    _create(d, "datafile-raw.qcow2", "3M", "-o", "data_file=dfr.data,data_file_raw=on",
            writes=data_writes)
    # Internal snapshots (shared clusters, COPIED flags cleared) and preallocated metadata.
    _convert(d, "snap.qcow2", writes=[])
    qemu_img_ok("snapshot", "-c", "s1", str(d / "snap.qcow2"))
    qemu_io(d / "snap.qcow2", "write -P 0x12 100k 200k", "qcow2")
    qemu_io(d / "snap.qcow2", "write -z 1M 64k", "qcow2")
    qemu_img_ok("snapshot", "-c", "s2", str(d / "snap.qcow2"))
    qemu_io(d / "snap.qcow2", "discard 0 64k", "qcow2")
    _create(d, "prealloc.qcow2", "3M", "-o", "preallocation=metadata",
            writes=["write -P 0x13 100k 200k", "write -z 1M 64k"])
    (d / "small.raw").write_bytes(pattern(70_000, seed=3))
    qemu_img_ok("convert", "-f", "raw", "-O", "qcow2", str(d / "small.raw"),
                str(d / "small.qcow2"))
    qemu_io(d / "small.qcow2", "write -z 10k 5k", "qcow2")
    return d


IMAGES = [
    "c64k.qcow2", "c512.qcow2", "c2m.qcow2", "zlib.qcow2", "zstd.qcow2", "v2.qcow2",
    "mid.qcow2", "top.qcow2", "top-nofmt.qcow2", "extl2.qcow2", "datafile.qcow2",
    "datafile-raw.qcow2", "small.qcow2", "snap.qcow2", "prealloc.qcow2",
]

# "END" stands for the image's size in 512-byte blocks.
WINDOWS: list[list[str]] = [
    [],
    ["bs=65536", "skip=2", "count=4"],
    ["bs=1000", "count=3"],
    ["bs=513", "skip=1", "count=3"],
    ["count=0"],
    ["skip=END"],
    ["skip=END+1"],
    ["bs=1M", "count=2"],
    ["bs=1999"],
    ["count=1k"],
    ["bs=0x200"],
    ["bs=0.5k"],
    ["bs=4M"],
]


def _operands(window: list[str], image: Path) -> list[str]:
    blocks = int(qemu_info(image)["virtual-size"]) // 512  # type: ignore[call-overload]
    return [
        w.replace("END+1", str(blocks + 1)).replace("END", str(blocks)) for w in window
    ]


def dd_both(directory: Path, out_dir: Path, name: str, operands: list[str]) -> tuple[Path, Path]:
    """qemu-img dd and instar dd, same operands; same exit status and stderr."""
    qemu_out, ours_out = out_dir / "qemu.raw", out_dir / "instar.raw"
    source = f"if={directory / name}"
    # Run in the images' directory: qemu opens a data file relative to it.
    qemu = run_qemu_img("dd", *operands, source, f"of={qemu_out}", cwd=directory)
    ours = run_instar("dd", *operands, source, f"of={ours_out}", cwd=directory)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    return qemu_out, ours_out


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", IMAGES)
def test_window_parity(name: str, window: list[str], images: Path, tmp_path: Path) -> None:
    qemu_out, ours_out = dd_both(images, tmp_path, name, _operands(window, images / name))
    assert ours_out.read_bytes() == qemu_out.read_bytes()


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("window", [["bs=5"], ["bs=5", "skip=3", "count=9000"]],
                         ids=lambda w: " ".join(w))
def test_bs5_on_small_image(window: list[str], images: Path, tmp_path: Path) -> None:
    qemu_out, ours_out = dd_both(images, tmp_path, "small.qcow2", window)
    assert ours_out.read_bytes() == qemu_out.read_bytes()


@pytest.mark.usefixtures("qemu_img")
def test_whole_chain_equals_convert(images: Path, tmp_path: Path) -> None:
    """The three-deep chain, read in one go, equals qemu-img convert's reading."""
    from helpers import qemu_read_raw

    out = tmp_path / "out.raw"
    assert run_instar("dd", "bs=4M", f"if={images / 'top.qcow2'}", f"of={out}").rc == 0
    assert out.read_bytes() == qemu_read_raw(images / "top.qcow2", tmp_path)


# --- the Image API: extents, coalescing -------------------------------------


def _open(path: Path) -> tuple[object, object]:
    from instar.opener import ImageOpener
    from instar.safety import PathPolicy

    opener = ImageOpener(PathPolicy([os.path.dirname(str(path))]))
    return opener, opener.open(str(path))


def test_extents_report_backing_and_zeros(images: Path) -> None:
    from instar.image import ExtentKind

    opener, image = _open(images / "top.qcow2")
    try:
        extents = list(image.extents(0, image.virtual_size))  # type: ignore[attr-defined]
        assert extents[0].offset == 0 and sum(e.length for e in extents) == image.virtual_size  # type: ignore[attr-defined]
        kinds = {e.kind for e in extents}
        # top: written data, zero clusters; mid and base show through as data;
        # past the 2 MiB base everything unwritten is zero.
        assert kinds <= {ExtentKind.DATA, ExtentKind.ZERO}
        assert ExtentKind.ZERO in kinds and ExtentKind.DATA in kinds
        tail = [e for e in extents if e.offset >= 2300 << 10]
        assert tail and all(
            e.kind is ExtentKind.ZERO or e.offset < (3 << 20) + 1024 for e in tail
        )
    finally:
        opener.close()  # type: ignore[attr-defined]


def test_extents_without_backing_are_unallocated(images: Path) -> None:
    from instar.image import Extent, ExtentKind

    opener, image = _open(images / "c64k.qcow2")
    try:
        extents = list(image.extents(1 << 20, 64 << 10))  # type: ignore[attr-defined]
        assert extents == [Extent(1 << 20, 64 << 10, ExtentKind.UNALLOCATED)]
    finally:
        opener.close()  # type: ignore[attr-defined]


def _record_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    from instar.files import InputFile

    reads: list[tuple[int, int]] = []
    original = InputFile.pread

    def pread(self: InputFile, offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return original(self, offset, length)

    monkeypatch.setattr(InputFile, "pread", pread)
    return reads


def test_extents_read_only_metadata(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opener, image = _open(images / "c64k.qcow2")
    try:
        reads = _record_reads(monkeypatch)
        list(image.extents(0, image.virtual_size))  # type: ignore[attr-defined]
        assert reads, "the L2 table must have been read"
        assert all(length == 65536 for _, length in reads)  # metadata clusters only
        # The L2 table, and the refcount table and block (read once, for the
        # aliasing check and qemu's guess of metadata preallocation).
        reftable = image.driver.header.refcount_table_offset  # type: ignore[attr-defined]
        data = (images / "c64k.qcow2").read_bytes()
        refblock = int.from_bytes(data[reftable : reftable + 8], "big")
        l2_offsets = {offset for offset, _ in reads} - {reftable, refblock}
        assert len(l2_offsets) == 1
    finally:
        opener.close()  # type: ignore[attr-defined]


def test_contiguous_clusters_read_with_one_pread(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opener, image = _open(images / "c64k.qcow2")
    try:
        image.read(512 << 10, 64 << 10)  # type: ignore[attr-defined]  # loads the L2 table
        reads = _record_reads(monkeypatch)
        data = image.read(448 << 10, 512 << 10)  # type: ignore[attr-defined]
        assert data == (images / "source.raw").read_bytes()[448 << 10 : 960 << 10]
        assert len(reads) == 1, reads
    finally:
        opener.close()  # type: ignore[attr-defined]


# --- backing files outside the allowed directories ---------------------------------


def test_backing_outside_allowed_directory(tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTAR_ALLOW")  # the default policy: nothing allowed
    require_qemu()
    elsewhere = tmp_path / "elsewhere"
    here = tmp_path / "here"
    elsewhere.mkdir()
    here.mkdir()
    (elsewhere / "base.raw").write_bytes(pattern(1 << 20))
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", str(elsewhere / "base.raw"), "-F", "raw",
                str(here / "top.qcow2"))
    out = here / "out.raw"
    result = run_instar("dd", f"if={here / 'top.qcow2'}", f"of={out}", cwd=here)
    assert result.rc == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert str(elsewhere / "base.raw") in result.stderr
    assert not out.exists()
    # Allowed explicitly, the same image copies.
    allowed = run_instar("dd", "--allow", str(elsewhere), f"if={here / 'top.qcow2'}",
                         f"of={out}", cwd=here)
    assert allowed.rc == 0, allowed.stderr
    assert out.read_bytes() == pattern(1 << 20)


# --- runs over L2 entries written by hand -------------------------------------------


def _random_l2_image(path: Path, seed: int) -> None:
    """64 clusters of stretches of every non-compressed kind: stored data
    contiguous in the file (the COPIED flag set, or set and cleared at random
    along one stretch), zero clusters with and without a host cluster, and
    unallocated ones. A stretch's entries continue each other, so the reader
    grows one run over them; a cleared COPIED flag must not end it."""
    rnd = random.Random(seed)
    image = Qcow2(4 << 20, 16)
    cluster = 0
    while cluster < 64:
        kind = rnd.choice(["data", "data", "mixed", "zero", "zero allocated", "unallocated"])
        count = min(rnd.randint(1, 6), 64 - cluster)
        if kind in ("data", "mixed", "zero allocated"):
            fill = bytes([rnd.randrange(1, 256)]) * (count * image.cluster)
            host = image.alloc(fill, clusters=count)
            for index in range(count):
                copied = COPIED if kind != "mixed" or rnd.random() < 0.5 else 0
                zero = 1 if kind == "zero allocated" else 0
                image.entry(cluster + index, (host + index * image.cluster) | copied | zero)
        elif kind == "zero":
            for index in range(count):
                image.entry(cluster + index, 1)
        cluster += count
    image.write(path)


@pytest.mark.parametrize("seed", range(8))
def test_hand_written_l2_runs_like_qemu(seed: int, tmp_path: Path) -> None:
    require_qemu()
    _random_l2_image(tmp_path / "a.qcow2", seed)
    _random_l2_image(tmp_path / "b.qcow2", seed + 100)
    assert_same(["map", "--output=json", "a.qcow2"], tmp_path)
    assert_same(["map", "a.qcow2"], tmp_path)
    # The progress meter advances by qemu's answers; strict mode compares them.
    compare_same_as_qemu(["-p", "a.qcow2", "b.qcow2"], tmp_path)
    compare_same_as_qemu(["-s", "-p", "a.qcow2", "a.qcow2"], tmp_path)
