"""The Parallels writer against the real qemu-img 7.2.

Sizes: instar declares what ``qemu-img dd -O parallels`` and ``convert -O
parallels`` declare; layout: the header qemu-img writes for the same size and
options, byte for byte; contents: ``qemu-img convert -O raw`` of instar's
output equals that of qemu's output; ``qemu-img check`` finds instar's
outputs clean (no leak, nothing fragmented); options are refused as qemu
refuses them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from helpers import (
    DD_INPUTS,
    DD_WINDOWS,
    assert_option_refused_like_qemu,
    build_dd_inputs,
    creation_options,
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
)
from instar.formats.base import OutputFile
from instar.formats.parallels import FORMAT
from instar.formats.parallels.layout import Header

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def _header(path: Path) -> Header:
    with path.open("rb") as handle:
        return Header.parse(handle.read(64))


def _catalog(path: Path) -> list[int]:
    header = _header(path)
    with path.open("rb") as handle:
        handle.seek(64)
        return list(struct.unpack(f"<{header.catalog_entries}I",
                                  handle.read(4 * header.catalog_entries)))


def assert_clean(path: Path) -> None:
    """``qemu-img check``: no error, no leak, nothing fragmented."""
    check = run_qemu_img("check", "-f", "parallels", str(path))
    assert check.rc == 0, check.stdout + check.stderr
    assert "No errors were found on the image." in check.stdout
    assert "0.00% fragmented" in check.stdout or "allocated" not in check.stdout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The writers' window inputs (helpers.build_dd_inputs), and a parallels copy."""
    directory = build_dd_inputs(tmp_path_factory.mktemp("parallels-dd"))
    qemu_img_ok("convert", "-O", "parallels", str(directory / "pattern.raw"),
                str(directory / "pattern.hds"))
    return directory


@pytest.mark.parametrize("window", DD_WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("source", [*DD_INPUTS, "pattern.hds"])
def test_dd_window_matches_qemu(inputs: Path, tmp_path: Path, source: str,
                                window: list[str]) -> None:
    ours, theirs = tmp_path / "i.hds", tmp_path / "q.hds"
    args = ["-O", "parallels", *window, f"if={inputs / source}"]
    result = run_instar("dd", *args, f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", *args, f"of={theirs}")
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"]
    assert qemu_info(ours)["format"] == "parallels"
    assert _header(ours) == _header(theirs)  # qemu dd allocates every cluster: only the header
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)
    assert_clean(ours)
    assert list(tmp_path.glob(".*instar-tmp")) == []


def test_count_zero_is_qemus_empty_image(inputs: Path, tmp_path: Path) -> None:
    """qemu-img dd count=0 writes a size-0 image: the header in one 1 MiB cluster."""
    ours, theirs = tmp_path / "i.hds", tmp_path / "q.hds"
    source = inputs / "pattern.raw"
    assert run_instar("dd", "-O", "parallels", "count=0", f"if={source}", f"of={ours}").rc == 0
    qemu_img_ok("dd", "-O", "parallels", "count=0", f"if={source}", f"of={theirs}")
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_size == MiB and qemu_info(ours)["virtual-size"] == 0
    assert_clean(ours)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4.5 MiB and a ragged tail: data, a zero MiB (1-2 MiB), data with a zero
    64 KiB piece inside a cluster, 512 KiB of zeros, then 777 bytes of 0x5a."""
    data = pattern(MiB) + bytes(MiB) + pattern(MiB, seed=7) + bytes(64 * KiB) + pattern(
        MiB, seed=8) + bytes(512 * KiB) + b"\x5a" * 777
    path = tmp_path_factory.mktemp("parallels-src") / "in.raw"
    path.write_bytes(data)
    return path


CLUSTER_SIZES = [[], ["-o", "cluster_size=512"], ["-o", "cluster_size=3k"],
                 ["-o", "cluster_size=4k"], ["-o", "cluster_size=64k"],
                 ["-o", "cluster_size=2M"], ["-o", "cluster_size=1000"],
                 ["-o", "size=1k,cluster_size=1"]]


@pytest.mark.parametrize("options", CLUSTER_SIZES, ids=lambda o: " ".join(o) or "default")
def test_convert_matches_qemu(source: Path, tmp_path: Path, options: list[str]) -> None:
    ours, theirs = tmp_path / "i.hds", tmp_path / "q.hds"
    result = run_instar("convert", "-O", "parallels", *options, str(source), str(ours))
    assert result.rc == 0, result.stderr
    qemu_img_ok("convert", "-O", "parallels", *options, str(source), str(theirs))
    assert _header(ours) == _header(theirs)
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"]
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)
    assert_clean(ours)
    compare = run_qemu_img("compare", "-f", "raw", "-F", "parallels", str(source), str(ours))
    assert compare.rc == 0, compare.stdout
    # instar reads its own output back too, and describes it as qemu-img does.
    back = tmp_path / "back.raw"
    assert run_instar("convert", "-O", "raw", str(ours), str(back)).rc == 0
    assert back.read_bytes() == qemu_read_raw(ours, tmp_path)
    for output in ("human", "json"):
        mine = run_instar("info", f"--output={output}", ours.name, cwd=tmp_path)
        assert mine.stdout == qemu_img_ok("info", f"--output={output}", ours.name, cwd=tmp_path)


def test_zero_clusters_stay_unallocated(source: Path, tmp_path: Path) -> None:
    """The zero MiB is no cluster; the others are laid out in disk order."""
    ours = tmp_path / "i.hds"
    assert run_instar("dd", "-O", "parallels", "bs=1M", f"if={source}", f"of={ours}").rc == 0
    catalog = _catalog(ours)
    assert len(catalog) == 5 and catalog[1] == 0 and all(catalog[i] for i in (0, 2, 3, 4))
    allocated = [entry for entry in catalog if entry]
    assert allocated == list(range(allocated[0], allocated[0] + len(allocated)))
    assert allocated[0] == _header(ours).data_off * 512 // MiB
    # The last cluster holds 777 bytes: the file still ends after all of it.
    assert ours.stat().st_size == (allocated[-1] + 1) * MiB


def test_compression_refused(source: Path, tmp_path: Path) -> None:
    ours = tmp_path / "c.hds"
    result = run_instar("convert", "-c", "-O", "parallels", str(source), str(ours))
    qemu = run_qemu_img("convert", "-c", "-O", "parallels", str(source), str(tmp_path / "q"))
    assert (result.rc, result.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert result.rc == 1 and not ours.exists()


@pytest.mark.parametrize("option", [
    "cluster_size=0",  # every size is too large for it
    "cluster_size=2147483137",  # rounds up to 2^31
    "cluster_size=18446744073709551615",  # rounds up past 2^64: 0
    "cluster_size=1E",
    "cluster_size=lots",
    "size=lots",
    "subformat=dynamic",
])
def test_bad_options_refused_like_qemu(source: Path, tmp_path: Path, option: str) -> None:
    assert_option_refused_like_qemu("parallels", option, source, tmp_path)


def test_cluster_qemu_cannot_open_refused_like_qemu(source: Path, tmp_path: Path) -> None:
    """2147483136 bytes: qemu-img creates the image (2 GiB of header) and then
    cannot open it; instar says what qemu says, without writing anything."""
    for side in ("i", "q"):
        (tmp_path / side).mkdir()
    args = ["convert", "-O", "parallels", "-o", "cluster_size=2147483136", str(source), "o.hds"]
    qemu = run_qemu_img(*args, cwd=tmp_path / "q")
    (tmp_path / "q" / "o.hds").unlink()
    ours = run_instar(*args, cwd=tmp_path / "i")
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert ours.stderr == "instar: Could not open 'o.hds': Invalid image: Too big cluster\n"
    assert list((tmp_path / "i").iterdir()) == []


def test_too_many_clusters_refused_like_qemu(tmp_path: Path) -> None:
    """2^32 clusters of 512 bytes (2 TiB): qemu's limit on the catalog."""
    huge = tmp_path / "huge.raw"
    with huge.open("wb") as handle:
        handle.truncate(2 << 40)
    for side in ("i", "q"):
        (tmp_path / side).mkdir()
    args = ["convert", "-O", "parallels", "-o", "cluster_size=512", str(huge), "o.hds"]
    qemu = run_qemu_img(*args, cwd=tmp_path / "q")  # leaves an empty o.hds behind
    ours = run_instar(*args, cwd=tmp_path / "i")
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert "Image size is too large for this cluster size" in ours.stderr
    assert list((tmp_path / "i").iterdir()) == []


def test_catalog_over_instars_limit_refused(tmp_path: Path) -> None:
    """A catalog of more than 32 MiB (8 GiB in 512-byte clusters): qemu writes
    it; instar refuses, before writing anything, what its reader would refuse."""
    huge = tmp_path / "huge.raw"
    with huge.open("wb") as handle:
        handle.truncate(8 * GiB)
    result = run_instar("dd", "-O", "parallels", "-o", "cluster_size=512", "bs=1M",
                        "if=huge.raw", "of=o.hds", cwd=tmp_path)
    assert result.rc == 1
    assert result.stderr == (
        "instar: o.hds: error while creating output image: a catalog of 16777216 entries is "
        "over instar's limit of 33554432 bytes (choose a larger cluster_size)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.raw"]


@pytest.mark.parametrize("size", [0, 1, 511, 512, 3000, MiB - 1, 10 * MiB + 1, GiB + 512])
def test_declared_size_matches_qemu_create(tmp_path: Path, size: int) -> None:
    image = tmp_path / "c.hds"
    qemu_img_ok("create", "-q", "-f", "parallels", str(image), str(size))
    assert qemu_info(image)["virtual-size"] == FORMAT.declared_size(size)
    ours = tmp_path / "i.hds"
    fd = os.open(ours, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        FORMAT.create(OutputFile(fd, str(ours)), size, creation_options(FORMAT)).close()
    finally:
        os.close(fd)
    assert ours.read_bytes() == image.read_bytes()  # an empty image: byte for byte qemu's


def test_in_place_output_overwrites_old_contents(source: Path, tmp_path: Path) -> None:
    """On a block device (or any output written in place), clusters and the
    header's padding are zero-filled: old bytes never show through."""
    target = tmp_path / "device.img"
    target.write_bytes(b"\xff" * (16 * MiB))
    data = source.read_bytes()
    fd = os.open(target, os.O_RDWR)
    try:
        writer = FORMAT.create(OutputFile(fd, str(target), in_place=True), len(data),
                               creation_options(FORMAT, {"cluster_size": "64k"}))
        for start in range(0, len(data), 64 * KiB):
            piece = data[start : start + 64 * KiB]
            if piece.count(0) == len(piece):
                writer.write_zeroes(start, len(piece))
            else:
                writer.write(start, piece)
        writer.close()
    finally:
        os.close(fd)
    read = qemu_read_raw(target, tmp_path, "parallels")
    assert read[: len(data)] == data and read[len(data) :].count(0) == len(read) - len(data)
    header = _header(target)
    with target.open("rb") as handle:
        handle.seek(64 + 4 * header.catalog_entries)
        assert handle.read(header.data_off * 512 - handle.tell()).count(0xFF) == 0


@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotests_159(tmp_path: Path, bs: str) -> None:
    """qemu-iotests 159, restated for parallels: dd -O parallels of 1 MiB of 0x0a."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x0a" * MiB)
    out = tmp_path / "out.hds"
    assert run_instar("dd", "-O", "parallels", f"bs={bs}", f"if={src}", f"of={out}").rc == 0
    compare = run_qemu_img("compare", "-f", "raw", "-F", "parallels", str(src), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout
    assert_clean(out)
