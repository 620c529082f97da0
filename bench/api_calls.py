"""One Python process answering "what is this image?" COUNT times in a loop.

    python bench/api_calls.py open_image|inspect|qemu-img-info PATH COUNT

``open_image``: ``instar.open_image(path)`` in this process, reading ``format``
and ``virtual_size`` (no worker: the API reads in-process). ``inspect``:
``instar.inspect(path)``, the API's ``info``-like verdict (format, virtual size,
findings), which parses the image in a sandboxed worker. ``qemu-img-info``:
``subprocess.run(["qemu-img", "info", path])``, what a Python service without
instar does. One untimed call first (imports, caches), then COUNT timed calls;
prints the wall and CPU seconds (user + system of this process and the children
it waited for: qemu-img, instar's worker) per call. Run by ``bench/run.py``.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable


def _cpu() -> float:
    """User + system seconds of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _open_image(path: str) -> None:
    import instar

    with instar.open_image(path) as image:
        if not image.format or image.virtual_size < 0:
            raise SystemExit(f"{path}: no format or size")


def _inspect(path: str) -> None:
    import instar

    verdict = instar.inspect(path)
    if not verdict.format or verdict.virtual_size is None:
        raise SystemExit(f"{path}: no format or size")


def _qemu_img_info(path: str) -> None:
    subprocess.run(["qemu-img", "info", path], stdout=subprocess.DEVNULL, check=True)


CALLS: dict[str, Callable[[str], None]] = {
    "open_image": _open_image,
    "inspect": _inspect,
    "qemu-img-info": _qemu_img_info,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in CALLS:
        raise SystemExit(f"usage: api_calls.py {'|'.join(CALLS)} PATH COUNT")
    call, path, count = CALLS[argv[0]], argv[1], int(argv[2])
    call(path)
    cpu, start = _cpu(), time.perf_counter()
    for _ in range(count):
        call(path)
    wall = time.perf_counter() - start
    print(f"{wall / count} {(_cpu() - cpu) / count}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
