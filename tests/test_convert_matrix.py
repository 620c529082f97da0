"""convert round trips for every pair of formats, against qemu-img convert.

A 16 MiB image with data, written zeros and holes is turned into each input
format by qemu-img; instar and qemu-img then convert it into each output
format. instar's output must declare qemu's virtual size, read back (through
qemu-img) to the same bytes as qemu's output, and compare identical to the
source with ``qemu-img compare``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_info, qemu_read_raw, run_instar, run_qemu_img

FORMATS = ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels", "qed", "qcow"]
SIZE = 16 << 20


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("matrix")
    raw = directory / "source.raw"
    with open(raw, "wb") as file:
        file.write(pattern(3 << 20))  # data
        file.write(bytes(2 << 20))  # written zeros
        file.seek(8 << 20)  # a hole before more data
        file.write(pattern(1_500_000, seed=17))
        file.seek(12 << 20)
        file.write(b"\x01" * 4096 + bytes(8192) + b"\x02" * 100)  # small islands
        file.truncate(SIZE)
    made = {"raw": raw}
    for fmt in FORMATS[1:]:
        made[fmt] = directory / f"source.{fmt}"
        qemu_img_ok("convert", "-f", "raw", "-O", fmt, str(raw), str(made[fmt]))
    return made


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("out_fmt", FORMATS)
@pytest.mark.parametrize("in_fmt", FORMATS)
def test_convert_pair(in_fmt: str, out_fmt: str, sources: dict[str, Path], tmp_path: Path) -> None:
    source = sources[in_fmt]
    ours, theirs = tmp_path / f"instar.{out_fmt}", tmp_path / f"qemu.{out_fmt}"
    result = run_instar("convert", "-f", in_fmt, "-O", out_fmt, str(source), str(ours))
    assert result.rc == 0, result.stderr
    qemu_img_ok("convert", "-f", in_fmt, "-O", out_fmt, str(source), str(theirs))
    assert qemu_info(ours, out_fmt)["virtual-size"] == qemu_info(theirs, out_fmt)["virtual-size"]
    assert qemu_read_raw(ours, tmp_path, out_fmt) == qemu_read_raw(theirs, tmp_path, out_fmt)
    compare = run_qemu_img("compare", "-f", "raw", "-F", out_fmt, str(sources["raw"]), str(ours))
    assert compare.rc == 0, compare.stdout + compare.stderr
    if out_fmt in ("qcow2", "vmdk", "vhdx", "vdi", "parallels", "qed"):  # qemu checks no qcow
        check = run_qemu_img("check", "-f", out_fmt, str(ours))
        assert check.rc == 0, check.stdout + check.stderr
