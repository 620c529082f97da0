"""The Parallels reader against images made by qemu-img 7.2 and qemu-io.

Every corpus image goes through ``instar dd`` and ``qemu-img dd`` over the same
windows (named with ``-f`` and probed), ``convert -O raw``, ``info`` (human and
JSON) and ``compare`` (plain and strict) on both sides, and the outputs are
compared. Version 1 images and format extensions (dirty bitmaps), which
qemu-img cannot write, are made here from qemu-made images by rewriting the
header and catalog (`to_version_1`) or appending an extension cluster
(`add_extension`); qemu reads them, and instar must read them as qemu does.
Damaged images are rows of tests/test_conformance.py and a class of
tests/hostile_corpus.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import (
    READ_WINDOWS,
    open_image,
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_io,
    require_qemu,
    run_instar,
    run_qemu_img,
)
from instar.formats import registry
from instar.formats.parallels.extension import DIRTY_BITMAP, EXTENSION_MAGIC
from instar.formats.parallels.layout import INUSE_MAGIC, MAGIC_V1, Header
from instar.image import ExtentKind

KiB = 1 << 10
MiB = 1 << 20
WINDOWS = READ_WINDOWS


# --- images qemu-img cannot write, made from images it wrote ------------------------------------


def read_header(path: Path) -> Header:
    with path.open("rb") as handle:
        return Header.parse(handle.read(64))


def write_header(path: Path, header: Header) -> None:
    with path.open("r+b") as handle:
        handle.write(header.pack())


def catalog(path: Path) -> list[int]:
    header = read_header(path)
    with path.open("rb") as handle:
        handle.seek(64)
        data = handle.read(4 * header.catalog_entries)
    return list(struct.unpack(f"<{header.catalog_entries}I", data))


def write_catalog(path: Path, entries: list[int]) -> None:
    with path.open("r+b") as handle:
        handle.seek(64)
        handle.write(struct.pack(f"<{len(entries)}I", *entries))


def to_version_1(path: Path) -> None:
    """Rewrite a version 2 image as version 1: the old magic, catalog entries
    in sectors rather than clusters, a 32-bit sector count."""
    header = read_header(path)
    assert header.sectors < 1 << 32
    write_catalog(path, [entry * header.tracks for entry in catalog(path)])
    write_header(path, header._replace(magic=MAGIC_V1))


def bitmap_feature(uuid: bytes, sectors: int, granularity: int, table: list[int]) -> bytes:
    """A dirty bitmap feature (its header and data): ``granularity`` in sectors,
    ``table`` the L1 entries (a cluster's sector, 0 or 1)."""
    data = struct.pack("<Q16sII", sectors, uuid, granularity, len(table))
    data += struct.pack(f"<{len(table)}Q", *table)
    return struct.pack("<QQI4x", DIRTY_BITMAP, 0, len(data)) + data + bytes(-len(data) % 8)


def extension_cluster(features: list[bytes], cluster_size: int, end: bytes | None = None) -> bytes:
    """An extension cluster holding ``features`` then the end-of-features header
    (``end``: other bytes instead), its MD5 right."""
    body = b"".join(features) + (bytes(32) if end is None else end)
    body = body.ljust(cluster_size - 24, b"\0")[: cluster_size - 24]
    return struct.pack("<Q", EXTENSION_MAGIC) + hashlib.md5(body).digest() + body


def add_extension(path: Path, features: list[bytes] | None = None,
                  bitmaps: int = 1, data_clusters: int = 1) -> tuple[int, int]:
    """Append a format extension to the image at ``path``: ``features`` as
    given, or ``bitmaps`` dirty bitmaps of 64 KiB granules whose tables name
    ``data_clusters`` clusters appended before it (then all ones, then all
    clear). Returns (sector of the extension, sector of the first data cluster)."""
    header = read_header(path)
    cluster = header.tracks * 512
    end = -(-path.stat().st_size // cluster) * cluster
    first_data = end // 512
    if features is None:
        features = []
        granules = -(-header.sectors * 512 // (64 * KiB))
        entries = -(-(-(-granules // 64) * 8) // cluster)
        for n in range(bitmaps):
            table = []
            for i in range(entries):
                if i < data_clusters:
                    with path.open("r+b") as handle:
                        handle.seek(end)
                        handle.write(pattern(cluster, seed=n + i))
                    table.append(end // 512)
                    end += cluster
                else:
                    table.append(1 if i % 2 else 0)
            uuid = bytes([0x10 + n]) * 16
            features.append(bitmap_feature(uuid, header.sectors, 128, table))
    with path.open("r+b") as handle:
        handle.seek(end)
        handle.write(extension_cluster(features, cluster))
    write_header(path, header._replace(ext_off=end // 512))
    return end // 512, first_data


# --- the corpus ------------------------------------------------------------------------------


def _create(path: Path, size: str, *options: str) -> Path:
    args = ["create", "-q", "-f", "parallels"] + (["-o", ",".join(options)] if options else [])
    qemu_img_ok(*args, str(path), size)
    return path


def _write(path: Path, *commands: str) -> None:
    for command in commands:
        qemu_io(path, command, "parallels")


def _raw_with_zeros(path: Path) -> Path:
    """3.5 MiB: data, 64 KiB zero pieces inside clusters, a whole zero MiB, a ragged tail."""
    data = bytearray(pattern(3 * MiB + 512 * KiB + 1536, seed=4))
    for start, end in [(128 * KiB, 192 * KiB), (MiB, 2 * MiB), (2 * MiB + 320 * KiB,
                                                               2 * MiB + 512 * KiB)]:
        data[start:end] = bytes(end - start)
    path.write_bytes(bytes(data))
    return path


def build_corpus(directory: Path) -> dict[str, Path]:
    """qemu-made images, and the ones made from them (version 1, in use, bitmaps)."""
    images: dict[str, Path] = {}
    dynamic = _create(directory / "dynamic.hds", "7M")
    _write(dynamic, "write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -z 3500k 100k",
           "write -P 0x33 5000k 513", "write -P 0x44 6143k 1k")
    images["dynamic"] = dynamic
    small = _create(directory / "clusters-4k.hds", "1000000", "cluster_size=4k")
    # Later offsets first: the catalog's clusters are out of order in the file.
    _write(small, "write -P 0x77 500k 4k", "write -P 0x66 900k 50k", "write -P 0x55 1k 9k",
           "write -P 0x78 100k 4k")
    images["clusters-4k"] = small
    odd = _create(directory / "clusters-3k.hds", "2M", "cluster_size=3k")
    _write(odd, "write -P 0x79 4k 10k", "write -P 0x7a 1500k 513")
    images["clusters-3k"] = odd
    raw = _raw_with_zeros(directory / "source.raw")
    converted = directory / "converted.hds"
    qemu_img_ok("convert", "-O", "parallels", str(raw), str(converted))
    images["converted"] = converted
    # The same image with the zeros inside its clusters made holes of the file.
    sparse = directory / "sparse.hds"
    subprocess.run(["cp", "--sparse=always", str(converted), str(sparse)], check=True)
    images["sparse"] = sparse
    images["empty"] = _create(directory / "empty.hds", "0")
    for name, base in [("version-1", "dynamic"), ("version-1-4k", "clusters-4k")]:
        images[name] = directory / f"{name}.hds"
        shutil.copyfile(images[base], images[name])
        to_version_1(images[name])
    images["inuse"] = directory / "inuse.hds"
    shutil.copyfile(dynamic, images["inuse"])
    write_header(images["inuse"], read_header(dynamic)._replace(inuse=INUSE_MAGIC))
    images["bitmaps"] = directory / "bitmaps.hds"
    shutil.copyfile(converted, images["bitmaps"])
    add_extension(images["bitmaps"], bitmaps=2)
    return images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_qemu()
    return build_corpus(tmp_path_factory.mktemp("parallels-corpus"))


NAMES = ["dynamic", "clusters-4k", "clusters-3k", "converted", "sparse", "empty", "version-1",
         "version-1-4k", "inuse", "bitmaps"]


def _same(args: list[str], cwd: Path) -> None:
    """instar and qemu-img give the same status, stdout and stderr."""
    ours, theirs = run_instar(*args, cwd=cwd), run_qemu_img(*args, cwd=cwd)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        theirs.rc, theirs.stdout, theirs.normalised_stderr()), args


@pytest.mark.parametrize("probed", [False, True], ids=["f", "probed"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", NAMES)
def test_dd_to_raw_matches_qemu(corpus: dict[str, Path], tmp_path: Path, name: str,
                                window: list[str], probed: bool) -> None:
    fmt = [] if probed else ["-f", "parallels"]
    ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
    args = [*fmt, *window, f"if={corpus[name]}"]
    result = run_instar("dd", *args, f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", *args, f"of={theirs}")
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_convert_to_raw_matches_qemu(corpus: dict[str, Path], tmp_path: Path,
                                     name: str) -> None:
    ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
    assert run_instar("convert", "-O", "raw", str(corpus[name]), str(ours)).rc == 0
    qemu_img_ok("convert", "-O", "raw", str(corpus[name]), str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("name", NAMES)
def test_info_matches_qemu(corpus: dict[str, Path], name: str, output: str) -> None:
    path = corpus[name]
    _same(["info", f"--output={output}", path.name], path.parent)
    _same(["info", f"--output={output}", "-f", "parallels", path.name], path.parent)


@pytest.mark.parametrize("name", NAMES)
def test_probe_and_size_match_qemu(corpus: dict[str, Path], name: str) -> None:
    path = corpus[name]
    header = path.read_bytes()[: registry.PROBE_SIZE]
    assert registry.probe(header, str(path)).name == "parallels" == qemu_info(path)["format"]
    with open_image(path, "parallels", allow_own_directory=False) as image:
        assert image.virtual_size == qemu_info(path)["virtual-size"]


@pytest.mark.parametrize("strict", [[], ["-s"]], ids=["plain", "strict"])
@pytest.mark.parametrize("name", NAMES)
def test_compare_matches_qemu(corpus: dict[str, Path], tmp_path: Path, name: str,
                              strict: list[str]) -> None:
    """Against itself, against what qemu reads (as raw) both ways, and against
    another image of the corpus: the same words and status as qemu-img compare."""
    path = corpus[name]
    raw = tmp_path / "read.raw"
    qemu_img_ok("convert", "-O", "raw", str(path), str(raw))
    other = corpus["dynamic" if name != "dynamic" else "converted"]
    for pair in ([path, path], [path, raw], [raw, path], [path, other]):
        _same(["compare", *strict, *map(str, pair)], tmp_path)


@pytest.mark.parametrize("name", ["dynamic", "clusters-4k", "sparse", "version-1"])
def test_extents_match_qemu_map_without_reading(
    corpus: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATA extents are qemu's data that is not zero; asking for them reads nothing."""
    path = corpus[name]
    mapped = json.loads(qemu_img_ok("map", "--output=json", "-f", "parallels", str(path)))
    qemu_data = [(e["start"], e["length"]) for e in mapped if e["data"] and not e["zero"]]
    with open_image(path, "parallels", allow_own_directory=False) as image:

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


def test_sparse_image_has_holes_inside_clusters(corpus: dict[str, Path]) -> None:
    """The corpus holds what it claims: holes of the file inside allocated
    clusters (qemu's parallels answers data there all the same: it does not ask
    the file, and neither does instar)."""
    path = corpus["sparse"]
    start = read_header(path).data_off * 512
    with path.open("rb") as handle:
        assert os.lseek(handle.fileno(), start, os.SEEK_HOLE) < path.stat().st_size
    mapped = json.loads(qemu_img_ok("map", "--output=json", str(path)))
    assert not any(e["data"] and e["zero"] for e in mapped)


def test_version_1_is_what_it_claims(corpus: dict[str, Path]) -> None:
    header = read_header(corpus["version-1-4k"])
    assert header.magic == MAGIC_V1 and header.tracks == 8
    entries = [entry for entry in catalog(corpus["version-1-4k"]) if entry]
    assert entries and all(entry % 8 == 0 for entry in entries) and entries != sorted(entries)


def test_bitmaps_are_loaded_by_qemu(corpus: dict[str, Path]) -> None:
    """qemu loads the extension it reads (a damaged one fails its open: see the
    conformance rows); qemu-img info shows no bitmap, nor does instar."""
    header = read_header(corpus["bitmaps"])
    assert header.ext_off
    broken = corpus["bitmaps"].with_name("broken-bitmaps.hds")
    shutil.copyfile(corpus["bitmaps"], broken)
    with broken.open("r+b") as handle:
        handle.seek(header.ext_off * 512 + 30)
        handle.write(b"\xff")  # the checksum no longer holds
    refused = run_qemu_img("info", str(broken))
    assert refused.rc == 1 and "Wrong checksum in Format Extension header" in refused.stderr
    ours = run_instar("info", str(broken))
    assert (ours.rc, ours.normalised_stderr()) == (1, refused.normalised_stderr())
    shown = qemu_img_ok("info", "--output=json", str(corpus["bitmaps"]))
    assert set(json.loads(shown)) == {"virtual-size", "filename", "format", "actual-size"}


def test_catalog_past_the_end_of_the_file_reads_as_zeros(qemu_img: str, tmp_path: Path) -> None:
    """A catalog longer than the file (64 KiB of it, in 4 KiB): qemu reads what
    is missing as zeros (unallocated); so does instar, without holding it."""
    path = _create(tmp_path / "long.hds", "64M", "cluster_size=4k")
    assert read_header(path).catalog_entries == 16384
    os.truncate(path, 4096)
    _same(["dd", "bs=64k", "count=2", f"if={path.name}", "of=out.raw"], tmp_path)
    ours = run_instar("convert", "-O", "raw", path.name, "i.raw", cwd=tmp_path)
    theirs = run_qemu_img("convert", "-O", "raw", path.name, "q.raw", cwd=tmp_path)
    assert ours.rc == theirs.rc == 0
    assert (tmp_path / "i.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
