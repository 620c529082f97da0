"""instar run as a service would run it on an untrusted image: a subprocess
with the default sandbox and limits (``--timeout 5 --max-memory 512M``), its
wall clock, CPU and peak memory measured. The hostile corpus tests
(test_hostile and the mutating commands' sweeps, `mutation_sweep`) share it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hostile_corpus as corpus
from hostile_corpus import Place
from spawner import Spawner

SRC = Path(__file__).resolve().parent.parent / "src"
LIMIT_SECONDS = 5.0
LIMIT_MEMORY = 512 << 20
WATCHDOG_SECONDS = 8.0  # past instar's own --timeout: the run hangs
SANDBOX_WARNING = re.compile(r"instar: warning: sandbox layer \S+ is off: ")


@dataclass
class Run:
    """One subprocess run of instar."""

    label: str
    args: list[str]
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float
    max_rss: int  # bytes: the instar process or its worker, whichever was larger
    cpu: float  # seconds of CPU, the process and its worker
    hung: bool

    @property
    def stalled(self) -> bool:
        """Killed by the watchdog, or over the time limit (instar's own --timeout)."""
        return self.hung or self.seconds > LIMIT_SECONDS

    def describe(self) -> str:
        return (f"{self.label}: rc={self.rc} {self.seconds:.2f}s (CPU {self.cpu:.2f}s) "
                f"rss={self.max_rss >> 20}MiB "
                f"stderr={self.stderr.decode(errors='replace')[:400]!r}")


def environment() -> dict[str, str]:
    """The environment of every run: this checkout's code, default settings, and
    a secret only /proc/self/environ holds."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("INSTAR_")}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["INSTAR_HOSTILE_SECRET"] = corpus.ENV_SECRET
    env["LC_ALL"] = "C.UTF-8"
    return env


ENV = environment()


_SPAWNER = Spawner()


def run_instar(label: str, args: list[str], place: Place) -> Run:
    """``python -m instar --timeout 5 --max-memory 512M ARGS`` in the case's
    directory, with its wall clock and its maximum resident size (wait4
    reports the larger of the process and the children it waited for: the
    worker). Started by a small spawner process (tests/spawner.py), so the
    peak is instar's own, not this test process's size. Its output is
    captured outside the case's directory."""
    command = [sys.executable, "-m", "instar", "--timeout", "5", "--max-memory", "512M", *args]
    out_path, err_path = place.scratch / "stdout", place.scratch / "stderr"
    started = time.monotonic()
    pid = _SPAWNER.start(command, str(place.root), ENV, str(out_path), str(err_path))
    hung = threading.Event()

    def kill() -> None:
        hung.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    watchdog = threading.Timer(WATCHDOG_SECONDS, kill)
    watchdog.start()
    try:
        ended = _SPAWNER.wait()
    finally:
        watchdog.cancel()
    seconds = time.monotonic() - started
    with contextlib.suppress(ProcessLookupError):  # a worker left behind
        os.killpg(pid, signal.SIGKILL)
    stdout, stderr = out_path.read_bytes(), err_path.read_bytes()
    out_path.unlink()
    err_path.unlink()
    return Run(label, args, os.waitstatus_to_exitcode(ended.status), stdout, stderr, seconds,
               ended.max_rss, ended.cpu_seconds, hung.is_set())
