"""The VMDK writer against the real qemu-img 7.2 and independent readers.

Sizes: instar declares what ``qemu-img dd -O vmdk`` declares; contents:
``qemu-img convert -O raw`` of instar's output equals that of qemu's output for
the same dd operands (qemu-img dd writes monolithicSparse only, so it is the
reference for streamOptimized too); layout: headers, grain directories and
descriptors as qemu-img create writes them. Inputs are raw only (the qcow2
reader lives on another branch).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

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
from instar.errors import UnsupportedError, UsageError
from instar.formats.base import OutputFile
from instar.formats.vmdk import FORMAT
from instar.formats.vmdk.layout import (
    GD_AT_END,
    GRAIN_MARKER,
    MAGIC,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GRAIN_DIRECTORY,
    MARKER_GRAIN_TABLE,
    SparseHeader,
    descriptor_text,
    parse_descriptor,
    parse_metadata_marker,
)

KIB = 1 << 10
MIB = 1 << 20
WINDOWS = DD_WINDOWS
MODES = {
    "sparse": ["-O", "vmdk"],
    "stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "compressed": ["-c", "-O", "vmdk"],
}
CREATE_TYPE = {
    "sparse": "monolithicSparse",
    "stream": "streamOptimized",
    "compressed": "streamOptimized",
}


def _input_bytes() -> bytes:
    """3 MiB and a ragged tail: data, a zero MiB, data with a zero grain inside, 777 bytes."""
    middle = bytearray(pattern(MIB, seed=7))
    middle[256 * KIB : 320 * KIB] = bytes(64 * KIB)
    return pattern(MIB) + bytes(MIB) + bytes(middle) + b"\x5a" * 777


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vmdk-src") / "in.raw"
    path.write_bytes(_input_bytes())
    return path


def _check_clean(image: Path) -> None:
    result = run_qemu_img("check", str(image))
    assert result.rc == 0, result.stderr + result.stdout
    assert "No errors were found on the image." in result.stdout


def _create_type(image: Path) -> str:
    info = qemu_info(image, "vmdk")
    specific = info["format-specific"]
    assert isinstance(specific, dict)
    data = specific["data"]
    assert isinstance(data, dict)
    return str(data["create-type"])


def _header(path: Path, at: int = 0) -> SparseHeader:
    with path.open("rb") as handle:
        handle.seek(at, os.SEEK_SET if at >= 0 else os.SEEK_END)
        sector = handle.read(512)
    assert sector[:4] == MAGIC
    return SparseHeader.unpack(sector)


# --- the dd window matrix -------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
def test_dd_matches_qemu(
    qemu_img: str, source: Path, tmp_path: Path, mode: str, window: list[str]
) -> None:
    ours, theirs = tmp_path / "instar.vmdk", tmp_path / "qemu.vmdk"
    result = run_instar("dd", *MODES[mode], *window, f"if={source}", f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu = run_qemu_img("dd", "-O", "vmdk", *window, f"if={source}", f"of={theirs}")
    _check_clean(ours)
    assert _create_type(ours) == CREATE_TYPE[mode]
    size = qemu_info(ours, "vmdk")["virtual-size"]
    if window == ["count=0"]:
        # qemu-img dd cannot write an empty vmdk (capacity 0 makes its own header unreadable).
        assert qemu.rc == 1
        assert size == 0
        assert qemu_read_raw(ours, tmp_path, "vmdk") == b""
        return
    assert qemu.rc == 0, qemu.stderr
    assert size == qemu_info(theirs, "vmdk")["virtual-size"]
    assert qemu_read_raw(ours, tmp_path, "vmdk") == qemu_read_raw(theirs, tmp_path, "vmdk")


@pytest.mark.parametrize("mode", ["sparse", "stream"])
def test_declared_size_matches_qemu_create(qemu_img: str, tmp_path: Path, mode: str) -> None:
    for length in (1, 511, 512, 3000, 65536, 1000000, MIB):
        assert FORMAT.declared_size(length) == (length + 511) // 512 * 512
    source = tmp_path / "in.raw"
    source.write_bytes(b"\x01" * 1000000)
    ours = tmp_path / "o.vmdk"
    assert run_instar("dd", *MODES[mode], "bs=1000000", f"if={source}", f"of={ours}").rc == 0
    assert qemu_info(ours, "vmdk")["virtual-size"] == 1000448


# --- qemu-iotests 159, restated for vmdk ----------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse", "stream"])
@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotests_159(qemu_img: str, tmp_path: Path, mode: str, bs: str) -> None:
    source = tmp_path / "in.raw"
    source.write_bytes(b"\x0a" * MIB)
    out = tmp_path / "out.vmdk"
    result = run_instar("dd", *MODES[mode], f"bs={bs}", f"if={source}", f"of={out}")
    assert result.rc == 0, result.stderr
    _check_clean(out)
    compare = run_qemu_img("compare", "-f", "raw", "-F", "vmdk", str(source), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout, compare.stdout


# --- layout: what qemu-img create writes ----------------------------------------------------


def _metadata_region(path: Path) -> bytes:
    """Header and tables up to the first grain, with the descriptor cut out."""
    header = _header(path)
    data = path.read_bytes()[: header.overhead * 512]
    return data[:512] + data[(header.desc_offset + header.desc_sectors) * 512 :]


def _descriptor(path: Path) -> dict[str, str]:
    header = _header(path)
    start = 512 if header.desc_offset == 0 else header.desc_offset * 512
    raw = path.read_bytes()[start : start + 20 * 512]
    return parse_descriptor(descriptor_text(raw)).fields


@pytest.mark.parametrize("size", [512, MIB, 3 * MIB + 512, 70 * MIB])
@pytest.mark.parametrize(
    "options",
    [
        [],
        ["adapter_type=lsilogic", "hwversion=7"],
        ["adapter_type=buslogic", "compat6=on"],
        ["adapter_type=legacyESX", "toolsversion=10"],
        ["zeroed_grain=on"],
    ],
    ids=lambda o: ",".join(o) or "default",
)
def test_sparse_layout_is_qemus(
    qemu_img: str, tmp_path: Path, size: int, options: list[str]
) -> None:
    source = tmp_path / "in.raw"
    with source.open("wb") as handle:
        handle.truncate(size)  # sparse: nothing to copy, only metadata
    ours, theirs = tmp_path / "a.vmdk", tmp_path / "b.vmdk"
    dash_o = ["-o", ",".join(options)] if options else []
    assert run_instar("dd", "-O", "vmdk", *dash_o, f"if={source}", f"of={ours}").rc == 0
    qemu_img_ok("create", "-f", "vmdk", *dash_o, str(theirs), str(size))
    assert _metadata_region(ours) == _metadata_region(theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    mine, reference = _descriptor(ours), _descriptor(theirs)
    assert mine.pop("CID") != "" and reference.pop("CID") != ""
    assert mine == reference
    _check_clean(ours)


def test_zero_grains_are_not_allocated(qemu_img: str, tmp_path: Path) -> None:
    source = tmp_path / "in.raw"
    data = bytearray(4 * MIB)
    data[MIB + 100 : MIB + 200] = b"\xff" * 100  # one grain of data
    source.write_bytes(data)
    out = tmp_path / "o.vmdk"
    assert run_instar("dd", "-O", "vmdk", "bs=4M", f"if={source}", f"of={out}").rc == 0
    header = _header(out)
    assert out.stat().st_size == header.overhead * 512 + 64 * KIB
    assert qemu_read_raw(out, tmp_path, "vmdk") == bytes(data)


def test_many_grain_tables(qemu_img: str, tmp_path: Path) -> None:
    """Data in the first, a middle and the last of several grain tables (32 MiB each)."""
    size = 100 * MIB + 1024
    source = tmp_path / "in.raw"
    pieces = {
        0: b"first",
        40 * MIB - 3: b"straddles grains",
        65 * MIB: pattern(200 * KIB),
        size - 10: b"last bytes",
    }
    with source.open("wb") as handle:
        handle.truncate(size)
        for offset, piece in pieces.items():
            handle.seek(offset)
            handle.write(piece)
    expected = source.read_bytes()
    for mode in ("sparse", "stream"):
        out = tmp_path / f"{mode}.vmdk"
        assert run_instar("dd", *MODES[mode], "bs=1M", f"if={source}", f"of={out}").rc == 0
        _check_clean(out)
        assert qemu_read_raw(out, tmp_path, "vmdk") == expected


# --- the stream layout ----------------------------------------------------------------------


def test_stream_layout(qemu_img: str, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.vmdk"
    assert run_instar("dd", "-c", "-O", "vmdk", f"if={source}", f"of={out}").rc == 0
    data = out.read_bytes()
    header = _header(out)
    assert (header.version, header.flags, header.compression) == (3, 0x30001, 1)
    assert header.gd_offset == GD_AT_END and header.rgd_offset == 0
    assert len(data) % 512 == 0
    assert parse_metadata_marker(data[-512:]) == (0, 0, MARKER_EOS)
    assert data[-512:] == bytes(512)
    assert parse_metadata_marker(data[-1536:-1024]) == (1, 0, MARKER_FOOTER)
    footer = SparseHeader.unpack(data[-1024:-512])
    assert footer == header.with_gd_offset(footer.gd_offset)
    # Walk the stream: every grain marker names its LBA and inflates to the input.
    expected = _input_bytes()
    expected += bytes(-len(expected) % (64 * KIB))
    position, grains, tables = header.overhead * 512, 0, 0
    while True:
        lba, size = GRAIN_MARKER.unpack_from(data, position)
        if size == 0:
            sectors, _, kind = parse_metadata_marker(data[position : position + 512])
            if kind == MARKER_GRAIN_TABLE:
                tables += 1
                position += 512 + sectors * 512
                continue
            assert kind == MARKER_GRAIN_DIRECTORY
            assert position // 512 + 1 == footer.gd_offset
            break
        grain = zlib.decompress(data[position + 12 : position + 12 + size])
        assert grain == expected[lba * 512 : lba * 512 + 64 * KIB]
        grains += 1
        position += -(-(12 + size) // 512) * 512
    assert (grains, tables) == (32, 1)  # 49 grains, 17 of them zero


def test_stream_with_zeroed_grain_flag(qemu_img: str, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.vmdk"
    args = ["-O", "vmdk", "-o", "subformat=streamOptimized,zeroed_grain=on"]
    assert run_instar("dd", *args, f"if={source}", f"of={out}").rc == 0
    assert _header(out).flags == 0x30005
    _check_clean(out)
    assert qemu_read_raw(out, tmp_path, "vmdk")[: len(_input_bytes())] == _input_bytes()


# --- the Writer API with awkward writes -----------------------------------------------------


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_unaligned_writes(qemu_img: str, tmp_path: Path, subformat: str) -> None:
    """Writes of odd sizes and gaps, in increasing order, assemble whole grains."""
    size = 2 * MIB + 4096
    expected = bytearray(size)
    path = tmp_path / "w.vmdk"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        writer = FORMAT.create(
            OutputFile(fd, str(path)), size, creation_options(FORMAT, {"subformat": subformat})
        )
        offset = 100
        step = 0
        while offset < size:
            length = min(size - offset, [1000, 70000, 5, 131072, 3 * 65536][step % 5])
            piece = pattern(length, seed=step)
            if step % 3 == 2:
                writer.write_zeroes(offset, length)
            else:
                writer.write(offset, piece)
                expected[offset : offset + length] = piece
            offset += length + (step % 4) * 777
            step += 1
        writer.close()
    finally:
        os.close(fd)
    _check_clean(path)
    assert qemu_read_raw(path, tmp_path, "vmdk") == bytes(expected)


def test_block_device_gets_explicit_zeros(qemu_img: str, tmp_path: Path) -> None:
    """On a device nothing reads as zeros by itself: metadata padding and tables are written."""
    size = 70 * MIB
    path = tmp_path / "dev.vmdk"
    path.write_bytes(b"\xa5" * (size + MIB))  # stale contents of a used device
    expected = bytearray(size)
    fd = os.open(path, os.O_WRONLY)
    try:
        out = OutputFile(fd, str(path), in_place=True)
        writer = FORMAT.create(out, size, creation_options(FORMAT))
        for offset in (5 * MIB, 40 * MIB + 4096):
            writer.write_zeroes(offset - MIB, MIB)
            writer.write(offset, pattern(70000))
            expected[offset : offset + 70000] = pattern(70000)
        writer.close()
        with pytest.raises(UnsupportedError, match="block device"):
            FORMAT.create(out, size, creation_options(FORMAT, {"subformat": "streamOptimized"}))
    finally:
        os.close(fd)
    _check_clean(path)
    assert qemu_read_raw(path, tmp_path, "vmdk") == bytes(expected)


# --- independent readers --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse", "stream"])
@pytest.mark.parametrize("window", WINDOWS[:4], ids=lambda w: " ".join(w) or "whole")
def test_independent_readers(
    qemu_img: str, source: Path, tmp_path: Path, mode: str, window: list[str]
) -> None:
    pyvmdk = pytest.importorskip("pyvmdk")
    from dissect.hypervisor.disk.vmdk import VMDK

    out = tmp_path / "o.vmdk"
    assert run_instar("dd", *MODES[mode], *window, f"if={source}", f"of={out}").rc == 0
    expected = qemu_read_raw(out, tmp_path, "vmdk")
    handle = pyvmdk.handle()
    handle.open(str(out))
    handle.open_extent_data_files()
    try:
        assert handle.get_media_size() == len(expected)
        assert handle.read_buffer_at_offset(len(expected), 0) == expected
    finally:
        handle.close()
    with out.open("rb") as file:
        disk = VMDK(file)
        assert disk.size == len(expected)
        assert disk.read_sectors(0, disk.sector_count) == expected


@pytest.mark.parametrize("mode", ["sparse", "stream"])
def test_oslo_format_inspector(qemu_img: str, source: Path, tmp_path: Path, mode: str) -> None:
    from oslo_utils.imageutils import format_inspector

    out = tmp_path / "o.vmdk"
    assert run_instar("dd", *MODES[mode], "bs=1000", "count=3", f"if={source}", f"of={out}").rc == 0
    inspector = format_inspector.detect_file_format(str(out))
    assert str(inspector) == "vmdk"
    inspector.safety_check()
    assert inspector.virtual_size == qemu_info(out, "vmdk")["virtual-size"] == 3072


# --- options --------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["-o", "subformat=foo"], "invalid parameter value: foo"),
    (["-o", "adapter_type=scsi"], "invalid parameter value: scsi"),
    (["-o", "zeroed_grain=maybe"], "Parameter 'zeroed_grain' expects 'on' or 'off'"),
    (["-o", "compat6=1"], "Parameter 'compat6' expects 'on' or 'off'"),
    (["-o", "hwversion=7,compat6=on"], "compat6 cannot be enabled with hwversion set"),
    (["-o", "cluster_size=64k"], "Invalid parameter 'cluster_size'"),
    (["-o", "subformat=monolithicFlat"], "not supported yet"),
    (["-o", "subformat=twoGbMaxExtentSparse"], "not supported yet"),
    (["-o", "subformat=twoGbMaxExtentFlat"], "not supported yet"),
    (["-c", "-o", "subformat=monolithicSparse"], "needs vmdk subformat=streamOptimized"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS]
)
def test_bad_options_fail_before_output(
    source: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "o.vmdk"
    result = run_instar("dd", "-O", "vmdk", *args, f"if={source}", f"of={out}", cwd=tmp_path)
    assert result.rc == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_qemu_agrees_on_bad_option_wording(qemu_img: str, tmp_path: Path) -> None:
    for option, message in BAD_OPTIONS[:5]:
        result = run_qemu_img("create", "-f", "vmdk", *option, str(tmp_path / "q.vmdk"), "1M")
        assert result.rc == 1 and message in result.stderr, result.stderr


def test_too_large_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "big.vmdk", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(UsageError, match="too large for vmdk"):
            FORMAT.create(OutputFile(fd, "big.vmdk"), 1 << 60, creation_options(FORMAT))
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


def test_header_struct_size() -> None:
    header = SparseHeader(1, 3, 2048, 128, 1, 20, 512, 21, 26, 128)
    packed = header.pack()
    assert len(packed) == 512
    assert struct.unpack_from("<4sII", packed) == (MAGIC, 1, 3)
    assert SparseHeader.unpack(packed) == header
