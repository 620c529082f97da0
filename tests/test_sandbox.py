"""The sandboxed worker: each layer proven by a worker that tries to break it.

The jobs here run in the same worker every command uses (`instar.worker.run_job`),
confined the same way; each tries something the layers forbid and reports what
happened, and the test asserts it failed. From outside, a long convert's
worker is looked at through /proc: no_new_privs, seccomp filter mode, its own
user and network namespaces, its limits.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import pattern, qemu_img_ok, run_instar
from instar import sandbox
from instar.errors import InstarError, PolicyError, WorkerLimitError
from instar.events import EventSink
from instar.files import pwrite_all
from instar.opener import Broker
from instar.safety import PathPolicy
from instar.sandbox import Limits
from instar.worker import SandboxSettings, run_job

REQUIRE = SandboxSettings(mode="require")


def in_worker(job: Any, settings: SandboxSettings = REQUIRE, **kwargs: Any) -> Any:
    """Run ``job()`` (no arguments) in a confined worker; its result comes back."""

    def wrapped(broker: Broker, events: EventSink) -> Any:
        return job()

    return run_job(wrapped, PathPolicy([]), settings, inputs=[], **kwargs)


def errno_of(action: Any) -> Any:
    """``action()``'s errno if it raised OSError, else what it returned."""
    try:
        return action()
    except OSError as error:
        return error.errno


# --- every layer is on, on this kind of machine ------------------------------------------------


def test_sandbox_status_lists_every_layer_on() -> None:
    result = run_instar("--sandbox-status")
    assert result.rc == 0
    lines = result.stdout.splitlines()
    names = [line.split(":", 1)[0] for line in lines[:-1]]
    assert names == list(sandbox.LAYERS)
    for line in lines[:-1]:
        assert ": on (" in line, line  # CI's machine has every layer
    assert lines[-1].startswith("mode: auto")


# --- each layer, from inside ---------------------------------------------------------------------


def test_a_worker_cannot_open_a_file() -> None:
    assert in_worker(lambda: errno_of(lambda: Path("/etc/passwd").read_bytes())) in (
        errno.EPERM, errno.EACCES)
    assert in_worker(lambda: errno_of(lambda: os.open("/etc/passwd", os.O_RDONLY))) in (
        errno.EPERM, errno.EACCES)


def test_a_worker_cannot_list_or_stat_a_directory() -> None:
    assert in_worker(lambda: errno_of(lambda: os.listdir("/"))) in (errno.EPERM, errno.EACCES)
    assert in_worker(lambda: errno_of(lambda: os.stat("/etc/passwd"))) == errno.EPERM


def test_a_worker_cannot_create_a_socket() -> None:
    assert in_worker(lambda: errno_of(lambda: socket.socket())) == errno.EPERM


def test_a_worker_cannot_exec_or_fork() -> None:
    assert in_worker(lambda: errno_of(lambda: os.execv("/bin/true", ["true"]))) == errno.EPERM
    assert in_worker(lambda: errno_of(os.fork)) == errno.EPERM


def test_a_worker_cannot_signal_the_host() -> None:
    assert in_worker(lambda: errno_of(lambda: os.kill(os.getppid(), 0))) == errno.EPERM


def test_a_worker_can_run_threads() -> None:
    """The reader thread and the compression pool need threads (clone with CLONE_THREAD)."""
    import threading

    def job() -> int:
        results: list[int] = []
        thread = threading.Thread(target=lambda: results.append(41 + 1))
        thread.start()
        thread.join()
        return results[0]

    assert in_worker(job) == 42


def test_a_worker_cannot_allocate_past_its_memory_limit() -> None:
    settings = SandboxSettings("require", Limits(memory=256 << 20))
    with pytest.raises(WorkerLimitError, match="more memory than the worker may use"):
        in_worker(lambda: len(bytearray(512 << 20)), settings)


def test_a_worker_spinning_past_its_cpu_limit_is_stopped() -> None:
    settings = SandboxSettings("require", Limits(cpu=1))
    started = time.monotonic()
    with pytest.raises(WorkerLimitError, match=r"more than 1 s of CPU"):
        in_worker(lambda: [None for _ in iter(int, 1)], settings)
    assert time.monotonic() - started < 10


def test_a_worker_cannot_write_past_its_file_size_limit(tmp_path: Path) -> None:
    target = str(tmp_path / "out.raw")
    settings = SandboxSettings("require", Limits(file_size=1 << 20))

    def job(broker: Broker, events: EventSink) -> Any:
        out = broker.create_output(target)
        return errno_of(lambda: pwrite_all(out.fd, bytes(2 << 20), 0))

    assert run_job(job, PathPolicy([]), settings, inputs=[], outputs=[target]) == errno.EFBIG
    assert os.listdir(tmp_path) == []  # never committed: nothing left


def test_a_worker_running_too_long_is_killed() -> None:
    settings = SandboxSettings("require", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(WorkerLimitError, match=r"took longer than 1 s"):
        in_worker(lambda: time.sleep(30), settings)
    assert time.monotonic() - started < 5


def test_a_worker_asks_the_host_for_files_it_was_not_given(tmp_path: Path) -> None:
    """The host opens only what the user named and what the policy allows."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")

    def job(broker: Broker, events: EventSink) -> list[str]:
        said = []
        for attempt in (lambda: broker.open_image_file(str(secret)),
                        lambda: broker.open_named_file("secret", str(tmp_path / "x"), "extent"),
                        lambda: broker.create_output(str(tmp_path / "elsewhere"))):
            try:
                attempt()
                said.append("opened")
            except PolicyError as error:
                said.append(str(error))
        return said

    said = run_job(job, PathPolicy([]), REQUIRE, inputs=[])
    assert "was not named on the command line" in said[0]
    assert "outside the allowed directories (none)" in said[1]
    assert "was not named as the output" in said[2]


def test_off_runs_in_process() -> None:
    assert in_worker(os.getpid, SandboxSettings(mode="off")) == os.getpid()
    assert in_worker(os.getpid) != os.getpid()


# --- the policy for a kernel that lacks a layer ------------------------------------------------


def test_require_refuses_to_run_without_every_layer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_landlock() -> str:
        raise OSError(errno.ENOSYS, "landlock_create_ruleset")

    monkeypatch.setattr(sandbox, "_apply_landlock", no_landlock)
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(4096))
    refused = run_instar("--sandbox=require", "info", str(image))
    assert refused.rc == 1 and refused.stdout == ""
    assert refused.stderr == ("instar: the sandbox is required but not complete: "
                              "landlock: the kernel does not have it\n")
    warned = run_instar("--sandbox=auto", "info", str(image))
    assert warned.rc == 0 and "file format: raw" in warned.stdout
    assert warned.stderr == ("instar: warning: sandbox layer landlock is off: "
                             "the kernel does not have it\n")
    assert run_instar("--sandbox=off", "info", str(image)).stderr == ""


def test_bad_sandbox_options_are_one_line() -> None:
    for args, message in (
        (["--sandbox=maybe", "info", "x"], "--sandbox must be one of auto, require, off: maybe"),
        (["--max-memory=1k", "info", "x"], "--max-memory must be a size of at least 64M: 1k"),
        (["--timeout=-1", "info", "x"], "--timeout must be a positive number of seconds: -1"),
        (["--max-cpu", "soon", "info", "x"], "--max-cpu must be a positive number of seconds"),
    ):
        result = run_instar(*args)
        assert result.rc == 1 and result.stderr.startswith(f"instar: {message}"), result
        assert result.stderr.count("\n") == 1


# --- from outside: a long convert's worker in /proc --------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_a_running_worker_seen_from_outside(tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(pattern(64 << 20, seed=3))
    image = tmp_path / "source.qcow2"
    qemu_img_ok("convert", "-O", "qcow2", str(source), str(image))
    command = [sys.executable, "-m", "instar", "--max-memory", "768M", "--max-cpu", "120",
               "convert", "-c", "-O", "qcow2", str(image), str(tmp_path / "out.qcow2")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        worker = None
        deadline = time.monotonic() + 20
        while worker is None and time.monotonic() < deadline and process.poll() is None:
            children = _children(process.pid)
            if children and "NoNewPrivs:\t1" in Path(f"/proc/{children[0]}/status").read_text():
                worker = children[0]
            time.sleep(0.01)
        assert worker is not None, "no confined worker seen while converting"
        status = Path(f"/proc/{worker}/status").read_text()
        limits = Path(f"/proc/{worker}/limits").read_text()
        worker_ns = {ns: os.readlink(f"/proc/{worker}/ns/{ns}") for ns in ("net", "user")}
    finally:
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    for ns, link in worker_ns.items():
        assert link != os.readlink(f"/proc/self/ns/{ns}"), ns
    soft = {line[:26].strip(): line[26:].split()[0] for line in limits.splitlines()[1:]}
    assert soft["Max address space"] == str(768 << 20)
    assert soft["Max cpu time"] == "120"
    assert soft["Max core file size"] == "0"
    assert soft["Max open files"] == str(sandbox.MAX_OPEN_FILES)


def test_errors_in_the_worker_stay_one_line(tmp_path: Path) -> None:
    with pytest.raises(InstarError, match="internal error in the worker: ZeroDivisionError"):
        in_worker(lambda: 1 // 0)


@pytest.mark.parametrize("sonames", ["{'c': 'libc.so.6', 'seccomp': 'libseccomp.so.2'}",
                                     "{'c': 'libc.so.6', 'seccomp': 'libnothing.so.9'}"])
def test_seccomp_loads_with_known_sonames_or_the_real_lookup(sonames: str) -> None:
    """pyseccomp is lent the sonames (fast); with a wrong one it still loads
    through ctypes.util, and the lent module is never left behind."""
    code = ("import sys; from instar import sandbox; sandbox._SONAMES = " + sonames + "; "
            "sc = sandbox._import_pyseccomp(); import ctypes.util; "
            "print(sc._libseccomp_path, ctypes.util.find_library.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path, module = proc.stdout.split()
    assert "seccomp" in path and module == "ctypes.util"


def test_a_worker_stopped_after_its_commit_leaves_no_output(tmp_path: Path) -> None:
    """The output takes its name when the result comes, not when the worker
    asks: a timeout between the two leaves nothing, and no existing target
    is replaced."""
    target = tmp_path / "out.img"
    target.write_bytes(b"old contents")

    def job(broker: Broker, events: EventSink) -> None:
        out = broker.create_output(str(target))
        pwrite_all(out.fd, b"new", 0)
        broker.commit_output(False)
        time.sleep(30)

    with pytest.raises(WorkerLimitError, match=r"took longer than 1 s"):
        run_job(job, PathPolicy([]), SandboxSettings("require", timeout=1.0), inputs=[],
                outputs=[str(target)])
    assert os.listdir(tmp_path) == ["out.img"] and target.read_bytes() == b"old contents"
