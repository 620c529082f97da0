"""The instar demo: dd windows of a small patterned image, checked by reading back.

Makes a 4 MiB image (byte i is i % 251, with a 1 MiB hole in the middle),
copies several dd windows of it with ``instar dd`` into every output format
(and the compressed and fixed variants), reads each output back with instar's own readers (and with
qemu-img when it is installed) and checks the bytes against the window cut
from the input directly. Prints one line per copy; exits 1 if any check fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from instar import dd_window, open_image
from instar.cli import main as instar

OUT = Path("demo-out")
SIZE = 4 << 20
WINDOWS = [
    ["bs=4M"],
    ["bs=65536", "skip=2", "count=4"],
    ["bs=1000", "count=3"],
    ["bs=513", "skip=1", "count=3"],
    ["bs=1M", "skip=1", "count=3"],
    ["count=0"],
]
# (format, extra dd options, label)
OUTPUTS = [
    ("raw", [], "raw"),
    ("qcow2", [], "qcow2"),
    ("qcow2", ["-c"], "qcow2 -c"),
    ("vmdk", [], "vmdk"),
    ("vmdk", ["-o", "subformat=streamOptimized"], "vmdk stream"),
    ("vpc", [], "vpc"),
    ("vpc", ["-o", "subformat=fixed"], "vpc fixed"),
    ("vhdx", [], "vhdx"),
]


def make_input(path: Path) -> bytes:
    """A patterned image with a hole, so sparse handling shows too."""
    data = bytearray(i % 251 for i in range(251 * 64)) * (SIZE // (251 * 64) + 1)
    data = data[:SIZE]
    data[1 << 20 : 2 << 20] = bytes(1 << 20)
    with open(path, "wb") as file:
        file.write(data[: 1 << 20])
        file.seek(2 << 20)
        file.write(data[2 << 20 :])
    return bytes(data)


def operand(window: list[str], name: str, default: int | None) -> int | None:
    for item in window:
        key, _, value = item.partition("=")
        if key == name:
            return int(value[:-1]) << 20 if value.endswith("M") else int(value)
    return default


def expected_bytes(data: bytes, window: list[str]) -> bytes:
    bs = operand(window, "bs", 512)
    assert bs is not None
    cut = dd_window(len(data), bs, operand(window, "count", None), operand(window, "skip", None))
    return data[cut.start : cut.start + cut.length]


def read_back(path: Path, fmt: str, length: int) -> bytes:
    with open_image(str(path), fmt) as image:
        return image.read(0, min(length, image.virtual_size))


def qemu_read_back(path: Path, fmt: str) -> bytes | None:
    if shutil.which("qemu-img") is None:
        return None
    raw = path.with_suffix(".qemu-readback")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)],
                   check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def main() -> int:
    OUT.mkdir(exist_ok=True)
    source = OUT / "input.raw"
    data = make_input(source)
    print(f"input: {source} ({SIZE} bytes, 1 MiB hole)")
    failures = 0
    for number, (fmt, extra, label) in enumerate(OUTPUTS):
        for index, window in enumerate(WINDOWS):
            out = OUT / f"out{number}-window{index}.{fmt}"
            status = instar(["dd", "-O", fmt, *extra, *window, f"if={source}", f"of={out}"])
            want = expected_bytes(data, window)
            checks = []
            ok = status == 0
            if ok:
                got = read_back(out, fmt, len(want))
                checks.append("instar " + ("ok" if got == want else "MISMATCH"))
                ok = got == want
            qemu = qemu_read_back(out, fmt) if ok else None
            if qemu is not None:
                same = qemu[: len(want)] == want and not qemu[len(want) :].strip(b"\0")
                checks.append("qemu-img " + ("ok" if same else "MISMATCH"))
                ok = ok and same
            failures += not ok
            print(f"  {label:11} {' '.join(window):28} -> {len(want):8} bytes  "
                  f"{'; '.join(checks) or 'FAILED'}")
    print("all windows read back correctly" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
