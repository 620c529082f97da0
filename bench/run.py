"""Benchmarks: instar against qemu-img (and cp) on the same inputs, in the same run.

    python bench/run.py [--size-mib MIB [MIB ...]] [--runs N] [--where tmpfs|disk|both]
                        [--only SUBSTRING ...] [--markdown FILE] [--sandbox-cost]

The input is a raw image half random and half zero in alternating 1 MiB stripes
(zeros written, not holes), and its copies in each format, made by qemu-img
convert (so zero clusters are not allocated); besides it, a 1 TiB sparse raw
image with 8 MiB of data, a 2 PiB empty qcow2 (qemu-img create) and a qcow2 of
4 KiB clusters written in scattered order (qemu-io: every other cluster, then
the rest). Each is made when a row first needs it and deleted after the last
row that reads it, so the work directory holds at most about three times the
size.

Each row runs the other tool and instar alternately (A B A B ...): a warm-up
pair, not counted, then N counted pairs. Before every run the page cache's
dirty pages are written back (untimed), so a run does not pay for the previous
one's writes; the output is deleted after it. As in qemu-img, dd flushes its
output and convert (default cache mode "unsafe") does not. Reported per row:
wall seconds, median (min-max), of each side; the ratio instar / other, the
median (min-max) of the per-pair ratios (below 1: instar is faster); the
median CPU seconds (user + system from wait4, so instar's sandboxed worker is
counted); the peak resident memory of each side. A run that goes over the
row's limit is killed, reported as "> limit", and that side is not run again
in the row. Only public tools are used: qemu-img, qemu-io, cp and the Python
standard library.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
INSTAR = (sys.executable, "-m", "instar")
API_CALLS = (sys.executable, str(HERE / "api_calls.py"))
WRITE_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels", "qed", "qcow")
STRIPE = 1 << 20
BS512_MAX = 32 << 20  # qemu-img dd bs=512 manages a few MB/s: keep its window short
FRAGMENTED_MAX = 1 << 30  # qemu-io writes the 4 KiB clusters one command each
CLUSTER = 4096
API_CALLS_PER_RUN = 20
HUGE_LIMIT = 15.0  # seconds: qemu-img dd reads and writes all 2 PiB, block by block
SPARSE_SIZE = 1 << 40


class Row(NamedTuple):
    """One comparison: a command instar is measured against, and instar's."""

    name: str
    vs: tuple[str, ...]  # the other tool's argv; {src}, {qcow2}, {out}... filled in
    ours: tuple[str, ...]  # instar's argv
    vs_name: str = "qemu-img"
    needs: tuple[str, ...] = ()  # formats instar must write for this row
    limit: float | None = None  # seconds one run may take (default: --timeout)
    per_call: bool = False  # the commands print wall and CPU seconds per call (api_calls.py)


def same(name: str, *args: str, needs: tuple[str, ...] = (), limit: float | None = None) -> Row:
    """A row giving qemu-img and instar the same arguments."""
    return Row(name, ("qemu-img", *args), (*INSTAR, *args), needs=needs, limit=limit)


def image(fmt: str) -> str:
    """The placeholder of the striped input in ``fmt`` (the raw one is {src})."""
    return "{src}" if fmt == "raw" else f"{{{fmt}}}"


def rows(size: int) -> list[Row]:
    """Every row, grouped by the input they read (so each input is dropped early)."""
    count = min(size, BS512_MAX) // 512
    table: list[Row] = []
    for bs, window in (("4M", ()), ("64k", ()), ("512", (f"count={count}",))):
        label = f"bs={bs}" + (f" count={count}" if window else "")
        table += [same(f"dd raw->{fmt} {label}", "dd", f"bs={bs}", *window, "-O", fmt,
                       "if={src}", "of={out}", needs=(fmt,)) for fmt in WRITE_FORMATS]
    table += [same(f"convert raw->{fmt}", "convert", "-O", fmt, "{src}", "{out}", needs=(fmt,))
              for fmt in WRITE_FORMATS]
    table += [
        Row("convert raw->raw, against cp", ("cp", "--sparse=always", "{src}", "{out}"),
            (*INSTAR, "convert", "-O", "raw", "{src}", "{out}"), vs_name="cp --sparse=always"),
        same("convert -c raw->qcow2 (zlib)", "convert", "-c", "-O", "qcow2", "{src}", "{out}",
             needs=("qcow2",)),
        same("convert -c raw->qcow2 (zstd)", "convert", "-c", "-O", "qcow2", "-o",
             "compression_type=zstd", "{src}", "{out}", needs=("qcow2",)),
        same("convert raw->vmdk streamOptimized", "convert", "-O", "vmdk", "-o",
             "subformat=streamOptimized", "{src}", "{out}", needs=("vmdk",)),
        same("compare raw raw (identical)", "compare", "{src}", "{src2}"),
        same("compare raw qcow2", "compare", "{src}", "{qcow2}"),
    ]
    for fmt in WRITE_FORMATS:
        if fmt != "raw":
            table.append(same(f"dd {fmt}->raw bs=4M", "dd", "-f", fmt, "bs=4M", "-O", "raw",
                              f"if={image(fmt)}", "of={out}"))
            table.append(same(f"convert {fmt}->raw", "convert", "-f", fmt, "-O", "raw",
                              image(fmt), "{out}"))
        table.append(same(f"info {fmt}", "info", image(fmt)))
        table.append(same(f"info --output=json {fmt}", "info", "--output=json", image(fmt)))
        if fmt == "qcow2":
            table += [Row(f"API {call} qcow2, per call",
                          (*API_CALLS, "qemu-img-info", "{qcow2}", str(API_CALLS_PER_RUN)),
                          (*API_CALLS, call, "{qcow2}", str(API_CALLS_PER_RUN)),
                          vs_name="subprocess.run(qemu-img info)", per_call=True)
                      for call in ("open_image", "inspect")]
    fragmented = min(size, FRAGMENTED_MAX) >> 20
    table += [
        same("convert 1 TiB sparse raw->raw", "convert", "-O", "raw", "{sparse}", "{out}"),
        same("convert 1 TiB sparse raw->qcow2", "convert", "-O", "qcow2", "{sparse}", "{out}",
             needs=("qcow2",)),
        same("info 1 TiB sparse raw", "info", "{sparse}"),
        same("dd -O qcow2 2 PiB empty qcow2", "dd", "-O", "qcow2", "if={huge}", "of={out}",
             needs=("qcow2",), limit=HUGE_LIMIT),
        same("compare 2 PiB empty qcow2 with itself", "compare", "{huge}", "{huge}",
             limit=HUGE_LIMIT),
        same(f"convert fragmented 4 KiB-cluster qcow2 ({fragmented} MiB)->raw",
             "convert", "-O", "raw", "{fragmented}", "{out}"),
    ]
    return table


def placeholders(row: Row) -> set[str]:
    return {field for arg in (*row.vs, *row.ours)
            for _, field, _, _ in string.Formatter().parse(arg) if field}


def checked(argv: Sequence[str], stdin: bytes | None = None) -> None:
    """Run a set-up command; its output is not wanted."""
    subprocess.run(argv, input=stdin, check=True, stdout=subprocess.DEVNULL)


class Inputs:
    """The images the rows read, made on first use (qemu-img, qemu-io, plain writes)."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self.made: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self.made:
            target = self.directory / f"{name}.img"
            maker: Callable[[Path], None] = getattr(self, f"_make_{name}", None) or (
                lambda path: checked(["qemu-img", "convert", "-O", name,
                                      str(self.path("src")), str(path)]))
            maker(target)
            self.made[name] = target
        return self.made[name]

    def drop(self, name: str) -> None:
        path = self.made.pop(name, None)
        if path is not None:
            path.unlink()

    def _make_src(self, path: Path) -> None:
        random_stripe, zero_stripe = os.urandom(STRIPE), bytes(STRIPE)
        with open(path, "wb") as file:
            for index in range(self.size // STRIPE):
                file.write(random_stripe if index % 2 == 0 else zero_stripe)

    def _make_src2(self, path: Path) -> None:
        shutil.copyfile(self.path("src"), path)

    def _make_sparse(self, path: Path) -> None:
        with open(path, "wb") as file:
            for index in range(8):  # 1 MiB every 128 GiB
                file.seek(index * (SPARSE_SIZE // 8))
                file.write(os.urandom(1 << 20))
            file.truncate(SPARSE_SIZE)

    def _make_huge(self, path: Path) -> None:
        checked(["qemu-img", "create", "-f", "qcow2", str(path), "2P"])

    def _make_fragmented(self, path: Path) -> None:
        clusters = min(self.size, FRAGMENTED_MAX) // CLUSTER
        checked(["qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
                 str(path), str(clusters * CLUSTER)])
        order = [*range(0, clusters, 2), *range(1, clusters, 2)]
        script = "".join(f"write -P {index % 255 + 1} {index * CLUSTER} {CLUSTER}\n"
                         for index in order)
        checked(["qemu-io", "-t", "unsafe", str(path)], stdin=script.encode())


class Run(NamedTuple):
    wall: float  # seconds (per call for a per_call row)
    cpu: float  # user + system seconds of the process and the children it waited for
    rss: int  # peak resident KiB of the largest of them


class Failed(Exception):
    """A command exited with an error."""


def measure(argv: Sequence[str], timeout: float, per_call: bool, log: Path) -> Run | None:
    """Run ``argv`` and measure it; None if it ran over ``timeout`` (then killed,
    with its process group). CPU time includes instar's sandboxed worker (a child
    it waits for) and, unlike wall time, hardly moves when other work shares the
    machine."""
    with open(log, "wb") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE if per_call else subprocess.DEVNULL,
                                   stderr=errors, start_new_session=True)
        lock, state = threading.Lock(), {"exited": False, "killed": False}

        def kill() -> None:
            with lock:
                if not state["exited"]:  # still unreaped: the group is still ours
                    state["killed"] = True
                    os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        output = process.stdout.read() if process.stdout is not None else b""
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        elapsed = time.perf_counter() - start
        with lock:
            state["exited"] = True
        timer.cancel()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.stdout is not None:
        process.stdout.close()
    if state["killed"]:
        return None
    if process.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["(no message)"]
        raise Failed(f"{Path(argv[0]).name} exit {process.returncode}: {lines[-1]}")
    if per_call:
        wall, cpu = (float(word) for word in output.split())
        return Run(wall, cpu, usage.ru_maxrss)
    return Run(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


class Side:
    """One side's runs in a row, pair by pair (None: not run, it went over)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.runs: list[Run | None] = []
        self.over = False

    def measured(self) -> list[Run]:
        return [run for run in self.runs if run is not None]


def run_row(row: Row, paths: dict[str, str], out: Path, runs: int, timeout: float
            ) -> tuple[Side, Side]:
    """The warm-up pair and ``runs`` counted pairs, the other tool first in each."""
    sides = (Side([arg.format(**paths) for arg in row.vs]),
             Side([arg.format(**paths) for arg in row.ours]))
    limit = row.limit or timeout
    for pair in range(runs + 1):
        for side in sides:
            run = None
            if not side.over:
                os.sync()  # start with no dirty pages left by the previous run
                try:
                    run = measure(side.argv, limit, row.per_call, out.with_suffix(".log"))
                finally:
                    out.unlink(missing_ok=True)
                side.over = run is None
            if pair > 0:
                side.runs.append(run)
    return sides


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def cells(row: Row, vs: Side, ours: Side, limit: float) -> list[str]:
    """The table cells after the row's name and the other tool's."""
    def seconds(side: Side) -> str:
        return f"> {limit:g}" if side.over else spread([run.wall for run in side.measured()])

    ratios = [(o.wall if o else limit) / (v.wall if v else limit)
              for v, o in zip(vs.runs, ours.runs, strict=True) if v or o]
    bound = "?" if vs.over and ours.over else "< " if vs.over else "> " if ours.over else ""
    ratio = "?" if bound == "?" else bound + spread(ratios)

    def cpu(side: Side) -> str:
        done = side.measured()
        return f"{statistics.median(run.cpu for run in done):.3g}" if done else "-"

    def rss(side: Side) -> str:
        done = side.measured()
        return f"{max(run.rss for run in done) / 1024:.0f}" if done else "-"

    return [seconds(vs), seconds(ours), ratio, cpu(vs), cpu(ours), rss(vs), rss(ours)]


HEADER = ("| case | against | against s | instar s | instar / against | against CPU s "
          "| instar CPU s | against RSS MiB | instar RSS MiB |\n"
          "|---|---|---|---|---|---|---|---|---|")


def writable(fmt: str) -> bool:
    from instar.formats import registry

    found = registry.get(fmt)
    return found is not None and bool(getattr(found, "writer", ""))


def comparison(inputs: Inputs, out: Path, args: argparse.Namespace) -> Iterator[str]:
    """The table's lines, each yielded as soon as its row is measured."""
    selected = [row for row in rows(inputs.size)
                if any(part in row.name for part in args.only or [""])]
    last_use = {name: index for index, row in enumerate(selected) for name in placeholders(row)}
    yield HEADER
    for index, row in enumerate(selected):
        missing = [fmt for fmt in row.needs if not writable(fmt)]
        if missing:
            yield f"| {row.name} | {row.vs_name} | not supported ({', '.join(missing)}) |"
            continue
        paths = {name: str(inputs.path(name)) for name in placeholders(row) if name != "out"}
        try:
            vs, ours = run_row(row, paths | {"out": str(out)}, out, args.runs, args.timeout)
            yield "| " + " | ".join([row.name, row.vs_name,
                                     *cells(row, vs, ours, row.limit or args.timeout)]) + " |"
        except Failed as error:
            yield f"| {row.name} | {row.vs_name} | failed: {error} |"
        for name, last in last_use.items():
            if last == index:
                inputs.drop(name)


def sandbox_cost(inputs: Inputs, out: Path, args: argparse.Namespace) -> Iterator[str]:
    """What the sandboxed worker costs: each command with the worker (the
    default) and in-process (``--sandbox=off``), alternately, and qemu-img
    beside them; the worker's cost is the difference of the medians, in wall
    time and in CPU time (which the machine's other load hardly moves)."""
    runs = max(args.runs, 5)
    cases = (
        ("info qcow2", ["info", "{qcow2}"]),
        ("info --output=json vmdk", ["info", "--output=json", "{vmdk}"]),
        ("convert qcow2->raw", ["convert", "-O", "raw", "{qcow2}", "{out}"]),
    )
    yield f"The sandboxed worker's cost: medians of {runs} alternating runs after a warm-up"
    yield ("| case | qemu-img s | instar --sandbox=off s | instar (worker) s | worker cost ms "
           "| qemu-img CPU s | --sandbox=off CPU s | worker CPU s | worker CPU cost ms |\n"
           "|---|---|---|---|---|---|---|---|---|")
    paths = {"qcow2": str(inputs.path("qcow2")), "vmdk": str(inputs.path("vmdk")),
             "out": str(out)}
    for name, case in cases:
        filled = [arg.format(**paths) for arg in case]
        argvs = {"qemu": ["qemu-img", *filled], "off": [*INSTAR, "--sandbox=off", *filled],
                 "on": [*INSTAR, *filled]}
        measured: dict[str, list[Run]] = {key: [] for key in argvs}
        for _ in range(runs + 1):
            for key, argv in argvs.items():
                os.sync()
                run = measure(argv, args.timeout, False, out.with_suffix(".log"))
                out.unlink(missing_ok=True)
                if run is None:
                    raise SystemExit(f"over {args.timeout} s: {' '.join(argv)}")
                measured[key].append(run)
        q, off, on = (statistics.median(run.wall for run in measured[key][1:])
                      for key in ("qemu", "off", "on"))
        qc, offc, onc = (statistics.median(run.cpu for run in measured[key][1:])
                         for key in ("qemu", "off", "on"))
        yield (f"| {name} | {q:.3f} | {off:.3f} | {on:.3f} | {(on - off) * 1000:.0f} "
               f"| {qc:.3f} | {offc:.3f} | {onc:.3f} | {(onc - offc) * 1000:.0f} |")
    parts = subprocess.run([sys.executable, str(HERE / "sandbox_parts.py")], check=True,
                           stdout=subprocess.PIPE, text=True).stdout
    yield "\nWhere it goes (bench/sandbox_parts.py, a fresh interpreter):\n"
    yield parts.rstrip()


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, options) of each mount, from /proc/mounts."""
    found = []
    with open("/proc/mounts") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 4:
                point = fields[1].replace("\\040", " ")
                found.append((point, fields[2], fields[3]))
    return found


def fs_type(path: str) -> str:
    """The type of the file system ``path`` is on (its longest mount point)."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    for point, fstype, _ in mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def tmpfs_dir() -> str:
    """/dev/shm if it is a writable tmpfs, else another writable tmpfs."""
    candidates = ["/dev/shm", *(point for point, fstype, options in mounts()
                                if fstype == "tmpfs" and "rw" in options.split(",")
                                and not point.startswith(("/sys", "/proc")))]
    for point in candidates:
        if os.path.isdir(point) and os.access(point, os.W_OK) and fs_type(point) == "tmpfs":
            return point
    raise SystemExit("no writable tmpfs found (try --where disk)")


def disk_dir() -> str:
    """/var/tmp or /tmp, whichever is not on a tmpfs."""
    for point in ("/var/tmp", "/tmp"):
        if os.access(point, os.W_OK) and fs_type(point) != "tmpfs":
            return point
    raise SystemExit("/var/tmp and /tmp are both tmpfs (try --where tmpfs)")


def versions() -> str:
    qemu = subprocess.run(["qemu-img", "--version"], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.splitlines()[0]
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return f"{qemu}; instar {commit.stdout.strip() or 'unknown commit'}"


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, nargs="+", default=[256],
                        help="input sizes, a table each (default 256)")
    parser.add_argument("--runs", type=int, default=5,
                        help="counted pairs per row, after a warm-up pair (default 5)")
    parser.add_argument("--where", choices=("tmpfs", "disk", "both"), default="tmpfs",
                        help="tmpfs: /dev/shm or another tmpfs; disk: /var/tmp or /tmp, "
                        "whichever is not a tmpfs (default tmpfs)")
    parser.add_argument("--only", action="append", metavar="SUBSTRING",
                        help="only the rows whose name has SUBSTRING (may be repeated)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds a run may take, where the row sets no limit (default 900)")
    parser.add_argument("--sandbox-cost", action="store_true",
                        help="only the rows of the sandboxed worker's cost")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required (apt-get install qemu-utils)")
    places = [(kind, finder()) for kind, finder in (("tmpfs", tmpfs_dir), ("disk", disk_dir))
              if args.where in (kind, "both")]
    written: list[str] = []
    started = time.monotonic()
    for kind, parent in places:
        for mib in args.size_mib:
            size = mib << 20
            free = shutil.disk_usage(parent).free
            if free < 3 * size + (256 << 20):
                raise SystemExit(f"{parent} has {free >> 20} MiB free; {mib} MiB inputs need "
                                 f"{3 * mib + 256} MiB")
            work = Path(tempfile.mkdtemp(prefix="instar-bench-", dir=parent))
            at_start, began = load(), time.strftime("%Y-%m-%d %H:%M")
            print(f"\n## {mib} MiB, {kind}: {work} ({fs_type(str(work))})\n", flush=True)
            table = []
            try:
                inputs = Inputs(work, size)
                lines = (sandbox_cost if args.sandbox_cost else comparison)(
                    inputs, work / "out.img", args)
                for line in lines:
                    print(line, flush=True)
                    table.append(line)
            finally:
                shutil.rmtree(work)
            header = (f"{began}; {os.cpu_count()} CPUs, load average (1/5/15 min) {at_start} "
                      f"at start, {load()} at end; input {mib} MiB; counted pairs: {args.runs} "
                      f"after a warm-up pair; {kind} ({parent}, {fs_type(parent)}); "
                      f"{versions()}")
            print(f"\n{header}", flush=True)
            written += [f"### {mib} MiB on {kind}", "", header, "", *table, ""]
            if args.markdown:
                args.markdown.write_text("\n".join(written))
    print(f"\ntook {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
