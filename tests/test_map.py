"""instar map against the real qemu-img map (7.2), byte for byte.

IMAGES is a matrix of images made with qemu-img and qemu-io in every format
instar reads: raw with holes and odd sizes; qcow2 plain, compressed (wholly
and in part), with zero clusters (allocated or not), small and large
clusters, extended L2 subclusters, preallocation, external data files, and
backing chains three deep of unequal sizes (over raw, vmdk, vhdx, vdi and
compressed images too); vmdk monolithicSparse, streamOptimized, zeroed
grains, twoGbMaxExtentSparse/Flat (across extents), monolithicFlat and an
overlay; vpc dynamic and fixed; vhdx dynamic and fixed; vdi dynamic and
static; parallels. Each is mapped whole
(human and JSON) and through windows (--start-offset/--max-length, unaligned
and past the end); stdout, stderr (after the program name) and the exit
status must be qemu-img's. So must bad command lines, qemu's sample images,
and the names of files shown from another directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    Result,
    pattern,
    qemu_img_ok,
    qemu_io,
    run_instar,
    run_qemu_img,
    unpack_sample_image,
    write_pieces,
)
from test_sample_images import COMPARED

pytestmark = pytest.mark.usefixtures("allow_own_directories")

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
Builder = Callable[[Path], None]
DATA = pattern(3 * MIB, seed=5)

# Data and holes, at offsets no cluster size divides.
HOLES = [(0, DATA[: 64 * KIB]), (MIB + 4097, DATA[:5000]), (2 * MIB + 512, DATA[: MIB - 512])]


def _qemu_img(p: Path, *args: str) -> None:
    qemu_img_ok(*args, cwd=p.parent)


def _convert(source: str, fmt: str, *options: str) -> Builder:
    """``qemu-img convert`` of an image built earlier into FMT."""
    return lambda p: _qemu_img(p, "convert", "-O", fmt, *options, source, p.name)


def _create(fmt: str, size: str, *options: str, writes: tuple[str, ...] = ()) -> Builder:
    """``qemu-img create`` then qemu-io writes."""
    def build(p: Path) -> None:
        _qemu_img(p, "create", "-q", "-f", fmt, *options, p.name, size)
        for command in writes:
            qemu_io(p.name, command, fmt, cwd=p.parent)
    return build


def _edited(build: Builder, fmt: str, *writes: str) -> Builder:
    def run(p: Path) -> None:
        build(p)
        for command in writes:
            qemu_io(p.name, command, fmt, cwd=p.parent)
    return run


def _overlay(fmt: str, backing: str, backing_fmt: str, *writes: str,
             size: str | None = None, options: tuple[str, ...] = ()) -> Builder:
    def build(p: Path) -> None:
        _qemu_img(p, "create", "-q", "-f", fmt, *options, "-b", backing, "-F", backing_fmt,
                  p.name, *([size] if size else []))
        for command in writes:
            qemu_io(p.name, command, fmt, cwd=p.parent)
    return build


def _sparse_raw(size: int, pieces: list[tuple[int, bytes]]) -> Builder:
    return lambda p: write_pieces(p, pieces, size)


IMAGES: dict[str, Builder] = {
    # raw: data, holes, sizes that are no multiple of a sector, nothing at all
    "base.raw": _sparse_raw(3 * MIB, [(0, DATA)]),
    "holes.raw": _sparse_raw(3 * MIB, HOLES),
    "k1000.raw": _sparse_raw(1000, [(0, DATA[:1000])]),
    "empty.raw": _sparse_raw(0, []),
    "hole-4m.raw": _sparse_raw(4 * MIB, []),
    "big-5g.raw": _sparse_raw(5 * GIB, [(2 * GIB - 64 * KIB, DATA[: 128 * KIB]),
                                        (4 * GIB + 12345, DATA[:777])]),
    # qcow2
    "base.qcow2": _convert("base.raw", "qcow2"),
    "holes.qcow2": _convert("holes.raw", "qcow2"),
    "v2.qcow2": _convert("holes.raw", "qcow2", "-o", "compat=0.10"),
    "compressed.qcow2": _convert("holes.raw", "qcow2", "-c"),
    "mixed.qcow2": _create("qcow2", "3M", writes=("write -P 1 0 128k", "write -c -P 2 256k 64k",
                                                  "write -P 3 1M 64k")),
    "zeros.qcow2": _edited(_convert("base.raw", "qcow2"), "qcow2", "write -z 1M 64k",
                           "write -z -u 2M 64k", "write -z 2880k 128k"),
    "zeros-first.qcow2": _create("qcow2", "2M", writes=("write -z 0 64k", "write -P 7 1M 4k")),
    "c512.qcow2": _convert("holes.raw", "qcow2", "-o", "cluster_size=512"),
    "c2m.qcow2": _convert("holes.raw", "qcow2", "-o", "cluster_size=2M"),
    "extl2.qcow2": _edited(_convert("holes.raw", "qcow2", "-o", "extended_l2=on"), "qcow2",
                           "write -z 1M 4k", "discard 2M 8k", "write -P 9 1088k 2k",
                           "write -z -u 2100k 2k"),
    "prealloc-metadata.qcow2": _create("qcow2", "3M", "-o", "preallocation=metadata",
                                       writes=("write -P 4 64k 64k", "write -z 1M 64k")),
    "prealloc-falloc.qcow2": _create("qcow2", "3M", "-o", "preallocation=falloc",
                                     writes=("write -P 4 64k 64k",)),
    "prealloc-full.qcow2": _create("qcow2", "1M", "-o", "preallocation=full"),
    "data-file.qcow2": _create("qcow2", "3M", "-o", "data_file=data-file.bin",
                               writes=("write -P 5 64k 128k", "write -z 1M 64k",
                                       "write -P 6 2M 4k")),
    "data-file-raw.qcow2": _create("qcow2", "3M", "-o", "data_file=data-raw.bin,data_file_raw=on",
                                   writes=("write -P 5 64k 128k", "write -P 6 2M 4k")),
    # a chain three deep, each layer larger than the one below
    "chain-base.qcow2": _convert("holes.raw", "qcow2"),
    "chain-mid.qcow2": _overlay("qcow2", "chain-base.qcow2", "qcow2", "write -P 1 1M 64k",
                                "write -z 2M 64k", "write -P 2 3200k 64k", size="4M"),
    "chain-top.qcow2": _overlay("qcow2", "chain-mid.qcow2", "qcow2", "write -P 3 1088k 64k",
                                "write -z -u 512k 64k", "write -P 4 5M 64k",
                                "write -z 4352k 64k", size="6M"),
    "short-top.qcow2": _overlay("qcow2", "chain-mid.qcow2", "qcow2", "write -P 3 64k 4k",
                                size="2M"),
    "over-raw.qcow2": _overlay("qcow2", "holes.raw", "raw", "write -P 8 1M 64k", size="4M"),
    "over-k1000.qcow2": _overlay("qcow2", "k1000.raw", "raw", size="1M"),
    "over-compressed.qcow2": _overlay("qcow2", "compressed.qcow2", "qcow2", "write -P 8 0 64k"),
    "over-extl2.qcow2": _overlay("qcow2", "holes.qcow2", "qcow2", "write -P 8 1028k 4k",
                                 "write -z 12k 2k", options=("-o", "extended_l2=on")),
    # vmdk
    "sparse.vmdk": _convert("holes.raw", "vmdk"),
    "stream.vmdk": _convert("holes.raw", "vmdk", "-o", "subformat=streamOptimized"),
    "zeroed.vmdk": _edited(_convert("holes.raw", "vmdk", "-o", "zeroed_grain=on"), "vmdk",
                           "write -z 64k 64k"),
    "split.vmdk": _convert("holes.raw", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"),
    "split-flat.vmdk": _convert("holes.raw", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"),
    "split-5g.vmdk": _convert("big-5g.raw", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"),
    "split-flat-5g.vmdk": _convert("big-5g.raw", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"),
    "flat.vmdk": _convert("holes.raw", "vmdk", "-o", "subformat=monolithicFlat"),
    "over.vmdk": _overlay("vmdk", "sparse.vmdk", "vmdk", "write -P 8 1M 64k"),
    # vpc
    "dynamic.vhd": _convert("holes.raw", "vpc"),
    "dynamic-forced.vhd": _convert("holes.raw", "vpc", "-o", "force_size=on"),
    "fixed.vhd": _convert("holes.raw", "vpc", "-o", "subformat=fixed,force_size=on"),
    # vhdx: qemu has no block status for it: data everywhere, at no offset
    "dynamic.vhdx": _convert("holes.raw", "vhdx"),
    "fixed.vhdx": _convert("holes.raw", "vhdx", "-o", "subformat=fixed"),
    "empty.vhdx": _create("vhdx", "0"),
    # vdi, parallels
    "dynamic.vdi": _edited(_convert("holes.raw", "vdi"), "vdi", "write -P 2 1M 4k"),
    "static.vdi": _convert("holes.raw", "vdi", "-o", "static=on"),
    "holes.parallels": _edited(_convert("holes.raw", "parallels"), "parallels",
                               "write -P 2 1536k 4k"),
    # over the formats above
    "over-vmdk.qcow2": _overlay("qcow2", "sparse.vmdk", "vmdk", "write -P 8 64k 64k"),
    "over-vhdx.qcow2": _overlay("qcow2", "dynamic.vhdx", "vhdx", "write -P 8 0 64k"),
    "over-vdi.qcow2": _overlay("qcow2", "dynamic.vdi", "vdi", "write -P 8 64k 64k", size="4M"),
}

# Every image: whole (human and JSON) and through windows with unaligned starts
# and lengths (the offsets inside clusters, grains and blocks).
OPTIONS: list[list[str]] = [
    [],
    ["--output=json"],
    ["--output=json", "-s", "1000"],
    ["--output=json", "--start-offset=65537", "--max-length=1M"],
    ["--start-offset=1052677", "-l", "4097"],
]
# A few images: the edges of the window (one byte, empty, at and past the end,
# a length whose sum with the start wraps past 2^63 in qemu's arithmetic).
EDGE_IMAGES = ["chain-top.qcow2", "holes.raw", "compressed.qcow2", "dynamic.vhdx",
               "split-5g.vmdk", "k1000.raw"]
EDGES: list[list[str]] = [
    ["--output=json", "--start-offset", "1M", "-l", "1"],
    ["--output=json", "-s", "100M"],
    ["-s", "100M"],
    ["--output=json", "--max-length=0"],
    ["--max-length=0"],
    ["--output=json", "-s", "3M"],
    ["--output=json", "-s", "999", "-l", "2"],
    ["--output=json", "--start-offset", "1", "--max-length", "9223372036854775807"],
    ["--output=json", "-s", "9223372036854775807", "-l", "9223372036854775807"],
    ["-s", "0x10k", "--output", "json"],
    ["-l", "1.5k", "--output", "human", "-U"],
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("map") / "images"
    directory.mkdir()
    for name, build in IMAGES.items():
        build(directory / name)
    return directory


def same_as_qemu(args: list[str], cwd: Path) -> Result:
    """instar map and qemu-img map give the same status, stdout and stderr."""
    ours, theirs = run_instar("map", *args, cwd=cwd), run_qemu_img("map", *args, cwd=cwd)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        theirs.rc, theirs.stdout, theirs.normalised_stderr()), args
    return theirs


def _options_id(options: list[str]) -> str:
    return " ".join(options) or "human"


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", OPTIONS, ids=_options_id)
@pytest.mark.parametrize("name", list(IMAGES))
def test_map_matches_qemu(name: str, options: list[str], images: Path) -> None:
    same_as_qemu([*options, name], images)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", EDGES, ids=_options_id)
@pytest.mark.parametrize("name", EDGE_IMAGES)
def test_map_window_edges_match_qemu(name: str, options: list[str], images: Path) -> None:
    same_as_qemu([*options, name], images)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize(("fmt", "name"), [("vpc", "fixed.vhd"), ("vpc", "dynamic.vhd"),
                                           ("qcow2", "chain-top.qcow2"), ("vmdk", "flat.vmdk"),
                                           ("raw", "split.vmdk"), ("vhdx", "fixed.vhdx")])
def test_map_with_format_given(fmt: str, name: str, output: str, images: Path) -> None:
    """``-f``: a fixed VHD read as vpc (probed, it is raw), a descriptor read as raw."""
    same_as_qemu(["-f", fmt, f"--output={output}", "-s", "4097", name], images)


def test_the_matrix_shows_what_it_should(images: Path) -> None:
    """The matrix is no set of empty maps: qemu shows the cases it is built for."""
    def json_of(name: str) -> str:
        return same_as_qemu(["--output=json", name], images).stdout

    assert '"depth": 2' in json_of("chain-top.qcow2")  # three layers answer
    assert '"depth": 0, "present": false, "zero": true' in json_of("chain-top.qcow2")
    assert '"zero": true, "data": true' in json_of("prealloc-metadata.qcow2")  # holes in data
    assert '"present": false, "zero": true, "data": false, "offset"' in json_of("extl2.qcow2")
    assert "data-file.bin" in same_as_qemu(["data-file.qcow2"], images).stdout
    assert "split-5g-s002.vmdk" in same_as_qemu(["split-5g.vmdk"], images).stdout
    refused = same_as_qemu(["mixed.qcow2"], images)
    assert refused.rc == 1 and refused.stdout.count("\n") == 2  # header, one entry


# --- names, bad command lines, failures ------------------------------------------------------


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", ["chain-top.qcow2", "split-flat-5g.vmdk", "over-k1000.qcow2"])
def test_file_names_as_qemu_shows_them(name: str, images: Path) -> None:
    """The File column names backing files and extents as qemu does: relative
    to the image as it was named, or absolute. (Not a data file: qemu opens a
    relative one from its working directory, instar from the image's.)"""
    same_as_qemu([f"images/{name}"], images.parent)
    same_as_qemu([f"./images//{name}"], images.parent)
    same_as_qemu([str(images / name)], images.parent)


BAD_COMMAND_LINES: list[list[str]] = [
    ["--start-offset", "-1", "holes.raw"],
    ["--start-offset=abc", "holes.raw"],
    ["--max-length=-5", "holes.raw"],
    ["-l", "", "holes.raw"],
    ["-s", "18446744073709551616", "holes.raw"],
    ["-s", "9223372036854775808", "holes.raw"],
    ["-s", "8E", "holes.raw"],
    ["--output=json", "--max-length=1x", "holes.raw"],
    ["--output=xml", "holes.raw"],
    ["--output=xml"],
    ["--output=xml", "holes.raw", "base.raw"],
    ["holes.raw", "base.raw"],
    [],
    ["-q", "holes.raw"],
    ["--start-offset"],
    ["holes.raw", "-f"],
    ["--bogus", "holes.raw"],
    ["-f", "foo", "holes.raw"],
    ["-f", "vmdk", "holes.raw"],
    ["-f", "qcow2", "--output=json", "holes.raw"],
    ["-f", "raw", "--output=json", "holes.qcow2"],
    ["--format=raw", "holes.qcow2"],
    ["no-such-image"],
    ["--output=json", "no-such-image"],
    ["--force-share", "--output", "json", "holes.raw"],
    ["--", "holes.raw"],
]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", BAD_COMMAND_LINES, ids=_options_id)
def test_command_lines_as_qemu(args: list[str], images: Path) -> None:
    same_as_qemu(args, images)


@pytest.mark.parametrize("args", [["--image-opts", "holes.raw"],
                                  ["--object", "secret,id=s0,data=x", "holes.raw"]])
def test_image_opts_and_object_are_refused(args: list[str], images: Path) -> None:
    result = run_instar("map", *args, cwd=images)
    assert (result.rc, result.stdout) == (1, "")
    assert result.stderr == f"instar: {args[0]} is not supported\n"


def test_help(images: Path) -> None:
    result = run_instar("map", "--help", cwd=images)
    assert result.rc == 0 and result.stdout.startswith("usage: instar map ")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("output", ["human", "json"])
def test_failure_midway_prints_what_qemu_prints(output: str, tmp_path: Path) -> None:
    """An L2 table whose offset is unaligned, past the first: qemu and instar
    print the entries before it (with the separator qemu prints) and fail."""
    image = tmp_path / "bad.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", str(image), "1G")
    qemu_io(image, "write -P 1 0 64k", "qcow2")
    qemu_io(image, "write -P 2 600M 64k", "qcow2")
    data = bytearray(image.read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    entry = int.from_bytes(data[l1 + 8 : l1 + 16], "big")
    data[l1 + 8 : l1 + 16] = (entry + 0x200).to_bytes(8, "big")
    image.write_bytes(data)
    args = [f"--output={output}", image.name]
    ours, theirs = run_instar("map", *args, cwd=tmp_path), run_qemu_img("map", *args, cwd=tmp_path)
    assert (ours.rc, ours.stdout) == (theirs.rc, theirs.stdout) == (1, theirs.stdout)
    assert theirs.stdout.count("\n") == (2 if output == "human" else 1)
    assert "Could not read file metadata: Input/output error" in theirs.stderr
    assert ours.stderr == ("instar: Could not read file metadata: bad.qcow2: "
                           f"L2 table offset {entry + 0x200 & ~(1 << 63):#x} unaligned "
                           "(L1 index 0x1)\n")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("output", ["human", "json"])
def test_many_entries_match_qemu(output: str, tmp_path: Path) -> None:
    """More entries than one batch from the worker: 4 KiB of data, 4 KiB of
    hole, 16 MiB long; as raw and as qcow2 of 4 KiB clusters."""
    write_pieces(tmp_path / "comb.raw", [(n, DATA[:4096]) for n in range(0, 16 * MIB, 8192)],
                 16 * MIB)
    qemu_img_ok("convert", "-O", "qcow2", "-o", "cluster_size=4k", "comb.raw", "comb.qcow2",
                cwd=tmp_path)
    for name in ("comb.raw", "comb.qcow2"):
        result = same_as_qemu([f"--output={output}", name], tmp_path)
        assert result.stdout.count("\n") >= 2048


# --- refcounts: qemu's guess of metadata preallocation -----------------------------------------


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_metadata_preallocation_by_refcount_width(bits: int, tmp_path: Path) -> None:
    """qemu guesses from the refcounts of every width: the same guess, the
    same holes reported as zeros inside data clusters."""
    name = f"pm{bits}.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o",
                f"preallocation=metadata,refcount_bits={bits},cluster_size=4k", name, "3M",
                cwd=tmp_path)
    qemu_io(tmp_path / name, "write -P 3 100k 20k", "qcow2")
    for output in ("human", "json"):
        same_as_qemu([f"--output={output}", name], tmp_path)


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32, 64])
def test_nonzero_entries_counts_every_width(width: int) -> None:
    from instar.formats.qcow2.refcounts import nonzero_entries

    rng = __import__("random").Random(width)
    count = 4096 * 8 // width
    values = [rng.choice([0, 0, 1, (1 << width) - 1, rng.getrandbits(width)])
              for _ in range(count)]
    if width >= 8:
        block = b"".join(v.to_bytes(width // 8, "big") for v in values)
    else:
        packed = sum(v << (i * width) for i, v in enumerate(values))
        block = packed.to_bytes(4096, "little")
    for limit in (0, 1, 7, count // 3, count):
        order = width.bit_length() - 1
        assert nonzero_entries(block, order, limit) == sum(1 for v in values[:limit] if v)


# --- qemu's sample images; images qemu does not read as instar does ------------------------------


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("map-samples")
    for name in MAPPED_SAMPLES:
        unpack_sample_image(name, directory)
    return directory


# Those instar reads as qemu does (as test_sample_images says: not the formats
# instar does not read yet, nor the VHDX with a pending log, which qemu refuses to
# open read-only and instar replays).
MAPPED_SAMPLES = COMPARED


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("name", MAPPED_SAMPLES)
def test_sample_images_match_qemu(name: str, output: str, samples: Path) -> None:
    same_as_qemu([f"--output={output}", name], samples)


def test_differencing_vhdx_is_data_everywhere(tmp_path: Path) -> None:
    """qemu cannot read a differencing VHDX; instar maps it as qemu maps
    every VHDX (qemu's vhdx has no block status): data, at no offset."""
    from test_vhdx_reader import make_child

    base = tmp_path / "base.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(base), "8M")
    qemu_io(base, "write -P 0x5a 0 3M", "vhdx")
    make_child(tmp_path / "child.vhdx", base, {1: ("full", b"\x44" * MIB, None)},
               virtual_size=8 * MIB)
    result = run_instar("map", "--output=json", "child.vhdx", cwd=tmp_path)
    assert (result.rc, result.stdout) == (0, '[{ "start": 0, "length": 8388608, "depth": 0, '
                                             '"present": true, "zero": false, "data": true}]\n')
    human = run_instar("map", "child.vhdx", cwd=tmp_path)
    assert (human.rc, human.stderr) == (
        1, "instar: File contains external, encrypted or compressed clusters.\n")


def test_differencing_vhd_maps_its_parent_below(tmp_path: Path) -> None:
    """instar reads a differencing VHD through its parent (qemu ignores the
    parent): the parent's data is at depth 1, the child's sectors at depth 0."""
    from test_vpc_reader import BLOCK, _bitmap, _utf16le, make_child

    base = tmp_path / "base.vhd"
    qemu_img_ok("create", "-q", "-f", "vpc", str(base), "8M")
    qemu_io(base, "write -P 0x5a 0 3M", "vpc")
    make_child(tmp_path / "child.vhd", base, {1: (_bitmap([(0, 8)]), b"\x77" * BLOCK)},
               [(b"W2ru", _utf16le("base.vhd"))])
    ours = run_instar("map", "--output=json", "child.vhd", cwd=tmp_path).stdout.splitlines()
    base_map = run_qemu_img("map", "--output=json", "base.vhd", cwd=tmp_path).stdout
    assert ours[0].startswith('[{ "start": 0, "length": 2097152, "depth": 1, "present": true, '
                              '"zero": false, "data": true')
    assert ours[0].split('"offset": ')[1] in base_map  # where the parent holds it
    assert ours[1].startswith('{ "start": 2097152, "length": 4096, "depth": 0, "present": true,'
                              ' "zero": false, "data": true')


def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    """A backing file name from the image is printed with its control
    characters escaped (qemu-img prints them raw), as instar info does."""
    name = "b\x1b[31mase.raw"
    write_pieces(tmp_path / name, [(0, DATA[:4096])], MIB)
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", "top.qcow2",
                cwd=tmp_path)
    result = run_instar("map", "top.qcow2", cwd=tmp_path)
    assert result.rc == 0 and "\x1b" not in result.stdout
    assert result.stdout.splitlines()[1] == f"{'0':<16}{'0x1000':<16}{'0':<16}b\\x1b[31mase.raw"
