"""Format names: what qemu-img 7.2 knows and instar lacks is "not supported", never unknown.

`registry.QEMU_DRIVERS` is qemu-img's "Supported formats" list; a name in it that
instar has no driver for is refused as not supported (reading or writing, once,
with the program's name only as the prefix), where qemu-img itself cannot create
such an image with qemu's message; a name qemu does not know either keeps qemu's
`Unknown driver` / `Unknown file format`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_instar, run_qemu_img
from instar.formats import registry

LACKING = sorted(name for name in registry.QEMU_DRIVERS if registry.get(name) is None)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    (tmp_path / "a.raw").write_bytes(bytes(1 << 16))
    return tmp_path


def test_drivers_are_qemus(qemu_img: str) -> None:
    usage = run_qemu_img("--help").stdout
    listed = usage.split("Supported formats:")[1].split("\n")[0].split()
    assert sorted(listed) == sorted(registry.QEMU_DRIVERS)
    assert {"luks", "nbd"} <= set(LACKING) and "file" not in LACKING  # test_file_driver.py
    assert registry.QEMU_CANNOT_CREATE <= registry.QEMU_DRIVERS


@pytest.mark.parametrize("name", LACKING)
def test_reading_a_qemu_driver_is_not_supported(name: str, raw: Path) -> None:
    message = f"{name}: reading this format is not supported yet"
    for args in (["info", "-f", name, "a.raw"], ["dd", "-f", name, "if=a.raw", "of=o"],
                 ["convert", "-f", name, "a.raw", "o"], ["compare", "-F", name, "a.raw", "a.raw"]):
        result = run_instar(*args, cwd=raw)
        assert result.stderr == f"instar: Could not open 'a.raw': {message}\n", args
        assert result.rc == (2 if args[0] == "compare" else 1) and result.stdout == ""
    assert sorted(path.name for path in raw.iterdir()) == ["a.raw"]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", LACKING)
def test_writing_a_qemu_driver_is_not_supported(name: str, raw: Path) -> None:
    """Refused before anything is created; with qemu's words where qemu refuses too."""
    for args in (["convert", "-O", name, "a.raw", "o"], ["dd", "-O", name, "if=a.raw", "of=o"]):
        result = run_instar(*args, cwd=raw)
        assert result.rc == 1 and result.stdout == ""
        if name in registry.QEMU_CANNOT_CREATE:
            qemu = run_qemu_img(*args, cwd=raw)
            assert (result.rc, result.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
        else:
            assert result.stderr == f"instar: {name}: writing this format is not supported yet\n"
        assert sorted(path.name for path in raw.iterdir()) == ["a.raw"]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", ["bochs", "cloop", "dmg"])
def test_formats_read_and_never_created_are_refused_as_qemu_refuses(name: str,
                                                                     raw: Path) -> None:
    """instar reads them; ``-O`` (with or without ``-o``) is refused in qemu's
    words before anything is created, as qemu-img refuses it."""
    assert registry.get(name) is not None and name in registry.QEMU_CANNOT_CREATE
    for args in (["convert", "-O", name, "a.raw", "o"], ["dd", "-O", name, "if=a.raw", "of=o"],
                 ["convert", "-O", name, "-o", "help", "a.raw", "o"],
                 ["convert", "-O", name, "-o", "size=1M", "a.raw", "o"]):
        ours, qemu = run_instar(*args, cwd=raw), run_qemu_img(*args, cwd=raw)
        assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
            qemu.rc, qemu.stdout, qemu.normalised_stderr()), args
        assert sorted(path.name for path in raw.iterdir()) == ["a.raw"]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", [["info", "-f", "xyz", "a.raw"], ["dd", "-f", "qcow3", "if=a.raw",
                                  "of=o"], ["convert", "-O", "xyz", "a.raw", "o"],
                                  ["dd", "-O", "vhd", "if=a.raw", "of=o"],
                                  ["compare", "-f", "img", "a.raw", "a.raw"]],
                         ids=" ".join)
def test_names_qemu_does_not_know_are_unknown(args: list[str], raw: Path) -> None:
    ours = run_instar(*args, cwd=raw)
    qemu = run_qemu_img(*args, cwd=raw)
    assert "Unknown" in qemu.stderr
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr())


@pytest.mark.parametrize(("name", "magic_at", "magic"), [("luks", 0, b"LUKS\xba\xbe")])
def test_probed_format_instar_cannot_read(name: str, magic_at: int, magic: bytes,
                                          tmp_path: Path) -> None:
    image = tmp_path / f"x.{name}"
    image.write_bytes(bytes(magic_at) + magic + bytes(4096))
    result = run_instar("info", image.name, cwd=tmp_path)
    assert (result.rc, result.stdout, result.stderr) == (
        1, "", f"instar: Could not open 'x.{name}': {name}: reading this format is not "
        "supported yet\n")
