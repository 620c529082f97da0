"""Writing qcow2: `instar dd -O qcow2` checked by qemu-img and two independent readers.

For each input and window, `qemu-img dd -O qcow2` with the same operands is the
reference: same exit status and messages, same virtual size, the same bytes
read back by `qemu-img convert -O raw`; `qemu-img check` must find no errors
and no leaks. dissect.hypervisor and OpenStack's format inspector read the
outputs independently.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import (
    DD_INPUT_SIZE,
    DD_INPUTS,
    DD_WINDOWS,
    assert_option_refused_like_qemu,
    build_dd_inputs,
    qemu_img_ok,
    qemu_info,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
)

RAW_SIZE = DD_INPUT_SIZE
INPUTS = DD_INPUTS
WINDOWS = DD_WINDOWS


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dd_inputs(tmp_path_factory.mktemp("qcow2-writer-inputs"))


# Creation options beyond the defaults: (instar's extra arguments, expected `qemu-img info`).
CONFIGS: dict[str, tuple[list[str], dict[str, object]]] = {
    "default": ([], {"compat": "1.1", "refcount-bits": 16, "compression-type": "zlib",
                     "lazy-refcounts": False, "extended-l2": False}),
    "compressed": (["-c"], {"compression-type": "zlib"}),
    "zstd": (["-c", "-o", "compression_type=zstd"], {"compression-type": "zstd"}),
    "cluster512": (["-o", "cluster_size=512"], {}),
    "extended-l2": (["-o", "extended_l2=on"], {"extended-l2": True}),
    "compat010": (["-o", "compat=0.10"], {"compat": "0.10"}),
    "refcount1": (["-o", "refcount_bits=1"], {"refcount-bits": 1}),
    "lazy": (["-o", "lazy_refcounts=on"], {"lazy-refcounts": True}),
    # Many refcount blocks written along the way, and compressed clusters sharing sectors.
    "refcount64-512": (["-o", "cluster_size=512,refcount_bits=64"], {"refcount-bits": 64}),
    "compressed-refcount2-512": (["-c", "-o", "cluster_size=512,refcount_bits=2"],
                                 {"refcount-bits": 2}),
    "compressed-refcount1": (["-c", "-o", "refcount_bits=1"], {"refcount-bits": 1}),
    "compressed-2m": (["-c", "-o", "cluster_size=2M"], {}),
}
CLUSTER_SIZES = {"cluster512": 512, "refcount64-512": 512, "compressed-refcount2-512": 512,
                 "compressed-2m": 2 << 20}


def _check_clean(image: Path) -> str:
    result = run_qemu_img("check", "--output=human", str(image))
    assert result.rc == 0, result.stdout + result.stderr
    assert "No errors were found on the image." in result.stdout, result.stdout
    assert "leaked" not in result.stdout
    return result.stdout


def _compare_with_qemu(
    inputs: Path, tmp_path: Path, name: str, window: list[str], extra: list[str]
) -> Path:
    """Run both dds; assert parity of status, messages, size and content; return ours."""
    source = f"if={inputs / name}"
    qemu_out, ours_out = tmp_path / "qemu.qcow2", tmp_path / "instar.qcow2"
    qemu = run_qemu_img("dd", "-O", "qcow2", *window, source, f"of={qemu_out}", cwd=tmp_path)
    ours = run_instar("dd", "-O", "qcow2", *extra, *window, source, f"of={ours_out}",
                      cwd=tmp_path)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert ours.rc == 0
    assert qemu_info(ours_out)["virtual-size"] == qemu_info(qemu_out)["virtual-size"]
    _check_clean(ours_out)
    assert qemu_read_raw(ours_out, tmp_path) == qemu_read_raw(qemu_out, tmp_path)
    return ours_out


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("config", ["default", "compressed"])
def test_window_matrix(
    config: str, name: str, window: list[str], inputs: Path, tmp_path: Path
) -> None:
    _compare_with_qemu(inputs, tmp_path, name, window, CONFIGS[config][0])


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_creation_options(config: str, window: list[str], inputs: Path, tmp_path: Path) -> None:
    extra, expected = CONFIGS[config]
    out = _compare_with_qemu(inputs, tmp_path, "pattern.raw", window, extra)
    info = qemu_info(out)
    specific = info["format-specific"]["data"]  # type: ignore[index]
    for key, value in expected.items():
        assert specific[key] == value, (key, specific)
    assert info["cluster-size"] == CLUSTER_SIZES.get(config, 65536)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("config", ["compressed", "zstd", "compressed-refcount2-512"])
def test_compressed_output_is_compressed(config: str, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    assert run_instar("dd", "-O", "qcow2", *CONFIGS[config][0], f"if={inputs / 'pattern.raw'}",
                      f"of={out}").rc == 0
    report = _check_clean(out)
    compressed = float(report.split("% compressed clusters")[0].rsplit(" ", 1)[1])
    assert compressed > 50.0, report
    assert out.stat().st_size < RAW_SIZE // 2  # the pattern repeats: it compresses well


@pytest.mark.usefixtures("qemu_img")
def test_zero_data_is_not_allocated(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    assert run_instar("dd", "-O", "qcow2", f"if={inputs / 'hole.qcow2'}", f"of={out}").rc == 0
    mapping = qemu_img_ok("map", "--output=json", str(out))
    import json

    data = [m for m in json.loads(mapping) if m["data"]]
    # The 300k written at 1500k touch clusters 23 to 28; the rest stays unallocated.
    assert sum(m["length"] for m in data) == 6 << 16


@pytest.mark.usefixtures("qemu_img")
def test_empty_image(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty.qcow2"
    assert run_instar("dd", "-O", "qcow2", "count=0", f"if={inputs / 'pattern.raw'}",
                      f"of={out}").rc == 0
    assert qemu_info(out)["virtual-size"] == 0
    _check_clean(out)
    assert out.stat().st_size == 3 * 65536  # header, refcount table, refcount block


# --- qemu-iotests 159, restated for qcow2 output ------------------------------


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("iotest159") / "in.raw"
    path.write_bytes(b"\x0a" * (1 << 20))
    return path


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("bs", ["5", "512", "1024", "1999", "1K", "64K", "1M"])
def test_iotest_159(bs: str, filled: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    assert run_instar("dd", "-O", "qcow2", f"bs={bs}", f"if={filled}", f"of={out}").rc == 0
    _check_clean(out)
    compare = run_qemu_img("compare", "-f", "raw", "-F", "qcow2", str(filled), str(out))
    assert compare.rc == 0 and "Images are identical." in compare.stdout, compare


# --- independent readers ------------------------------------------------------


# Not extended-l2: dissect.hypervisor fails on qemu-img's own extended-L2 images too
# ("read length must be non-negative"), so it cannot judge instar's.
@pytest.mark.parametrize("config", ["default", "compressed", "zstd", "cluster512", "compat010",
                                    "refcount1", "compressed-refcount2-512"])
def test_dissect_reads_output(config: str, inputs: Path, tmp_path: Path) -> None:
    from dissect.hypervisor.disk.qcow2 import QCow2

    out = tmp_path / "out.qcow2"
    assert run_instar("dd", "-O", "qcow2", *CONFIGS[config][0], f"if={inputs / 'pattern.raw'}",
                      f"of={out}").rc == 0
    disk = QCow2(out)
    stream = disk.open()
    expected = (inputs / "pattern.raw").read_bytes()
    expected += bytes(-len(expected) % 512)
    assert disk.size == len(expected)
    assert stream.read(disk.size) == expected


def _inspect(path: Path) -> tuple[str, int, set[str]]:
    """OpenStack's verdict: detected format, virtual size, failed safety checks."""
    from oslo_utils.imageutils import format_inspector

    inspector = format_inspector.detect_file_format(str(path))
    assert inspector is not None
    try:
        inspector.safety_check()
        failures: set[str] = set()
    except format_inspector.SafetyCheckFailed as error:
        failures = set(error.failures)
    return str(inspector), inspector.virtual_size, failures


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("config", ["default", "compressed", "zstd", "compat010", "extended-l2"])
def test_openstack_inspector(config: str, inputs: Path, tmp_path: Path) -> None:
    extra = CONFIGS[config][0]
    out, reference = tmp_path / "out.qcow2", tmp_path / "qemu.qcow2"
    assert run_instar("dd", "-O", "qcow2", *extra, f"if={inputs / 'c64k.qcow2'}",
                      f"of={out}").rc == 0
    qemu_img_ok("convert", "-O", "qcow2", *extra, str(inputs / "c64k.qcow2"), str(reference))
    fmt, size, failures = _inspect(out)
    assert fmt == "qcow2"
    assert size == qemu_info(out)["virtual-size"] == RAW_SIZE + 24
    # The inspector does not know the extended L2 bit: it fails qemu's own image alike.
    assert failures == _inspect(reference)[2]
    assert failures == ({"unknown_features"} if config == "extended-l2" else set())


# --- refusals -----------------------------------------------------------------

BAD_OPTIONS = [
    "cluster_size=1000", "cluster_size=256", "cluster_size=4M", "cluster_size=abc",
    "cluster_size=0", "compat=0.9", "compat=", "refcount_bits=3", "refcount_bits=128",
    "refcount_bits=0", "refcount_bits=x", "extended_l2=maybe", "extended_l2=ON",
    "compression_type=lz4", "compression_type=zstd,compat=0.10",
    "lazy_refcounts=on,compat=0.10", "lazy_refcounts=x", "extended_l2=on,compat=0.10",
    "extended_l2=on,cluster_size=4k", "foo=1", "refcount_bits=1,compat=0.10",
]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("option", BAD_OPTIONS)
def test_bad_option_refused_before_output(option: str, inputs: Path, tmp_path: Path) -> None:
    assert_option_refused_like_qemu("qcow2", option, inputs / "pattern.raw", tmp_path)


@pytest.mark.parametrize("option", ["encryption=on", "backing_file=x"])
def test_unsupported_option_refused(option: str, inputs: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.qcow2"
    ours = run_instar("dd", "-O", "qcow2", "-o", option, f"if={inputs / 'pattern.raw'}",
                      f"of={target}", cwd=tmp_path)
    assert ours.rc == 1 and len(ours.stderr.splitlines()) == 1
    assert "is not supported yet" in ours.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [[], ["-c"]], ids=["plain", "compressed"])
def test_input_error_mid_copy_leaves_nothing(
    extra: list[str], inputs: Path, tmp_path: Path
) -> None:
    """A corrupt L2 entry met during the copy: one line, exit 1, no output, no threads left."""
    bad = tmp_path / "bad.qcow2"
    shutil.copy(inputs / "c512.qcow2", bad)
    with open(bad, "r+b") as file:
        file.seek(40)
        l1_offset = struct.unpack(">Q", file.read(8))[0]
        file.seek(l1_offset + 8 * 70)  # the L2 table of 2240 KiB, past the zero stretch
        l2_offset = struct.unpack(">Q", file.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        assert l2_offset
        file.seek(l2_offset + 8 * 3)
        file.write(struct.pack(">Q", (1 << 63) | (1 << 45)))
    out = tmp_path / "out.qcow2"
    result = run_instar("dd", "-O", "qcow2", *extra, f"if={bad}", f"of={out}", cwd=tmp_path)
    assert result.rc == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "beyond the end of the file" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.qcow2"]


def test_python_entry_point_writes_qcow2(inputs: Path, tmp_path: Path) -> None:
    """The CLI in a fresh process (thread pool start-up and exit included)."""
    import os
    import sys

    out = tmp_path / "o.qcow2"
    proc = subprocess.run(
        [sys.executable, "-m", "instar", "dd", "-c", "-O", "qcow2", "bs=64k", "count=3",
         f"if={inputs / 'pattern.raw'}", f"of={out}"],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    assert qemu_read_raw(out, tmp_path) == (inputs / "pattern.raw").read_bytes()[: 3 << 16]
