"""The VDI reader against images made by qemu-img 7.2 and qemu-io.

Every corpus image (dynamic and static, written in and out of order, zeros
written, odd and empty sizes, converted from patterned data with holes, a
disk past the first 32 GiB page of the block map) is copied to raw by
``instar dd`` and ``qemu-img dd`` over the same windows and by both
converts, and the bytes compared; ``info`` (human and JSON), ``compare``
(strict mode and meter too) and probing must be qemu-img's. Discarded
blocks and a VirtualBox-style layout, which qemu-img does not write, are
made here by editing qemu's images. Damaged images are rows of
tests/test_conformance.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import (
    READ_WINDOWS,
    Result,
    open_image,
    pattern,
    qemu_img_ok,
    qemu_img_path,
    qemu_info,
    qemu_io,
    run_instar,
    run_qemu_img,
)
from instar.formats import registry
from instar.formats.vdi.layout import BLOCK_SIZE, DISCARDED, UNALLOCATED, Header, bmap_bytes
from instar.image import Extent, ExtentKind

MIB = 1 << 20
GIB = 1 << 30
WINDOWS = READ_WINDOWS


# --- the corpus ------------------------------------------------------------------------------


def _create(path: Path, size: str, *options: str) -> Path:
    args = ["create", "-q", "-f", "vdi"] + (["-o", ",".join(options)] if options else [])
    qemu_img_ok(*args, str(path), size)
    return path


def _write(path: Path, *commands: str) -> None:
    for command in commands:
        qemu_io(path, command, "vdi")


def bmap(path: Path) -> list[int]:
    """The block map entries of a VDI, as stored."""
    data = path.read_bytes()
    header = Header.parse(data[:512])
    start = header.offset_bmap
    return list(struct.unpack_from(f"<{header.blocks_in_image}I", data, start))


def set_entries(path: Path, entries: dict[int, int]) -> None:
    header = Header.parse(path.read_bytes()[:512])
    with path.open("r+b") as handle:
        for index, value in entries.items():
            handle.seek(header.offset_bmap + 4 * index)
            handle.write(struct.pack("<I", value))


def vbox_layout(source: Path, target: Path) -> None:
    """``source``'s disk laid out as VirtualBox lays out a VDI: its own text and
    a 0x190-byte header with the geometry, the data at 1 MiB (not right after
    the map), blocks stored in reverse order."""
    data = source.read_bytes()
    header = Header.parse(data[:512])
    entries = bmap(source)
    blocks = {index: data[header.offset_data + entry * BLOCK_SIZE:][:BLOCK_SIZE]
              for index, entry in enumerate(entries) if entry < DISCARDED}
    order = sorted(blocks, reverse=True)
    new_entries = [UNALLOCATED] * header.blocks_in_image
    for slot, index in enumerate(order):
        new_entries[index] = slot
    vbox = header._replace(
        text=b"<<< Oracle VM VirtualBox Disk Image >>>\n", header_size=0x190,
        offset_data=MIB, blocks_allocated=len(order), geometry=(1024, 255, 63),
        description=b"made for instar's tests")
    with target.open("wb") as handle:
        handle.write(vbox.pack())
        handle.seek(header.offset_bmap)
        handle.write(struct.pack(f"<{len(new_entries)}I", *new_entries))
        for slot, index in enumerate(order):
            handle.seek(MIB + slot * BLOCK_SIZE)
            handle.write(blocks[index])
        handle.truncate(MIB + len(order) * BLOCK_SIZE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu-made images, and two edited ones (discarded blocks, VirtualBox's layout)."""
    directory = tmp_path_factory.mktemp("vdi-corpus")
    images: dict[str, Path] = {}
    dynamic = _create(directory / "dynamic.vdi", "7M")
    # Later offsets first: the block map is not in guest order.
    _write(dynamic, "write -P 0x44 6143k 1k", "write -P 0x22 3M 1M", "write -z 3500k 100k",
           "write -P 0x11 0 100k", "write -P 0x33 5000k 513")  # fmt: skip
    images["dynamic"] = dynamic
    zeroed = _create(directory / "zeroed.vdi", "3M")
    _write(zeroed, "write -z 1M 1M", "write -P 0x12 2M 4k")
    images["zeroed"] = zeroed
    static = _create(directory / "static.vdi", "3M", "static=on")
    _write(static, "write -P 0x55 1M 5k", "write -P 0x66 3000k 4k")
    images["static"] = static
    odd = _create(directory / "odd.vdi", "1000000")
    _write(odd, "write -P 0x77 975k 1k", "write -P 0x78 1k 3k")
    images["odd"] = odd
    raw = directory / "patterned.raw"
    raw.write_bytes(pattern(3 * MIB) + bytes(2 * MIB) + pattern(MIB + 1234, seed=3))
    for name, options in [("converted", []), ("converted-static", ["-o", "static=on"])]:
        images[name] = directory / f"{name}.vdi"
        qemu_img_ok("convert", "-O", "vdi", *options, str(raw), str(images[name]))
    images["empty"] = _create(directory / "empty.vdi", "0")
    images["empty-static"] = _create(directory / "empty-static.vdi", "0", "static=on")
    discarded = directory / "discarded.vdi"
    discarded.write_bytes(images["converted"].read_bytes())
    set_entries(discarded, {0: DISCARDED, 4: DISCARDED})
    images["discarded"] = discarded
    images["vbox"] = directory / "vbox.vdi"
    vbox_layout(images["converted"], images["vbox"])
    return images


NAMES = ["dynamic", "zeroed", "static", "odd", "converted", "converted-static", "empty",
         "empty-static", "discarded", "vbox"]


def _dd_both(tmp_path: Path, image: Path, args: list[str]) -> tuple[bytes, bytes]:
    ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
    for path in (ours, theirs):
        path.unlink(missing_ok=True)
    result = run_instar("dd", *args, f"if={image}", f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", *args, f"if={image}", f"of={theirs}")
    return ours.read_bytes(), theirs.read_bytes()


@pytest.mark.parametrize("fmt", [[], ["-f", "vdi"]], ids=["probed", "given"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", NAMES)
def test_dd_to_raw_matches_qemu(
    qemu_img: str, corpus: dict[str, Path], tmp_path: Path, name: str, window: list[str],
    fmt: list[str],
) -> None:
    ours, theirs = _dd_both(tmp_path, corpus[name], [*fmt, *window])
    assert ours == theirs


@pytest.mark.parametrize("name", NAMES)
def test_convert_to_raw_matches_qemu(
    qemu_img: str, corpus: dict[str, Path], tmp_path: Path, name: str
) -> None:
    ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
    result = run_instar("convert", "-O", "raw", str(corpus[name]), str(ours))
    assert result.rc == 0, result.stderr
    qemu_img_ok("convert", "-O", "raw", str(corpus[name]), str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_size == qemu_info(corpus[name])["virtual-size"]


def test_corpus_is_what_it_claims(qemu_img: str, corpus: dict[str, Path]) -> None:
    """The edits and qemu's layouts the tests rely on, checked on the files."""
    assert bmap(corpus["dynamic"]) == [2, UNALLOCATED, UNALLOCATED, 1, 3, 0, UNALLOCATED]
    assert bmap(corpus["zeroed"]) == [UNALLOCATED, 0, 1]  # qemu stores zeros written
    assert bmap(corpus["static"]) == [0, 1, 2]
    assert bmap(corpus["converted"]) == [0, 1, 2, UNALLOCATED, UNALLOCATED, 3, 4]
    assert bmap(corpus["discarded"]) == [DISCARDED, 1, 2, UNALLOCATED, DISCARDED, 3, 4]
    assert bmap(corpus["vbox"]) == [4, 3, 2, UNALLOCATED, UNALLOCATED, 1, 0]
    assert qemu_img_ok("check", str(corpus["vbox"])).startswith("No errors")
    assert Header.parse(corpus["static"].read_bytes()[:512]).image_type == 2


@pytest.mark.parametrize("name", NAMES)
def test_probe_and_size_match_qemu(qemu_img: str, corpus: dict[str, Path], name: str) -> None:
    path = corpus[name]
    header = path.read_bytes()[: registry.PROBE_SIZE]
    assert registry.probe(header, str(path)).name == "vdi" == qemu_info(path)["format"]
    with open_image(path) as image:
        assert image.virtual_size == qemu_info(path, "vdi")["virtual-size"]


@pytest.mark.parametrize("options", [[], ["--output=json"], ["-f", "vdi", "--output", "json"],
                                     ["--backing-chain"]], ids=" ".join)
@pytest.mark.parametrize("name", NAMES)
def test_info_matches_qemu(
    qemu_img: str, corpus: dict[str, Path], name: str, options: list[str]
) -> None:
    directory = corpus[name].parent
    qemu = run_qemu_img("info", *options, corpus[name].name, cwd=directory)
    ours = run_instar("info", *options, corpus[name].name, cwd=directory)
    assert qemu.rc == 0, qemu.stderr
    assert (ours.rc, ours.stdout, ours.stderr) == (qemu.rc, qemu.stdout, qemu.stderr)


@pytest.mark.parametrize("name", ["dynamic", "zeroed", "static", "converted-static", "vbox",
                                  "discarded"])
def test_extents_match_qemu_map_without_reading_data(
    qemu_img: str, corpus: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATA extents are qemu's data that is not zero (a static image's holes
    are zero, as qemu finds them in the file); asking reads the block map
    (a page, when first needed) and no data."""
    path = corpus[name]
    mapped = json.loads(qemu_img_ok("map", "--output=json", "-f", "vdi", str(path)))
    qemu_data = [(e["start"], e["length"]) for e in mapped if e["data"] and not e["zero"]]
    header = Header.parse(path.read_bytes()[:512])
    bmap_end = header.offset_bmap + bmap_bytes(header.blocks_in_image)
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def recorded(fd: int, length: int, offset: int) -> bytes:
        reads.append((offset, length))
        return real_pread(fd, length, offset)

    with open_image(path, "vdi") as image:
        monkeypatch.setattr(os, "pread", recorded)
        extents = list(image.extents(0, image.virtual_size))
        monkeypatch.undo()
    assert reads and all(header.offset_bmap <= at and at + n <= bmap_end for at, n in reads)
    assert sum(e.length for e in extents) == image.virtual_size
    ours = [(e.offset, e.length) for e in extents if e.kind is ExtentKind.DATA]
    assert ours == _merge(qemu_data)
    assert ours  # every one of these has data


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in ranges:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


# --- compare ----------------------------------------------------------------------------------

COMPARE_PAIRS = [
    ("converted.vdi", "converted-static.vdi"),
    ("converted.vdi", "patterned.raw"),
    ("patterned.raw", "discarded.vdi"),
    ("discarded.vdi", "converted.vdi"),
    ("vbox.vdi", "converted.vdi"),
    ("dynamic.vdi", "static.vdi"),
    ("static.vdi", "zeroed.vdi"),
    ("empty.vdi", "empty-static.vdi"),
    ("odd.vdi", "dynamic.vdi"),
]


def _qemu_compare(args: list[str], cwd: Path) -> Result:
    """qemu-img compare, its progress meter's carriage returns kept."""
    proc = subprocess.run([qemu_img_path(), "compare", *args], cwd=cwd, capture_output=True,
                          timeout=300, check=False)
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.mark.parametrize("options", [[], ["-s"], ["-p"], ["-s", "-p"], ["-f", "vdi"]],
                         ids=lambda o: " ".join(o) or "plain")
@pytest.mark.parametrize("pair", COMPARE_PAIRS, ids="~".join)
def test_compare_matches_qemu(
    qemu_img: str, corpus: dict[str, Path], pair: tuple[str, str], options: list[str]
) -> None:
    if options == ["-f", "vdi"] and not pair[0].endswith(".vdi"):
        pair = (pair[1], pair[0])
    directory = corpus["dynamic"].parent
    qemu = _qemu_compare([*options, *pair], directory)
    ours = run_instar("compare", *options, *pair, cwd=directory)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr())


# --- past the first page of the block map --------------------------------------------------------


@pytest.fixture(scope="module")
def paged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """65 GiB: three pages of the block map, data across the first page boundary
    (32 GiB), in the last page and at the start, written last first."""
    path = _create(tmp_path_factory.mktemp("vdi-paged") / "paged.vdi", "65G")
    _write(path, "write -P 0x79 64G 1M", "write -P 0x77 32767M 2M", "write -P 0x78 1M 4k",
           "write -P 0x7a 48G 64k")  # fmt: skip
    return path


@pytest.mark.parametrize("window", [["bs=1M", "skip=32766", "count=32770"],
                                    ["bs=1M", "count=3"],
                                    ["bs=64k", "skip=786431", "count=786434"],
                                    ["bs=1M", "skip=65535", "count=65537"]],
                         ids=" ".join)
def test_paged_windows_match_qemu(
    qemu_img: str, paged: Path, tmp_path: Path, window: list[str]
) -> None:
    ours, theirs = _dd_both(tmp_path, paged, window)
    assert ours == theirs and ours.strip(b"\0")


def test_paged_extents_and_compare(qemu_img: str, paged: Path, tmp_path: Path) -> None:
    mapped = json.loads(qemu_img_ok("map", "--output=json", str(paged)))
    qemu_data = _merge([(e["start"], e["length"]) for e in mapped if e["data"]])
    with open_image(paged) as image:
        extents = list(image.extents(0, image.virtual_size))
    assert [(e.offset, e.length) for e in extents if e.kind is ExtentKind.DATA] == qemu_data
    copy = tmp_path / "copy.vdi"
    qemu_img_ok("convert", "-O", "vdi", str(paged), str(copy))
    for options in ([], ["-s"]):
        qemu = _qemu_compare([*options, str(paged), str(copy)], tmp_path)
        ours = run_instar("compare", *options, str(paged), str(copy))
        assert (ours.rc, ours.stdout) == (qemu.rc, qemu.stdout) == (0, "Images are identical.\n")


def test_block_map_larger_than_one_table(qemu_img: str, tmp_path: Path) -> None:
    """An empty 10 TiB disk: a 40 MiB block map, more than instar reads of any
    one table at once; read as pages only where a range needs them, so a
    window at its end opens and reads at once."""
    blocks = 10 << 20
    path = _create(tmp_path / "huge.vdi", str(blocks * MIB))
    assert path.stat().st_size == 512 + blocks * 4
    out = tmp_path / "end.raw"
    result = run_instar("dd", "bs=1M", f"skip={blocks - 2}", f"if={path}", f"of={out}")
    assert result.rc == 0, result.stderr
    assert out.read_bytes() == bytes(2 * MIB)
    with open_image(path) as image:
        assert image.virtual_size == qemu_info(path)["virtual-size"] == blocks * MIB
        assert list(image.extents(0, image.virtual_size)) == [
            Extent(0, blocks * MIB, ExtentKind.ZERO)]


def test_bmap_bytes_rounds_to_sectors() -> None:
    assert [bmap_bytes(n) for n in (0, 1, 128, 129)] == [0, 512, 512, 1024]
