"""Benchmarks: instar against qemu-img on the same inputs, in the same run.

Makes a 1 GiB raw image, half random and half zero in alternating 1 MiB
stripes (zeros written, not holes), and copies of it in each format (made by
qemu-img convert, so zero clusters are not allocated); then times each
case for qemu-img and instar alternately (A B A B ...), reporting the median
wall time, throughput, the instar/qemu speed ratio and each side's peak RSS.
Before each run the page cache's dirty pages are written back (untimed), so a
run does not pay for the previous one's writes. As in qemu-img, dd flushes its
output and convert (default cache mode "unsafe") does not.
Only public tools are used: qemu-img and the Python standard library.

    python bench/run.py [--size-mib 1024] [--runs 3] [--only SUBSTRING] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

INSTAR = [sys.executable, "-m", "instar"]
STRIPE = 1 << 20
INPUT_FORMATS = ("qcow2", "vmdk", "vpc", "vhdx")


@dataclass
class Case:
    name: str
    qemu: list[str]  # arguments after "qemu-img"; {src}, {qcow2}, {vmdk}... {out} filled in
    instar: list[str]  # arguments after "instar"
    bytes_moved: int  # for MB/s: the bytes of the window copied
    needs: tuple[str, ...] = ()  # output formats instar must be able to write


def cases(size: int) -> list[Case]:
    small = min(size, 128 << 20)  # qemu-img dd bs=512 manages ~12 MB/s: keep it short
    rows = [
        Case("dd raw->raw bs=4M", ["dd", "bs=4M", "if={src}", "of={out}"],
             ["dd", "bs=4M", "if={src}", "of={out}"], size),
        Case("dd raw->raw bs=64k", ["dd", "bs=64k", "if={src}", "of={out}"],
             ["dd", "bs=64k", "if={src}", "of={out}"], size),
        Case(f"dd raw->raw bs=512 count={small // 512}",
             ["dd", "bs=512", f"count={small // 512}", "if={src}", "of={out}"],
             ["dd", "bs=512", f"count={small // 512}", "if={src}", "of={out}"], small),
    ]
    for fmt in INPUT_FORMATS:
        dd_args = ["dd", "-f", fmt, "bs=4M", f"if={{{fmt}}}", "of={out}"]
        convert_args = ["convert", "-f", fmt, "-O", "raw", f"{{{fmt}}}", "{out}"]
        rows.append(Case(f"dd {fmt}->raw bs=4M", dd_args, dd_args, size, (fmt,)))
        rows.append(Case(f"convert {fmt}->raw", convert_args, convert_args, size, (fmt,)))
    for fmt in ("qcow2", "vmdk", "vpc", "vhdx"):
        rows.append(Case(f"dd raw->{fmt} bs=4M", ["dd", "bs=4M", "-O", fmt, "if={src}", "of={out}"],
                         ["dd", "bs=4M", "-O", fmt, "if={src}", "of={out}"], size, (fmt,)))
        rows.append(Case(f"convert raw->{fmt}", ["convert", "-O", fmt, "{src}", "{out}"],
                         ["convert", "-O", fmt, "{src}", "{out}"], size, (fmt,)))
    rows.append(Case("convert -c raw->qcow2", ["convert", "-c", "-O", "qcow2", "{src}", "{out}"],
                     ["convert", "-c", "-O", "qcow2", "{src}", "{out}"], size, ("qcow2",)))
    stream = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
    rows.append(Case("convert raw->vmdk streamOptimized", ["convert", *stream, "{src}", "{out}"],
                     ["convert", *stream, "{src}", "{out}"], size, ("vmdk",)))
    return rows


def make_inputs(directory: Path, size: int) -> dict[str, Path]:
    """The striped raw image and its copy in each input format (made by qemu-img)."""
    src = directory / "striped.raw"
    random_stripe = os.urandom(STRIPE)
    zero_stripe = bytes(STRIPE)
    with open(src, "wb") as file:
        for index in range(size // STRIPE):
            file.write(random_stripe if index % 2 == 0 else zero_stripe)
    made = {"src": src}
    for fmt in INPUT_FORMATS:
        made[fmt] = directory / f"striped.{fmt}"
        run(["qemu-img", "convert", "-O", fmt, str(src), str(made[fmt])])
    return made


class Measured(NamedTuple):
    wall: float  # seconds
    cpu: float  # user + system seconds of the process and the children it waited for
    rss: int  # peak resident KiB of the largest of them


def run(argv: list[str]) -> Measured:
    """Run ``argv`` (its standard output thrown away) and measure it. CPU time
    includes instar's sandboxed worker (a child it waits for), and, unlike wall
    time, hardly moves when other work shares the machine."""
    start = time.perf_counter()
    with open(os.devnull, "wb") as null:
        process = subprocess.Popen(argv, stdout=null)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return Measured(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def fill(args: list[str], paths: dict[str, str]) -> list[str]:
    return [arg.format(**paths) for arg in args]


def writable(fmt: str) -> bool:
    from instar.formats import registry

    return registry.get(fmt) is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--sandbox-cost", action="store_true",
                        help="only the rows of the sandboxed worker's cost")
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is required (apt-get install qemu-utils)")
    size = args.size_mib << 20
    work = Path(args.dir or tempfile.mkdtemp(prefix="instar-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(work, size)
    if args.sandbox_cost:
        sandbox_cost(inputs, work, args.runs)
        return 0
    print(f"input: {size >> 20} MiB, half random half zero in 1 MiB stripes; "
          f"{args.runs} runs each, medians; {os.cpu_count()} CPUs")
    print("| case | qemu-img s | instar s | qemu-img MB/s | instar MB/s | speed ratio "
          "| qemu-img RSS MiB | instar RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases(size):
        if args.only not in case.name:
            continue
        if not all(writable(fmt) for fmt in case.needs):
            print(f"| {case.name} | | | | | not supported yet | | |")
            continue
        out = work / "out.img"
        paths = {name: str(path) for name, path in inputs.items()} | {"out": str(out)}
        qemu_times: list[float] = []
        ours_times: list[float] = []
        qemu_rss: list[int] = []
        ours_rss: list[int] = []
        for _ in range(args.runs + 1):  # the first round warms the cache, not counted
            for argv, times, rss in ((["qemu-img", *fill(case.qemu, paths)], qemu_times, qemu_rss),
                                     ([*INSTAR, *fill(case.instar, paths)], ours_times, ours_rss)):
                os.sync()  # start each run with no dirty pages left by the previous one
                elapsed, _, peak = run(argv)
                times.append(elapsed)
                rss.append(peak)
                out.unlink(missing_ok=True)
        q, o = statistics.median(qemu_times[1:]), statistics.median(ours_times[1:])
        mb = case.bytes_moved / 1e6
        print(f"| {case.name} | {q:.2f} | {o:.2f} | {mb / q:.0f} | {mb / o:.0f} | {q / o:.2f}x "
              f"| {max(qemu_rss) / 1024:.0f} | {max(ours_rss) / 1024:.0f} |", flush=True)
    sparse_memory(work)
    sandbox_cost(inputs, work, args.runs)
    if args.dir is None:
        shutil.rmtree(work)
    return 0


def sparse_memory(work: Path) -> None:
    """Peak memory on a 1 TiB sparse raw image with 8 MiB of data scattered over it:
    memory must not grow with the virtual size (only metadata tables do)."""
    src = work / "sparse-1t.raw"
    with open(src, "wb") as file:
        for index in range(8):
            file.seek(index * (1 << 37))  # every 128 GiB
            file.write(os.urandom(1 << 20))
        file.truncate(1 << 40)
    print("\n1 TiB sparse raw, 8 MiB of data: one run each")
    print("| case | qemu-img s | instar s | qemu-img RSS MiB | instar RSS MiB |")
    print("|---|---|---|---|---|")
    for fmt in ("raw", "qcow2", "vmdk", "vpc", "vhdx"):
        if fmt == "vpc":
            continue  # VHD holds at most 2040 GiB: fine, but qemu-img takes minutes here
        out = work / f"sparse-out.{fmt}"
        args = ["convert", "-O", fmt, str(src), str(out)]
        os.sync()
        qemu_time, _, qemu_rss = run(["qemu-img", *args])
        out.unlink()
        os.sync()
        ours_time, _, ours_rss = run([*INSTAR, *args])
        out.unlink()
        print(f"| convert 1 TiB sparse raw->{fmt} | {qemu_time:.2f} | {ours_time:.2f} "
              f"| {qemu_rss / 1024:.0f} | {ours_rss / 1024:.0f} |", flush=True)
    src.unlink()


def sandbox_cost(inputs: dict[str, Path], work: Path, runs: int) -> None:
    """What the sandboxed worker costs: each command with the worker (the
    default) and in-process (``--sandbox=off``), alternately, and qemu-img
    beside them; the worker's cost is the difference of the medians, in wall
    time and in CPU time (which the machine's other load hardly moves)."""
    out = work / "out.img"
    rows = (
        ("info qcow2", ["info", "{qcow2}"]),
        ("info --output=json vmdk", ["info", "--output=json", "{vmdk}"]),
        ("convert qcow2->raw", ["convert", "-O", "raw", "{qcow2}", "{out}"]),
    )
    print(f"\nThe sandboxed worker's cost: medians of {max(runs, 5)} alternating runs")
    print("| case | qemu-img s | instar --sandbox=off s | instar (worker) s | worker cost ms "
          "| qemu-img CPU s | --sandbox=off CPU s | worker CPU s | worker CPU cost ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    paths = {name: str(path) for name, path in inputs.items()} | {"out": str(out)}
    for name, args in rows:
        times: dict[str, list[Measured]] = {"qemu": [], "off": [], "on": []}
        argvs = {"qemu": ["qemu-img", *fill(args, paths)],
                 "off": [*INSTAR, "--sandbox=off", *fill(args, paths)],
                 "on": [*INSTAR, *fill(args, paths)]}
        for _ in range(max(runs, 5) + 1):
            for key, argv in argvs.items():
                os.sync()
                times[key].append(run(argv))
                out.unlink(missing_ok=True)
        q, off, on = (statistics.median(m.wall for m in times[key][1:])
                      for key in ("qemu", "off", "on"))
        qc, offc, onc = (statistics.median(m.cpu for m in times[key][1:])
                         for key in ("qemu", "off", "on"))
        print(f"| {name} | {q:.3f} | {off:.3f} | {on:.3f} | {(on - off) * 1000:.0f} "
              f"| {qc:.3f} | {offc:.3f} | {onc:.3f} | {(onc - offc) * 1000:.0f} |", flush=True)
    print("\nWhere it goes (bench/sandbox_parts.py, a fresh interpreter):", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("sandbox_parts.py"))],
                   check=True)


if __name__ == "__main__":
    sys.exit(main())
