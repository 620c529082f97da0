"""The hostile corpus given to a command that changes an image in place.

Every mutating command (resize, rebase, commit, snapshot, amend, check -r)
must, on every image of tests/hostile_corpus.py, run by a confined instar
(`confined.run_instar`): succeed or refuse in one ``instar: ...`` line, within
the limits, never print a secret; a refusal changes no file at all, a success
changes nothing but what the command may change. This module is that one
contract, so each command's test is a parametrized call of `check_run`.

A command with several modes gives each image one of them in turn
(`corpus_params`): every family meets every mode, and the sweep costs one run
per image, not one per image and mode (the open and the walk of the tables,
where the bounds are at stake, are the same in every mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import hostile_corpus as corpus
from confined import SANDBOX_WARNING, Run, run_instar

# Lines a run may print besides its one refusal: qemu's warning for a probed
# raw image opened for writing, and for a Parallels format extension it drops.
ALLOWED_WARNINGS = ("WARNING: Image format was not specified for ",
                    "         Automatically detecting the format is dangerous",
                    "         Specify the 'raw' format explicitly",
                    "instar: warning: Format Extension ignored in RW mode")


def corpus_params(modes: Sequence[Any] = (None,),
                  skip_families: Sequence[str] = ()) -> list[Any]:
    """``(case, mode)`` parameters: every case of the corpus but the skipped
    families, each paired with the next of ``modes`` in turn."""
    cases = [case for case in corpus.CASES if case.family not in skip_families]
    return [pytest.param(case, modes[number % len(modes)],
                         id=f"{case.family}-{case.name}")
            for number, case in enumerate(cases)]


def files(root: Path) -> dict[Path, bytes]:
    """Every regular file under ``root`` (not through links) and its bytes."""
    return {path: path.read_bytes() for path in root.rglob("*")
            if path.is_file() and not path.is_symlink()}


def check_run(command: str, args: Callable[[str], list[str]], case: corpus.Case,
              bases: corpus.Bases, tmp_path: Path, *, success: bytes = b"",
              may_change: str = "image", try_line: bool = False) -> tuple[Run, Path]:
    """Build ``case``, run ``instar COMMAND`` with ``args(image)`` (the image's
    name relative to the case's root, ``--allow img`` added where the case
    allows its directory) and assert the contract. ``success`` is the stdout
    of a success; ``may_change`` what a success may change: "image" (the
    image named) or "allowed" (anything under the allowed directory: a
    commit's base). ``try_line``: a usage refusal's second "Try ..." line is
    allowed. Returns the run and the image's path, for checks of its own."""
    place = corpus.Place.make(tmp_path, bases)
    image = "img/" + case.build(place)
    target = (place.root / image).resolve()
    before = files(place.root)
    allow = ["--allow", "img"] if case.allow in ("dir", "both") else []
    run = run_instar(command, [command, *allow, *args(image)], place)
    assert not run.stalled and run.rc in (0, 1), run.describe()
    lines = [line for line in run.stderr.decode(errors="replace").splitlines()
             if not SANDBOX_WARNING.match(line) and not line.startswith(ALLOWED_WARNINGS)]
    after = files(place.root)
    if run.rc == 0:
        assert run.stdout == success and not lines, run.describe()
        if may_change == "image":
            changeable = {target}
        else:
            allowed = (place.root / "img").resolve()
            changeable = {path for path in before if path.resolve().is_relative_to(allowed)}
        unchanged = {path for path in before if path.resolve() not in changeable}
        assert {path: after.get(path) for path in unchanged} == \
            {path: before[path] for path in unchanged}, "a file it may not change changed"
    else:
        assert lines and lines[0].startswith("instar: "), run.describe()
        assert len(lines) == 1 or (try_line and len(lines) == 2
                                   and lines[1].startswith("Try ")), run.describe()
        assert "internal error" not in lines[0], run.describe()
        assert after == before, f"a refused {command} changed a file"
    for token in corpus.forbidden(neighbour_allowed=False):
        assert token not in run.stdout + run.stderr
    return run, target
