"""Human ``instar info`` escapes control characters from an image; qemu-img prints them raw.

An intended difference (docs/info-compare.md): a backing file name such as
``ESC[2J ESC]0;x BEL`` would clear the terminal and set its title. Everything
else is qemu-img's output, and the JSON (which escapes anyway) is qemu-img's too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import qemu_img_ok, run_instar, run_qemu_img

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

TERMINAL_ATTACK = "\x1b[2J\x1b]0;x\x07"


def _escaped(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("backing", [TERMINAL_ATTACK, "b\nimage: forged.qcow2",
                                     "tab\there\x7f\x9b"],
                         ids=["escape-sequences", "newline", "tab-del-c1"])
def test_backing_name_is_escaped_in_human_output(backing: str, tmp_path: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", "top.qcow2",
                "1M", cwd=tmp_path)
    ours = run_instar("info", "top.qcow2", cwd=tmp_path)
    qemu = run_qemu_img("info", "top.qcow2", cwd=tmp_path)
    assert qemu.rc == ours.rc == 0 and backing in qemu.stdout  # qemu-img prints it raw
    assert ours.stdout == qemu.stdout.replace(backing, _escaped(backing))
    assert all(char == "\n" or char.isprintable() for char in ours.stdout)
    json_args = ["info", "--output=json", "top.qcow2"]
    assert run_instar(*json_args, cwd=tmp_path).stdout == run_qemu_img(*json_args,
                                                                      cwd=tmp_path).stdout


@pytest.mark.usefixtures("qemu_img")
def test_format_specific_names_are_escaped(tmp_path: Path) -> None:
    """A qcow2 external data file's name, shown under "Format specific information"."""
    data_file = f"data{TERMINAL_ATTACK}.raw"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", "top.qcow2",
                "1M", cwd=tmp_path)
    ours = run_instar("info", "top.qcow2", cwd=tmp_path)
    qemu = run_qemu_img("info", "top.qcow2", cwd=tmp_path)
    assert qemu.rc == ours.rc == 0 and f"data file: {data_file}\n" in qemu.stdout
    assert ours.stdout == qemu.stdout.replace(data_file, _escaped(data_file))
    assert "\x1b" not in ours.stdout


def test_undecodable_bytes_stay_as_qemu_prints_them(tmp_path: Path) -> None:
    """Only control characters change: a byte that is not UTF-8 (but not C1) is kept."""
    name = "caf\udce9.raw"  # b"caf\xe9.raw", Latin-1
    (tmp_path / name).write_bytes(bytes(512))
    ours = run_instar("info", name, cwd=tmp_path)
    assert ours.rc == 0 and ours.stdout.startswith(f"image: {name}\n")


@pytest.mark.usefixtures("qemu_img")
def test_snapshot_names_are_escaped(tmp_path: Path) -> None:
    name = f"snap{TERMINAL_ATTACK}"
    qemu_img_ok("create", "-q", "-f", "qcow2", "top.qcow2", "1M", cwd=tmp_path)
    qemu_img_ok("snapshot", "-c", name, "top.qcow2", cwd=tmp_path)
    ours = run_instar("info", "top.qcow2", cwd=tmp_path).stdout.splitlines()
    qemu = run_qemu_img("info", "top.qcow2", cwd=tmp_path).stdout.splitlines()
    row = [i for i, line in enumerate(qemu) if name in line]
    assert len(row) == 1 and len(ours) == len(qemu)
    assert ours[row[0]].split()[:2] == ["1", _escaped(name)]
    assert ours[: row[0]] + ours[row[0] + 1 :] == qemu[: row[0]] + qemu[row[0] + 1 :]
