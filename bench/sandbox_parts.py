"""Where the sandboxed worker's cost goes, part by part, in a fresh interpreter.

Prints milliseconds (wall, one line per run) for: importing ctypes and
instar.sandbox (only a process that starts a worker pays them), building the
seccomp allow-list with libseccomp (`sandbox.prepare`), then for a forked
child: the fork, each confinement layer, and the child's exit and reaping.
Run by ``bench/run.py --sandbox-cost``; on its own: ``python bench/sandbox_parts.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

LAYERS = ("_apply_rlimits", "_apply_no_new_privs", "_apply_namespaces", "_apply_landlock",
          "_apply_seccomp")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _timed(name: str, step: Callable[..., Any], spent: list[tuple[str, float]]
           ) -> Callable[..., Any]:
    """``step``, recording into ``spent`` how long each call took."""
    def run(*args: Any) -> Any:
        begin = time.perf_counter()
        try:
            return step(*args)
        finally:
            spent.append((name[len("_apply_"):], time.perf_counter() - begin))
    return run


def main() -> None:
    start = time.perf_counter()
    import ctypes  # noqa: F401  # what pyseccomp and Landlock load
    imported_ctypes = time.perf_counter()
    from instar import sandbox

    imported = time.perf_counter()
    sandbox.prepare()
    prepared = time.perf_counter()
    print(f"import ctypes {_ms(imported_ctypes - start)} ms, "
          f"import instar.sandbox (and instar) {_ms(imported - imported_ctypes)} ms, "
          f"libseccomp allow-list {_ms(prepared - imported)} ms")
    for _ in range(5):
        read_end, write_end = os.pipe()
        forking = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: time each layer as sandbox.apply runs it
            forked = time.perf_counter()
            spent: list[tuple[str, float]] = []
            for name in LAYERS:
                setattr(sandbox, name, _timed(name, getattr(sandbox, name), spent))
            sandbox.apply(sandbox.Limits())
            parts = "; ".join(f"{name} {_ms(seconds)}" for name, seconds in spent)
            os.write(write_end, f"fork {_ms(forked - forking)}; {parts}".encode())
            os._exit(0)
        os.close(write_end)
        line = os.read(read_end, 4096).decode()
        os.close(read_end)
        os.waitpid(pid, 0)
        print(f"{line}; fork to reaped {_ms(time.perf_counter() - forking)} (ms)")


if __name__ == "__main__":
    main()
