"""instar info against the real qemu-img info (7.2): byte-identical stdout.

Parity rows run both programs on the same files. Formats instar cannot read
yet are still covered at the rendering level: their facts (taken from qemu's
own JSON) are rendered by instar.info and must give qemu's exact text, which
is also the specification of what each format's ``describe`` must return.
Adding a format to the parity table is one row in INFO_IMAGES.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, run_instar, run_qemu_img
from instar.formats.base import FormatDetails, QValue, SnapshotDetails
from instar.info import (
    NodeInfo,
    full_backing_filename,
    qdict_items,
    render_human,
    render_json,
    to_json,
)
from instar.sizes import size_to_str

Builder = Callable[[Path], None]


def _write(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    with open(path, "wb") as file:
        for offset, data in pieces:
            file.seek(offset)
            file.write(data)
        if size is not None:
            file.truncate(size)


# name -> how to make it. One row per image; a new format is a new row.
INFO_IMAGES: dict[str, Builder] = {
    "empty.raw": lambda p: _write(p, []),
    "one.raw": lambda p: _write(p, [(0, b"\x01")]),
    "k1000.raw": lambda p: _write(p, [(0, pattern(1000))]),
    "hole1000.raw": lambda p: _write(p, [], 1000),
    "mib.raw": lambda p: _write(p, [(0, pattern(1 << 20))]),
    "mib-plus-one.raw": lambda p: _write(p, [(0, pattern((1 << 20) + 1))]),
    "sparse.raw": lambda p: _write(p, [(70_000, pattern(5000)), (9 << 20, b"\x07")], 12_345_679),
    "created.raw": lambda p: qemu_img_ok("create", "-q", "-f", "raw", str(p), "3M"),
}

OUTPUT_OPTIONS: list[list[str]] = [
    [],
    ["--output=json"],
    ["--backing-chain"],
    ["--output=json", "--backing-chain"],
    ["--output", "human", "-f", "raw"],
    ["-U", "--format=raw", "--output", "json"],
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("info")
    for name, build in INFO_IMAGES.items():
        build(directory / name)
    (directory / "name with spaces.raw").write_bytes(b"x" * 600)
    return directory


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", OUTPUT_OPTIONS, ids=lambda o: " ".join(o) or "human")
@pytest.mark.parametrize("name", [*INFO_IMAGES, "name with spaces.raw"])
def test_info_matches_qemu(name: str, options: list[str], images: Path) -> None:
    qemu = run_qemu_img("info", *options, name, cwd=images)
    ours = run_instar("info", *options, name, cwd=images)
    assert qemu.rc == 0, qemu.stderr
    assert (ours.rc, ours.stdout, ours.stderr) == (qemu.rc, qemu.stdout, qemu.stderr)


@pytest.mark.usefixtures("qemu_img")
def test_info_absolute_and_nested_paths(images: Path, tmp_path: Path) -> None:
    nested = tmp_path / "sub dir"
    nested.mkdir()
    _write(nested / "x.raw", [(0, b"\x02" * 4096)])
    for target in (str(nested / "x.raw"), "sub dir/x.raw", "./sub dir/../sub dir/x.raw"):
        for options in ([], ["--output=json"]):
            qemu = run_qemu_img("info", *options, target, cwd=tmp_path)
            ours = run_instar("info", *options, target, cwd=tmp_path)
            assert (ours.rc, ours.stdout) == (qemu.rc, qemu.stdout)


ERROR_ROWS: list[list[str]] = [
    [],
    ["one.raw", "mib.raw"],
    ["--output=xml", "one.raw"],
    ["--output", "JSON", "one.raw"],
    ["-f", "foo", "one.raw"],
    ["missing.raw"],
    ["--backing-chain", "missing.raw"],
    ["-x", "one.raw"],
    ["--bogus", "one.raw"],
    ["--output"],
    ["-f"],
    ["."],
    [""],
]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", ERROR_ROWS, ids=lambda a: " ".join(a) or "<none>")
def test_info_errors_match_qemu(args: list[str], images: Path) -> None:
    qemu = run_qemu_img("info", *args, cwd=images)
    ours = run_instar("info", *args, cwd=images)
    assert qemu.rc != 0
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr()
    )


def test_recognised_format_is_refused_clearly(images: Path) -> None:
    """-f of a format instar cannot read yet: a clear error, never raw output."""
    result = run_instar("info", "-f", "qcow2", "one.raw", cwd=images)
    assert result.rc == 1 and result.stdout == ""
    assert "qcow2" in result.stderr


# ---------------------------------------------------------------------------
# A petabyte of holes: info reads metadata only.


@pytest.fixture
def huge_sparse_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose file system holds a 1 PiB sparse file (ext4 cannot)."""
    probe = tmp_path / "probe"
    try:
        with open(probe, "wb") as file:
            file.truncate(1 << 50)
        probe.unlink()
        yield tmp_path
        return
    except OSError:
        probe.unlink(missing_ok=True)
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no file system here can hold a 1 PiB sparse file")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        yield Path(directory)


@pytest.mark.usefixtures("qemu_img")
def test_info_of_a_petabyte_is_instant(huge_sparse_dir: Path) -> None:
    with open(huge_sparse_dir / "pb.raw", "wb") as file:
        file.truncate(1 << 50)
    started = time.perf_counter()
    ours = run_instar("info", "pb.raw", cwd=huge_sparse_dir)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    assert "virtual size: 1 PiB (1125899906842624 bytes)\ndisk size: 0 B\n" in ours.stdout
    for options in ([], ["--output=json"]):
        qemu = run_qemu_img("info", *options, "pb.raw", cwd=huge_sparse_dir)
        assert run_instar("info", *options, "pb.raw", cwd=huge_sparse_dir).stdout == qemu.stdout


# ---------------------------------------------------------------------------
# size_to_str: qemu's numbers, through the "virtual size" line.

SIZES = [
    0, 512, 1024, 1536, 10 * 512, 999 * 512, 1000 * 512, 1023 * 1024, 1000 * 1024,
    999 * 1024, 1 << 20, (1 << 20) + 512, 1_000_000_000 // 512 * 512, 1023 << 20,
    1000 << 20, 999 << 20, (1 << 30) - 512, 1 << 30, 3 << 29, 10 << 30, (100 << 30) + 512,
    999 << 30, 1000 << 30, 1023 << 30, (1 << 40) - 512, 1 << 40, 5 << 40, (10 << 40) + 4096,
    15 << 40, 1024 * 1000 * 1000 // 512 * 512, 123_456_789 // 512 * 512,
]


def _virtual_size_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("virtual size:"))


@pytest.mark.usefixtures("qemu_img")
def test_size_to_str_matches_qemu(tmp_path: Path) -> None:
    for size in SIZES:
        path = tmp_path / f"{size}.raw"
        with open(path, "wb") as file:
            file.truncate(size)
        line = _virtual_size_line(qemu_img_ok("info", str(path)))
        assert line == f"virtual size: {size_to_str(size)} ({size} bytes)", size
        assert _virtual_size_line(run_instar("info", str(path)).stdout) == line
        path.unlink()


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "0.977 KiB"), (1023, "0.999 KiB"), (1024, "1 KiB"),
     (1536, "1.5 KiB"), (1_048_576_000, "0.977 GiB"), (1 << 50, "1 PiB"),
     ((1 << 63) - 1, "8 EiB"), (1000 << 50, "0.977 EiB")],
)
def test_size_to_str_values(value: int, text: str) -> None:
    """Values qemu prints (the 1000 threshold, %0.3g) beyond what a file reaches here."""
    assert size_to_str(value) == text


# ---------------------------------------------------------------------------
# Rendering of formats instar cannot read yet, from qemu's own facts.


def _details_from_qemu(info: dict[str, object]) -> FormatDetails:
    specific = info.get("format-specific")
    snapshots = [
        SnapshotDetails(
            id=str(s["id"]), name=str(s["name"]), vm_state_size=int(s["vm-state-size"]),
            date_sec=int(s["date-sec"]), date_nsec=int(s["date-nsec"]),
            vm_clock_nsec=int(s["vm-clock-sec"]) * 1_000_000_000 + int(s["vm-clock-nsec"]),
            icount=int(s["icount"]) if "icount" in s else None,
        )
        for s in info.get("snapshots", [])  # type: ignore[attr-defined]
    ]
    return FormatDetails(
        cluster_size=info.get("cluster-size"),  # type: ignore[arg-type]
        encrypted=bool(info.get("encrypted", False)),
        dirty=info.get("dirty-flag"),  # type: ignore[arg-type]
        backing_filename=info.get("backing-filename"),  # type: ignore[arg-type]
        backing_format=info.get("backing-filename-format"),  # type: ignore[arg-type]
        snapshots=snapshots,
        specific_type=specific["type"] if specific else None,  # type: ignore[index]
        specific=specific["data"] if specific else None,  # type: ignore[index]
    )


def _node_from_qemu(info: dict[str, object]) -> NodeInfo:
    details = _details_from_qemu(info)
    node = NodeInfo(
        filename=str(info["filename"]), format=str(info["format"]),
        virtual_size=int(info["virtual-size"]),  # type: ignore[call-overload]
        actual_size=info.get("actual-size"),  # type: ignore[arg-type]
        details=details,
    )
    if details.backing_filename:
        node.full_backing_filename = full_backing_filename(node.filename,
                                                           details.backing_filename)
    return node


def _create(*args: str) -> Builder:
    """qemu-img create ... img, run inside the test directory."""
    return lambda d: qemu_img_ok("create", "-q", *args, cwd=d)


def _qcow2_full(d: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "raw", "base.raw", "1M", cwd=d)
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                "-o", "lazy_refcounts=on", "img", cwd=d)
    qemu_img_ok("bitmap", "--add", "img", "b0", cwd=d)
    qemu_img_ok("bitmap", "--add", "--disable", "-g", "128k", "img", "b-1", cwd=d)
    qemu_img_ok("snapshot", "-c", "first snapshot", "img", cwd=d)


RENDER_CASES: dict[str, Builder] = {
    "qcow2": _create("-f", "qcow2", "img", "5G"),
    "qcow2-v2": _create("-f", "qcow2", "-o", "compat=0.10", "img", "1M"),
    "qcow2-chain-bitmaps-snapshot": _qcow2_full,
    "qcow2-data-file": _create("-f", "qcow2", "-o", "data_file=img.data,data_file_raw=on",
                               "img", "1M"),
    "vmdk": _create("-f", "vmdk", "img", "1M"),
    "vmdk-stream": _create("-f", "vmdk", "-o", "subformat=streamOptimized", "img", "1M"),
    "vmdk-2gb": _create("-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "img", "3G"),
    "vmdk-flat": _create("-f", "vmdk", "-o", "subformat=monolithicFlat", "img", "1M"),
    "vpc": _create("-f", "vpc", "img", "1M"),
    "vpc-fixed": _create("-f", "vpc", "-o", "subformat=fixed", "img", "1M"),
    "vhdx": _create("-f", "vhdx", "img", "1M"),
}


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("case", list(RENDER_CASES))
def test_rendering_matches_qemu(case: str, tmp_path: Path) -> None:
    RENDER_CASES[case](tmp_path)
    qemu_json = qemu_img_ok("info", "--output=json", "img", cwd=tmp_path)
    node = _node_from_qemu(json.loads(qemu_json))
    assert render_json([node], chain=False) == qemu_json
    assert render_human([node]) == qemu_img_ok("info", "img", cwd=tmp_path)
    chain_json = qemu_img_ok("info", "--output=json", "--backing-chain", "img", cwd=tmp_path)
    nodes = [_node_from_qemu(item) for item in json.loads(chain_json)]
    assert render_json(nodes, chain=True) == chain_json
    assert render_human(nodes) == qemu_img_ok("info", "--backing-chain", "img", cwd=tmp_path)


def test_qdict_order_breaks_bucket_ties_by_last_insertion() -> None:
    """"children" and "backing-filename-format" share a bucket: qemu lists
    the one inserted last first."""
    assert [k for k, _ in qdict_items({"backing-filename-format": "a", "children": []})] == [
        "children", "backing-filename-format"
    ]
    assert [k for k, _ in qdict_items({"children": [], "backing-filename-format": "a"})] == [
        "backing-filename-format", "children"
    ]


def test_json_strings_escaped_as_qemu() -> None:
    value: QValue = {"filename": 'a"b\\c\n\x01é\U0001f600\udcff'}
    assert to_json(value) == (
        '{\n    "filename": "a\\"b\\\\c\\n\\u0001\\u00E9\\uD83D\\uDE00\\uFFFD"\n}'
    )
    assert to_json({"x": {}, "y": []}) == '{\n    "x": {\n    },\n    "y": [\n    ]\n}'


# ---------------------------------------------------------------------------
# The qemu 8.0+ form (--qemu-version 8), from qemu's block/qapi.c and qemu-img.c


@pytest.mark.usefixtures("qemu_img")
def test_qemu8_human_form(images: Path) -> None:
    ours = run_instar("info", "--qemu-version", "8.0", "mib.raw", cwd=images)
    assert ours.stdout == (
        "image: mib.raw\nfile format: raw\nvirtual size: 1 MiB (1048576 bytes)\n"
        "disk size: 1 MiB\nChild node '/file':\n    filename: mib.raw\n"
        "    protocol type: file\n    file length: 1 MiB (1048576 bytes)\n"
        "    disk size: 1 MiB\n"
    )
    assert run_instar("info", "--qemu-version", "7.2", "mib.raw", cwd=images).stdout == (
        run_qemu_img("info", "mib.raw", cwd=images).stdout
    )


def test_qemu8_json_form(images: Path) -> None:
    ours = run_instar("info", "--qemu-version=9.2", "--output=json", "k1000.raw", cwd=images)
    allocated = os.stat(images / "k1000.raw").st_blocks * 512
    assert ours.stdout == (
        '{\n    "children": [\n        {\n            "name": "file",\n'
        '            "info": {\n                "children": [\n                ],\n'
        '                "virtual-size": 1024,\n                "filename": "k1000.raw",\n'
        '                "format": "file",\n'
        f'                "actual-size": {allocated},\n'
        '                "format-specific": {\n                    "type": "file",\n'
        '                    "data": {\n                    }\n                },\n'
        '                "dirty-flag": false\n            }\n        }\n    ],\n'
        '    "virtual-size": 1024,\n    "filename": "k1000.raw",\n    "format": "raw",\n'
        f'    "actual-size": {allocated},\n    "dirty-flag": false\n}}\n'
    )


def test_qemu8_children_order_and_paths() -> None:
    """qemu lists children last-attached first, and names grandchildren by path."""
    leaf = NodeInfo("d.bin", "file", 512, 0, FormatDetails(specific_type="file", specific={}))
    top = NodeInfo(
        "t.qcow2", "qcow2", 1 << 20, 4096,
        FormatDetails(cluster_size=65536, specific_type="qcow2", specific={"compat": "1.1"}),
        children=[("data-file", leaf), ("file", NodeInfo(
            "t.qcow2", "file", 4096, 4096, FormatDetails(specific_type="file",
                                                         specific={"extent-size-hint": 1 << 20}),
        ))],
    )
    text = render_human([top], (8, 0))
    assert text.endswith(
        "Format specific information:\n    compat: 1.1\n"
        "Child node '/data-file':\n    filename: d.bin\n    protocol type: file\n"
        "    file length: 512 B (512 bytes)\n    disk size: 0 B\n"
        "Child node '/file':\n    filename: t.qcow2\n    protocol type: file\n"
        "    file length: 4 KiB (4096 bytes)\n    disk size: 4 KiB\n"
        "    Format specific information:\n        extent size hint: 1048576\n"
    )


def test_bad_qemu_version_is_a_usage_error(images: Path) -> None:
    result = run_instar("info", "--qemu-version", "eight", "one.raw", cwd=images)
    assert result.rc == 1 and "--qemu-version" in result.stderr
