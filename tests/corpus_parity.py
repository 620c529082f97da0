"""The read parity every format with a qemu-made corpus runs against qemu-img.

A format's test module subclasses `ReadParity`, names its format (``fmt``)
and its corpus images (``corpus_names``), and provides a module fixture
``corpus`` (image name to path) with at least a "written" and a "converted"
image. conftest.py's ``pytest_generate_tests`` runs each test once per name.
Each test runs instar and qemu-img on the same image and compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from helpers import READ_WINDOWS, both, open_image, qemu_img_ok, qemu_info, run_instar
from instar.formats import registry


@pytest.mark.usefixtures("qemu_img")
class ReadParity:
    fmt: ClassVar[str]
    corpus_names: ClassVar[list[str]]

    @pytest.mark.parametrize("window", READ_WINDOWS, ids=lambda w: " ".join(w) or "whole")
    def test_dd_to_raw_matches_qemu(self, corpus: dict[str, Path], tmp_path: Path, name: str,
                                    window: list[str]) -> None:
        image = corpus[name]
        ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
        result = run_instar("dd", *window, f"if={image.name}", f"of={ours}", cwd=image.parent)
        assert result.rc == 0, result.stderr
        qemu_img_ok("dd", *window, f"if={image.name}", f"of={theirs}", cwd=image.parent)
        assert ours.read_bytes() == theirs.read_bytes()

    def test_convert_to_raw_matches_qemu(self, corpus: dict[str, Path], tmp_path: Path,
                                         name: str) -> None:
        image = corpus[name]
        ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
        assert run_instar("convert", "-f", self.fmt, "-O", "raw", image.name, str(ours),
                          cwd=image.parent).rc == 0
        qemu_img_ok("convert", "-f", self.fmt, "-O", "raw", image.name, str(theirs),
                    cwd=image.parent)
        assert ours.read_bytes() == theirs.read_bytes()

    @pytest.mark.parametrize("args", [[], ["--output=json"], ["--backing-chain"],
                                      ["--output=json", "--backing-chain"], ["-f", "FMT"]],
                             ids=lambda a: " ".join(a) or "human")
    def test_info_matches_qemu(self, corpus: dict[str, Path], name: str, args: list[str]) -> None:
        image = corpus[name]
        args = [self.fmt if arg == "FMT" else arg for arg in args]
        ours, qemu = both(["info", *args, image.name], image.parent)
        assert ours == qemu
        assert ours[0] == 0
        assert f"file format: {self.fmt}\n" in ours[1] or f'"format": "{self.fmt}"' in ours[1]

    @pytest.mark.parametrize("args", [[], ["--output=json"], ["-f", "FMT", "--output=json"]],
                             ids=lambda a: " ".join(a) or "human")
    def test_map_matches_qemu(self, corpus: dict[str, Path], name: str, args: list[str]) -> None:
        image = corpus[name]
        args = [self.fmt if arg == "FMT" else arg for arg in args]
        ours, qemu = both(["map", *args, image.name], image.parent)
        assert ours == qemu

    def test_compare_matches_qemu(self, corpus: dict[str, Path], tmp_path: Path,
                                  name: str) -> None:
        """Against its own contents as raw (identical), strictly against itself
        and against the raw copy (where block status differs), and against
        another image."""
        image = corpus[name]
        raw = tmp_path / "copy.raw"
        qemu_img_ok("convert", "-O", "raw", image.name, str(raw), cwd=image.parent)
        other = corpus["written" if name != "written" else "converted"]
        for args in ([image.name, str(raw)], ["-s", image.name, image.name],
                     ["-s", image.name, str(raw)], [image.name, str(other)],
                     ["-f", self.fmt, "-F", "raw", image.name, str(raw)]):
            ours, qemu = both(["compare", *args], image.parent)
            assert ours == qemu, args

    def test_probe_matches_qemu(self, corpus: dict[str, Path], name: str) -> None:
        image = corpus[name]
        header = image.read_bytes()[: registry.PROBE_SIZE]
        assert registry.probe(header, str(image)).name == self.fmt == qemu_info(image)["format"]
        with open_image(image) as opened:
            assert opened.virtual_size == qemu_info(image)["virtual-size"]
