"""The project as a clone or a wheel gets it: license metadata, self-contained docs."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_license_is_declared_and_shipped() -> None:
    """An SPDX expression (PEP 639) and the Apache-2.0 text it names, in LICENSE."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    # PEP 639 metadata needs setuptools 77; older ones reject the string form.
    assert "setuptools>=77" in project["build-system"]["requires"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_docs_do_not_point_outside_the_repository() -> None:
    """A clone has only what is in it: no ``../shared`` (the design notes it once had)."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*"), *(ROOT / "src").rglob("*")]
    checked = [path for path in files if path.is_file() and path.suffix in (".md", ".py")]
    assert len(checked) > 30
    offenders = [str(path) for path in checked if "../shared" in path.read_text()]
    assert offenders == []
