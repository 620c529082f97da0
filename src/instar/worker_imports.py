"""Python modules for a confined worker, served by the host.

A confined worker cannot open a file, so it cannot import a module from disk.
Importing every reader before confinement, in case the image needs it, made
every command pay for all formats (tens of milliseconds); instead the worker
imports what the job turns out to need, and the host reads the module for it.
(The formats' small packages, with their probes, are the exception: every job
probes, so the host imports them before the fork, which costs less than
serving them one request at a time.)

- host side, `module_reply`: finds the module on the host's own import path
  (never a path the worker names, so the worker can only get code the host
  could import) and sends its code object, from the cached bytecode when it is
  fresh;
- worker side, `HostImporter`: the meta path finder that replaces the file
  system finders once the worker is confined, and asks the host.

Compiled extensions cannot be loaded from memory: the host loads those a job
may need before it forks the worker (`EXTENSIONS`).
"""

from __future__ import annotations

import importlib.machinery
import marshal
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from instar.runtime_types import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import importlib.abc
    from typing import Any

    Ask = Callable[[dict[str, Any]], dict[str, Any]]

# The compiled modules jobs need, loaded before the fork without their
# parent packages (whose Python code comes from the host when a job imports
# them): zlib, bz2 and zstd for compressed data, crc32c for VHDX checksums
# (its pure-Python fallback would load silently, and slowly, without it), mmap,
# _md5 for the Parallels format extension's checksum (hashlib would want
# OpenSSL or every hash module), _random and _sha512 for the random module
# (tempfile, which inspect_stream uses on the host's side, imports it),
# binascii for DMG's base64 property lists.
# Accelerators the standard library falls back from (_heapq, _uuid...) stay
# out: an ImportError there is expected. tests/test_worker_imports.py imports
# every module of instar in a confined worker and fails when one is missing.
EXTENSIONS = ("zlib", "_bz2", "mmap", "fcntl", "backports.zstd._zstd", "_zstd",
              "google_crc32c._crc32c", "_md5", "_random", "_sha512", "binascii")



# --- the host's side ---------------------------------------------------------------------


def _find(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of ``name`` on the host's import path, without importing it or
    its parents (a package's children are looked up in its own directories)."""
    parent, _, _ = name.rpartition(".")
    if not parent:
        if name in sys.modules:
            return sys.modules[name].__spec__
        return importlib.machinery.PathFinder.find_spec(name)  # only files are served
    parent_spec = sys.modules[parent].__spec__ if parent in sys.modules else _find(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    return importlib.machinery.PathFinder.find_spec(
        name, list(parent_spec.submodule_search_locations))


_CODE_ROOTS: list[tuple[str, ...]] = []  # found once per process


def _code_roots() -> tuple[str, ...]:
    """Where served modules may come from: the standard library, the installed
    packages and instar itself; never the working directory, which ``python -m``
    puts on the import path, so the worker cannot read the user's files.
    (From ``os`` and ``site``, which every start loads: ``sysconfig`` would
    cost a few milliseconds per command.)"""
    if _CODE_ROOTS:
        return _CODE_ROOTS[0]
    import site

    roots = {os.path.dirname(os.__file__), *site.getsitepackages(),
             os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    _CODE_ROOTS.append(tuple(os.path.join(os.path.realpath(root), "") for root in roots))
    return _CODE_ROOTS[0]


def _servable(spec: importlib.machinery.ModuleSpec) -> bool:
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or ())
    roots = _code_roots()
    return bool(places) and all(os.path.realpath(place).startswith(roots) for place in places)


def module_reply(name: str) -> dict[str, Any]:
    """The host's answer to a worker asking for module ``name``."""
    if not all(part.isidentifier() for part in name.split(".")):
        return {"found": False}
    spec = _find(name)
    if spec is None or not _servable(spec):
        return {"found": False}
    loader, locations = spec.loader, spec.submodule_search_locations
    if spec.origin is None and locations is not None:  # a namespace package: no code
        return {"found": True, "origin": None, "package": list(locations), "code": b""}
    if not isinstance(loader, importlib.machinery.SourceFileLoader | \
                      importlib.machinery.SourcelessFileLoader):
        return {"found": True, "origin": spec.origin}  # compiled: not loadable in a worker
    code = loader.get_code(name)
    return {"found": True, "origin": spec.origin,
            "package": None if locations is None else list(locations),
            "code": marshal.dumps(code)}


# --- the worker's side -------------------------------------------------------------------


class HostImporter:
    """Finds and loads modules by asking the host (`module_reply`): a meta path
    finder and loader by protocol (importlib.abc's base classes would import
    importlib.resources, pathlib, tempfile and more at every start)."""

    def __init__(self, ask: Ask) -> None:
        self._ask = ask
        self._code: dict[str, bytes] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        reply = self._ask({"request": "module", "name": fullname})
        if not reply["found"]:
            return None
        if "code" not in reply:
            raise ImportError(f"{fullname}: a compiled module cannot be loaded in the "
                              "confined worker (it must be imported before confinement)",
                              name=fullname)
        package, origin = reply["package"], reply["origin"]
        if origin is None:  # a namespace package: only its directories
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        else:
            loader = cast("importlib.abc.Loader", self)  # one by protocol
            spec = importlib.machinery.ModuleSpec(fullname, loader, origin=origin,
                                                  is_package=package is not None)
            spec.has_location = True
            self._code[fullname] = reply["code"]
        if package is not None:
            spec.submodule_search_locations = package
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        exec(marshal.loads(self._code.pop(module.__name__)), module.__dict__)


def import_extensions() -> None:
    """Load the compiled modules of `EXTENSIONS` this Python has, in the host
    before it forks a worker (once per process)."""
    for name in EXTENSIONS:
        if name in sys.modules:
            continue
        spec = _find(name)
        loader = None if spec is None else spec.loader
        if spec is None or not isinstance(loader, importlib.machinery.ExtensionFileLoader):
            continue
        # What importlib.util.module_from_spec does for an extension (importing
        # importlib.util would cost more than loading them all).
        module = loader.create_module(spec)
        module.__spec__, module.__loader__ = spec, loader
        sys.modules[name] = module
        loader.exec_module(module)


def import_from_host(ask: Ask) -> None:
    """From now on, modules come from the host: the file system finders, which a
    confined worker cannot use, give way to a `HostImporter`."""
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if finder in (importlib.machinery.BuiltinImporter,
                                      importlib.machinery.FrozenImporter)]
    sys.meta_path.append(HostImporter(ask))
