"""The VDI writer against the real qemu-img 7.2 and independent readers.

Sizes: instar declares what ``qemu-img dd -O vdi`` declares (a sector
multiple; 0 for an empty window); contents: qemu-img reads instar's output
as it reads its own, and ``qemu-img check`` finds it clean; layout:
``instar convert -O vdi`` writes the bytes ``qemu-img convert -O vdi``
writes, but for the two random UUIDs (qemu-img dd stores every block, zeros
included: there the layouts differ and only the header's shape is compared).
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
    qemu_io,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
)
from instar.errors import CreationError
from instar.formats.base import OutputFile
from instar.formats.vdi import FORMAT
from instar.formats.vdi.layout import (
    BLOCK_SIZE,
    DISK_SIZE_MAX,
    TYPE_DYNAMIC,
    TYPE_STATIC,
    UNALLOCATED,
    Header,
)
from instar.formats.vdi.writer import CHUNK_ENTRIES, create_writer
from instar.image import Extent, ExtentKind
from instar.opener import ImageOpener
from instar.safety import PathPolicy

MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
UUIDS = slice(392, 424)  # the image and last-snapshot UUIDs: random in both
SUBFORMATS = [[], ["-o", "static=on"]]


def _header(path: Path) -> Header:
    return Header.parse(path.read_bytes()[:512])


def _without_uuids(data: bytes) -> bytes:
    return data[: UUIDS.start] + bytes(UUIDS.stop - UUIDS.start) + data[UUIDS.stop :]


def _check_clean(path: Path) -> None:
    result = run_qemu_img("check", str(path))
    assert (result.rc, result.stdout, result.stderr) == (
        0, "No errors were found on the image.\n", ""), result


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The writers' window matrix inputs, and a raw with a whole zero block."""
    directory = build_dd_inputs(tmp_path_factory.mktemp("vdi-inputs"))
    (directory / "gap.raw").write_bytes(
        pattern(2 * MIB) + bytes(2 * MIB) + pattern(MIB, seed=7) + bytes(MIB // 2)
        + b"\x5a" * 777)
    qemu_img_ok("convert", "-O", "vdi", str(directory / "gap.raw"), str(directory / "gap.vdi"))
    return directory


# --- dd windows against qemu-img dd --------------------------------------------------------


@pytest.mark.parametrize("subformat", SUBFORMATS, ids=["dynamic", "static"])
@pytest.mark.parametrize("window", DD_WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("source", [*DD_INPUTS, "gap.vdi"])
def test_dd_window_matches_qemu(
    qemu_img: str, inputs: Path, tmp_path: Path, window: list[str], subformat: list[str],
    source: str,
) -> None:
    """Same size and contents as qemu-img dd's (which takes no -o: its output is
    dynamic); qemu-img check finds ours clean."""
    ours, theirs = tmp_path / "i.vdi", tmp_path / "q.vdi"
    result = run_instar("dd", "-O", "vdi", *subformat, *window, f"if={inputs / source}",
                        f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", "-O", "vdi", *window, f"if={inputs / source}", f"of={theirs}")
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"]
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)
    _check_clean(ours)
    mine, qemus = _header(ours), _header(theirs)
    assert mine.image_type == (TYPE_STATIC if subformat else TYPE_DYNAMIC)
    same = ("disk_size", "blocks_in_image", "offset_bmap", "offset_data", "block_size",
            "header_size", "text", "version", "sector_size")
    assert [getattr(mine, f) for f in same] == [getattr(qemus, f) for f in same]
    assert list(tmp_path.glob(".*instar-tmp")) == []


def test_count_zero_is_qemus_empty_image(qemu_img: str, inputs: Path, tmp_path: Path) -> None:
    """qemu-img dd writes a 512-byte image of size 0 for an empty window: so does instar."""
    for subformat in SUBFORMATS:
        ours, theirs = tmp_path / "i.vdi", tmp_path / "q.vdi"
        result = run_instar("dd", "-O", "vdi", *subformat, "count=0",
                            f"if={inputs / 'pattern.raw'}", f"of={ours}")
        assert result.rc == 0, result.stderr
        qemu_img_ok("dd", "-O", "vdi", "count=0", f"if={inputs / 'pattern.raw'}", f"of={theirs}")
        assert ours.stat().st_size == theirs.stat().st_size == 512
        if not subformat:
            assert _without_uuids(ours.read_bytes()) == _without_uuids(theirs.read_bytes())
        assert qemu_info(ours)["virtual-size"] == 0
        _check_clean(ours)
        ours.unlink()
        theirs.unlink()


# --- convert: qemu's bytes, UUIDs apart ---------------------------------------------------------


@pytest.mark.parametrize("subformat", SUBFORMATS, ids=["dynamic", "static"])
@pytest.mark.parametrize("source", [*DD_INPUTS, "gap.raw", "gap.vdi"])
def test_convert_writes_qemus_bytes(
    qemu_img: str, inputs: Path, tmp_path: Path, subformat: list[str], source: str
) -> None:
    ours, theirs = tmp_path / "i.vdi", tmp_path / "q.vdi"
    result = run_instar("convert", "-O", "vdi", *subformat, str(inputs / source), str(ours))
    assert result.rc == 0, result.stderr
    qemu_img_ok("convert", "-O", "vdi", *subformat, str(inputs / source), str(theirs))
    mine, qemus = ours.read_bytes(), theirs.read_bytes()
    assert len(mine) == len(qemus)
    assert _without_uuids(mine) == _without_uuids(qemus)
    assert mine[UUIDS] != qemus[UUIDS]
    _check_clean(ours)
    compare = run_qemu_img("compare", str(inputs / source), str(ours))
    assert (compare.rc, compare.stdout) == (0, "Images are identical.\n")


def test_zero_blocks_stay_unallocated(qemu_img: str, inputs: Path, tmp_path: Path) -> None:
    """gap.raw's all-zero 2-4 MiB is not stored; the other four blocks are, in order."""
    ours = tmp_path / "i.vdi"
    assert run_instar("dd", "-O", "vdi", "bs=1M", f"if={inputs / 'gap.raw'}", f"of={ours}").rc == 0
    header = _header(ours)
    data = ours.read_bytes()
    entries = struct.unpack_from(f"<{header.blocks_in_image}I", data, header.offset_bmap)
    assert entries == (0, 1, UNALLOCATED, UNALLOCATED, 2, 3)
    assert header.blocks_allocated == 4
    assert len(data) == header.offset_data + 4 * BLOCK_SIZE
    assert data[header.offset_bmap + 24 : header.offset_data] == bytes(512 - 24)  # zero padding


def test_uuids_are_random_version_4(tmp_path: Path) -> None:
    seen = set()
    for n in range(3):
        path = tmp_path / f"{n}.vdi"
        _write_with_api(path, MIB, {}, b"")
        raw = path.read_bytes()
        for uuid in (raw[392:408], raw[408:424]):
            assert uuid[7] >> 4 == 4 and uuid[8] >> 6 == 2  # stored little-endian: byte 7
            seen.add(uuid)
        assert raw[424:456] == bytes(32)  # link and parent UUIDs: none
    assert len(seen) == 6


# --- options and refusals ---------------------------------------------------------------------


def test_static_matches_qemu_create(qemu_img: str, tmp_path: Path) -> None:
    """static=on: every block mapped in order, the file given its whole size."""
    ours, theirs = tmp_path / "i.vdi", tmp_path / "q.vdi"
    _write_with_api(ours, 5 * MIB + 512, {"static": "on"}, b"")
    qemu_img_ok("create", "-q", "-f", "vdi", "-o", "static=on", str(theirs), str(5 * MIB + 512))
    assert _without_uuids(ours.read_bytes()) == _without_uuids(theirs.read_bytes())
    assert ours.stat().st_size == theirs.stat().st_size == 1024 + 6 * MIB


def test_compression_refused(qemu_img: str, inputs: Path, tmp_path: Path) -> None:
    ours = tmp_path / "c.vdi"
    result = run_instar("dd", "-c", "-O", "vdi", f"if={inputs / 'pattern.raw'}", f"of={ours}")
    assert result.rc == 1
    assert result.stderr == "instar: Compression not supported for this file format\n"
    qemu = run_qemu_img("convert", "-c", "-O", "vdi", str(inputs / "pattern.raw"), str(ours))
    assert qemu.normalised_stderr() == result.normalised_stderr()
    assert not ours.exists()


@pytest.mark.parametrize("option", ["static=maybe", "subformat=fixed", "cluster_size=2M",
                                    "static=on,static=x", "nostatic,foo=1"])
def test_bad_options_refused_like_qemu(
    qemu_img: str, inputs: Path, tmp_path: Path, option: str
) -> None:
    assert_option_refused_like_qemu("vdi", option, inputs / "pattern.raw", tmp_path)


@pytest.mark.parametrize("command", ["dd", "convert"])
def test_too_large_refused_like_qemu(qemu_img: str, tmp_path: Path, command: str) -> None:
    """Over qemu's 0x1fffff80 blocks of 1 MiB: refused before anything is created."""
    huge = tmp_path / "huge.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", str(huge), str(DISK_SIZE_MAX + 512))
    for side in ("i", "q"):
        (tmp_path / side).mkdir()
    args = (["dd", "-O", "vdi", "bs=1M", f"if={huge}", "of=out.vdi"] if command == "dd"
            else ["convert", "-O", "vdi", str(huge), "out.vdi"])
    ours = run_instar(*args, cwd=tmp_path / "i")
    qemu = run_qemu_img(*args, cwd=tmp_path / "q")
    assert ours.rc == qemu.rc == 1
    assert ours.normalised_stderr() == qemu.normalised_stderr()
    assert "Unsupported VDI image size (size is 0x1fffff8000200" in ours.stderr
    assert list((tmp_path / "i").iterdir()) == []  # qemu leaves an empty file behind


def test_static_too_large_for_the_file_system_like_qemu(qemu_img: str, tmp_path: Path) -> None:
    """A static image of 20 TiB: qemu's message where the file system refuses
    the size (ext4), success where it takes it; instar does what qemu does."""
    source = tmp_path / "big.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", str(source), str(20 * TIB))
    for side in ("i", "q"):
        (tmp_path / side).mkdir()
    args = ["convert", "-O", "vdi", "-o", "static=on", str(source), "out.vdi"]
    ours = run_instar(*args, cwd=tmp_path / "i")
    qemu = run_qemu_img(*args, cwd=tmp_path / "q")
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    if ours.rc == 0:
        assert (tmp_path / "i" / "out.vdi").stat().st_size == (
            tmp_path / "q" / "out.vdi").stat().st_size
    else:
        assert list((tmp_path / "i").iterdir()) == []


def test_largest_size_is_declared() -> None:
    """qemu's limit itself is accepted; a sector more is not. Nothing is written
    before close, so the writer of a 512 TiB image costs nothing to make."""
    assert FORMAT.declared_size(DISK_SIZE_MAX - 1) == DISK_SIZE_MAX
    assert FORMAT.declared_size(1) == 512 and FORMAT.declared_size(0) == 0
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        create_writer(OutputFile(fd, "x"), DISK_SIZE_MAX, creation_options(FORMAT)).abort()
        with pytest.raises(CreationError, match=r"^Unsupported VDI image size \(size is "
                                            r"0x1fffff8000200, max supported is 0x1fffff8000000\)"):
            create_writer(OutputFile(fd, "x"), DISK_SIZE_MAX + 1, creation_options(FORMAT))
    finally:
        os.close(fd)


def test_four_tib_of_holes(qemu_img: str, tmp_path: Path) -> None:
    """A 16 MiB block map, written a piece at a time; nothing allocated."""
    source = tmp_path / "holes.raw"
    with source.open("wb") as handle:
        handle.truncate(4 * TIB)
    ours = tmp_path / "i.vdi"
    assert run_instar("dd", "-O", "vdi", "bs=4M", f"if={source}", f"of={ours}").rc == 0
    assert qemu_info(ours)["virtual-size"] == 4 * TIB
    assert ours.stat().st_size == 512 + (4 * TIB // MIB) * 4
    _check_clean(ours)
    opener = ImageOpener(PathPolicy([str(tmp_path)]))
    try:
        image = opener.open(str(ours))
        assert list(image.extents(0, image.virtual_size)) == [
            Extent(0, 4 * TIB, ExtentKind.ZERO)]
    finally:
        opener.close()


# --- the writer through the API: pieces of the map, writing over old contents ---------------


def _write_with_api(path: Path, size: int, options: dict[str, str], data: bytes,
                    pieces: list[tuple[int, bytes | int]] | None = None,
                    in_place: bool = False) -> None:
    """Write ``data`` at 0, then each piece: bytes, or a length of zeros
    declared as the copy engine declares them (``write_zeroes``)."""
    flags = os.O_WRONLY | os.O_CREAT | (0 if in_place else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        writer = FORMAT.create(OutputFile(fd, str(path), in_place=in_place), size,
                               creation_options(FORMAT, options))
        for offset, piece in [(0, data), *(pieces or [])]:
            if isinstance(piece, int):
                writer.write_zeroes(offset, piece)
            elif piece:
                writer.write(offset, piece)
        writer.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("static", ["off", "on"])
def test_block_map_written_in_pieces(qemu_img: str, tmp_path: Path, static: str) -> None:
    """300 GiB: five pieces of the map, data in the first, fourth and fifth
    (the second and third never held: written unallocated)."""
    size = 300 * GIB
    pieces: list[tuple[int, bytes | int]] = [
        (GIB, b"\x11" * 4096), (200 * GIB + 5, b"\x22" * 3000), (size - 512, b"\x33" * 512)]
    path = tmp_path / "p.vdi"
    _write_with_api(path, size, {"static": static}, b"", pieces)
    assert size // BLOCK_SIZE > 4 * CHUNK_ENTRIES
    _check_clean(path)
    for offset, piece in pieces:
        assert isinstance(piece, bytes)
        qemu_io(path, f"read -P 0x{piece[0]:02x} {offset} {len(piece)}", "vdi")
    qemu_io(path, f"read -P 0 {100 * GIB} 1M", "vdi")
    if static == "off":
        header = _header(path)
        assert header.blocks_allocated == 3
        assert path.stat().st_size == header.offset_data + 3 * BLOCK_SIZE


@pytest.mark.parametrize("static", ["off", "on"])
def test_in_place_overwrites_old_contents(qemu_img: str, tmp_path: Path, static: str) -> None:
    """Written over a file of 0xff bytes (a block device, convert -n): what was
    not written reads as zeros all the same."""
    path = tmp_path / "old.vdi"
    path.write_bytes(b"\xff" * (8 * MIB))
    data = pattern(5000)
    _write_with_api(path, 3 * MIB, {"static": static}, data,
                    [(5000, 2 * MIB + 100 - 5000), (2 * MIB + 100, b"\x44" * 100),
                     (2 * MIB + 200, MIB - 200)], in_place=True)
    _check_clean(path)
    expected = bytearray(3 * MIB)
    expected[:5000] = data
    expected[2 * MIB + 100 : 2 * MIB + 200] = b"\x44" * 100
    assert qemu_read_raw(path, tmp_path, "vdi") == bytes(expected)


# --- qemu-iotests 159, restated for vdi -----------------------------------------------------


@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotests_159(qemu_img: str, tmp_path: Path, bs: str) -> None:
    src = tmp_path / "src.vdi"
    qemu_img_ok("create", "-q", "-f", "vdi", str(src), "1M")
    qemu_io(src, "write -P 0x0a 0 1M", "vdi")
    out = tmp_path / "out.vdi"
    assert run_instar("dd", "-f", "vdi", "-O", "vdi", f"bs={bs}", f"if={src}", f"of={out}").rc == 0
    compare = run_qemu_img("compare", "-f", "vdi", "-F", "vdi", str(src), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout


# --- independent readers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("vdi-out")
    images = {}
    for name, options in [("dynamic", []), ("static", ["-o", "static=on"])]:
        path = directory / f"{name}.vdi"
        assert run_instar("dd", "-O", "vdi", *options, f"if={inputs / 'gap.raw'}",
                          f"of={path}").rc == 0
        images[name] = path
    return images


def _expected(source: Path, size: int) -> bytes:
    data = source.read_bytes()
    return data + bytes(size - len(data))


@pytest.mark.parametrize("name", ["dynamic", "static"])
def test_dissect_reads_output(
    qemu_img: str, inputs: Path, written: dict[str, Path], name: str
) -> None:
    vdi = pytest.importorskip("dissect.hypervisor.disk.vdi")
    size = qemu_info(written[name])["virtual-size"]
    assert isinstance(size, int)
    with vdi.VDI(written[name]) as disk:
        assert disk.size == size
        stream = disk.open()
        # A block at a time: dissect 3.21 reads a longer request from its first block on.
        data = b"".join(stream.read(BLOCK_SIZE) for _ in range(0, size, BLOCK_SIZE))
        assert data == _expected(inputs / "gap.raw", size)


def test_oslo_format_inspector(qemu_img: str, written: dict[str, Path]) -> None:
    inspector = pytest.importorskip("oslo_utils.imageutils.format_inspector")
    for path in written.values():
        detected = inspector.detect_file_format(str(path))
        assert detected.NAME == "vdi"
        detected.safety_check()  # raises SafetyCheckFailed on a problem
        assert detected.virtual_size == qemu_info(path)["virtual-size"]
