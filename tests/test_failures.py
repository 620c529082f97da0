"""Every failure is one line: a full file system, a file size limit, a size past
what the file system or off_t can hold, I/O errors, a closed or full stdout,
a broken pipe under -p, and SIGINT/SIGTERM at any moment.

Each test asserts the one ``instar: ...`` line (qemu-img's words where qemu-img
has them, checked against the real qemu-img), the exit status, that nothing
is left beside the target and that an existing target is untouched.

Most run instar as a subprocess (``python -m instar``): a file size limit, a
closed stdout and signals belong to a process. The tests that need a small
file system mount a tmpfs (or a loop-mounted ext4), which needs root: CI runs
as root, so a failure to mount fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_img_path, run_instar
from instar import signals

SRC = Path(__file__).parents[1] / "src"
FORMATS = ["raw", "qcow2", "vmdk", "vpc", "vhdx"]
ENOSPC = os.strerror(errno.ENOSPC)
EFBIG = os.strerror(errno.EFBIG)
EIO = os.strerror(errno.EIO)


# --- running both programs ------------------------------------------------------------------


class Run:
    """A finished run: exit status (negative: killed by that signal), the
    stderr lines with the program's name as ``PROG``, and stdout bytes."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout or b""
        text = proc.stderr.decode("utf-8", "replace")
        self.stderr = text
        self.lines = [re.sub(r"^(instar|qemu-img): ", "PROG: ", line)
                      for line in text.splitlines()]

    def one_line(self) -> str:
        """The only line on stderr (the test fails if there are more or none)."""
        assert len(self.lines) == 1, self.stderr
        assert "Traceback" not in self.stderr
        return self.lines[0]


def command(program: str, *args: str) -> list[str]:
    if program == "instar":
        return [sys.executable, "-m", "instar", *args]
    return [qemu_img_path(), *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC)}


def run(program: str, *args: str, cwd: Path, stdout: int | object = subprocess.PIPE,
        preexec_fn: Callable[[], None] | None = None) -> Run:
    """``program ARGS`` (instar or qemu-img) in ``cwd``."""
    proc = subprocess.run(command(program, *args), cwd=cwd, stdout=stdout,  # type: ignore[call-overload]
                          stderr=subprocess.PIPE, env=environment(), preexec_fn=preexec_fn,
                          timeout=300, check=False)
    return Run(proc)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec_fn: ``ulimit -f`` of ``limit`` bytes (soft and hard)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@contextlib.contextmanager
def mounted(directory: Path, *mount_args: str) -> Iterator[Path]:
    """``mount MOUNT_ARGS directory`` for the block; fails (not skips) without root."""
    directory.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", *mount_args, str(directory)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount {mount_args} (these tests need root, as CI has): "
                    f"{proc.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=False)


def small_tmpfs(directory: Path, size: str = "2m") -> contextlib.AbstractContextManager[Path]:
    return mounted(directory, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 MiB of data that does not compress or deduplicate into 2 MiB."""
    path = tmp_path_factory.mktemp("failures") / "source.raw"
    path.write_bytes(os.urandom(8 << 20))
    return path


# --- a full file system ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_file_system_is_one_line(fmt: str, source: Path, tmp_path: Path) -> None:
    """qemu-img: "error while writing at byte N: No space left on device", exit 1,
    and a partial file left behind; instar: the same line, nothing left."""
    with small_tmpfs(tmp_path / "fs") as fs:
        ours = run("instar", "convert", "-O", fmt, str(source), "fs/out", cwd=tmp_path)
        assert ours.rc == 1
        assert re.fullmatch(rf"PROG: error while writing at byte \d+: {ENOSPC}", ours.one_line())
        assert listing(fs) == []
        theirs = run("qemu", "convert", "-O", fmt, str(source), "fs/out", cwd=tmp_path)
        assert theirs.rc == 1
        assert re.fullmatch(rf"PROG: error while writing at byte \d+: {ENOSPC}",
                            theirs.one_line())
        if fmt == "raw":  # the same write fails first: the same offset
            assert ours.lines == theirs.lines


def test_full_file_system_keeps_the_existing_target(source: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs") as fs:
        (fs / "out.qcow2").write_bytes(b"the old image")
        ours = run("instar", "convert", "-O", "qcow2", str(source), "fs/out.qcow2", cwd=tmp_path)
        assert ours.rc == 1
        assert re.fullmatch(rf"PROG: error while writing at byte \d+: {ENOSPC}", ours.one_line())
        assert listing(fs) == ["out.qcow2"]
        assert (fs / "out.qcow2").read_bytes() == b"the old image"


def test_full_file_system_dd(source: Path, tmp_path: Path) -> None:
    """qemu-img dd has its own words for it."""
    with small_tmpfs(tmp_path / "fs") as fs:
        for program in ("instar", "qemu"):
            result = run(program, "dd", f"if={source}", "of=fs/out.raw", cwd=tmp_path)
            assert result.rc == 1
            assert result.one_line() == f"PROG: error while writing to output image file: {ENOSPC}"
            if program == "instar":
                assert listing(fs) == []
            for name in listing(fs):
                (fs / name).unlink()


# --- file size limits -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_size_limit(fmt: str, source: Path, tmp_path: Path) -> None:
    """``ulimit -f`` 1 MiB. raw is sized when created, so qemu-img says so
    ("Could not resize file: File too large"); other formats fail a write."""
    (tmp_path / "out").write_bytes(b"old")
    limit = file_size_limit(1 << 20)
    ours = run("instar", "convert", "-O", fmt, str(source), "out", cwd=tmp_path, preexec_fn=limit)
    assert ours.rc == 1
    line = ours.one_line()  # also: no warning that the worker's rlimits are off
    assert listing(tmp_path) == ["out"]
    assert (tmp_path / "out").read_bytes() == b"old"
    theirs = run("qemu", "convert", "-O", fmt, str(source), "out", cwd=tmp_path, preexec_fn=limit)
    assert theirs.rc == 1
    if fmt == "raw":
        assert line == f"PROG: out: error while converting raw: Could not resize file: {EFBIG}"
        assert theirs.lines == ours.lines
    elif fmt == "vhdx":  # qemu sizes a vhdx's log and metadata when creating it
        assert line == f"PROG: error while writing at byte 0: {EFBIG}"
        assert theirs.one_line() == (
            f"PROG: out: error while converting vhdx: Could not resize file: {EFBIG}")
    else:
        assert line == f"PROG: error while writing at byte 0: {EFBIG}"
        assert theirs.lines == ours.lines


@pytest.mark.parametrize(("fmt", "options"), [
    ("raw", "preallocation=full"), ("qcow2", "preallocation=full"), ("vhdx", "log_size=1M"),
    ("vdi", "static=on")])
def test_file_size_limit_create(fmt: str, options: str, tmp_path: Path) -> None:
    """qemu-img create words every EFBIG its driver meets as "The image size is
    too large for file format 'FMT'", whichever step of the driver met it."""
    limit = file_size_limit(1 << 20)
    results = [run(program, "create", "-q", "-f", fmt, "-o", options, "out", "10M",
                   cwd=tmp_path, preexec_fn=limit) for program in ("qemu", "instar")]
    assert results[0].rc == results[1].rc == 1
    assert results[0].lines == results[1].lines
    assert results[1].one_line().startswith("PROG: out: The image size is too large")


def test_file_size_limit_dd(source: Path, tmp_path: Path) -> None:
    limit = file_size_limit(1 << 20)
    for fmt, expected in (("raw", "out: error while creating output image: Could not resize "
                                  f"file: {EFBIG}"),
                          ("qcow2", f"error while writing to output image file: {EFBIG}")):
        for program in ("instar", "qemu"):
            result = run(program, "dd", "-O", fmt, f"if={source}", "of=out", cwd=tmp_path,
                         preexec_fn=limit)
            assert (result.rc, result.one_line()) == (1, f"PROG: {expected}")
            if program == "instar":
                assert listing(tmp_path) == []
            with contextlib.suppress(FileNotFoundError):
                (tmp_path / "out").unlink()


def test_size_past_the_file_system(tmp_path: Path) -> None:
    """A 2 PiB raw output on ext4 (whose files end at 16 TiB): qemu-img's
    creation error; it used to be a traceback from ftruncate."""
    qemu_img_ok("create", "-q", "-f", "qcow2", str(tmp_path / "big.qcow2"), "2P")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as file:
        file.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    with mounted(tmp_path / "fs", "-o", "loop", str(image)) as fs:
        os.rmdir(fs / "lost+found")
        for program in ("instar", "qemu"):
            result = run(program, "convert", "-O", "raw", "big.qcow2", "fs/out.raw", cwd=tmp_path)
            assert (result.rc, result.one_line()) == (
                1, f"PROG: fs/out.raw: error while converting raw: Could not resize file: {EFBIG}")
            if program == "instar":
                assert listing(fs) == []
            with contextlib.suppress(FileNotFoundError):
                (fs / "out.raw").unlink()


def test_size_past_off_t(tmp_path: Path) -> None:
    """A raw input of 2^63 - 1 bytes (a sparse file on tmpfs) would declare a
    raw output of 2^63 bytes, past what off_t holds. qemu-img cannot open such
    an input at all, and neither can instar, in qemu's words (no disk may be
    larger than qemu's BDRV_MAX_LENGTH, 2^63 - 2^30): never Python's
    OverflowError, nothing written."""
    with small_tmpfs(tmp_path / "fs") as fs:
        with open(fs / "huge.raw", "wb") as file:
            file.truncate((1 << 63) - 1)
        result = run("instar", "convert", "-O", "raw", "fs/huge.raw", "fs/out.raw", cwd=tmp_path)
        assert (result.rc, result.one_line()) == (
            1, "PROG: Could not open 'fs/huge.raw': Could not refresh total sector count: "
               f"{EFBIG}")
        assert listing(fs) == ["huge.raw"]


# --- I/O errors, in the worker and in-process -----------------------------------------------


def _failing(real: Callable[..., object], code: int,
             when: Callable[..., bool] = lambda *args: True) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        if when(*args):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    return fail


@pytest.mark.parametrize("sandbox", ["auto", "off"])
def test_write_error_in_the_worker_is_qemus_line(
    sandbox: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EIO from pwrite inside the forked worker reaches the host as data
    and is qemu's line, not "internal error in the worker"."""
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(3 << 20, seed=3))
    monkeypatch.setattr(os, "pwrite", _failing(os.pwrite, errno.EIO))  # the worker inherits it
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"old")
    result = run_instar(f"--sandbox={sandbox}", "convert", "-O", "qcow2", str(source), str(out))
    assert (result.rc, result.stderr) == (1, f"instar: error while writing at byte 0: {EIO}\n")
    assert listing(tmp_path) == ["in.raw", "out.qcow2"]
    assert out.read_bytes() == b"old"
    result = run_instar(f"--sandbox={sandbox}", "dd", f"if={source}", f"of={out}")
    assert (result.rc, result.stderr) == (
        1, f"instar: error while writing to output image file: {EIO}\n")
    assert out.read_bytes() == b"old"


def test_read_error_is_qemus_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(6 << 20, seed=4))
    monkeypatch.setattr(os, "pread", _failing(os.pread, errno.EIO,
                                              lambda fd, length, offset: offset >= 2 << 20))
    out = tmp_path / "out.raw"
    result = run_instar("convert", "-O", "raw", str(source), str(out))
    assert (result.rc, result.stderr) == (
        1, f"instar: error while reading at byte 2097152: {EIO}\n")
    result = run_instar("dd", f"if={source}", f"of={out}")
    assert (result.rc, result.stderr) == (
        1, f"instar: error while reading from input image file: {EIO}\n")
    assert listing(tmp_path) == ["in.raw"]


def test_fsync_error_is_a_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-t writeback fsyncs before the output takes its name; EIO there (the
    kernel lost data it had accepted) is a failed write at the end."""
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(1 << 20, seed=5))
    monkeypatch.setattr(os, "fsync", _failing(os.fsync, errno.EIO))
    result = run_instar("convert", "-t", "writeback", str(source), str(tmp_path / "out.raw"))
    assert (result.rc, result.stderr) == (
        1, f"instar: error while writing at byte 1048576: {EIO}\n")
    assert listing(tmp_path) == ["in.raw"]


def test_failure_to_name_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host links the finished file into place; if that fails it is
    qemu's creation error, and nothing is left."""
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(1 << 20, seed=6))
    monkeypatch.setattr(os, "link", _failing(os.link, errno.ENOSPC))
    out = tmp_path / "out.raw"
    result = run_instar("convert", str(source), str(out))
    assert (result.rc, result.stderr) == (
        1, f"instar: {out}: error while converting raw: Could not create '{out}': {ENOSPC}\n")
    assert listing(tmp_path) == ["in.raw"]


def test_failure_to_name_the_output_of_dd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """dd words the same failure as qemu-img dd words a creation failure."""
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(1 << 20, seed=6))
    monkeypatch.setattr(os, "link", _failing(os.link, errno.ENOSPC))
    out = tmp_path / "out.raw"
    result = run_instar("dd", f"if={source}", f"of={out}")
    assert (result.rc, result.stderr) == (
        1, f"instar: {out}: error while creating output image: Could not create '{out}': "
           f"{ENOSPC}\n")
    assert listing(tmp_path) == ["in.raw"]


# --- standard output ------------------------------------------------------------------------


def close_stdout() -> None:
    os.close(1)


def test_info_into_a_full_stdout(source: Path, tmp_path: Path) -> None:
    """qemu-img loses the text and exits 0; instar says so and exits 1 (info's
    text is its result)."""
    with open("/dev/full", "wb") as full:
        ours = run("instar", "info", str(source), cwd=tmp_path, stdout=full)
        theirs = run("qemu", "info", str(source), cwd=tmp_path, stdout=full)
    assert (ours.rc, ours.one_line()) == (
        1, f"PROG: error while writing to standard output: {ENOSPC}")
    assert (theirs.rc, theirs.stderr) == (0, "")


def test_info_with_stdout_closed(source: Path, tmp_path: Path) -> None:
    ours = run("instar", "info", str(source), cwd=tmp_path, stdout=None, preexec_fn=close_stdout)
    theirs = run("qemu", "info", str(source), cwd=tmp_path, stdout=None, preexec_fn=close_stdout)
    assert (ours.rc, ours.one_line()) == (
        1, f"PROG: error while writing to standard output: {os.strerror(errno.EBADF)}")
    assert (theirs.rc, theirs.stderr) == (0, "")


def test_help_into_a_full_stdout(tmp_path: Path) -> None:
    with open("/dev/full", "wb") as full:
        result = run("instar", "--help", cwd=tmp_path, stdout=full)
    assert (result.rc, result.one_line()) == (
        1, f"PROG: error while writing to standard output: {ENOSPC}")


@pytest.mark.parametrize("how", ["closed", "full"])
def test_progress_that_cannot_be_shown_is_ignored(how: str, source: Path, tmp_path: Path) -> None:
    """convert -p with stdout closed or full: qemu-img copies everything and
    exits 0; so does instar, and no progress text lands in the output (a
    closed descriptor 1 is not reused for a file)."""
    for program in ("instar", "qemu"):
        out = tmp_path / f"{program}.raw"
        args = ("convert", "-p", "-O", "raw", str(source), str(out))
        if how == "closed":
            result = run(program, *args, cwd=tmp_path, stdout=None, preexec_fn=close_stdout)
        else:
            with open("/dev/full", "wb") as full:
                result = run(program, *args, cwd=tmp_path, stdout=full)
        assert (result.rc, result.stderr) == (0, "")
        assert out.read_bytes() == source.read_bytes()
    assert listing(tmp_path) == ["instar.raw", "qemu.raw"]


def test_progress_into_a_broken_pipe(tmp_path: Path) -> None:
    """``convert -p ... | head -c1``: the reader leaves after one byte; the
    copy goes on to the end and exits 0, as qemu-img's does."""
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(64 << 20, seed=7))
    for program in ("instar", "qemu"):
        out = tmp_path / f"{program}.raw"
        proc = subprocess.Popen(command(program, "convert", "-p", "-O", "raw", str(source),
                                        str(out)),
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=environment())
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(1) == b" "
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert (proc.wait(timeout=300), stderr) == (0, b"")
        assert out.read_bytes() == source.read_bytes()


def test_full_stderr_keeps_the_exit_status(tmp_path: Path) -> None:
    """An error that cannot be printed still exits 1 (not Python's 120 for a
    failed flush at exit), as qemu-img does."""
    for program in ("instar", "qemu"):
        with open("/dev/full", "wb") as full:
            proc = subprocess.run(command(program, "info", str(tmp_path / "missing")),
                                  stdout=subprocess.PIPE, stderr=full, env=environment(),
                                  check=False)
        assert proc.returncode == 1


# --- signals --------------------------------------------------------------------------------


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a forked worker
    has its host's command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


def no_process_left(text: str, within: float = 5.0) -> bool:
    """Whether every process mentioning ``text`` is gone within ``within``
    seconds: a worker the kernel kills as its host dies (PDEATHSIG) takes a
    moment to disappear from /proc; one that lives on is a leak."""
    deadline = time.monotonic() + within
    while processes_mentioning(text):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def large_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of data (no zeros: every byte is copied), for copies that take
    long enough to be interrupted."""
    path = tmp_path_factory.mktemp("signals") / "large.raw"
    block = bytearray(pattern(1 << 20, seed=11))
    with open(path, "wb") as file:
        for index in range(256):
            block[0] = index % 255 + 1
            file.write(block)
    return path


def _time_after_meter(source: Path, target: Path, fmt: str) -> float:
    """Seconds a convert of ``source`` runs after its meter's first bytes."""
    proc = subprocess.Popen(command("instar", "convert", "-p", "-O", fmt, str(source),
                                    str(target)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    assert proc.stdout is not None
    proc.stdout.read(4)
    started = time.monotonic()
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    target.unlink()
    return time.monotonic() - started


def test_signals_at_random_moments(large_source: Path, tmp_path: Path) -> None:
    """SIGINT or SIGTERM at a random moment of a convert, 20 times. Each run
    dies by the signal (as qemu-img does) or, if the signal came after the
    output took its name, ends with that complete output; never a traceback,
    a partial or temporary file, a damaged old target or a live worker."""
    seed = int(os.environ.get("INSTAR_SIGNAL_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "target.img"
    # How long each convert runs after its meter starts, on this machine: the
    # signals are sent within that span, so most of them interrupt the copy
    # however fast the machine is.
    span = {fmt: _time_after_meter(large_source, out_dir / f"span.{fmt}", fmt)
            for fmt in ("raw", "qcow2")}
    interrupted = 0
    for attempt in range(20):
        context = f"seed {seed}, attempt {attempt}"
        number = rng.choice([signal.SIGINT, signal.SIGTERM])
        fmt = rng.choice(["raw", "qcow2"])
        cache = rng.choice(["unsafe", "writeback"])
        existing = attempt % 2 == 1
        if existing:
            target.write_bytes(b"the old image")
        proc = subprocess.Popen(
            command("instar", "convert", "-p", "-t", cache, "-O", fmt, str(large_source),
                    str(target)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
        assert proc.stdout is not None
        proc.stdout.read(4)  # the meter's first bytes: instar's handlers are in place
        time.sleep(rng.uniform(0, 0.7 * span[fmt]))
        proc.send_signal(number)
        _, stderr = proc.communicate(timeout=300)
        assert stderr == b"", f"{context}: {stderr.decode(errors='replace')}"
        assert no_process_left(str(target)), context
        assert proc.returncode in (-number, 0), context
        names = listing(out_dir)
        complete = names == ["target.img"] and target.stat().st_size != len(b"the old image")
        if proc.returncode == -number and not complete:
            interrupted += 1
            assert names == (["target.img"] if existing else []), context
            if existing:
                assert target.read_bytes() == b"the old image", context
        else:  # the signal came after the output had its name: it is whole
            assert names == ["target.img"], context
            compare = subprocess.run([qemu_img_path(), "compare", "-q", "-F", fmt,
                                      str(large_source), str(target)], check=False)
            assert compare.returncode == 0, context
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    assert interrupted >= 10, f"seed {seed}: only {interrupted} runs were interrupted"


def test_worker_dies_with_a_killed_host(large_source: Path, tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the kernel still ends the worker (it asked
    for PR_SET_PDEATHSIG) and drops the unnamed output."""
    target = tmp_path / "target.raw"
    proc = subprocess.Popen(command("instar", "convert", "-p", str(large_source), str(target)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    assert proc.stdout is not None
    proc.stdout.read(4)  # the copy has started; 256 MiB take longer than the kill
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while processes_mentioning(str(target)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(str(target)) == []
    assert listing(tmp_path) == []


def test_deferred_holds_a_signal_until_the_step_is_done() -> None:
    """What commit and the worker's start rely on: a signal inside the block is
    delivered, to the handler that was there, when the block ends."""
    seen: list[str] = []

    def handler(signum: int, frame: object) -> None:
        seen.append("handled")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            seen.append("step done")
        time.sleep(0.01)
        assert seen == ["step done", "handled"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_during_commit_comes_after_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal between the link and the rename of the finished output is held
    until the rename is done: the target is complete, no temporary name is left."""
    from instar.output import AtomicOutput

    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    real_rename = os.rename

    def rename(source: str, target: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert caught == []
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    try:
        output = AtomicOutput(str(tmp_path / "out.raw"))
        out = output.create()
        os.write(out.fd, b"complete")
        output.commit(durable=False)
        time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert caught == [signal.SIGTERM]
    assert listing(tmp_path) == ["out.raw"]
    assert (tmp_path / "out.raw").read_bytes() == b"complete"
