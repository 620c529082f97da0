"""Every instar exception survives a pickle round trip (a process boundary).

The sandboxed worker will raise these in another process, and callers run
instar in multiprocessing pools: an exception that cannot be unpickled turns
into a confusing TypeError far from its cause. The walk below finds every
`InstarError` subclass in the package, so a new one is checked without anyone
remembering to add it here.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import multiprocessing
import pickle
import pkgutil
import types
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import instar
from instar.api import open_image
from instar.errors import ImageOpenError, InstarError
from instar.verdict import Finding, Verdict


def _import_every_module() -> None:
    for module in pkgutil.walk_packages(instar.__path__, "instar."):
        if module.name != "instar.__main__":  # runs the CLI on import
            importlib.import_module(module.name)


def _subclasses(cls: type[InstarError]) -> list[type[InstarError]]:
    found: list[type[InstarError]] = []
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("instar.") and sub not in found:
            found.append(sub)
        found.extend(s for s in _subclasses(sub) if s not in found)
    return found


_import_every_module()
ERRORS: list[type[InstarError]] = [InstarError, *_subclasses(InstarError)]


def _own_init(cls: type[BaseException]) -> Any:
    """The ``__init__`` an instar class defines, or None for Exception's."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("instar") and "__init__" in vars(klass):
            return vars(klass)["__init__"]
    return None


def _sample(name: str, annotation: object, index: int) -> object:
    """A representative value of ``annotation`` for parameter ``name``."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if options:
        annotation = next(option for option in options if option is not type(None))
    if annotation is str:
        return f"{name} \u00e9\u2603 {index}"  # non-ASCII: str() must survive as text
    if annotation is bool:
        return True
    if annotation is int:
        return 40 + index
    if annotation is Verdict:
        return Verdict(f"{name}.qcow2", "qcow2", ["qcow2"], 1 << 20,
                       [Finding("backing-file", f"names a backing file \u00e9 {index}")])
    raise AssertionError(f"no sample value for {name}: {annotation!r}; add one to _sample")


def build(cls: type[InstarError]) -> InstarError:
    """An instance of ``cls`` made through its own ``__init__``."""
    init = _own_init(cls)
    if init is None:
        return cls(f"{cls.__name__} went wrong \u00e9")
    hints = typing.get_type_hints(init)
    args: list[object] = []
    for index, (name, parameter) in enumerate(inspect.signature(init).parameters.items()):
        if name == "self":
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        args.append(_sample(name, hints.get(name, str), index))
    return cls(*args)


def assert_round_trips(error: InstarError) -> None:
    """pickle (every protocol) and copy keep type, message, args, attributes, hint."""
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for clone in (pickle.loads(pickle.dumps(error, protocol)), copy.copy(error)):
            assert type(clone) is type(error)
            assert str(clone) == str(error)
            assert clone.args == error.args
            assert vars(clone) == vars(error)
            assert clone.hint == error.hint


def test_the_walk_finds_the_subclasses_defined_outside_errors_py() -> None:
    names = {cls.__qualname__ for cls in ERRORS}
    assert {"ImageOpenError", "CompareError", "GetoptError", "NumberError",
            "OptionError", "InvalidArgumentError"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__qualname__)
def test_every_instar_error_pickles(cls: type[InstarError]) -> None:
    error = build(cls)
    assert str(error)
    assert_round_trips(error)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__qualname__)
def test_a_hint_and_notes_set_on_the_instance_survive(cls: type[InstarError]) -> None:
    error = build(cls)
    error.hint = "Try 'instar --help' for more information"
    error.add_note("while opening the backing file")
    clone = pickle.loads(pickle.dumps(error))
    assert clone.hint == "Try 'instar --help' for more information"
    assert clone.__notes__ == ["while opening the backing file"]
    assert_round_trips(error)


def test_attributes_of_the_multi_argument_errors_survive() -> None:
    from instar.compare import CompareError

    opened = pickle.loads(pickle.dumps(ImageOpenError("a.qcow2", "bad magic")))
    assert (opened.filename, opened.reason) == ("a.qcow2", "bad magic")
    assert str(opened) == "Could not open 'a.qcow2': bad magic"
    compared = pickle.loads(pickle.dumps(CompareError("Sector allocation test failed", 3)))
    assert compared.exit_code == 3
    assert isinstance(compared, InstarError)


def test_the_check_catches_a_subclass_that_does_not_pickle() -> None:
    """What the walk guards against: Exception's reduce calls cls(*args)."""

    class Unpicklable(InstarError):
        __reduce__ = Exception.__reduce__

        def __init__(self, name: str, code: int) -> None:
            super().__init__(f"{name}: {code}")
            self.code = code

    with pytest.raises(TypeError):
        assert_round_trips(build(Unpicklable))


def test_compare_error_still_imports_from_compare() -> None:
    from instar import compare, errors

    assert compare.CompareError is errors.CompareError


def test_an_error_raised_in_another_process_arrives_whole(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.qcow2")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(open_image, missing)
        with pytest.raises(ImageOpenError) as raised:
            future.result(timeout=120)
    assert raised.value.filename == missing
    assert "No such file or directory" in raised.value.reason
