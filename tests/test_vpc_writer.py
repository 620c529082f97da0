"""The VHD ("vpc") writer against the real qemu-img 7.2 and independent readers.

Sizes: instar declares what ``qemu-img dd -O vpc`` declares (CHS rounding);
contents: ``qemu-img convert -f vpc -O raw`` of instar's output equals that of
qemu's output for the same dd operands; layout: the footer and dynamic header
carry what qemu writes (creator, version, geometry, checksums).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    DD_WINDOWS,
    creation_options,
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
)
from instar.formats.base import OutputFile
from instar.formats.vpc import FORMAT
from instar.formats.vpc.layout import (
    DISK_DYNAMIC,
    DISK_FIXED,
    DynamicHeader,
    Footer,
    Geometry,
    chs_geometry,
    declared_size,
    rounded_geometry,
)
from instar.image import Extent, ExtentKind
from instar.opener import ImageOpener
from instar.safety import PathPolicy

MIB = 1 << 20
GIB = 1 << 30
WINDOWS = DD_WINDOWS
SUBFORMATS = [[], ["-o", "subformat=fixed"]]


def _input_bytes() -> bytes:
    """5.5 MiB and a ragged tail: data, a whole zero 2 MiB block (2-4 MiB), data,
    512 KiB of zeros inside the third block, then 777 bytes of 0x5a."""
    return (
        pattern(2 * MIB) + bytes(2 * MIB) + pattern(MIB, seed=7) + bytes(MIB // 2) + b"\x5a" * 777
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vpc-src") / "in.raw"
    path.write_bytes(_input_bytes())
    return path


def _footer_bytes(path: Path, at: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(at, os.SEEK_SET if at >= 0 else os.SEEK_END)
        return handle.read(512)


# --- CHS rounding --------------------------------------------------------------------------

CHECKED = [
    (0, 0, None),
    (1, 34816, (1, 4, 17)),
    (511, 34816, (1, 4, 17)),
    (512, 34816, (1, 4, 17)),
    (3000, 34816, (1, 4, 17)),
    (65536, 69632, None),
    (1000000, 1009664, None),
    (MIB, 1079296, (31, 4, 17)),
    (10 * MIB + 1, 10514432, None),
    (100 * MIB, 104865792, (1004, 12, 17)),
    (GIB, 1073995776, (2081, 16, 63)),
    (32 * GIB, 34361303040, (16449, 16, 255)),
]


@pytest.mark.parametrize(("length", "size", "chs"), CHECKED)
def test_declared_size_matches_reference(
    length: int, size: int, chs: tuple[int, ...] | None
) -> None:
    assert declared_size(length) == size
    assert FORMAT.declared_size(length) == size
    choice = rounded_geometry(length)
    assert choice.size == size
    if chs is not None:
        assert (choice.geometry.cylinders, choice.geometry.heads, choice.geometry.sectors) == chs
        assert choice.geometry.total_sectors * 512 == size


def test_geometry_branches() -> None:
    """Each branch of the specification's algorithm, and the cap at the CHS maximum."""
    assert chs_geometry(2048) == Geometry(30, 4, 17)
    # 278528 sectors: 16384 cylinders*heads at 17 sectors is one too many -> 31.
    assert chs_geometry(16 * 1024 * 17) == Geometry(278528 // 31 // 16, 16, 31)
    # 507904 sectors: too many at 31 sectors too -> 63.
    assert chs_geometry(16 * 1024 * 31) == Geometry(507904 // 63 // 16, 16, 63)
    assert chs_geometry(65535 * 16 * 63) == Geometry(65535 * 63 // 255, 16, 255)
    assert chs_geometry(10**12) == Geometry(65535, 16, 255)
    big = rounded_geometry(1536 * GIB)  # beyond CHS: exact size, maximum geometry
    assert big.geometry.is_maximum and big.size == 1536 * GIB
    assert rounded_geometry(2040 * GIB).too_large is False
    assert rounded_geometry(2040 * GIB + 512).too_large is True
    forced = rounded_geometry(3000, force_size=True)
    assert forced.size == 3072 and forced.geometry.is_maximum


def test_declared_size_is_idempotent() -> None:
    """create() re-rounds the size dd declared; it must not grow a second time."""
    for length in (1, 3000, 65536, 1000000, 10 * MIB + 1, 100 * MIB, GIB, 32 * GIB, 130 * GIB):
        once = declared_size(length)
        assert declared_size(once) == once


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.integers(min_value=0, max_value=64 * GIB))
def test_declared_size_matches_qemu_create(qemu_img: str, length: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "c.vhd"
        qemu_img_ok("create", "-q", "-f", "vpc", str(image), str(length))
        assert qemu_info(image)["virtual-size"] == declared_size(length)
        footer = Footer.parse(_footer_bytes(image, 0))
        assert footer.geometry == rounded_geometry(length).geometry


# --- dd windows against qemu-img dd --------------------------------------------------------


@pytest.fixture(scope="module")
def vpc_source(source: Path) -> Path:
    """The same bytes as a dynamic VHD made by qemu-img convert."""
    path = source.with_name("in.vhd")
    qemu_img_ok("convert", "-O", "vpc", str(source), str(path))
    return path


@pytest.mark.parametrize("input_kind", ["raw", "vpc"])
@pytest.mark.parametrize("subformat", SUBFORMATS, ids=["dynamic", "fixed"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
def test_dd_window_matches_qemu(
    qemu_img: str,
    source: Path,
    vpc_source: Path,
    tmp_path: Path,
    window: list[str],
    subformat: list[str],
    input_kind: str,
) -> None:
    if input_kind == "vpc":
        source = vpc_source
    ours, theirs = tmp_path / "i.vhd", tmp_path / "q.vhd"
    result = run_instar("dd", "-O", "vpc", *subformat, *window, f"if={source}", f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", "-O", "vpc", *window, f"if={source}", f"of={theirs}")
    assert qemu_info(ours, "vpc")["virtual-size"] == qemu_info(theirs)["virtual-size"]
    assert qemu_read_raw(ours, tmp_path, "vpc") == qemu_read_raw(theirs, tmp_path)
    end_footer = _footer_bytes(ours, -512)
    footer = Footer.parse(end_footer)
    assert Footer.checksum_matches(end_footer)
    if subformat:
        assert footer.disk_type == DISK_FIXED
        assert ours.stat().st_size == max(footer.current_size, 512) + 512
    else:
        assert footer.disk_type == DISK_DYNAMIC
        assert _footer_bytes(ours, 0) == end_footer
        # Same layout as qemu's: same BAT length, so the same header size.
        assert _header(ours).max_table_entries == _header(theirs).max_table_entries
    assert list(tmp_path.glob(".*instar-tmp")) == []


def _header(path: Path) -> DynamicHeader:
    with path.open("rb") as handle:
        handle.seek(512)
        data = handle.read(1024)
    assert DynamicHeader.checksum_matches(data)
    return DynamicHeader.parse(data)


def test_footer_fields_match_qemu(qemu_img: str, source: Path, tmp_path: Path) -> None:
    """Creator, versions, geometry and header fields are what qemu-img writes."""
    ours, theirs = tmp_path / "i.vhd", tmp_path / "q.vhd"
    assert run_instar("dd", "-O", "vpc", f"if={source}", f"of={ours}").rc == 0
    qemu_img_ok("dd", "-O", "vpc", f"if={source}", f"of={theirs}")
    mine, qemus = _footer_bytes(ours, 0), _footer_bytes(theirs, 0)
    assert mine[:8] == b"conectix" and mine[28:32] == b"qemu" and mine[36:40] == b"Wi2k"
    assert struct.unpack(">I", mine[32:36])[0] == 0x00050003
    # Everything but the timestamp (24..28), checksum (64..68) and UUID (68..84) is equal.
    for start, end in [(0, 24), (28, 64), (84, 512)]:
        assert mine[start:end] == qemus[start:end], (start, end)
    assert mine[68:84] != bytes(16)
    header, qheader = _header(ours), _header(theirs)
    assert (header.table_offset, header.block_size, header.data_offset) == (
        qheader.table_offset, qheader.block_size, qheader.data_offset,
    )  # fmt: skip
    assert header.max_table_entries == qheader.max_table_entries


def test_zero_block_stays_unallocated(qemu_img: str, source: Path, tmp_path: Path) -> None:
    """The all-zero 2 MiB block (2-4 MiB) is not stored: qemu's map shows no data there."""
    ours = tmp_path / "i.vhd"
    assert run_instar("dd", "-O", "vpc", "bs=1M", f"if={source}", f"of={ours}").rc == 0
    extents = json.loads(qemu_img_ok("map", "--output=json", "-f", "vpc", str(ours)))
    data = [(e["start"], e["start"] + e["length"]) for e in extents if e["data"]]
    assert all(end <= 2 * MIB or start >= 4 * MIB for start, end in data)
    assert any(start < 2 * MIB for start, _ in data) and any(s >= 4 * MIB for s, _ in data)
    with ours.open("rb") as handle:
        handle.seek(1536)
        bat = struct.unpack(">3I", handle.read(12))
        assert bat[1] == 0xFFFFFFFF and bat[0] != 0xFFFFFFFF and bat[2] != 0xFFFFFFFF
        handle.seek(bat[2] * 512)
        bitmap = handle.read(512)
    # Block 2: 1 MiB of data (sectors 0-2047), 512 KiB of zeros (2048-3071, not
    # stored, bits clear), then 777 bytes (sectors 3072-3073).
    assert bitmap == b"\xff" * 256 + bytes(128) + b"\xc0" + bytes(127)


def test_count_zero_is_a_valid_empty_image(qemu_img: str, source: Path, tmp_path: Path) -> None:
    ours = tmp_path / "e.vhd"
    assert run_instar("dd", "-O", "vpc", "count=0", f"if={source}", f"of={ours}").rc == 0
    assert ours.stat().st_size == 2048  # as qemu's
    assert qemu_info(ours)["virtual-size"] == 0
    fixed = tmp_path / "f.vhd"
    run = run_instar("dd", "-O", "vpc", "-o", "subformat=fixed", "count=0", f"if={source}",
                     f"of={fixed}")  # fmt: skip
    assert run.rc == 0
    assert qemu_info(fixed, "vpc")["virtual-size"] == 0


def test_compression_refused(qemu_img: str, source: Path, tmp_path: Path) -> None:
    ours = tmp_path / "c.vhd"
    result = run_instar("dd", "-c", "-O", "vpc", f"if={source}", f"of={ours}")
    assert result.rc == 1
    assert result.stderr == "instar: Compression not supported for this file format\n"
    assert not ours.exists() and list(tmp_path.iterdir()) == []
    qemu = run_qemu_img("convert", "-c", "-O", "vpc", str(source), str(ours))
    assert qemu.normalised_stderr() == result.normalised_stderr()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("subformat=foo", "Parameter 'subformat' does not accept value 'foo'"),
        ("force_size=maybe", "Parameter 'force_size' expects 'on' or 'off'"),
        ("cluster_size=4k", "Invalid parameter 'cluster_size'"),
    ],
)
def test_bad_options(source: Path, tmp_path: Path, option: str, message: str) -> None:
    ours = tmp_path / "o.vhd"
    result = run_instar("dd", "-O", "vpc", "-o", option, f"if={source}", f"of={ours}")
    assert result.rc == 1 and message in result.stderr
    assert not ours.exists()


def test_too_large_refused_like_qemu(qemu_img: str, tmp_path: Path) -> None:
    huge = tmp_path / "huge.raw"
    with huge.open("wb") as handle:
        handle.truncate(2041 * GIB)
    ours, theirs = tmp_path / "i.vhd", tmp_path / "q.vhd"
    result = run_instar("dd", "-O", "vpc", "bs=1M", f"if={huge}", f"of={ours}", cwd=tmp_path)
    qemu = run_qemu_img("dd", "-O", "vpc", "bs=1M", f"if={huge}", f"of={theirs}", cwd=tmp_path)
    assert result.rc == qemu.rc == 1
    assert result.normalised_stderr() == qemu.normalised_stderr().replace("q.vhd", "i.vhd")
    assert "Disk size is too large, max size is 2040 GiB" in result.stderr
    assert not ours.exists()


def test_largest_size_is_written(qemu_img: str, tmp_path: Path) -> None:
    """2040 GiB of holes: a 4 MiB BAT, nothing allocated, qemu reads the exact size."""
    huge = tmp_path / "huge.raw"
    with huge.open("wb") as handle:
        handle.truncate(2040 * GIB)
    ours = tmp_path / "i.vhd"
    assert run_instar("dd", "-O", "vpc", "bs=4M", f"if={huge}", f"of={ours}").rc == 0
    assert qemu_info(ours)["virtual-size"] == 2040 * GIB
    entries = 2040 * GIB // (2 * MIB)
    assert ours.stat().st_size == 1536 + entries * 4 + 512  # headers, BAT, footer
    opener = ImageOpener(PathPolicy([os.path.dirname(str(ours))]))
    try:
        image = opener.open(str(ours))
        extents = list(image.extents(0, image.virtual_size))
    finally:
        opener.close()
    # qemu's vpc driver answers ZERO for unallocated blocks: one run, nothing read.
    assert extents == [Extent(0, 2040 * GIB, ExtentKind.ZERO)]


def _write_with_api(path: Path, size: int, options: dict[str, str], data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = FORMAT.create(OutputFile(fd, str(path)), size, creation_options(FORMAT, options))
        writer.write(0, data)
        writer.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_force_size_matches_qemu_create(qemu_img: str, tmp_path: Path, subformat: str) -> None:
    """force_size=on keeps the exact size: creator 'qem2', maximum geometry, as qemu."""
    size = 6 * MIB + 512
    ours, theirs = tmp_path / "i.vhd", tmp_path / "q.vhd"
    _write_with_api(ours, size, {"force_size": "on", "subformat": subformat}, pattern(5000))
    qemu_img_ok("create", "-q", "-f", "vpc", "-o", f"force_size=on,subformat={subformat}",
                str(theirs), str(size))  # fmt: skip
    assert (
        qemu_info(ours, "vpc")["virtual-size"] == size == qemu_info(theirs, "vpc")["virtual-size"]
    )
    mine, qemus = _footer_bytes(ours, -512), _footer_bytes(theirs, -512)
    assert mine[28:32] == qemus[28:32] == b"qem2"
    assert mine[40:64] == qemus[40:64]  # sizes, geometry, type
    assert qemu_read_raw(ours, tmp_path, "vpc")[:5000] == pattern(5000)


def test_create_rounds_an_unrounded_size(qemu_img: str, tmp_path: Path) -> None:
    """Asked for 1 MiB directly, the writer rounds up as qemu-img create does."""
    ours = tmp_path / "i.vhd"
    _write_with_api(ours, MIB, {}, pattern(MIB))
    assert qemu_info(ours)["virtual-size"] == 1079296
    assert qemu_read_raw(ours, tmp_path)[:MIB] == pattern(MIB)


# --- qemu-iotests 159, restated for vpc -----------------------------------------------------


@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotests_159(qemu_img: str, tmp_path: Path, bs: str) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x0a" * MIB)
    out = tmp_path / "out.vhd"
    assert run_instar("dd", "-O", "vpc", f"bs={bs}", f"if={src}", f"of={out}").rc == 0
    compare = run_qemu_img("compare", "-f", "raw", "-F", "vpc", str(src), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout


# --- independent readers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("vpc-out")
    images = {}
    for name, options in [("dynamic", []), ("fixed", ["-o", "subformat=fixed"])]:
        path = directory / f"{name}.vhd"
        assert run_instar("dd", "-O", "vpc", *options, f"if={source}", f"of={path}").rc == 0
        images[name] = path
    return images


def _expected(source: Path, size: int) -> bytes:
    data = source.read_bytes()
    return data + bytes(size - len(data))


@pytest.mark.parametrize("name", ["dynamic", "fixed"])
def test_pyvhdi_reads_output(
    qemu_img: str, source: Path, written: dict[str, Path], name: str
) -> None:
    pyvhdi = pytest.importorskip("pyvhdi")
    size = qemu_info(written[name], "vpc")["virtual-size"]
    assert isinstance(size, int)
    handle = pyvhdi.file()
    handle.open(str(written[name]))
    try:
        assert handle.get_media_size() == size
        assert handle.read_buffer_at_offset(size, 0) == _expected(source, size)
    finally:
        handle.close()


@pytest.mark.parametrize("name", ["dynamic", "fixed"])
def test_dissect_reads_output(
    qemu_img: str, source: Path, written: dict[str, Path], name: str
) -> None:
    vhd = pytest.importorskip("dissect.hypervisor.disk.vhd")
    size = qemu_info(written[name], "vpc")["virtual-size"]
    assert isinstance(size, int)
    with written[name].open("rb") as handle:
        disk = vhd.VHD(handle)
        assert disk.size == size
        assert disk.read(size) == _expected(source, size)


def test_oslo_format_inspector(qemu_img: str, written: dict[str, Path]) -> None:
    inspector = pytest.importorskip("oslo_utils.imageutils.format_inspector")
    detected = inspector.detect_file_format(str(written["dynamic"]))
    assert detected.NAME == "vhd"
    detected.safety_check()  # raises SafetyCheckFailed on a problem
    assert detected.virtual_size == qemu_info(written["dynamic"])["virtual-size"]


def test_dd_force_size_declares_exact_size_like_convert(tmp_path: Path, qemu_img: str) -> None:
    source = tmp_path / "src.raw"
    source.write_bytes(pattern(3_000_000))
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "theirs.vhd"
    result = run_instar("dd", "-O", "vpc", "-o", "force_size=on", f"if={source}", f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("convert", "-O", "vpc", "-o", "force_size=on", str(source), str(theirs))
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"] == 3_000_320
