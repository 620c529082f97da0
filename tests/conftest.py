"""Fixtures shared by the suite.

Parity tests need the real qemu-img. When INSTAR_REQUIRE_QEMU=1 (as in CI and
``make test``) a missing qemu-img fails those tests instead of skipping them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import hostile_corpus as corpus
from helpers import qemu_img_path, qemu_io_path


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A corpus_parity.ReadParity subclass runs each test once per image it names."""
    names = getattr(metafunc.cls, "corpus_names", None)
    if names is not None and "name" in metafunc.fixturenames:
        metafunc.parametrize("name", names)


@pytest.fixture
def qemu_img() -> str:
    """Path of the reference qemu-img; fails (CI) or skips (by hand) when missing."""
    return qemu_img_path()


@pytest.fixture
def qemu_io_tool() -> str:
    return qemu_io_path()


def _directories(value: object) -> list[Path]:
    """The directories a corpus fixture's value (a path, or paths by name) lives in."""
    if isinstance(value, Path):
        return [value if value.is_dir() else value.parent]
    if isinstance(value, dict):
        return [d for item in value.values() for d in _directories(item)]
    return []


# Fixtures that build a module's images; their directories are "the image's own".
CORPUS_FIXTURES = ("images", "corpus", "inputs", "bases")


@pytest.fixture
def allow_own_directories(request: pytest.FixtureRequest, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests whose images name files beside them (backing files, extents,
    parents): instar may open files in the test's own directories, through
    INSTAR_ALLOW, which only instar reads, so qemu-img runs with the same
    arguments. instar's policy allows no directory by default; the tests of
    that policy do not use this fixture."""
    dirs = [tmp_path]
    for name in CORPUS_FIXTURES:
        if name in request.fixturenames:
            dirs += _directories(request.getfixturevalue(name))
    monkeypatch.setenv("INSTAR_ALLOW", ":".join(str(d) for d in dirs))


@pytest.fixture(scope="session")
def hostile_bases(tmp_path_factory: pytest.TempPathFactory) -> corpus.Bases:
    """The hostile corpus's qemu-img-made base images, built once per test process."""
    return corpus.Bases(tmp_path_factory.mktemp("hostile-bases"))
