"""The VMDK reader against the real qemu-img 7.2, on a corpus qemu made.

For every layout qemu reads (monolithicSparse with header versions 1-3, with
and without a redundant grain directory and the zeroed-grain flag;
streamOptimized as qemu writes it and in VMware's footer layout;
monolithicFlat; twoGbMaxExtentSparse/Flat; descriptors naming several extents;
parent chains) ``instar dd`` to raw over several windows is byte-identical to
``qemu-img dd``. Damaged and refused images are rows of tests/test_conformance.py.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from helpers import (
    READ_WINDOWS,
    pattern,
    qemu_img_ok,
    qemu_io,
    require_qemu,
    run_instar,
)
from instar.files import InputFile
from instar.formats import registry
from instar.formats.vmdk import FORMAT
from instar.formats.vmdk.layout import SparseHeader
from instar.image import ExtentKind, merge_extents
from instar.opener import ImageOpener
from instar.safety import PathPolicy

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

KIB = 1 << 10
MIB = 1 << 20
SIZE = 4 * MIB + 1536  # a partial last grain
WINDOWS = READ_WINDOWS


def _source() -> bytes:
    """Patterned data, a zero MiB, a zero grain inside data, a ragged tail."""
    data = bytearray(pattern(SIZE))
    data[MIB : 2 * MIB] = bytes(MIB)
    data[3 * MIB + 64 * KIB : 3 * MIB + 128 * KIB] = bytes(64 * KIB)
    return bytes(data)


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(fmt, *values))


def _header(path: Path) -> SparseHeader:
    return SparseHeader.unpack(path.read_bytes()[:512])


def _convert(raw: Path, out: Path, *options: str) -> None:
    dash_o = ["-o", ",".join(options)] if options else []
    qemu_img_ok("convert", "-f", "raw", "-O", "vmdk", *dash_o, str(raw), str(out))


def _write_descriptor(path: Path, create_type: str, extents: list[str], eol: str = "\n") -> None:
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        "CID=12345678",
        "parentCID=ffffffff",
        f'createType="{create_type}"',
        "",
        "# Extent description",
        *extents,
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "4"',
        'ddb.adapterType = "ide"',
    ]
    path.write_bytes(eol.join(lines).encode() + eol.encode())


def _build_corpus(root: Path) -> dict[str, Path]:
    """Every kind of VMDK, made by qemu-img and qemu-io (plus a few written by hand)."""
    source = _source()
    raw = root / "source.raw"
    raw.write_bytes(source)
    corpus: dict[str, Path] = {}

    sparse = corpus["sparse-v1"] = root / "sparse.vmdk"
    _convert(raw, sparse)
    qemu_io(sparse, "write -P 0x11 100k 200k", "vmdk")
    qemu_io(sparse, "write -z 3M 64k", "vmdk")  # no zeroed-grain flag: zeros are stored

    zeroed = corpus["sparse-v2-zeroed-grain"] = root / "zeroed.vmdk"
    _convert(raw, zeroed, "zeroed_grain=on")
    qemu_io(zeroed, "write -z 0 128k", "vmdk")  # grain table entries of 1
    qemu_io(zeroed, "write -z 2176k 64k", "vmdk")
    qemu_io(zeroed, "write -P 0x22 3145828 5000", "vmdk")

    version3 = corpus["sparse-v3"] = root / "v3.vmdk"
    shutil.copy(sparse, version3)
    _patch(version3, 4, "<I", 3)

    no_rgd = corpus["sparse-no-rgd"] = root / "nordg.vmdk"
    shutil.copy(sparse, no_rgd)
    header = _header(no_rgd)
    _patch(no_rgd, 8, "<I", header.flags & ~2)
    _patch(no_rgd, 0x30, "<Q", 0)

    corpus["stream-qemu"] = root / "stream-qemu.vmdk"
    _convert(raw, corpus["stream-qemu"], "subformat=streamOptimized")

    corpus["stream-footer"] = root / "stream-footer.vmdk"
    result = run_instar("dd", "-c", "-O", "vmdk", f"if={raw}", f"of={corpus['stream-footer']}")
    assert result.rc == 0, result.stderr

    corpus["monolithicFlat"] = root / "flat.vmdk"
    _convert(raw, corpus["monolithicFlat"], "subformat=monolithicFlat")
    qemu_io(corpus["monolithicFlat"], "write -P 0x33 1000 3000", "vmdk")

    corpus["twoGbMaxExtentSparse"] = root / "split-sparse.vmdk"
    _convert(raw, corpus["twoGbMaxExtentSparse"], "subformat=twoGbMaxExtentSparse")
    corpus["twoGbMaxExtentFlat"] = root / "split-flat.vmdk"
    _convert(raw, corpus["twoGbMaxExtentFlat"], "subformat=twoGbMaxExtentFlat")

    # Several sparse extents of different kinds behind one descriptor.
    pieces = [
        (0, MIB, ()),
        (MIB, 3 * MIB, ("zeroed_grain=on",)),
        (3 * MIB, SIZE, ("subformat=streamOptimized",)),
    ]
    lines = []
    for number, (start, end, options) in enumerate(pieces, start=1):
        part_raw = root / f"part{number}.raw"
        part_raw.write_bytes(source[start:end])
        _convert(part_raw, root / f"part{number}.vmdk", *options)
        lines.append(f'RW {(end - start) // 512} SPARSE "part{number}.vmdk"')
    qemu_io(root / "part2.vmdk", "write -z 1M 64k", "vmdk")
    corpus["multi-sparse"] = root / "multi-sparse.vmdk"
    _write_descriptor(corpus["multi-sparse"], "twoGbMaxExtentSparse", lines)

    # Flat extents: offsets into one file, a VMFS extent, a file shorter than its extent.
    (root / "data.bin").write_bytes(source[: 2 * MIB])
    (root / "short.bin").write_bytes(pattern(10000, seed=3))
    corpus["multi-flat"] = root / "multi-flat.vmdk"
    _write_descriptor(
        corpus["multi-flat"],
        "monolithicFlat",
        ['RW 1024 FLAT "data.bin" 2048', 'RW 100 VMFS "short.bin"', 'RW 3000 FLAT "data.bin" 1'],
    )
    corpus["crlf-descriptor"] = root / "crlf.vmdk"
    _write_descriptor(
        corpus["crlf-descriptor"], "twoGbMaxExtentFlat", ['RW 2048 FLAT "data.bin" 0'], eol="\r\n"
    )

    # Parent chains.
    base = root / "base.vmdk"
    _convert(raw, base)
    child = corpus["child"] = root / "child.vmdk"
    qemu_img_ok("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(child))
    qemu_io(child, "write -P 0x44 100k 10k", "vmdk")
    qemu_io(child, "write -P 0x45 3M 64k", "vmdk")
    child_zeroed = corpus["child-zeroed-grain"] = root / "child-zeroed.vmdk"
    backed = ["-b", "base.vmdk", "-F", "vmdk"]
    qemu_img_ok("create", "-f", "vmdk", "-o", "zeroed_grain=on", *backed, str(child_zeroed))
    qemu_io(child_zeroed, "write -z 0 64k", "vmdk")  # hides the parent's data
    qemu_io(child_zeroed, "write -P 0x46 1048581 100", "vmdk")
    grandchild = corpus["grandchild"] = root / "grandchild.vmdk"
    qemu_img_ok("create", "-f", "vmdk", "-b", "child.vmdk", "-F", "vmdk", str(grandchild))
    qemu_io(grandchild, "write -P 0x47 2M 4k", "vmdk")
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_qemu()
    return _build_corpus(tmp_path_factory.mktemp("vmdk-corpus"))


CORPUS_NAMES = [
    "sparse-v1", "sparse-v2-zeroed-grain", "sparse-v3", "sparse-no-rgd", "stream-qemu",
    "stream-footer", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
    "multi-sparse", "multi-flat", "crlf-descriptor", "child", "child-zeroed-grain",
    "grandchild",
]  # fmt: skip


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_dd_to_raw_matches_qemu(
    qemu_img: str, corpus: dict[str, Path], tmp_path: Path, name: str, window: list[str]
) -> None:
    image = corpus[name]
    ours, theirs = tmp_path / "instar.raw", tmp_path / "qemu.raw"
    result = run_instar("dd", *window, f"if={image}", f"of={ours}")
    assert result.rc == 0, result.stderr
    qemu_img_ok("dd", *window, f"if={image}", f"of={theirs}")
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_probe_picks_vmdk(corpus: dict[str, Path], name: str) -> None:
    header = corpus[name].read_bytes()[: registry.PROBE_SIZE]
    assert registry.probe(header, str(corpus[name])).name == "vmdk"


def test_probe_follows_qemu() -> None:
    assert FORMAT.probe(b"KDMV\x01", "x") == 100
    assert FORMAT.probe(b"# comment\n   \nversion=1\nCID=1\n", "x") == 100
    assert FORMAT.probe(b"#c\r\n  \r\nversion=3\r\n", "x") == 100
    assert FORMAT.probe(b"\nversion=1\n", "x") == 0  # an empty line stops qemu's probe
    assert FORMAT.probe(b"version=4\n", "x") == 0
    assert FORMAT.probe(b"hello world", "x") == 0
    assert FORMAT.probe(b"KDM", "x") == 0


def _open(path: Path) -> tuple[ImageOpener, object]:
    opener = ImageOpener(PathPolicy([os.path.dirname(str(path))]))
    return opener, opener.open(str(path))


class _CountingReads:
    """Counts preads of every InputFile while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int]] = []
        original = InputFile.pread

        def counting(file: InputFile, offset: int, length: int) -> bytes:
            self.calls.append((offset, length))
            return original(file, offset, length)

        monkeypatch.setattr(InputFile, "pread", counting)

    @property
    def total(self) -> int:
        return sum(length for _, length in self.calls)


@pytest.mark.parametrize("name", ["sparse-v1", "stream-qemu", "stream-footer", "child"])
def test_extents_never_read_grain_data(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    opener, image = _open(corpus[name])
    try:
        counter = _CountingReads(monkeypatch)
        extents = list(image.extents(0, image.virtual_size))  # type: ignore[attr-defined]
        assert extents[0].offset == 0 and extents[-1].end == SIZE
        # Only grain tables (2 KiB each) are read: one per 32 MiB, per image in the chain.
        assert counter.total <= 2 * 2048, counter.calls
    finally:
        opener.close()


def test_reads_coalesce_contiguous_grains(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    opener, image = _open(corpus["sparse-v1"])
    try:
        counter = _CountingReads(monkeypatch)
        data = image.read(0, 4 * MIB)  # type: ignore[attr-defined]
        assert len(data) == 4 * MIB
        # 49 data grains in a handful of contiguous runs, plus the grain table.
        assert len(counter.calls) <= 8, counter.calls
    finally:
        opener.close()


def test_extent_kinds(corpus: dict[str, Path]) -> None:
    opener, image = _open(corpus["child-zeroed-grain"])
    try:
        kinds = list(merge_extents(image.extents(0, SIZE)))  # type: ignore[attr-defined]
    finally:
        opener.close()
    # The zero grain hides the parent; the parent's data and holes show through elsewhere.
    assert kinds[0].kind is ExtentKind.ZERO and kinds[0].length == 64 * KIB
    assert kinds[1].kind is ExtentKind.DATA
    # The child wrote into the grain at 1 MiB; the zero MiB of the parent follows.
    assert any(e.kind is ExtentKind.UNALLOCATED and e.offset == MIB + 64 * KIB for e in kinds)
    opener, image = _open(corpus["monolithicFlat"])
    try:
        kinds = list(merge_extents(image.extents(0, SIZE)))  # type: ignore[attr-defined]
    finally:
        opener.close()
    assert {e.kind for e in kinds} <= {ExtentKind.DATA, ExtentKind.ZERO}
