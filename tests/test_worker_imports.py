"""Modules for a confined worker come from the host (`instar.worker_imports`).

A worker imports nothing before confinement but a few compiled modules; every
Python module a job needs is read by the host and sent over. These tests make
a fresh process (nothing imported but the worker machinery) run a confined
job that imports every module of instar, and check what the host will and
will not serve.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instar.worker_imports import module_reply

# Run in a fresh interpreter: the test process has imported everything already.
_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import instar
from instar.safety import PathPolicy
from instar.worker import SandboxSettings, run_job

names = sorted(m.name for m in pkgutil.walk_packages(instar.__path__, "instar.")
               if not m.name.startswith("instar.__main__"))

def job(broker, events):
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            failed[name] = repr(error)
    from instar.formats.common import zstd_module
    import bz2, google_crc32c
    zstd_module()
    return {"failed": failed, "imported": len(names), "crc32c": google_crc32c.implementation,
            "bz2": bz2.decompress(bz2.compress(b"x")).decode(),
            "before": sorted(n for n in sys.modules if n.startswith("instar.formats."))}

print(json.dumps(run_job(job, PathPolicy([]), SandboxSettings(mode="require"), inputs=[])))
"""


def test_a_confined_worker_imports_every_module_of_instar_from_the_host() -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["failed"] == {}
    assert result["imported"] > 50
    assert result["crc32c"] == "c"  # the compiled CRC, not the silent pure-Python fallback
    assert result["bz2"] == "x"


def test_the_worker_starts_without_the_readers() -> None:
    """A job that reads nothing imports no format: the host's process had none
    and the worker loads none before it is confined."""
    code = _IMPORT_ALL.replace("    for name in names:", "    for name in []:")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [n for n in json.loads(proc.stdout)["before"] if n.endswith(("reader", "writer"))] \
        == []


@pytest.mark.parametrize("name", ["csv", "json.decoder", "instar.formats.qcow2.reader"])
def test_the_host_serves_code_it_can_import(name: str) -> None:
    reply = module_reply(name)
    assert reply["found"] and reply["code"]


def test_the_host_serves_no_file_of_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m`` puts the working directory on the import path: a worker
    asking for a module named like a file there gets nothing."""
    (tmp_path / "secret_notes.py").write_text("TOKEN = 'do not leak'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_reply("secret_notes") == {"found": False}


@pytest.mark.parametrize("name", ["../etc/passwd", "os/path", "", "a..b", "/etc/passwd"])
def test_names_that_are_not_module_names_find_nothing(name: str) -> None:
    assert module_reply(name) == {"found": False}


def test_a_compiled_module_is_refused_in_one_line() -> None:
    reply = module_reply("_lzma")
    assert reply["found"] and "code" not in reply
