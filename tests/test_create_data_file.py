"""qcow2 ``-o data_file`` / ``data_file_raw`` in ``instar create`` and
``instar convert -O qcow2`` against qemu-img 7.2.

Each program runs in its own directory with the same file names (qemu creates
the data file relative to its working directory and records the name as
given), then: the same exit status, stdout (the "Formatting" line) and stderr
after the program name; the same files left; for a created image the same
``qemu-img info`` (but allocation) and ``map``, data files of the same length,
a clean ``qemu-img check``; after the same qemu-io writes into both images,
``qemu-img compare`` equal and (``data_file_raw``) the data files equal as raw.
A failure leaves nothing, and leaves files that existed as they were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from helpers import Result, qemu_img_ok, qemu_io, run_instar, run_qemu_img

pytestmark = pytest.mark.usefixtures("qemu_img")

_VOLATILE = ("actual-size", "dirty-flag")


def _normalised(info: Any) -> Any:
    if isinstance(info, dict):
        return {key: _normalised(value) for key, value in info.items() if key not in _VOLATILE}
    if isinstance(info, list):
        return [_normalised(item) for item in info]
    return info


def _files(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir())}


def _same_result(qemu: Result, ours: Result) -> None:
    assert ours.rc == qemu.rc, (qemu.stderr, ours.stderr)
    assert ours.stdout == qemu.stdout
    assert ours.normalised_stderr() == qemu.normalised_stderr()


def _run_both(tmp_path: Path, *args: str, prepare: dict[str, bytes] | None = None
              ) -> tuple[Path, Path, Result, Result]:
    """``args`` run by qemu-img in q/ and by instar in i/ (each prepared alike)."""
    theirs, ours = tmp_path / "q", tmp_path / "i"
    for directory in (theirs, ours):
        directory.mkdir()
        for name, data in (prepare or {}).items():
            (directory / name).write_bytes(data)
    qemu = run_qemu_img(*args, cwd=theirs)
    mine = run_instar(*args, cwd=ours)
    _same_result(qemu, mine)
    return theirs, ours, qemu, mine


def _same_images(theirs: Path, ours: Path, image: str, data: str, raw: bool,
                 source: Path | None = None) -> None:
    """Both images alike (info, map, check), then alike after the same writes.
    The image files' lengths differ (instar's refcount structures come after
    the tables, docs/formats/qcow2.md); the data files' do not."""
    assert _files(ours).keys() == _files(theirs).keys()
    assert (ours / data).stat().st_size == (theirs / data).stat().st_size
    infos = [_normalised(json.loads(qemu_img_ok("info", "--output=json", image, cwd=d)))
             for d in (theirs, ours)]
    assert infos[0] == infos[1]
    assert infos[1]["format-specific"]["data"]["data-file"] == data
    maps = [qemu_img_ok("map", "--output=json", image, cwd=d) for d in (theirs, ours)]
    assert maps[0] == maps[1]
    assert run_qemu_img("check", image, cwd=ours).rc == 0
    if source is not None:
        qemu_img_ok("compare", "-q", str(source), image, cwd=ours)
    if infos[1]["virtual-size"] < 70000 + 4096:
        return
    for directory in (theirs, ours):
        qemu_io(image, "write -P 0x5a 4096 70000", fmt="qcow2", cwd=directory)
        qemu_io(image, "write -P 0xa5 0 512", fmt="qcow2", cwd=directory)
    assert run_qemu_img("check", image, cwd=ours).rc == 0
    compared = run_qemu_img("compare", str(theirs / image), str(ours / image), cwd=ours)
    assert compared.rc == 0, compared.stdout + compared.stderr
    if raw:
        assert (ours / data).read_bytes() == (theirs / data).read_bytes()


CREATED = [
    ("data_file=d.raw", "1M"),
    ("data_file=d.raw,data_file_raw=on", "1M"),
    ("data_file=d.raw,data_file_raw=off,cluster_size=4k", "100k"),
    ("data_file=d.raw,data_file_raw=on,cluster_size=512,refcount_bits=1", "20M"),
    ("data_file=d.raw,data_file_raw=on", "0"),
    ("data_file=d.raw,data_file_raw=on,extended_l2=on", "3M"),
    ("data_file=d.raw,lazy_refcounts=on,compression_type=zstd", "1M"),
    ("data_file=d,,r.raw", "1M"),
    *[(f"data_file=d.raw,data_file_raw={raw},preallocation={mode}", "1000000")
      for mode in ("metadata", "falloc", "full") for raw in ("off", "on")],
    ("data_file=d.raw,preallocation=metadata,extended_l2=on", "1M"),
    ("data_file=d.raw,preallocation=full,cluster_size=2M", "5M"),
]


@pytest.mark.parametrize(("options", "size"), CREATED)
def test_create_is_qemus(tmp_path: Path, options: str, size: str) -> None:
    theirs, ours, qemu, _ = _run_both(tmp_path, "create", "-f", "qcow2", "-o", options,
                                      "x.qcow2", size)
    assert qemu.rc == 0 and "Formatting 'x.qcow2'" in qemu.stdout
    data = "d,r.raw" if "d,,r" in options else "d.raw"
    _same_images(theirs, ours, "x.qcow2", data, "data_file_raw=on" in options)


def test_create_with_backing_is_qemus(tmp_path: Path) -> None:
    base = {"b.qcow2": b""}
    theirs, ours, qemu, _ = _run_both(
        tmp_path, "create", "-f", "qcow2", "-o", "data_file=d.raw", "-b", "b.qcow2",
        "-F", "qcow2", "-u", "x.qcow2", "1M", prepare=base)
    assert qemu.rc == 0
    assert _files(ours).keys() == _files(theirs).keys()
    for directory in (theirs, ours):
        (directory / "b.qcow2").unlink()
        qemu_img_ok("create", "-q", "-f", "qcow2", "b.qcow2", "1M", cwd=directory)
    headers = [(d / "x.qcow2").read_bytes()[:4096] for d in (theirs, ours)]
    assert headers[0][72:] == headers[1][72:]  # features, extensions and names alike
    assert run_qemu_img("check", "x.qcow2", cwd=ours).rc == 0


REFUSED = [
    ("data_file=d.raw,compat=0.10", ()),
    ("data_file_raw=on", ()),
    ("data_file_raw=on,compression_type=zstd,compat=0.10", ()),
    ("data_file=d.raw,data_file_raw=on,compat=0.10", ()),
    ("data_file=d.raw,compat=0.10,compression_type=zstd", ()),
    ("data_file=d.raw,compat=0.10,lazy_refcounts=on", ()),
    ("data_file=d.raw,compat=0.10,cluster_size=1000", ()),
    ("data_file=d.raw,data_file_raw=on", ("-b", "b.qcow2", "-F", "qcow2", "-u")),
    ("data_file_raw=on", ("-b", "b.qcow2", "-F", "qcow2", "-u")),
    ("data_file=d.raw,data_file_raw=on,preallocation=metadata",
     ("-b", "b.qcow2", "-F", "qcow2", "-u")),
    ("data_file=", ()),
    ("data_file=nodir/d.raw", ()),
    ("data_file=nodir/d.raw,compat=0.9", ()),
    ("data_file=nodir/d.raw,preallocation=bad", ()),
    ("data_file=d.raw,preallocation=bad", ()),
]


@pytest.mark.parametrize(("options", "extra"), REFUSED)
def test_refusals_are_qemus_and_leave_nothing(tmp_path: Path, options: str,
                                              extra: tuple[str, ...]) -> None:
    theirs, ours, qemu, _ = _run_both(tmp_path, "create", "-f", "qcow2", "-o", options,
                                      *extra, "x.qcow2", "1M")
    assert qemu.rc == 1
    assert _files(ours) == _files(theirs) == {}


def test_data_file_is_the_image(tmp_path: Path) -> None:
    """qemu cannot lock the file twice; it also prints a line about the file it
    failed to delete afterwards ("... is not a regular file"), which instar,
    having created nothing, does not."""
    for name in ("x.qcow2", "./x.qcow2"):
        ours = run_instar("create", "-f", "qcow2", "-o", f"data_file={name}", "x.qcow2", "1M",
                          cwd=tmp_path)
        qemu = run_qemu_img("create", "-f", "qcow2", "-o", f"data_file={name}", "x.qcow2",
                            "1M", cwd=tmp_path)
        assert ours.rc == qemu.rc == 1
        assert qemu.normalised_stderr().endswith(ours.normalised_stderr())
        assert ours.normalised_stderr() == (
            'PROG: x.qcow2: Failed to get shared "resize" lock\n'
            f"Is another process using the image [{name}]?\n")
        assert _files(tmp_path) == {}


def test_failure_keeps_existing_files(tmp_path: Path) -> None:
    """qemu-img deletes the image and the data file when creating fails, even
    files that were there before; instar's outputs appear only on success, so
    what was there stays as it was."""
    (tmp_path / "d.raw").write_bytes(b"old data")
    (tmp_path / "x.qcow2").write_bytes(b"old image")
    ours = run_instar("create", "-f", "qcow2", "-o", "data_file=d.raw,compat=0.10",
                      "x.qcow2", "1M", cwd=tmp_path)
    assert ours.rc == 1
    assert (tmp_path / "d.raw").read_bytes() == b"old data"
    assert (tmp_path / "x.qcow2").read_bytes() == b"old image"


def test_existing_data_file_is_replaced(tmp_path: Path) -> None:
    theirs, ours, qemu, _ = _run_both(
        tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "x.qcow2", "1M",
        prepare={"d.raw": b"x" * 5000000})
    assert qemu.rc == 0
    assert (ours / "d.raw").read_bytes() == bytes(1 << 20)
    _same_images(theirs, ours, "x.qcow2", "d.raw", False)


def _source(directory: Path) -> Path:
    source = directory / "s.raw"
    with source.open("wb") as file:
        file.truncate(2100000)
        for offset, byte, length in ((0, 2, 4096), (1 << 20, 1, 65536), (2090000, 5, 10000)):
            file.seek(offset)
            file.write(bytes([byte]) * length)
    return source


CONVERTED = [
    ("data_file=c.raw", ()),
    ("data_file=c.raw,data_file_raw=on", ()),
    ("data_file=c.raw,preallocation=metadata", ()),
    ("data_file=c.raw,preallocation=falloc", ()),
    ("data_file=c.raw,preallocation=full,data_file_raw=on", ()),
    ("data_file=c.raw,cluster_size=4k", ()),
    ("data_file=c.raw,extended_l2=on,cluster_size=16k,preallocation=metadata", ()),
    ("data_file=c.raw", ("-c",)),
    ("data_file=c.raw,compat=0.10", ()),
    ("data_file=nodir/c.raw", ()),
    ("data_file=s.raw", ()),
    ("data_file=./s.raw", ()),
]


@pytest.mark.parametrize(("options", "extra"), CONVERTED)
def test_convert_is_qemus(tmp_path: Path, options: str, extra: tuple[str, ...]) -> None:
    theirs, ours = tmp_path / "q", tmp_path / "i"
    for directory in (theirs, ours):  # sparse alike: qemu's zero detection depends on it
        directory.mkdir()
        data = _source(directory).read_bytes()
    args = ("convert", *extra, "-O", "qcow2", "-o", options, "s.raw", "c.qcow2")
    qemu = run_qemu_img(*args, cwd=theirs)
    mine = run_instar(*args, cwd=ours)
    _same_result(qemu, mine)
    assert (ours / "s.raw").read_bytes() == data
    if qemu.rc:
        if extra:  # -c: qemu fails at its first write and leaves both files
            assert _files(theirs).keys() == {"s.raw", "c.qcow2", "c.raw"}
        assert _files(ours) == {"s.raw": len(data)}
        return
    _same_images(theirs, ours, "c.qcow2", "c.raw", "data_file_raw=on" in options,
                 source=ours / "s.raw")


def test_second_output_is_undone_when_the_first_cannot_be_named(tmp_path: Path) -> None:
    """The broker commits a job's outputs in order; if one cannot take its
    name, those named before it are removed again: all or nothing."""
    from instar.errors import CreationError
    from instar.opener import HostBroker
    from instar.safety import PathPolicy

    sub = tmp_path / "sub"
    sub.mkdir()
    first, second = str(tmp_path / "d.raw"), str(sub / "x.qcow2")
    broker = HostBroker(PathPolicy([]), frozenset(), frozenset([first, second]))
    try:
        for target in (first, second):
            out = broker.create_output(target)
            os.write(out.fd, b"data")
        sub.rmdir()  # the second output's directory goes away before the commit
        with pytest.raises(CreationError):
            broker.commit_output(False)
        assert not os.path.exists(first)
    finally:
        broker.close()
    assert _files(tmp_path) == {}


def test_data_file_must_be_named_as_an_output(tmp_path: Path) -> None:
    """A job may create only the outputs its command named."""
    from instar.errors import PolicyError
    from instar.opener import HostBroker
    from instar.safety import PathPolicy

    broker = HostBroker(PathPolicy([]), frozenset(), frozenset([str(tmp_path / "x.qcow2")]))
    try:
        with pytest.raises(PolicyError):
            broker.create_output(str(tmp_path / "d.raw"))
    finally:
        broker.close()
    assert _files(tmp_path) == {}


@pytest.mark.parametrize("spelling", ["on", "yes", "true", "y", "off", "no", "false", "n",
                                      "", "ON", "1", "maybe"])
def test_data_file_raw_spellings_are_qemus(tmp_path: Path, spelling: str) -> None:
    theirs, ours, qemu, _ = _run_both(
        tmp_path, "create", "-f", "qcow2", "-o", f"data_file=d.raw,data_file_raw={spelling}",
        "x.qcow2", "64k")
    assert _files(ours).keys() == _files(theirs).keys()
    if qemu.rc == 0:
        infos = [json.loads(qemu_img_ok("info", "--output=json", "x.qcow2", cwd=d))
                 for d in (theirs, ours)]
        assert (infos[0]["format-specific"]["data"]["data-file-raw"]
                == infos[1]["format-specific"]["data"]["data-file-raw"])


def test_dd_takes_the_data_file_as_convert_does(tmp_path: Path) -> None:
    """qemu-img dd takes no -o; instar's dd writes what convert writes."""
    _source(tmp_path)
    for command, image in (("convert", "c.qcow2"), ("dd", "d.qcow2")):
        args = ["-O", "qcow2", "-o", f"data_file={image}.raw"]
        files = ["s.raw", image] if command == "convert" else ["if=s.raw", f"of={image}"]
        result = run_instar(command, *args, *files, cwd=tmp_path)
        assert result.rc == 0, result.stderr
    qemu_img_ok("compare", "c.qcow2", "d.qcow2", cwd=tmp_path)
    assert (tmp_path / "c.qcow2.raw").read_bytes() == (tmp_path / "d.qcow2.raw").read_bytes()
