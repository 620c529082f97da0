"""Start commands from a small process, so their peak memory is their own.

Linux counts a child's peak resident size from the moment it is forked: a
command forked by a pytest worker that has grown to gigabytes (other tests'
images, read whole) reports the worker's size, whatever the command used.
The hostile tests bound instar's memory by that peak (``wait4``), so they
start it from this module's spawner: one small Python process per test
process, started on first use, that forks and waits for each command and
reports its status and resource usage.

Run as a script, it is the spawner: it reads one JSON request per line
(argv, cwd, env, stdout and stderr paths) and answers with the child's pid,
then its status, CPU seconds and peak resident size once it has ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, NamedTuple


class Ended(NamedTuple):
    status: int  # as os.wait4 gives it
    max_rss: int  # bytes
    cpu_seconds: float


class Spawner:
    """The client: a spawner process, started on first use."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None

    def _started(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, bufsize=1)
        return self._process

    def start(self, argv: list[str], cwd: str, env: dict[str, str], stdout: str,
              stderr: str) -> int:
        """Start ``argv`` in a new session; returns its pid (for a watchdog's killpg)."""
        process = self._started()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"argv": argv, "cwd": cwd, "env": env,
                                        "stdout": stdout, "stderr": stderr}) + "\n")
        reply: dict[str, Any] = json.loads(process.stdout.readline())
        return int(reply["pid"])

    def wait(self) -> Ended:
        """How the command started last ended."""
        process = self._started()
        assert process.stdout is not None
        reply: dict[str, Any] = json.loads(process.stdout.readline())
        return Ended(int(reply["status"]), int(reply["max_rss"]), float(reply["cpu"]))


def _serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        with open(request["stdout"], "wb") as out, open(request["stderr"], "wb") as err:
            child = subprocess.Popen(request["argv"], cwd=request["cwd"], env=request["env"],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     start_new_session=True)
        print(json.dumps({"pid": child.pid}), flush=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        print(json.dumps({"status": status, "max_rss": usage.ru_maxrss * 1024,
                          "cpu": usage.ru_utime + usage.ru_stime}), flush=True)


if __name__ == "__main__":
    _serve()
