"""Safe by default: an image opens no other file unless you allow its directory;
only regular files and block devices are ever read, and nothing blocks on open.

The CVE-2022-47951 pattern: a monolithicFlat VMDK uploaded into a shared staging
directory names another upload beside it. Without ``--allow`` (or INSTAR_ALLOW)
instar refuses, and the refusal reads the same whether the named file exists.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

import instar
from helpers import pattern, qemu_img_ok, run_instar
from instar.errors import PolicyError


def _flat_vmdk(directory: Path, extent: str, sectors: int = 8) -> Path:
    """A monolithicFlat descriptor naming ``extent`` (relative or absolute)."""
    descriptor = directory / "upload.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n'
        f'RW {sectors} FLAT "{extent}" 0\n\n'
        'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "1"\n'
        'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n'
    )
    return descriptor


def test_an_image_cannot_read_its_neighbour_by_default(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "other-upload.raw").write_bytes(b"SECRET" * 1000)
    image = _flat_vmdk(staging, "other-upload.raw")
    out = tmp_path / "out.raw"
    refused = run_instar("convert", "-O", "raw", str(image), str(out))
    assert refused.rc == 1 and not out.exists()
    assert refused.stderr == (
        f"instar: extent '{staging}/other-upload.raw' is outside the allowed directories "
        "(none); use --allow DIR to permit it\n")
    # The same words for a name that does not exist: nothing said about existence.
    missing = run_instar("convert", "-O", "raw", str(_flat_vmdk(staging, "no-such.raw")),
                         str(out))
    assert missing.stderr == refused.stderr.replace("other-upload.raw", "no-such.raw")
    image = _flat_vmdk(staging, "other-upload.raw")
    allowed = run_instar("convert", "--allow", str(staging), "-O", "raw", str(image), str(out))
    assert allowed.rc == 0, allowed.stderr
    assert out.read_bytes() == (b"SECRET" * 1000)[:4096]


def test_instar_allow_takes_colon_separated_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, top_dir = tmp_path / "bases", tmp_path / "tops"
    base_dir.mkdir()
    top_dir.mkdir()
    (base_dir / "base.raw").write_bytes(pattern(1 << 20))
    top = top_dir / "top.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", str(base_dir / "base.raw"), "-F", "raw",
                str(top))
    out = tmp_path / "out.raw"
    assert run_instar("dd", f"if={top}", f"of={out}").rc == 1
    monkeypatch.setenv("INSTAR_ALLOW", f"{tmp_path / 'nothing-here'}:{base_dir}")
    assert run_instar("dd", f"if={top}", f"of={out}").rc == 0
    assert out.read_bytes() == pattern(1 << 20)


def test_the_api_allows_nothing_by_default(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(pattern(1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    with pytest.raises(PolicyError, match=r"backing file '.*base\.raw' is outside"):
        instar.open_image(str(top))
    with instar.open_image(str(top), allow=[tmp_path]) as image:
        assert image.read(0, 4096) == pattern(4096)


# --- only regular files and block devices; nothing blocks ----------------------------------------


def _special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "directory":
        path.mkdir()


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory"])
def test_a_special_file_as_the_image_is_refused_at_once(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "thing"
    _special(kind, path)
    started = time.monotonic()
    result = run_instar("info", str(path))
    assert time.monotonic() - started < 5  # a FIFO with no writer must not hang
    assert result.rc == 1
    if kind == "socket":  # open(2) itself refuses a socket, as it does for qemu-img
        reason = f"Could not open '{path}': No such device or address"
    else:
        reason = f"'file' driver requires '{path}' to be a regular file"
    assert result.stderr == f"instar: Could not open '{path}': {reason}\n"


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "char device"])
@pytest.mark.parametrize("role", ["backing file", "extent"])
def test_a_special_file_named_by_an_image_is_refused_at_once(
    kind: str, role: str, tmp_path: Path
) -> None:
    named = Path("/dev/zero") if kind == "char device" else tmp_path / "named"
    if kind != "char device":
        _special(kind, named)
    if role == "backing file":
        image = tmp_path / "top.qcow2"
        qemu_img_ok("create", "-q", "-f", "qcow2", "-u", "-b", str(named), "-F", "raw",
                    str(image), "1M")
    else:
        image = _flat_vmdk(tmp_path, str(named))
    out = tmp_path / "out.raw"
    started = time.monotonic()
    result = run_instar("convert", "--allow", str(named.parent), "-O", "raw", str(image),
                        str(out))
    assert time.monotonic() - started < 5
    assert result.rc == 1 and not out.exists()
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    reason = ("No such device or address" if kind == "socket"
              else f"'file' driver requires '{named}' to be a regular file")
    assert reason in result.stderr
