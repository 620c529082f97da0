"""Start-up: what a command imports, and the stand-ins that keep it small.

Every instar command is a new Python process, so the modules it imports are
part of every row of the benchmark (docs/performance.md). These tests pin the
expensive standard-library modules out of the paths that never need them,
and check that the cheap stand-ins behave like what they replace.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import qemu_img_ok
from instar.cli.output import _is_progress
from instar.runtime_types import Generic, NamedTuple, Protocol, TypeVar, cast

# Loaded by typing, signal's and socket's enums, contextlib and importlib.util:
# together more than half of what instar's own start-up cost before.
EXPENSIVE = ("typing", "enum", "socket", "signal", "selectors", "contextlib", "base64",
             "importlib.util", "threading", "re", "dataclasses", "inspect")


def _imported_by(args: list[str], skip: tuple[str, ...] = ()) -> set[str]:
    """The modules of EXPENSIVE that ``instar ARGS`` (the CLI, in a new
    process) imports, but for ``skip``."""
    program = (
        "import sys\n"
        "from instar.cli import main\n"
        f"status = main({args!r})\n"
        "names = sorted(sys.modules)\n"
        "print(' '.join(names))\n"
        "sys.stdout.flush()\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=True)
    modules = set(done.stdout.strip().splitlines()[-1].split())
    return {name for name in EXPENSIVE if name in modules and name not in skip}


def test_version_imports_nothing_expensive() -> None:
    assert _imported_by(["--version"], skip=("re", "enum")) == set()


def test_info_imports_nothing_expensive(tmp_path: typing.Any) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", str(image), "1G")
    # json (the worker's channel) still loads re and enum.
    assert _imported_by(["--sandbox=off", "info", str(image)], skip=("re", "enum")) == set()
    assert _imported_by(["info", str(image)], skip=("re", "enum")) == set()


def _run_python(program: str) -> str:
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def test_pyseccomp_is_lent_typing_only_while_it_loads() -> None:
    """The allow-list is built with pyseccomp imported against a lent typing;
    afterwards ``import typing`` is the real one, and nothing lent is left."""
    out = _run_python(
        "import sys\n"
        "from instar import sandbox\n"
        "rules = sandbox._seccomp_filter()\n"
        "print('typing' in sys.modules, 'ctypes.util' in sys.modules)\n"
        "import typing\n"
        "print(hasattr(typing, 'get_type_hints'), type(rules).__name__)\n"
    )
    assert out.split() == ["False", "False", "True", "SyscallFilter"]


def test_pyseccomp_with_typing_loaded_already() -> None:
    """A caller that has typing (most programs using the API) keeps it: only
    ctypes.util is lent, and the allow-list is the same."""
    out = _run_python(
        "import typing, sys\n"
        "from instar import sandbox\n"
        "rules = sandbox._seccomp_filter()\n"
        "import pyseccomp\n"
        "print(pyseccomp.Union is typing.Union, 'ctypes.util' in sys.modules)\n"
    )
    assert out.split() == ["True", "False"]


_PROGRESS = re.compile(r" *\(\d+\.\d+/100%\)\r\n?|\n")


@given(st.text(alphabet=" (0123456789./%)\r\n٣x", max_size=16))
def test_is_progress_is_the_meter_pattern(text: str) -> None:
    assert _is_progress(text) == bool(_PROGRESS.fullmatch(text))


@given(st.integers(0, 4), st.integers(0, 100), st.integers(0, 99),
       st.sampled_from(["\r", "\r\n", "\n", ""]), st.sampled_from([".", "", ".."]))
def test_is_progress_on_meter_lines(spaces: int, whole: int, fraction: int, end: str,
                                    dot: str) -> None:
    text = f"{' ' * spaces}({whole}{dot}{fraction:02d}/100%){end}"
    assert _is_progress(text) == bool(_PROGRESS.fullmatch(text))


class Point(NamedTuple):
    """A point."""

    x: int
    y: int = 7

    @property
    def total(self) -> int:
        return self.x + self.y

    def moved(self, by: int) -> Point:
        return self._replace(x=self.x + by)


class TypingPoint(typing.NamedTuple):
    """A point."""

    x: int
    y: int = 7


def test_named_tuple_stand_in_behaves_as_typings() -> None:
    point = Point(1)
    assert point == (1, 7) == TypingPoint(1)
    assert repr(point) == "Point(x=1, y=7)" and repr(TypingPoint(1)) == "TypingPoint(x=1, y=7)"
    assert Point._fields == TypingPoint._fields == ("x", "y")
    assert Point._field_defaults == TypingPoint._field_defaults == {"y": 7}
    assert point.total == 8 and point.moved(2) == Point(3, 7)
    assert Point.__doc__ == "A point." and Point.__module__ == __name__
    assert Point.__qualname__ == "Point"
    x, y = point
    assert (x, y) == (1, 7) and isinstance(point, tuple)
    assert pickle.loads(pickle.dumps(point)) == point
    assert json.dumps(point) == "[1, 7]"


def test_other_stand_ins() -> None:
    value = TypeVar("value")

    class Box(Generic[value]):
        def __init__(self, item: value) -> None:
            self.item = item

    class Sized(Protocol):
        def size(self) -> int: ...

    assert Box[int](3).item == 3
    assert cast("int", "x") == "x"
    assert Sized.__mro__[-1] is object


# The VMDK descriptor grammar instar used to match with these (vmdk/layout.py
# now scans it by hand, so that reading a VMDK does not import re).
_EXTENT_LINE = re.compile(r'(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)\s+"([^"]*)"(?:\s+(\d+))?')
_KEY_VALUE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*)")
_QUOTED = re.compile(r'"([^"]*)"')
_HEX32 = re.compile(r"[0-9a-fA-F]{1,8}")

_DESCRIPTOR_CHARS = st.sampled_from(
    list('RWDONLYACSEFPxyz_.=" \t\x0b\u00a0\u2003') + list("0123456789٣") + ["RW", "RDONLY",
    "NOACCESS", "FLAT", "SPARSE", ' "a b.vmdk" ', "CID", "=", " 12 "])
DESCRIPTOR_LINES = st.lists(_DESCRIPTOR_CHARS, max_size=12).map("".join).map(str.strip)


@given(DESCRIPTOR_LINES)
def test_extent_lines_are_scanned_as_the_pattern_matched(line: str) -> None:
    from instar.formats.vmdk.layout import ExtentLine, _parse_extent_line

    match = _EXTENT_LINE.fullmatch(line)
    expected = None if match is None else ExtentLine(
        match[1], int(match[2]), match[3], match[4],
        None if match[5] is None else int(match[5]))
    assert _parse_extent_line(line) == expected


@given(DESCRIPTOR_LINES)
def test_fields_are_scanned_as_the_pattern_matched(line: str) -> None:
    from instar.formats.vmdk.layout import _is_hex32, _parse_field, _unquoted

    match = _KEY_VALUE.fullmatch(line)
    pair = _parse_field(line)
    assert (pair is None) == (match is None)
    if match is not None and pair is not None:
        assert pair[0] == match[1] and pair[1].strip() == match[2].strip()
    value = line.strip()
    quoted = _QUOTED.fullmatch(value)
    assert _unquoted(value) == (None if quoted is None else quoted[1])
    assert _is_hex32(value) == bool(_HEX32.fullmatch(value))


@pytest.mark.parametrize("line", [
    'RW 2048 FLAT "a.img" 0', 'RDONLY 1\tSPARSE  "x y.vmdk"', "NOACCESS 5 ZERO \"\"",
    'RW 2048 FLAT "a.img"0', 'RW2048 FLAT "a"', 'RW 20x48 FLAT "a"', 'RW 1 FLAT "a" 1 2',
    'RW 1 FLAT "a', "RW 1 FLAT a", 'RWX 1 FLAT "a"', 'RW 1 FL4T "a"', 'RW ٣ FLAT "a" ٣',
])
def test_extent_line_examples(line: str) -> None:
    from instar.formats.vmdk.layout import _parse_extent_line

    match = _EXTENT_LINE.fullmatch(line)
    parsed = _parse_extent_line(line)
    assert (parsed is None) == (match is None)
    if match is not None and parsed is not None:
        assert (parsed.access, parsed.sectors, parsed.kind, parsed.name) == (
            match[1], int(match[2]), match[3], match[4])


def test_guid_text_is_uuids() -> None:
    import os
    import uuid

    from instar.formats.vhdx.layout import _guid, guid_text

    for _ in range(200):
        raw = os.urandom(16)
        assert guid_text(raw) == str(uuid.UUID(bytes_le=raw))
        assert _guid(guid_text(raw).upper()) == raw
