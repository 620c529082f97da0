"""Writing VHDX: instar dd -O vhdx against qemu-img dd -O vhdx, qemu-img check,
qemu-iotests 159 restated, qemu-img create's layout, and independent readers
(libvhdi, dissect.hypervisor, OpenStack's format inspector)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from helpers import (
    assert_option_refused_like_qemu,
    creation_options,
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
)
from instar.copy import copy_image
from instar.formats.base import OutputFile
from instar.formats.raw import open_raw
from instar.formats.vhdx import FORMAT as VHDX
from instar.formats.vhdx import layout
from instar.formats.vhdx.writer import check_options, create, plan_layout
from instar.image import Window
from instar.opener import open_input_file
from instar.output import OutputSpec, write_image

MiB = 1 << 20

WINDOWS: list[list[str]] = [
    ["bs=65536"],  # the whole image (a large bs keeps qemu-img dd quick)
    ["bs=65536", "skip=2", "count=4"],
    ["bs=1000", "count=3"],
    ["bs=513", "skip=1", "count=3"],
    ["count=0"],
]
SUBFORMATS: list[list[str]] = [[], ["-o", "subformat=fixed"]]
# name -> extra -o options for that input
INPUTS = {"small.raw": [], "big.raw": ["block_size=1M"]}


def _options(subformat: list[str], name: str) -> list[str]:
    """The -o arguments for one case: subformat and the input's block size."""
    extra = [*subformat[1:], *INPUTS[name]]
    return ["-o", ",".join(extra)] if extra else []


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("vhdx-inputs")
    # A few MiB: data, a 1.5 MiB zero stretch, data ending off a sector boundary.
    (directory / "small.raw").write_bytes(
        pattern(2 * MiB + 4096, seed=1) + bytes(3 * MiB // 2) + pattern(MiB + 1000, seed=2)
    )
    # 20 MiB in 1 MiB blocks: data across block ends, whole zero blocks, a zero tail.
    big = bytearray(pattern(20 * MiB, seed=5))
    big[3 * MiB + 4096 : 7 * MiB] = bytes(4 * MiB - 4096)
    big[18 * MiB :] = bytes(2 * MiB)
    (directory / "big.raw").write_bytes(bytes(big))
    return directory


@pytest.fixture(scope="module")
def qemu_reference(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """qemu-img dd -O vhdx per (input, window), computed once: size and raw contents."""
    cache: dict[str, object] = {}
    work = tmp_path_factory.mktemp("qemu-vhdx")

    def get(name: str, operands: list[str]) -> tuple[int, bytes]:
        key = name + " " + " ".join(operands)
        if key not in cache:
            out = work / f"q{len(cache)}.vhdx"
            qemu_img_ok("dd", "-O", "vhdx", *operands, f"if={inputs / name}", f"of={out}")
            size = qemu_info(out)["virtual-size"]
            assert isinstance(size, int)
            cache[key] = (size, qemu_read_raw(out, work))
            out.unlink()
        value = cache[key]
        assert isinstance(value, tuple)
        return value

    return {"get": get}


def _check_clean(image: Path) -> None:
    result = run_qemu_img("check", "-f", "vhdx", str(image))
    assert result.rc == 0, result.stdout + result.stderr
    assert "No errors were found on the image." in result.stdout


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("subformat", SUBFORMATS, ids=["dynamic", "fixed"])
@pytest.mark.parametrize("operands", WINDOWS, ids=lambda w: " ".join(w))
def test_dd_window_matrix(
    name: str,
    subformat: list[str],
    operands: list[str],
    inputs: Path,
    qemu_reference: dict[str, object],
    tmp_path: Path,
) -> None:
    out = tmp_path / "instar.vhdx"
    options = _options(subformat, name)
    result = run_instar("dd", "-O", "vhdx", *options, *operands, f"if={inputs / name}", f"of={out}")
    assert result.rc == 0, result.stderr
    _check_clean(out)
    size = qemu_info(out, "vhdx")["virtual-size"]
    if operands == ["count=0"]:
        # qemu-img writes a 74 MB file here (an underflow sizes its BAT); instar a sparse one.
        assert size == 0
        assert out.stat().st_size <= 12 * MiB
        assert out.stat().st_blocks * 512 < MiB
        assert qemu_read_raw(out, tmp_path, "vhdx") == b""
        return
    get = qemu_reference["get"]
    assert callable(get)
    qemu_size, qemu_bytes = get(name, operands)
    assert size == qemu_size
    assert qemu_read_raw(out, tmp_path, "vhdx") == qemu_bytes


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotests_159(bs: str, tmp_path: Path) -> None:
    """qemu-iotests 159 for vhdx: dd of a 1 MiB image of 0x0a, any bs, is identical."""
    source = tmp_path / "img.raw"
    source.write_bytes(b"\x0a" * MiB)
    out = tmp_path / "out.vhdx"
    assert run_instar("dd", "-O", "vhdx", f"bs={bs}", f"if={source}", f"of={out}").rc == 0
    _check_clean(out)
    compare = run_qemu_img("compare", "-f", "raw", "-F", "vhdx", str(source), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout


@pytest.mark.usefixtures("qemu_img")
def test_zero_blocks_are_not_allocated(inputs: Path, tmp_path: Path) -> None:
    """All-zero 1 MiB blocks stay unallocated (ZERO state); the rest are in order."""
    out = tmp_path / "out.vhdx"
    args = ["-O", "vhdx", "-o", "block_size=1M", "bs=4M"]
    assert run_instar("dd", *args, f"if={inputs / 'big.raw'}", f"of={out}").rc == 0
    data = out.read_bytes()
    bat = [int.from_bytes(data[2 * MiB + 8 * i : 2 * MiB + 8 * i + 8], "little") for i in range(20)]
    states = [entry & 7 for entry in bat]
    # Blocks 4, 5, 6 and 18, 19 are all zero; block 3 has 4 KiB of data.
    assert states == [6, 6, 6, 6, 2, 2, 2, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 2, 2]
    offsets = [entry >> 20 << 20 for entry in bat if entry & 7 == 6]
    assert offsets == sorted(offsets) and offsets[0] == 8 * MiB
    assert all(b - a == MiB for a, b in itertools.pairwise(offsets))
    assert len(data) == offsets[-1] + MiB  # 15 blocks, nothing else after the metadata


@pytest.mark.usefixtures("qemu_img")
def test_block_state_zero_off(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.vhdx"
    args = ["-O", "vhdx", "-o", "block_size=1M,block_state_zero=off", "bs=4M"]
    assert run_instar("dd", *args, f"if={inputs / 'big.raw'}", f"of={out}").rc == 0
    _check_clean(out)
    data = out.read_bytes()
    entry = int.from_bytes(data[2 * MiB + 8 * 4 : 2 * MiB + 8 * 5], "little")
    assert entry == layout.PAYLOAD_NOT_PRESENT
    assert qemu_read_raw(out, tmp_path, "vhdx") == (inputs / "big.raw").read_bytes()


def _structure(path: Path) -> dict[str, object]:
    """The layout facts of an image, decoded with instar's own decoders."""
    data = path.read_bytes()
    headers = [
        layout.decode_header(data[o : o + layout.HEADER_SIZE]) for o in layout.HEADER_OFFSETS
    ]
    assert all(h is not None for h in headers)
    regions = [
        layout.decode_region_table(data[o : o + layout.REGION_TABLE_SIZE])
        for o in layout.REGION_TABLE_OFFSETS
    ]
    assert regions[0] == regions[1]
    metadata = next(r for r in regions[0] if r.guid == layout.METADATA_REGION)
    table = data[metadata.file_offset : metadata.file_offset + layout.METADATA_TABLE_SIZE]
    entries = layout.decode_metadata_table(table, metadata.length)
    params = next(e for e in entries if e.item_id == layout.FILE_PARAMETERS)
    start = metadata.file_offset + params.offset
    first, second = headers
    assert first is not None and second is not None
    return {
        "identifier": data[:8],
        "log": (first.log_offset, first.log_length, first.log_version, first.log_guid),
        "sequence": second.sequence_number - first.sequence_number,
        "guids equal": (first.file_write_guid, first.data_write_guid)
        == (second.file_write_guid, second.data_write_guid),
        "regions": [(r.guid, r.file_offset, r.length) for r in regions[0]],
        "items": [(e.item_id, e.offset, e.length, e.flags) for e in entries],
        "params": layout.decode_file_parameters(data[start : start + 8]),
    }


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(
    "options",
    ["", "block_size=1M", "subformat=fixed,block_state_zero=off", "log_size=3M,block_size=32M"],
)
def test_layout_matches_qemu_img_create(options: str, tmp_path: Path) -> None:
    """Same header, region table, metadata table and file parameters as qemu-img create."""
    size = 50 * MiB
    qemu_out = tmp_path / "qemu.vhdx"
    qemu_img_ok(
        "create",
        "-q",
        "-f",
        "vhdx",
        *(["-o", options] if options else []),
        str(qemu_out),
        str(size),
    )
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(MiB))
    os.truncate(source, size)
    ours = tmp_path / "ours.vhdx"
    args = ["-O", "vhdx", *(["-o", options] if options else []), "bs=1M"]
    assert run_instar("dd", *args, f"if={source}", f"of={ours}").rc == 0
    _check_clean(ours)
    assert _structure(ours) == _structure(qemu_out)
    # The creator names instar; qemu writes "QEMU v7.2...".
    assert ours.read_bytes()[8:30].decode("utf-16-le").startswith("instar v")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(
    ("size", "block_size"),
    [
        (MiB, 8 * MiB),
        (1 << 30, 8 * MiB),
        ((1 << 30) + 512, 16 * MiB),
        (100 << 30, 16 * MiB),
        ((100 << 30) + 512, 32 * MiB),
    ],
)
def test_block_size_by_virtual_size(size: int, block_size: int, tmp_path: Path) -> None:
    """qemu's thresholds, checked end to end: a tiny image padded to ``size``."""
    qemu_out = tmp_path / "qemu.vhdx"
    qemu_img_ok("create", "-q", "-f", "vhdx", str(qemu_out), str(size))
    assert qemu_info(qemu_out)["cluster-size"] == block_size
    source = tmp_path / "tiny.raw"
    source.write_bytes(pattern(4096))
    target = tmp_path / "ours.vhdx"
    from instar.formats.vhdx import FORMAT

    image = open_raw(open_input_file(str(source)))
    write_image(Window(image, 0, size), str(target),
                OutputSpec(FORMAT, size, creation_options(FORMAT)))
    image.close()
    assert qemu_info(target)["cluster-size"] == block_size
    assert qemu_info(target)["virtual-size"] == size
    _check_clean(target)


@pytest.mark.parametrize(
    ("size", "block_size"),
    [(32 << 40, 32 * MiB), ((32 << 40) + 512, 64 * MiB), (64 << 40, 64 * MiB)],
)
def test_block_size_for_huge_disks(size: int, block_size: int) -> None:
    """Above 32 TiB qemu picks 64 MiB blocks (too big to create in a test)."""
    plan = plan_layout(size, check_options(creation_options(VHDX)))
    assert plan.geometry.block_size == block_size


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(
    "option",
    [
        "block_size=3M",
        "log_size=0",
        "log_size=5G",
        "block_state_zero=maybe",
        "block_state_zero=ON",
        "subformat=diff",
        "foo=1",
        "block_size=abc",
        "block_size=-1",
        "block_size=99999999999999999999",
    ],
)
def test_option_errors_match_qemu(option: str, inputs: Path, tmp_path: Path) -> None:
    assert_option_refused_like_qemu("vhdx", option, inputs / "small.raw", tmp_path)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(
    ("option", "cluster_size"),
    [
        ("block_size=1.5M", 2 * MiB),
        ("block_size=512M", 256 * MiB),
        ("block_size=0", 8 * MiB),
        ("block_size=1", MiB),
    ],
)
def test_block_size_rounding_matches_qemu(
    option: str, cluster_size: int, inputs: Path, tmp_path: Path
) -> None:
    qemu_img_ok("create", "-q", "-f", "vhdx", "-o", option, str(tmp_path / "q.vhdx"), "10M")
    assert qemu_info(tmp_path / "q.vhdx")["cluster-size"] == cluster_size
    out = tmp_path / "o.vhdx"
    assert (
        run_instar("dd", "-O", "vhdx", "-o", option, f"if={inputs / 'small.raw'}", f"of={out}").rc
        == 0
    )
    assert qemu_info(out)["cluster-size"] == cluster_size
    _check_clean(out)


def test_log_size_is_rounded_up(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.vhdx"
    args = ["-O", "vhdx", "-o", "log_size=2.5M"]
    assert run_instar("dd", *args, f"if={inputs / 'small.raw'}", f"of={out}").rc == 0
    header = layout.decode_header(out.read_bytes()[64 << 10 : 68 << 10])
    assert header is not None and (header.log_offset, header.log_length) == (MiB, 3 * MiB)


@pytest.mark.usefixtures("qemu_img")
def test_compression_refused_before_output(inputs: Path, tmp_path: Path) -> None:
    qemu = run_qemu_img(
        "convert", "-c", "-O", "vhdx", str(inputs / "small.raw"), "q.vhdx", cwd=tmp_path
    )
    ours = run_instar(
        "dd", "-c", "-O", "vhdx", f"if={inputs / 'small.raw'}", "of=o.vhdx", cwd=tmp_path
    )
    assert ours.rc == qemu.rc == 1
    assert ours.normalised_stderr() == qemu.normalised_stderr()
    assert ours.stderr == "instar: Compression not supported for this file format\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("qemu_img")
def test_too_large_refused_like_qemu(tmp_path: Path) -> None:
    qemu = run_qemu_img("create", "-q", "-f", "vhdx", "t.vhdx", "65T", cwd=tmp_path)
    assert qemu.stderr.endswith("Image size too large; max of 64TB\n")
    with pytest.raises(Exception, match=r"^Image size too large; max of 64TB$"):
        plan_layout(65 << 40, check_options(creation_options(VHDX)))
    with pytest.raises(Exception, match="use a larger block_size"):
        plan_layout(64 << 40, check_options(creation_options(VHDX, {"block_size": "1M"})))


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_block_device_output_overwrites_garbage(fixed: bool, inputs: Path, tmp_path: Path) -> None:
    """Written in place over old bytes (as on a block device), zeros are written too."""
    source = inputs / "big.raw"
    target = tmp_path / "device.img"
    target.write_bytes(b"\xa5" * (40 * MiB))
    options = {"block_size": "1M", **({"subformat": "fixed"} if fixed else {})}
    image = open_raw(open_input_file(str(source)))
    fd = os.open(target, os.O_WRONLY)
    try:
        out = OutputFile(fd, str(target), in_place=True)
        size = image.virtual_size
        writer = create(out, size, creation_options(VHDX, options))
        copy_image(Window(image, 0, size), writer)
    finally:
        os.close(fd)
        image.close()
    _check_clean(target)
    assert qemu_read_raw(target, tmp_path, "vhdx") == source.read_bytes()


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("name", list(INPUTS))
def test_independent_readers(fixed: bool, name: str, inputs: Path, tmp_path: Path) -> None:
    """libvhdi and dissect.hypervisor read instar's output to the input's bytes;
    OpenStack's format inspector detects it, finds it safe, and agrees on the size."""
    import pyvhdi
    from dissect.hypervisor.disk import vhdx as dissect_vhdx
    from oslo_utils.imageutils import format_inspector

    out = tmp_path / "out.vhdx"
    options = _options([] if not fixed else ["-o", "subformat=fixed"], name)
    assert (
        run_instar("dd", "-O", "vhdx", *options, "bs=1M", f"if={inputs / name}", f"of={out}").rc
        == 0
    )
    expected = (inputs / name).read_bytes()
    expected += bytes(-len(expected) % 512)

    handle = pyvhdi.file()
    handle.open(str(out))
    try:
        assert handle.get_media_size() == len(expected)
        assert handle.read_buffer_at_offset(len(expected), 0) == expected
    finally:
        handle.close()

    with open(out, "rb") as stream:
        disk = dissect_vhdx.VHDX(stream)
        assert disk.size == len(expected)
        assert disk.read() == expected

    inspector = format_inspector.detect_file_format(str(out))
    assert isinstance(inspector, format_inspector.VHDXInspector)
    inspector.safety_check()
    assert inspector.virtual_size == len(expected) == qemu_info(out, "vhdx")["virtual-size"]


def test_empty_image_for_other_readers(inputs: Path, tmp_path: Path) -> None:
    """count=0: OpenStack's inspector accepts the empty image (libvhdi refuses any
    0-byte VHDX, and dissect mistakes a 0 size for a missing item)."""
    from oslo_utils.imageutils import format_inspector

    out = tmp_path / "empty.vhdx"
    assert (
        run_instar("dd", "-O", "vhdx", "count=0", f"if={inputs / 'small.raw'}", f"of={out}").rc == 0
    )
    inspector = format_inspector.detect_file_format(str(out))
    assert isinstance(inspector, format_inspector.VHDXInspector)
    inspector.safety_check()
    assert inspector.virtual_size == 0


@pytest.mark.usefixtures("qemu_img")
def test_bat_interleaves_sector_bitmap_entries(tmp_path: Path) -> None:
    """With 256 MiB blocks a chunk is 16 blocks: block 16 sits after a bitmap entry."""
    source = tmp_path / "sparse.raw"
    regions = {0: 0x11, (4 << 30) + 100 * MiB: 0x22, (4 << 30) + 700 * MiB: 0x33}
    with open(source, "wb") as file:
        for offset, byte in regions.items():
            file.seek(offset)
            file.write(bytes([byte]) * 65536)
        file.truncate(5 << 30)
    out = tmp_path / "out.vhdx"
    args = ["-O", "vhdx", "-o", "block_size=256M", "bs=4M"]
    assert run_instar("dd", *args, f"if={source}", f"of={out}").rc == 0
    _check_clean(out)
    assert qemu_info(out)["virtual-size"] == 5 << 30
    with open(out, "rb") as file:
        file.seek(2 * MiB)
        entries = [int.from_bytes(file.read(8), "little") for _ in range(21)]
    states = [entry & 7 for entry in entries]
    assert states[16] == layout.SB_NOT_PRESENT  # the bitmap entry of chunk 0
    assert states[0] == states[17] == states[19] == layout.PAYLOAD_FULLY_PRESENT
    assert states[18] == states[20] == layout.PAYLOAD_ZERO
    for offset, byte in regions.items():
        qemu_io_read = run_qemu_io(out, f"read -P {byte:#x} {offset} 65536")
        assert "Pattern verification failed" not in qemu_io_read
        qemu_io_read = run_qemu_io(out, f"read -P 0 {offset + 65536} 65536")
        assert "Pattern verification failed" not in qemu_io_read


def run_qemu_io(image: Path, command: str) -> str:
    import subprocess

    from helpers import qemu_io_path

    proc = subprocess.run(
        [qemu_io_path(), "-f", "vhdx", "-r", "-c", command, str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "read 65536/65536 bytes" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr
