"""The dd window matrix into every structured format, from raw and qcow2 inputs.

For each input, window and output format: `qemu-img dd -O <fmt>` with the same
operands is the reference. instar's output must declare the same virtual size,
read back (through qemu-img) to the same bytes, and pass `qemu-img check`
where the format has one. qemu-img dd cannot write streamOptimized VMDK or a
fixed VHD, so those are compared with its default subformat. An empty window
into vmdk, where qemu-img dd fails, must still give an image qemu-img accepts.
(qcow2 output has its own, larger matrix in test_qcow2_writer.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import (
    DD_INPUTS,
    DD_WINDOWS,
    build_dd_inputs,
    qemu_info,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
)

# label: (output format, instar's extra options)
OUTPUTS: dict[str, tuple[str, list[str]]] = {
    "vmdk": ("vmdk", []),
    "vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"]),
    "vpc": ("vpc", []),
    "vpc-fixed": ("vpc", ["-o", "subformat=fixed"]),
    "vhdx": ("vhdx", []),
}
CHECKABLE = {"qcow2", "vmdk", "vhdx"}  # qemu-img check has no vpc support


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dd_inputs(tmp_path_factory.mktemp("dd-matrix-inputs"))


@pytest.mark.parametrize("window", DD_WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", DD_INPUTS)
@pytest.mark.parametrize("label", sorted(OUTPUTS))
def test_window_into_format(
    label: str, name: str, window: list[str], inputs: Path, tmp_path: Path
) -> None:
    fmt, extra = OUTPUTS[label]
    source = f"if={inputs / name}"
    ours, theirs = tmp_path / f"instar.{fmt}", tmp_path / f"qemu.{fmt}"
    result = run_instar("dd", "-O", fmt, *extra, *window, source, f"of={ours}", cwd=tmp_path)
    assert result.rc == 0, result.stderr
    qemu = run_qemu_img("dd", "-O", fmt, *window, source, f"of={theirs}", cwd=tmp_path)
    if fmt in CHECKABLE:
        check = run_qemu_img("check", "-f", fmt, str(ours))
        assert check.rc == 0, check.stdout + check.stderr
    size = qemu_info(ours, fmt)["virtual-size"]
    if qemu.rc != 0:  # only the empty vmdk, which qemu-img dd cannot make
        assert (fmt, window) == ("vmdk", ["count=0"]), qemu.stderr
        assert size == 0
        return
    assert result.normalised_stderr() == qemu.normalised_stderr()
    assert size == qemu_info(theirs, fmt)["virtual-size"]
    assert qemu_read_raw(ours, tmp_path, fmt) == qemu_read_raw(theirs, tmp_path, fmt)
