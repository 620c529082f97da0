"""The hostile corpus: every image of tests/hostile_corpus.py through ten commands.

Each image is built by the test (qemu-img bases patched in Python, or written
from the format specifications) in a directory ``img/`` of its own, beside a
directory ``secret/`` holding a canary file, which attacks name. Every command
runs instar as a subprocess with the default sandbox and the limits a service
would set (``--timeout 5 --max-memory 512M``):

    dd if=X of=OUT   dd -O qcow2 if=X of=OUT   convert -O raw X OUT
    info X           info --output=json X     compare X X
    map X            map --output=json X
    check X          measure -O qcow2 X

and each run must either succeed with the right output (what qemu-img reads,
where qemu reads the image; an image's own commands agree where it does not)
or refuse in exactly one line (``instar: ...``, no traceback, no "internal
error": an exception the worker did not expect); within 5 s of
wall clock and 512 MiB of memory (the instar process and its worker); with no
file left behind on failure (hidden temporary files included) and nothing of
the canary, of /etc/passwd or of the environment in any output. ``check``
reports what it finds, as qemu-img check does, so its contract is its own
(`check_check_run`): qemu-img check's exit statuses, a summary where it
finished, a last line ``instar: ...`` where it could not check.

map reads no data, only the image's tables: it may map an image whose data
the other commands refuse (a compressed bomb), so it must map it as qemu-img
maps it, or refuse in one line; a benign image ("read") it maps exactly as
qemu-img does (stdout and exit status, the human output's "File contains
external, encrypted or compressed clusters." included). measure walks the same
block status and reads no data either: it may measure what the others refuse,
and must measure every image they read.

Attacks on paths run the ten commands with ``--allow img`` (the most a user
would allow), and dd again without it: refused both ways.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import hostile_corpus as corpus
from confined import (
    LIMIT_MEMORY,
    SANDBOX_WARNING,
    WATCHDOG_SECONDS,
    Run,
    run_instar,
)
from helpers import QEMU_IMG, require_qemu
from hostile_corpus import Case, Place

QEMU_SECONDS = 30.0
SCAN_LIMIT = 256 << 20  # bytes of data read from one output to look for the canary


def run_qemu(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes] | None:
    """qemu-img, limited as instar is (memory, time); None if it did not finish."""
    require_qemu("qemu-img")
    assert QEMU_IMG is not None

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    try:
        return subprocess.run([QEMU_IMG, *args], cwd=cwd, capture_output=True,
                              timeout=QEMU_SECONDS, preexec_fn=limit, check=False)
    except subprocess.TimeoutExpired:
        return None


# --- what is in a directory and in a file -----------------------------------------------------


def listing(directory: Path) -> set[str]:
    """Every name under ``directory``, hidden ones included (not following links)."""
    names = set()
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            names.add(os.path.relpath(os.path.join(root, name), directory))
    return names


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the data of a (possibly sparse) file, by SEEK_DATA/SEEK_HOLE."""
    ranges = []
    with open(path, "rb") as handle:
        fd, size, position = handle.fileno(), os.fstat(handle.fileno()).st_size, 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end))
            position = end
    return ranges


def chunks(path: Path, limit: int = SCAN_LIMIT) -> list[tuple[int, bytes]]:
    """The data of ``path`` as (offset, bytes) pieces of at most 4 MiB; at most
    ``limit`` bytes (an AssertionError beyond: an output that large is a finding)."""
    pieces, total = [], 0
    with open(path, "rb") as handle:
        for start, end in data_ranges(path):
            position = start
            while position < end:
                length = min(4 << 20, end - position)
                handle.seek(position)
                data = handle.read(length)
                total += len(data)
                assert total <= limit, f"{path.name} holds more than {limit} bytes of data"
                pieces.append((position, data))
                position += length
    return pieces


def same_content(first: Path, second: Path) -> str | None:
    """None if the files read the same (holes as zeros), else where they differ."""
    size_a, size_b = first.stat().st_size, second.stat().st_size
    if size_a != size_b:
        return f"{first.name} is {size_a} bytes, {second.name} {size_b}"
    for this, other in ((first, second), (second, first)):
        with open(other, "rb") as handle:
            for offset, data in chunks(this):
                handle.seek(offset)
                theirs = handle.read(len(data))
                theirs += bytes(len(data) - len(theirs))
                if data != theirs:
                    at = next(i for i in range(len(data)) if data[i] != theirs[i])
                    return f"{this.name} and {other.name} differ at offset {offset + at}"
    return None


def leaks(data: bytes, forbidden: list[bytes]) -> list[bytes]:
    return [secret for secret in forbidden if secret in data]


# --- the ten commands --------------------------------------------------------------------------


OUTPUTS = {"dd": "dd.raw", "dd -O qcow2": "dd.qcow2", "convert": "convert.raw"}


def commands(case: Case, image: str, allow: bool) -> list[tuple[str, list[str]]]:
    """(label, arguments) of the ten commands; outputs go to ``out/``."""
    f = ["-f", case.fmt] if case.fmt else []
    a = ["--allow", "img"] if allow else []
    return [
        ("dd", ["dd", *f, *a, f"if={image}", "of=out/dd.raw"]),
        ("dd -O qcow2", ["dd", *f, *a, "-O", "qcow2", f"if={image}", "of=out/dd.qcow2"]),
        ("convert", ["convert", *f, *a, "-O", "raw", image, "out/convert.raw"]),
        ("info", ["info", *f, *a, image]),
        ("info json", ["info", *f, *a, "--output=json", image]),
        ("compare", ["compare", *f, *a, *(["-F", case.fmt] if case.fmt else []), image, image]),
        ("map", ["map", *f, *a, image]),
        ("map json", ["map", *f, *a, "--output=json", image]),
        ("check", ["check", *f, *a, image]),
        ("measure", ["measure", *f, *a, "-O", "qcow2", image]),
    ]


MAPS = {"map": [], "map json": ["--output=json"]}
WALKS = ("map", "map json", "measure")  # block status only, no data read


def expectation(case: Case, label: str) -> str:
    """What a command must do with the case's image: info as ``info`` says
    where given; map refuses attacks on paths and otherwise may map what the
    others refuse (its output is checked against qemu-img's instead); measure
    may measure what the others refuse, and must measure what they read."""
    if label.startswith("info") and case.info:
        return case.info
    if label in MAPS and case.allow != "both":
        return "either"
    if label == "measure" and case.allow != "both" and case.expect == "refuse":
        return "either"
    return case.expect


@dataclass
class Checked:
    """What the runs of one image showed: every problem, and the outputs kept."""

    problems: list[str]
    outputs: dict[str, Path]
    runs: dict[str, Run]


def check_run(run: Run, expect: str, case: Case, place: Place, before: set[str],
              forbidden: list[bytes], keep: Path | None, says: str | None) -> list[str]:
    """The contract for one run; ``expect`` is "read", "refuse" or "either";
    a refusal must contain ``says`` (a regex) where given."""
    if run.label == "check":
        return check_check_run(run, place, before, forbidden)
    problems = []
    where = run.describe()
    if run.hung:
        problems.append(f"HANG (killed after {WATCHDOG_SECONDS:g} s): {where}")
    elif run.stalled:
        problems.append(f"SLOW ({run.seconds:.1f} s): {where}")
    if run.max_rss > LIMIT_MEMORY:
        problems.append(f"MEMORY ({run.max_rss >> 20} MiB): {where}")
    if b"Traceback" in run.stderr:
        problems.append(f"TRACEBACK: {where}")
    if b"internal error" in run.stderr:  # an exception instar did not expect, from the worker
        problems.append(f"INTERNAL ERROR: {where}")
    for stream, data in (("stdout", run.stdout), ("stderr", run.stderr)):
        for secret in leaks(data, forbidden):
            problems.append(f"LEAK of {secret[:16]!r} on {stream}: {where}")
    lines = [line for line in run.stderr.decode("utf-8", "replace").splitlines()
             if not SANDBOX_WARNING.match(line)]
    output = place.out / OUTPUTS[run.label] if run.label in OUTPUTS else None
    ok = run.rc == 0 and not lines
    if ok:
        if expect == "refuse":
            problems.append(f"NOT REFUSED: {where}")
        if output is not None:
            if not output.exists():
                problems.append(f"NO OUTPUT: {where}")
            else:
                for _, data in chunks(output):
                    for secret in leaks(data, forbidden):
                        problems.append(f"LEAK of {secret[:16]!r} in {output.name}: {where}")
                if keep is not None:
                    output.rename(keep / output.name)
        if run.label == "compare" and run.stdout != b"Images are identical.\n":
            problems.append(f"COMPARE says {run.stdout[:200]!r}: {where}")
        if run.label == "measure" and not re.fullmatch(
                rb"required size: \d+\nfully allocated size: \d+\n(bitmaps size: \d+\n)?",
                run.stdout):
            problems.append(f"MEASURE says {run.stdout[:200]!r}: {where}")
    else:
        if expect == "read":
            problems.append(f"NOT READ: {where}")
        good_rc = (2, 3, 4) if run.label == "compare" else (1,)
        if run.rc not in good_rc and not run.hung:
            problems.append(f"EXIT {run.rc} (wanted {good_rc}): {where}")
        if len(lines) != 1 or not lines[0].startswith("instar: "):
            problems.append(f"NOT ONE LINE ({len(lines)} lines): {where}")
        elif says and not re.search(says, lines[0]) and expect == "refuse":
            problems.append(f"REASON not /{says}/: {where}")
    after = listing(place.root)
    if after != before:
        added, removed = sorted(after - before), sorted(before - after)
        if ok and output is not None:  # the output, moved aside above
            added = [name for name in added if name != f"out/{output.name}"]
        if added or removed:
            problems.append(f"FILES added {added} removed {removed}: {where}")
    if output is not None and output.exists():
        output.unlink()  # a success kept elsewhere, or a failure's file (reported above)
    return problems


CHECK_SUMMARY = re.compile(rb"No errors were found on the image\.\n|errors were found on the image"
                           rb"|leaked clusters were found on the image")


def check_check_run(run: Run, place: Place, before: set[str],
                    forbidden: list[bytes]) -> list[str]:
    """check's contract: within the limits, no traceback or internal error, no
    secret in its output, nothing written; qemu-img check's exit statuses, with
    its summary on stdout where the check ran to the end (0, 2, 3), a last line
    ``instar: ...`` where it could not check (1), the format's refusal (63)."""
    problems = []
    where = run.describe()
    if run.hung:
        problems.append(f"HANG (killed after {WATCHDOG_SECONDS:g} s): {where}")
    elif run.stalled:
        problems.append(f"SLOW ({run.seconds:.1f} s): {where}")
    if run.max_rss > LIMIT_MEMORY:
        problems.append(f"MEMORY ({run.max_rss >> 20} MiB): {where}")
    if b"Traceback" in run.stderr or b"internal error" in run.stderr:
        problems.append(f"TRACEBACK or INTERNAL ERROR: {where}")
    for stream, data in (("stdout", run.stdout), ("stderr", run.stderr)):
        for secret in leaks(data, forbidden):
            problems.append(f"LEAK of {secret[:16]!r} on {stream}: {where}")
    lines = [line for line in run.stderr.decode("utf-8", "replace").splitlines()
             if not SANDBOX_WARNING.match(line)]
    if run.rc in (0, 2, 3):
        if not CHECK_SUMMARY.search(run.stdout):
            problems.append(f"NO SUMMARY {run.stdout[:200]!r}: {where}")
        if run.rc == 0 and lines:
            problems.append(f"LINES on a clean check: {where}")
    elif run.rc == 1:
        stopped = not run.stdout and any(line.startswith("instar: ") for line in lines)
        errors = CHECK_SUMMARY.search(run.stdout) and lines[-1:] == ["instar: Check failed"]
        if not (stopped or errors):
            problems.append(f"NOT A FAILED CHECK: {where}")
    elif run.rc == 63:
        if lines != ["instar: This image format does not support checks"]:
            problems.append(f"NOT qemu's 63: {where}")
    elif not run.hung:
        problems.append(f"EXIT {run.rc} (wanted 0, 1, 2, 3 or 63): {where}")
    if listing(place.root) != before:
        problems.append(f"FILES changed: {where}")
    return problems


READING = ("dd", "dd -O qcow2", "convert", "compare")  # one read path: one stall stalls all


def kind_of(label: str) -> str:
    """Commands of one kind share a path through the image: one stall stalls all."""
    return "read" if label in READING else "map" if label in WALKS else "info"


def run_case(case: Case, place: Place, image: str) -> Checked:
    """The ten commands (with ``--allow img`` where the case asks), then dd
    again without it for attacks on paths. Once a command of one kind
    (reading the data, mapping, or info) hangs or runs out of time, the others of its
    kind are not run: each would cost the full limit, and the case fails anyway."""
    problems: list[str] = []
    runs: dict[str, Run] = {}
    kept = place.scratch / "kept"
    kept.mkdir()
    before = listing(place.root)
    stalled: set[str] = set()
    allow = case.allow in ("dir", "both")
    plan = [(label, args, allow) for label, args in commands(case, image, allow)]
    if case.allow == "both":
        plan += [(label, args, False) for label, args in commands(case, image, allow=False)
                 if label == "dd"]
    for label, args, allowed in plan:
        kind = kind_of(label)
        if kind in stalled:
            second = case.allow == "both" and not allowed
            problems.append(f"NOT RUN after a stall: {label}{' (no --allow)' if second else ''}")
            continue
        run = run_instar(label, args, place)
        says = case.says
        if allowed or case.allow != "both":
            runs[label] = run
            expect = expectation(case, label)
        else:
            expect = case.without_allow or expectation(case, label)
            says = case.says_without_allow or says
        forbidden = corpus.forbidden(neighbour_allowed=allowed)
        problems += check_run(run, expect, case, place, before, forbidden,
                              kept if allowed or case.allow != "both" else None, says)
        if run.stalled:
            stalled.add(kind)
    outputs = {label: kept / OUTPUTS[label] for label in OUTPUTS
               if (kept / OUTPUTS[label]).exists()}
    return Checked(problems, outputs, runs)


def check_contents(case: Case, place: Place, image: str, checked: Checked) -> list[str]:
    """What succeeded read the right bytes: qemu-img's where qemu reads the image
    (and qemu-img may be run on it), else the image's own convert output."""
    problems: list[str] = []
    outputs, runs = checked.outputs, checked.runs
    f = ["-f", case.fmt] if case.fmt else []
    reference: Path | None = None
    qemu_size: int | None = None
    # qemu-img reads the image only where instar did (in the time limit), so that
    # it is never asked to copy the terabytes an image claims.
    if case.qemu and ("convert" in outputs or "dd" in outputs or case.expect == "read"):
        target = place.scratch / "kept" / "qemu.raw"
        qemu = run_qemu(["convert", *f, "-O", "raw", image, str(target)], place.root)
        if qemu is not None and qemu.returncode == 0:
            reference = target
        elif case.expect == "read":
            problems.append(f"qemu-img does not read this image: {qemu and qemu.stderr!r}")
    json_run = runs.get("info json")
    if case.qemu and json_run is not None and json_run.rc == 0:
        info = run_qemu(["info", *f, "--output=json", image], place.root)
        if info is not None and info.returncode == 0:
            qemu_size = json.loads(info.stdout)["virtual-size"]
    if reference is None and "convert" in outputs:
        reference = outputs["convert"]
    for label in ("dd", "convert"):
        if label in outputs and reference is not None and outputs[label] != reference:
            difference = same_content(outputs[label], reference)
            if difference:
                problems.append(f"WRONG DATA from {label}: {difference}")
    if "dd -O qcow2" in outputs and reference is not None:
        readback = place.scratch / "kept" / "readback.raw"
        qemu = run_qemu(["convert", "-f", "qcow2", "-O", "raw", str(outputs["dd -O qcow2"]),
                         str(readback)], place.root)
        if qemu is None or qemu.returncode != 0:
            problems.append(f"qemu-img cannot read the qcow2 dd wrote: {qemu and qemu.stderr!r}")
        else:
            difference = same_content(readback, reference)
            if difference:
                problems.append(f"WRONG DATA from dd -O qcow2: {difference}")
    if json_run is not None and json_run.rc == 0:
        try:
            size = json.loads(json_run.stdout)["virtual-size"]
        except (ValueError, KeyError) as error:
            problems.append(f"info --output=json is not qemu's JSON: {error}")
        else:
            wanted = qemu_size if qemu_size is not None else (
                reference.stat().st_size if reference is not None else None)
            if wanted is not None and size != wanted:
                problems.append(f"info says virtual size {size}, not {wanted}")
    if json_run is not None and json_run.rc == 0 and case.probes != "any":
        with contextlib.suppress(ValueError, KeyError):
            found, wanted_format = json.loads(json_run.stdout)["format"], case.probed_format(image)
            if found != wanted_format:
                problems.append(f"the image was read as {found}, not {wanted_format}: "
                                "the case tests nothing")
    human = runs.get("info")
    if human is not None and human.rc == 0 and b"virtual size: " not in human.stdout:
        problems.append(f"info printed no virtual size: {human.stdout[:200]!r}")
    return problems + check_maps(case, place, image, runs)


def check_maps(case: Case, place: Place, image: str, runs: dict[str, Run]) -> list[str]:
    """What map printed is what qemu-img map prints (stdout, exit status) for
    every benign image. (qemu-img map takes tens of seconds on some of the
    attacks; instar's map of those is bounded above and checked to refuse in
    one line or map; test_map.py holds the parity matrix.)"""
    problems: list[str] = []
    f = ["-f", case.fmt] if case.fmt else []
    for label, options in MAPS.items():
        run = runs.get(label)
        if run is None or not case.qemu or case.expect != "read":
            continue
        qemu = run_qemu(["map", *f, *options, image], place.root)
        if qemu is None or (qemu.returncode and not qemu.stdout and case.expect != "read"):
            continue  # qemu refuses to open what instar reads (as for the other commands)
        if (qemu.returncode, qemu.stdout) != (run.rc, run.stdout):
            problems.append(f"{label.upper()} is not qemu-img's: qemu rc={qemu.returncode} "
                            f"{qemu.stdout[:300]!r} {qemu.stderr[:200]!r}; {run.describe()} "
                            f"{run.stdout[:300]!r}")
    return problems


# --- the test -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> corpus.Bases:
    require_qemu("qemu-img", "qemu-io")
    return corpus.Bases(tmp_path_factory.mktemp("hostile-bases"))


def nbd_listener() -> socket.socket | None:
    """A listener on localhost:10809 (NBD's port) that no run may connect to
    (None if the port is taken: by the other worker's, say)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setblocking(False)
    try:
        listener.bind(("127.0.0.1", 10809))
    except OSError:
        listener.close()
        return None
    listener.listen(8)
    return listener


def _case_param(case: Case) -> Any:
    return pytest.param(case, id=f"{case.family}-{case.name}")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("case", [_case_param(case) for case in corpus.CASES])
def test_hostile_image(case: Case, bases: corpus.Bases, tmp_path: Path) -> None:
    place = Place.make(tmp_path, bases)
    image = "img/" + case.build(place)
    listener = nbd_listener() if "nbd" in case.name else None
    try:
        checked = run_case(case, place, image)
        problems = checked.problems + check_contents(case, place, image, checked)
        if listener is not None:
            with contextlib.suppress(BlockingIOError):
                listener.accept()
                problems.append("a run connected to localhost:10809")
    finally:
        if listener is not None:
            listener.close()
    assert not problems, "\n".join(problems)


def test_the_corpus_is_large_and_every_class_is_documented() -> None:
    """At least 150 images, every class with a docstring saying what it attacks."""
    assert len(corpus.CASES) >= 150
    names = [f"{case.family}-{case.name}" for case in corpus.CASES]
    assert len(set(names)) == len(names)
    for family in corpus.FAMILIES:
        assert family.__doc__ and len(family.__doc__.split()) > 8, family.__name__
    families = {case.family for case in corpus.CASES}
    assert families == {family.__name__ for family in corpus.FAMILIES}
