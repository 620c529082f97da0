"""Replacing an existing target keeps what qemu-img keeps.

qemu-img opens an existing target and truncates and writes it in place, so
the file keeps its inode: its mode, owner, group and hard links. instar
replaces it atomically (a new file, renamed over it) where that loses nothing,
giving the new file the old one's mode, owner and group, and writes through
the existing inode, as qemu-img does, where a new file would lose something:
other hard links, a directory the user may not write, an owner or group the
user cannot give. Each case is run with both programs.

Cases that need an ordinary user run the programs as nobody (uid 65534, in
group 100): qemu-img through ``preexec_fn``, instar in a forked child that
drops to nobody and calls the CLI in-process (the Python executable may sit
where nobody cannot run it, such as a pyenv under /root). The suite runs as
root (CI does), so they fail rather than skip without it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_img_path, run_instar
from test_failures import listing, run, small_tmpfs

NOBODY, GROUP = 65534, 100
EACCES = os.strerror(errno.EACCES)


def as_nobody() -> None:
    """preexec_fn: drop to nobody, a member of group GROUP only."""
    os.setgroups([GROUP])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def run_as_nobody(program: str, *args: str, cwd: Path) -> tuple[int, list[str]]:
    """``program ARGS`` as nobody: exit status and stderr lines (``PROG: ...``)."""
    if program == "qemu":
        result = run("qemu", *args, cwd=cwd, preexec_fn=as_nobody)
        return result.rc, result.lines
    import importlib

    from instar.cli import COMMANDS
    from instar.worker_imports import import_extensions

    # Import now what the run will: nobody may not read the standard library.
    for module in (*COMMANDS.values(), "instar.cli.sandbox_options", "ctypes.util"):
        importlib.import_module(module)
    with contextlib.suppress(ImportError):
        importlib.import_module("pyseccomp")
    import pkgutil

    import instar.formats

    every_format_module = [m.name for m in pkgutil.walk_packages(instar.formats.__path__,
                                                                 "instar.formats.")]
    for module in (*every_format_module, "concurrent.futures.thread"):
        importlib.import_module(module)
    import_extensions()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            as_nobody()
            result = run_instar(*args, cwd=cwd)
            os.write(write_end, f"{result.rc}\n{result.stderr}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    rc, _, stderr = data.partition("\n")
    return int(rc), [line.replace("instar: ", "PROG: ", 1) for line in stderr.splitlines()]


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path is root's alone), holding
    a source image nobody can read."""
    if os.geteuid() != 0:
        pytest.fail("these tests change owners and run as another user: they need root")
    directory = Path(tempfile.mkdtemp(prefix="instar-replace-"))
    directory.chmod(0o755)
    source = directory / "source.raw"
    source.write_bytes(pattern(300 << 10, seed=21))
    source.chmod(0o644)
    try:
        yield directory
    finally:
        for path in directory.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(directory)


def make_target(path: Path, owner: tuple[int, int] = (0, 0), mode: int = 0o644) -> int:
    """An old image at ``path``; returns its inode."""
    path.write_bytes(b"old image " * 100)
    os.chown(path, *owner)
    path.chmod(mode)
    return path.stat().st_ino


def both(directory: Path, name: str, setup: Callable[[Path], object], *args: str,
         nobody: bool = False) -> dict[str, tuple[int, list[str], os.stat_result]]:
    """Run instar and qemu-img convert on the same setup (``setup(target)``
    before each), as root or as nobody; for each: exit status, stderr lines,
    the target's stat afterwards."""
    results = {}
    for program in ("instar", "qemu"):
        target = directory / name
        setup(target)
        command = ("convert", *args, "source.raw", name)
        if nobody:
            rc, lines = run_as_nobody(program, *command, cwd=directory)
        else:
            result = run(program, *command, cwd=directory)
            rc, lines = result.rc, result.lines
        results[program] = (rc, lines, target.stat())
    return results


def test_mode_owner_and_group_kept_by_an_atomic_replace(shared: Path) -> None:
    def setup(target: Path) -> None:
        make_target(target, owner=(1234, 5678), mode=0o640)

    results = both(shared, "out.raw", setup, "-O", "raw")
    for program, (rc, lines, info) in results.items():
        assert (rc, lines) == (0, []), program
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1234, 5678, 0o640)
    assert (shared / "out.raw").read_bytes() == (shared / "source.raw").read_bytes()
    assert listing(shared) == ["out.raw", "source.raw"]


def test_instar_replaces_atomically_when_nothing_is_lost(shared: Path) -> None:
    target = shared / "out.qcow2"
    inode = make_target(target, owner=(1234, 5678), mode=0o600)
    result = run("instar", "convert", "-O", "qcow2", "source.raw", "out.qcow2", cwd=shared)
    assert (result.rc, result.lines) == (0, [])
    info = target.stat()
    assert info.st_ino != inode  # a new file, renamed over the old one
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1234, 5678, 0o600)
    qemu_img_ok("compare", "-q", str(shared / "source.raw"), str(target))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_hard_links_kept(fmt: str, shared: Path) -> None:
    """A target with another hard link is written in place: the link sees the
    new image, as with qemu-img (a rename would leave it the old one)."""
    inodes: dict[str, int] = {}

    def setup(target: Path) -> None:
        link = shared / "link"
        link.unlink(missing_ok=True)
        inodes[target.name] = make_target(target, owner=(1234, 5678), mode=0o640)
        os.link(target, link)

    for program, (rc, lines, info) in both(shared, "out", setup, "-O", fmt).items():
        assert (rc, lines) == (0, []), program
        assert info.st_ino == inodes["out"] and info.st_nlink == 2, program
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1234, 5678, 0o640)
        assert (shared / "link").read_bytes() == (shared / "out").read_bytes()
        qemu_img_ok("compare", "-q", "-F", fmt, str(shared / "source.raw"), str(shared / "link"))
    assert listing(shared) == ["link", "out", "source.raw"]


def test_writable_file_in_a_read_only_directory(shared: Path) -> None:
    """No new file can be made there, but the file itself is writable: written
    in place, as qemu-img does."""
    directory = shared / "ro"
    directory.mkdir()
    inode = make_target(directory / "out.raw", owner=(NOBODY, NOBODY))
    directory.chmod(0o555)
    for program in ("instar", "qemu"):
        result = run_as_nobody(program, "convert", "-O", "raw", "source.raw", "ro/out.raw",
                               cwd=shared)
        assert result == (0, []), program
        assert (directory / "out.raw").stat().st_ino == inode
        assert (directory / "out.raw").read_bytes() == (shared / "source.raw").read_bytes()
        (directory / "out.raw").write_bytes(b"old")
    assert listing(directory) == ["out.raw"]


def test_new_file_in_a_read_only_directory(shared: Path) -> None:
    directory = shared / "ro"
    directory.mkdir(mode=0o555)
    directory.chmod(0o555)
    lines = {}
    for program in ("instar", "qemu"):
        lines[program] = run_as_nobody(program, "convert", "-O", "qcow2", "source.raw",
                                       "ro/new.qcow2", cwd=shared)
    assert lines["instar"] == lines["qemu"] == (1, [
        f"PROG: ro/new.qcow2: error while converting qcow2: Could not create 'ro/new.qcow2': "
        f"{EACCES}"])
    assert listing(directory) == []


def test_read_only_file_refused_as_qemu_refuses_it(shared: Path) -> None:
    """A file the user may not write is not replaced behind its back (a rename
    in a writable directory could): qemu-img's error, the file untouched."""
    target = shared / "ro.raw"
    inode = make_target(target, owner=(NOBODY, NOBODY), mode=0o444)
    shared.chmod(0o777)
    results = {}
    for program in ("instar", "qemu"):
        results[program] = run_as_nobody(program, "dd", "if=source.raw", "of=ro.raw",
                                         cwd=shared)
    assert results["instar"] == results["qemu"] == (1, [
        f"PROG: ro.raw: error while creating output image: Could not create 'ro.raw': {EACCES}"])
    assert target.stat().st_ino == inode
    assert target.read_bytes() == b"old image " * 100
    assert listing(shared) == ["ro.raw", "source.raw"]


@pytest.mark.parametrize("owner", [(0, GROUP), (NOBODY, 0)], ids=["root-owned", "other-group"])
def test_owner_the_user_cannot_give_is_kept_in_place(owner: tuple[int, int], shared: Path) -> None:
    """nobody may write the file (through its group, or as its owner) but
    cannot give a new file its owner or group: written in place, so both are
    kept, as with qemu-img (a replacement would have become nobody's)."""
    shared.chmod(0o777)
    inodes: dict[str, int] = {}

    def setup(target: Path) -> None:
        inodes[target.name] = make_target(target, owner=owner, mode=0o664 if owner[0] == 0
                                          else 0o644)

    for program, (rc, lines, info) in both(shared, "out.raw", setup, "-O", "raw",
                                           nobody=True).items():
        assert (rc, lines) == (0, []), program
        assert info.st_ino == inodes["out.raw"], program
        assert (info.st_uid, info.st_gid) == owner, program
        assert (shared / "out.raw").read_bytes() == (shared / "source.raw").read_bytes()
    assert listing(shared) == ["out.raw", "source.raw"]


def test_owner_the_user_can_give_is_replaced_atomically(shared: Path) -> None:
    """nobody's own file in nobody's group: a new file can have both, so the
    replacement is atomic."""
    shared.chmod(0o777)
    target = shared / "out.raw"
    inode = make_target(target, owner=(NOBODY, GROUP), mode=0o640)
    assert run_as_nobody("instar", "convert", "source.raw", "out.raw", cwd=shared) == (0, [])
    info = target.stat()
    assert info.st_ino != inode
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, GROUP, 0o640)


def test_convert_n_into_a_hard_linked_image_stays_correct(shared: Path) -> None:
    """``convert -n`` into a qcow2 reads the old image while writing the new
    one, so it is never truncated in place: it is replaced (and its other
    link keeps the old image, a documented difference from qemu-img)."""
    results = {}
    for program in ("instar", "qemu"):
        target, link = shared / f"{program}.qcow2", shared / f"{program}-link.qcow2"
        qemu_img_ok("create", "-q", "-f", "qcow2", str(target), "1M")
        subprocess.run([qemu_img_path(), "convert", "-n", "-O", "qcow2",
                        str(shared / "source.raw"), str(target)], check=True)  # a full old image
        small = shared / "small.raw"
        small.write_bytes(pattern(100 << 10, seed=22))
        os.link(target, link)
        result = run(program, "convert", "-n", "-O", "qcow2", "small.raw", target.name,
                     cwd=shared)
        results[program] = (result.rc, result.lines)
    assert results["instar"] == results["qemu"] == (0, [])
    qemu_img_ok("compare", "-q", str(shared / "qemu.qcow2"), str(shared / "instar.qcow2"))
    # the other name of instar's target still holds a valid (the old) image
    qemu_img_ok("check", "-q", str(shared / "instar-link.qcow2"))


def test_failure_while_writing_in_place_leaves_what_qemu_leaves(tmp_path: Path) -> None:
    """Written in place (a hard link), a full file system leaves a partial
    image in the target, as qemu-img does: documented, and still one line."""
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(4 << 20))
    with small_tmpfs(tmp_path / "fs") as fs:
        target = fs / "out.raw"
        target.write_bytes(b"old image")
        os.link(target, fs / "link.raw")
        result = run("instar", "convert", "-O", "raw", str(source), "fs/out.raw", cwd=tmp_path)
        assert result.rc == 1
        assert result.one_line().startswith("PROG: error while writing at byte ")
        assert listing(fs) == ["link.raw", "out.raw"]
        assert target.read_bytes() != b"old image"  # truncated and partly written
        assert (fs / "link.raw").stat().st_ino == target.stat().st_ino


@pytest.mark.parametrize("kind", ["character device", "fifo"])
def test_special_files_are_not_replaced(kind: str, tmp_path: Path) -> None:
    """qemu-img cannot size a character device or a FIFO as a raw image and
    says so; instar used to rename a regular file over the node."""
    source = tmp_path / "source.raw"
    source.write_bytes(pattern(64 << 10))
    node = tmp_path / "node"
    if kind == "fifo":
        os.mkfifo(node)
        expected = f"Could not resize file: {os.strerror(errno.EINVAL)}"
    else:
        os.mknod(node, stat.S_IFCHR | 0o644, os.makedev(1, 3))  # a /dev/null
        expected = "Cannot grow device files"
    for program in ("instar", "qemu"):
        result = run(program, "convert", "-O", "raw", "source.raw", "node", cwd=tmp_path)
        assert (result.rc, result.lines) == (
            1, [f"PROG: node: error while converting raw: {expected}"]), program
    mode = node.stat().st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)
    assert listing(tmp_path) == ["node", "source.raw"]
