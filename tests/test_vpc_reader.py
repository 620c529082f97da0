"""The VHD ("vpc") reader against images made by qemu-img 7.2 and qemu-io.

Every corpus image is copied to raw by ``instar dd`` and ``qemu-img dd`` over
the same windows and the bytes compared. Differencing disks, which qemu-img
cannot create (and reads without their parent), are built here with instar's
layout code and checked against a computed expectation and against pyvhdi.
Damaged images (and children with bad parents) are rows of tests/test_conformance.py.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    READ_WINDOWS,
    open_image,
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_io,
    run_instar,
    run_qemu_img,
)
from instar.formats import registry
from instar.formats.vpc.layout import (
    DISK_DIFFERENCING,
    UNALLOCATED,
    DynamicHeader,
    Footer,
    ParentLocator,
    bitmap_size,
    declared_size,
)
from instar.formats.vpc.reader import bitmap_runs
from instar.image import ExtentKind

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

MIB = 1 << 20
BLOCK = 2 * MIB
WINDOWS = READ_WINDOWS


# --- the corpus ------------------------------------------------------------------------------


def _create(path: Path, size: str, *options: str) -> Path:
    args = ["create", "-q", "-f", "vpc"] + (["-o", ",".join(options)] if options else [])
    qemu_img_ok(*args, str(path), size)
    return path


def _write(path: Path, *commands: str) -> None:
    for command in commands:
        qemu_io(path, command, "vpc")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu-made images: dynamic, fixed, odd sizes, force_size, converted, empty."""
    directory = tmp_path_factory.mktemp("vpc-corpus")
    images: dict[str, Path] = {}
    dynamic = _create(directory / "dynamic.vhd", "7M")
    _write(dynamic, "write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -z 3500k 100k",
           "write -P 0x33 5000k 513", "write -P 0x44 6143k 1k")  # fmt: skip
    images["dynamic"] = dynamic
    fixed = _create(directory / "fixed.vhd", "3M", "subformat=fixed")
    _write(fixed, "write -P 0x55 1M 5k", "write -P 0x66 3000k 4k")
    images["fixed"] = fixed
    odd = _create(directory / "odd.vhd", "1000000")
    _write(odd, "write -P 0x77 985k 1k", "write -P 0x78 1k 3k")
    images["odd"] = odd
    forced = _create(directory / "forced.vhd", str(5 * MIB + 512), "force_size=on")
    _write(forced, "write -P 0x79 5m 512", "write -P 0x7a 0 512")
    images["forced"] = forced
    forced_fixed = _create(directory / "forced-fixed.vhd", "1000000",
                           "force_size=on,subformat=fixed")  # fmt: skip
    _write(forced_fixed, "write -P 0x7b 976k 1k")
    images["forced-fixed"] = forced_fixed
    raw = directory / "patterned.raw"
    raw.write_bytes(pattern(3 * MIB) + bytes(2 * MIB) + pattern(MIB + 1234, seed=3))
    converted = directory / "converted.vhd"
    qemu_img_ok("convert", "-O", "vpc", str(raw), str(converted))
    images["converted"] = converted
    images["empty"] = _create(directory / "empty.vhd", "0")
    return images


FIXED = {"fixed", "forced-fixed"}


def _fmt(name: str) -> list[str]:
    return ["-f", "vpc"] if name in FIXED else []


def _dd_both(tmp_path: Path, image: Path, args: list[str]) -> tuple[bytes, bytes]:
    ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
    for path in (ours, theirs):
        path.unlink(missing_ok=True)
    result = run_instar("dd", *args, f"if={image}", f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", *args, f"if={image}", f"of={theirs}")
    return ours.read_bytes(), theirs.read_bytes()


NAMES = ["dynamic", "fixed", "odd", "forced", "forced-fixed", "converted", "empty"]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", NAMES)
def test_dd_to_raw_matches_qemu(
    qemu_img: str, corpus: dict[str, Path], tmp_path: Path, name: str, window: list[str]
) -> None:
    ours, theirs = _dd_both(tmp_path, corpus[name], [*_fmt(name), *window])
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_probes_as_raw(
    qemu_img: str, corpus: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """Without -f, qemu (and instar) see a fixed VHD as raw: footer included."""
    ours, theirs = _dd_both(tmp_path, corpus[name], [])
    assert ours == theirs
    assert len(ours) == corpus[name].stat().st_size
    assert qemu_info(corpus[name])["format"] == "raw"


@pytest.mark.parametrize("name", NAMES)
def test_probe_and_size_match_qemu(qemu_img: str, corpus: dict[str, Path], name: str) -> None:
    path = corpus[name]
    header = path.read_bytes()[: registry.PROBE_SIZE]
    expected = "raw" if name in FIXED else "vpc"
    assert registry.probe(header, str(path)).name == expected == qemu_info(path)["format"]
    with open_image(path, "vpc") as image:
        assert image.virtual_size == qemu_info(path, "vpc")["virtual-size"]


@pytest.mark.parametrize("name", ["dynamic", "converted", "odd"])
def test_extents_match_qemu_map_without_reading(
    qemu_img: str, corpus: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATA extents are qemu's allocated blocks; asking for them reads nothing."""
    path = corpus[name]
    mapped = json.loads(qemu_img_ok("map", "--output=json", "-f", "vpc", str(path)))
    qemu_data = [(e["start"], e["length"]) for e in mapped if e["data"]]
    with open_image(path, "vpc") as image:

        def forbidden(*args: object) -> bytes:
            raise AssertionError("extents() read from the file")

        monkeypatch.setattr(os, "preadv", forbidden)
        monkeypatch.setattr(os, "pread", forbidden)
        extents = list(image.extents(0, image.virtual_size))
        monkeypatch.undo()
    assert sum(e.length for e in extents) == image.virtual_size
    ours = [(e.offset, e.length) for e in extents if e.kind is ExtentKind.DATA]
    assert ours == _merge(qemu_data)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in ranges:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


def test_vpc_to_vpc_matches_qemu(qemu_img: str, corpus: dict[str, Path], tmp_path: Path) -> None:
    ours, theirs = tmp_path / "i.vhd", tmp_path / "q.vhd"
    source = corpus["dynamic"]
    assert run_instar("dd", "-O", "vpc", "bs=4k", f"if={source}", f"of={ours}").rc == 0
    qemu_img_ok("dd", "-O", "vpc", "bs=4k", f"if={source}", f"of={theirs}")
    compare = run_qemu_img("compare", str(ours), str(theirs))
    assert compare.rc == 0, compare.stdout


@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotests_159(qemu_img: str, tmp_path: Path, bs: str) -> None:
    """qemu-iotests 159 for vpc: a 1 MiB vpc of 0x0a, dd -O vpc, compare identical."""
    src = _create(tmp_path / "src.vhd", "1M")
    _write(src, "write -P 0x0a 0 1M")
    out = tmp_path / "out.vhd"
    assert run_instar("dd", "-f", "vpc", "-O", "vpc", f"bs={bs}", f"if={src}", f"of={out}").rc == 0
    compare = run_qemu_img("compare", "-f", "vpc", "-F", "vpc", str(src), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout


# --- sizes: which footer field qemu believes ----------------------------------------------------


def _rewrite_footer(path: Path, change: Callable[[Footer], None]) -> None:
    """Edit both footers of a dynamic image (or the only one of a fixed image)."""
    data = bytearray(path.read_bytes())
    offsets = [len(data) - 512]
    if data[:8] == b"conectix":
        offsets.append(0)
    for at in offsets:
        footer = Footer.parse(bytes(data[at : at + 512]))
        change(footer)
        data[at : at + 512] = footer.pack()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "creator", [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", b"vpc ", b"vs  "]
)
def test_size_rule_by_creator(qemu_img: str, tmp_path: Path, creator: bytes) -> None:
    """current_size (7 MiB) or C*H*S (7.01 MiB): whichever qemu picks for the creator."""
    path = _create(tmp_path / "c.vhd", "7M")

    def change(footer: Footer) -> None:
        footer.creator_app = creator
        footer.current_size = 7 * MIB

    _rewrite_footer(path, change)
    with open_image(path) as image:
        assert image.virtual_size == qemu_info(path)["virtual-size"]
    chs = declared_size(7 * MIB)  # what qemu created: its C*H*S
    assert chs != 7 * MIB
    expected = 7 * MIB if creator in (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0") else chs
    assert qemu_info(path)["virtual-size"] == expected


# --- differencing disks, built here -------------------------------------------------------------


def _utf16le(text: str) -> bytes:
    return text.encode("utf-16-le")


def make_child(
    path: Path,
    parent: Path,
    blocks: dict[int, tuple[bytes, bytes]],
    locators: list[tuple[bytes, bytes]],
    parent_name: str = "",
) -> None:
    """A differencing VHD over ``parent``: ``blocks`` maps a block index to
    (bitmap, 2 MiB of data); ``locators`` are (platform code, locator bytes)."""
    parent_footer = Footer.parse(parent.read_bytes()[:512])
    entries = -(-parent_footer.virtual_size() // BLOCK)
    table_bytes = -(-entries * 4 // 512) * 512
    locator_at = 1536 + table_bytes
    entries_list: list[ParentLocator] = []
    blobs = b""
    for platform, blob in locators:
        space = -(-len(blob) // 512) * 512
        entries_list.append(ParentLocator(platform, space, len(blob), locator_at + len(blobs)))
        blobs += blob + bytes(space - len(blob))
    entries_list += [ParentLocator(bytes(4), 0, 0, 0)] * (8 - len(entries_list))
    bat = [UNALLOCATED] * entries
    body = b""
    first_block = locator_at + len(blobs)
    span = bitmap_size(BLOCK) + BLOCK
    for n, index in enumerate(sorted(blocks)):
        bitmap, data = blocks[index]
        bat[index] = (first_block + n * span) // 512
        body += bitmap + bytes(512 - len(bitmap)) + data
    footer = Footer(
        disk_type=DISK_DIFFERENCING, current_size=parent_footer.current_size,
        geometry=parent_footer.geometry, data_offset=512, uuid=b"\x01" * 16,
    )  # fmt: skip
    name = parent_name.encode("utf-16-be")
    header = DynamicHeader(
        table_offset=1536, max_table_entries=entries, parent_uuid=parent_footer.uuid,
        parent_timestamp=parent_footer.timestamp, parent_name=name + bytes(512 - len(name)),
        locators=tuple(entries_list),
    )  # fmt: skip
    table = struct.pack(f">{entries}I", *bat) + b"\xff" * (table_bytes - entries * 4)
    path.write_bytes(footer.pack() + header.pack() + table + blobs + body + footer.pack())


def _bitmap(ranges: list[tuple[int, int]]) -> bytes:
    """A 512-byte bitmap with sectors ``[a, b)`` of each range set (MSB first)."""
    bits = 0
    for first, last in ranges:
        bits |= ((1 << (last - first)) - 1) << (4096 - last)
    return bits.to_bytes(512, "big")


@pytest.fixture
def family(qemu_img: str, tmp_path: Path) -> tuple[Path, bytes]:
    """A 5 MiB-ish dynamic parent full of 0x5a data, and its contents."""
    base = _create(tmp_path / "base.vhd", "5M")
    _write(base, "write -P 0x5a 0 5M")
    return base, qemu_read(base, tmp_path)


def qemu_read(path: Path, tmp_path: Path) -> bytes:
    target = tmp_path / "qread.raw"
    qemu_img_ok("convert", "-f", "vpc", "-O", "raw", str(path), str(target))
    data = target.read_bytes()
    target.unlink()
    return data


def _child_blocks(
    aligned: bool = False,
) -> tuple[dict[int, tuple[bytes, bytes]], Callable[[bytes], bytes]]:
    """Block 0: sectors 8-15 and 100-2047 from the child; block 2: sector 0 only.

    ``aligned`` moves every run edge to a multiple of 8 sectors (whole bitmap
    bytes): libvhdi reads a run that ends inside a bitmap byte to the end of
    the byte, which the bit-per-sector rule of the specification does not.
    """
    runs0 = [(8, 16), (96 if aligned else 100, 2048)]
    runs2 = [(0, 8 if aligned else 1)]
    data0 = pattern(BLOCK, seed=9)
    data2 = b"\x77" * BLOCK
    blocks = {0: (_bitmap(runs0), data0), 2: (_bitmap(runs2), data2)}

    def expect(parent: bytes) -> bytes:
        out = bytearray(parent)
        for block, data, runs in [(0, data0, runs0), (2, data2, runs2)]:
            for first, last in runs:
                start, stop = block * BLOCK + first * 512, block * BLOCK + last * 512
                out[start:stop] = data[first * 512 : last * 512]
        return bytes(out)

    return blocks, expect


@pytest.mark.parametrize(
    "locator",
    ["W2ru", "MacX", "W2ku", "name"],
)
def test_differencing_reads_through_parent(
    family: tuple[Path, bytes], tmp_path: Path, locator: str
) -> None:
    base, parent_data = family
    blocks, expect = _child_blocks()
    locators = {
        "W2ru": [(b"W2ru", _utf16le(".\\base.vhd"))],
        "MacX": [(b"MacX", f"file://{base}".encode())],
        "W2ku": [(b"W2ku", _utf16le("C:\\nowhere\\base.vhd")), (b"W2ku", _utf16le(str(base)))],
        "name": [],
    }[locator]
    child = tmp_path / "child.vhd"
    make_child(child, base, blocks, locators, parent_name="base.vhd" if locator == "name" else "")
    expected = expect(parent_data)
    with open_image(child) as image:
        assert image.virtual_size == len(parent_data)
        assert image.read(0, image.virtual_size) == expected
        assert image.read(4000, 5000) == expected[4000:9000]
        size = image.virtual_size
        kinds = [(e.offset, e.length, e.kind) for e in image.extents(0, size)]
    # The parent is all data, so the child's extents are all DATA, in one run.
    assert kinds == [(0, size, ExtentKind.DATA)]
    out = tmp_path / "flat.raw"
    assert run_instar("dd", "bs=64k", f"if={child}", f"of={out}").rc == 0
    assert out.read_bytes() == expected


def test_pyvhdi_agrees_on_differencing(family: tuple[Path, bytes], tmp_path: Path) -> None:
    """An independent reader confirms the hand-built child and instar's reading of it."""
    pyvhdi = pytest.importorskip("pyvhdi")
    base, parent_data = family
    blocks, expect = _child_blocks(aligned=True)
    child = tmp_path / "child.vhd"
    make_child(child, base, blocks, [(b"W2ru", _utf16le(".\\base.vhd"))], "base.vhd")
    parent_file, child_file = pyvhdi.file(), pyvhdi.file()
    parent_file.open(str(base))
    child_file.open(str(child))
    try:
        child_file.set_parent(parent_file)
        theirs = child_file.read_buffer_at_offset(len(parent_data), 0)
    finally:
        child_file.close()
        parent_file.close()
    with open_image(child) as image:
        assert image.read(0, image.virtual_size) == theirs == expect(parent_data)


def test_differencing_chain_of_two(family: tuple[Path, bytes], tmp_path: Path) -> None:
    base, parent_data = family
    blocks, expect = _child_blocks()
    middle = tmp_path / "middle.vhd"
    make_child(middle, base, blocks, [(b"W2ru", _utf16le("base.vhd"))])
    top = tmp_path / "top.vhd"
    top_data = b"\x99" * BLOCK
    make_child(
        top, middle, {1: (_bitmap([(0, 4096)]), top_data)}, [(b"W2ru", _utf16le("middle.vhd"))]
    )
    expected = bytearray(expect(parent_data))
    expected[BLOCK : 2 * BLOCK] = top_data
    with open_image(top) as image:
        assert image.read(0, image.virtual_size) == bytes(expected)


# --- a parent outside the allowed directories --------------------------------------------------


def test_parent_outside_allowed_directory(family: tuple[Path, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTAR_ALLOW")  # the default policy: nothing allowed
    base, _ = family
    child_dir = tmp_path / "sub"
    child_dir.mkdir()
    child = child_dir / "child.vhd"
    blocks, _ = _child_blocks()
    make_child(child, base, blocks, [(b"W2ru", _utf16le("..\\base.vhd"))])
    out = tmp_path / "out.raw"
    result = run_instar("dd", f"if={child}", f"of={out}")
    assert result.rc == 1 and "outside the allowed directories" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()
    allowed = run_instar("dd", "--allow", str(tmp_path), f"if={child}", f"of={out}")
    assert allowed.rc == 0, allowed.stderr


# --- sector bitmaps and extents of differencing disks ------------------------------------------


def test_bitmap_runs() -> None:
    bits = int.from_bytes(_bitmap([(8, 16), (100, 2048), (4095, 4096)]), "big")
    assert list(bitmap_runs(bits, 4096, 0, 4096)) == [
        (0, 8, False), (8, 16, True), (16, 100, False), (100, 2048, True),
        (2048, 4095, False), (4095, 4096, True),
    ]  # fmt: skip
    assert list(bitmap_runs(bits, 4096, 10, 12)) == [(10, 12, True)]
    assert list(bitmap_runs(bits, 4096, 15, 17)) == [(15, 16, True), (16, 17, False)]
    assert list(bitmap_runs(0, 8, 0, 8)) == [(0, 8, False)]


def test_differencing_extents_fall_through(qemu_img: str, tmp_path: Path) -> None:
    """Sectors the child lacks take the parent's kind: data, or zeros where the
    parent (a dynamic disk: qemu's vpc answers ZERO there) has no block."""
    base = _create(tmp_path / "base.vhd", "5M")
    _write(base, "write -P 0x5a 0 1M")  # qemu allocates block 0 only
    child = tmp_path / "child.vhd"
    make_child(
        child, base, {2: (_bitmap([(0, 1)]), b"\x77" * BLOCK)}, [(b"W2ru", _utf16le("base.vhd"))]
    )
    with open_image(child) as image:
        size = image.virtual_size
        kinds = [(e.offset, e.length, e.kind) for e in image.extents(0, size)]
        data = image.read(0, size)
    assert kinds == [
        (0, BLOCK, ExtentKind.DATA),
        (BLOCK, BLOCK, ExtentKind.ZERO),
        (2 * BLOCK, 512, ExtentKind.DATA),
        (2 * BLOCK + 512, size - 2 * BLOCK - 512, ExtentKind.ZERO),
    ]
    expected = b"\x5a" * MIB + bytes(3 * MIB) + b"\x77" * 512
    assert data == expected + bytes(size - len(expected))
