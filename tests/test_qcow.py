"""qcow (version 1): the reader and the writer against qemu-img 7.2 and qemu-io.

Reader: images qemu-img and qemu-io make (converted, compressed with -c,
written at odd offsets, odd sizes, a 1 TiB sparse disk, an AES-encrypted one,
backing chains of qcow over qcow, raw and qed) are copied by ``instar dd``
and ``qemu-img dd`` over the same windows and compared byte for byte, as are
``convert -O raw``, ``info`` (human, JSON, backing chain), ``map``, ``compare`` and
probing (qcow and qcow2 share a magic: the version decides, as in qemu).
Writer: ``dd -O qcow`` over the window matrix (with and without ``-c``) and
``convert -O qcow`` against the same runs of qemu-img: same status and
messages (an empty window fails as qemu's), the same virtual size, the same
bytes read back. qemu-img has no check for qcow. Damaged images are rows of
tests/test_conformance.py and hostile ones classes of tests/hostile_corpus.py.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from corpus_parity import ReadParity
from helpers import (
    DD_INPUTS,
    DD_WINDOWS,
    both,
    build_dd_inputs,
    open_image,
    pattern,
    qemu_img_ok,
    qemu_info,
    qemu_io,
    qemu_read_raw,
    run_instar,
    run_qemu_img,
)
from instar.formats import registry
from instar.formats.qcow import FORMAT
from instar.formats.qcow import layout as L

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SECRET = ["--object", "secret,id=sec0,data=instar"]


# --- the corpus ------------------------------------------------------------------------------


def _create(directory: Path, name: str, size: str, *args: str) -> Path:
    qemu_img_ok("create", "-q", "-f", "qcow", *args, name, size, cwd=directory)
    return directory / name


def _write(path: Path, *commands: str) -> None:
    for command in commands:
        qemu_io(path, command, "qcow", cwd=path.parent)


def _mixed(size: int, seed: int) -> bytes:
    """Clusters that compress, clusters that do not, and zeros."""
    rng = random.Random(seed)
    data = bytearray()
    for index in range(size // (4 * KIB)):
        kind = index % 5
        if kind == 0:
            data += rng.randbytes(4 * KIB)
        elif kind == 4:
            data += bytes(4 * KIB)
        else:
            data += pattern(4 * KIB, seed=index)
    return bytes(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu-made images, each named as the tests name it (relative to its directory)."""
    directory = tmp_path_factory.mktemp("qcow-corpus")
    images: dict[str, Path] = {}
    raw = bytearray(pattern(3 * MIB + 1000, seed=5))
    raw[MIB + 4321 : 2 * MIB + 99] = bytes(MIB + 99 - 4321)
    (directory / "patterned.raw").write_bytes(bytes(raw))
    qemu_img_ok("convert", "-O", "qcow", "patterned.raw", "converted.qcow", cwd=directory)
    images["converted"] = directory / "converted.qcow"
    (directory / "mixed.raw").write_bytes(_mixed(2 * MIB + 8 * KIB, seed=3))
    qemu_convert_compressed(directory / "mixed.raw", directory / "compressed.qcow")
    images["compressed"] = directory / "compressed.qcow"
    written = _create(directory, "written.qcow", "5M")
    _write(written, "write -P 0x11 0 100k", "write -P 0x22 1M 65k", "write -z 2M 1M",
           "write -P 0x33 4000k 1k", "write -P 0x34 5119k 1k")
    images["written"] = written
    odd = _create(directory, "odd.qcow", "1000000")
    _write(odd, "write -P 0x61 976k 512", "write -P 0x62 3k 1k")
    images["odd"] = odd
    images["untouched"] = _create(directory, "untouched.qcow", "3M")
    # Chains: qemu-img gives a backed qcow 512-byte clusters and L2 tables of 4096 entries.
    qemu_img_ok("convert", "-O", "qcow", "mixed.raw", "base.qcow", cwd=directory)
    over_qcow = _create(directory, "over-qcow.qcow", "3M", "-b", "base.qcow", "-F", "qcow")
    _write(over_qcow, "write -P 0x71 4k 1k", "write -z 64k 8k", "write -P 0x72 2500k 4k")
    images["over-qcow"] = over_qcow
    top = _create(directory, "top.qcow", "4M", "-b", "over-qcow.qcow", "-F", "qcow")
    _write(top, "write -P 0x81 1M 512", "write -P 0x82 3M 8k")
    images["top"] = top
    (directory / "base.raw").write_bytes(pattern(2 * MIB, seed=7))
    over_raw = _create(directory, "over-raw.qcow", "3M", "-b", "base.raw", "-F", "raw")
    _write(over_raw, "write -P 0x91 100k 3k")
    images["over-raw"] = over_raw
    qemu_img_ok("create", "-q", "-f", "qed", "base.qed", "1M", cwd=directory)
    qemu_io(directory / "base.qed", "write -P 0x93 64k 64k", "qed")
    over_qed = _create(directory, "over-qed.qcow", "2M", "-b", "base.qed", "-F", "qed")
    _write(over_qed, "write -P 0x94 96k 1k")
    images["over-qed"] = over_qed
    return images


def qemu_convert_compressed(source: Path, target: Path) -> None:
    """qemu-img convert -c -O qcow: qemu 7.2 writes the whole image, then
    exits 1 without a word (the zero-length compressed write it ends with,
    which qcow2 takes as "the end", qcow refuses); the image is good."""
    result = run_qemu_img("convert", "-c", "-O", "qcow", str(source), str(target))
    assert (result.rc, result.stdout, result.stderr) == (1, "", "")
    assert run_qemu_img("compare", str(source), str(target)).rc == 0


NAMES = ["converted", "compressed", "written", "odd", "untouched", "over-qcow", "top",
         "over-raw", "over-qed"]


class TestQcowReadParity(ReadParity):
    fmt = "qcow"
    corpus_names = NAMES


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", NAMES)
def test_check_has_none_as_in_qemu(corpus: dict[str, Path], name: str) -> None:
    """qemu has no check for qcow: "This image format does not support checks", 63."""
    image = corpus[name]
    ours, qemu = both(["check", image.name], image.parent)
    assert ours == qemu and ours[0] == 63


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qcow2_probes_as_qcow2(tmp_path: Path, compat: str) -> None:
    """The same magic, versions 2 and 3: qcow2, as qemu probes them."""
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "v.qcow2", "1M",
                cwd=tmp_path)
    header = (tmp_path / "v.qcow2").read_bytes()[: registry.PROBE_SIZE]
    assert registry.probe(header, "v.qcow2").name == "qcow2" == qemu_info(
        tmp_path / "v.qcow2")["format"]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(("name", "fmt"), [
    ("converted.qcow", "qcow2"), ("converted.qcow", "qed"), ("v2.qcow2", "qcow"),
    ("v3.qcow2", "qcow"), ("patterned.raw", "qcow"), ("base.qed", "qcow")])
def test_wrong_format_named_like_qemu(corpus: dict[str, Path], name: str, fmt: str) -> None:
    """-f naming the wrong driver: each driver's refusal as qemu words it
    (qcow2's version 2 and 3 with qemu's hint to try qcow2)."""
    directory = corpus["converted"].parent
    for compat, image in (("0.10", "v2.qcow2"), ("1.1", "v3.qcow2")):
        if not (directory / image).exists():
            qemu_img_ok("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", image, "1M",
                        cwd=directory)
    ours, qemu = both(["info", "-f", fmt, name], directory)
    assert ours == qemu
    assert ours[0] == 1


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("qcow-encrypted")
    qemu_img_ok("create", "-q", "-f", "qcow", *SECRET, "-o",
                "encrypt.format=aes,encrypt.key-secret=sec0", "enc.qcow", "1M", cwd=directory)
    return directory / "enc.qcow"


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", [
    ["info"], ["info", "--output=json"], ["info", "--backing-chain"],
    ["convert", "-O", "raw", "{image}", "out.raw"], ["dd", "if={image}", "of=out.raw"],
    ["compare", "{image}", "{image}"], ["convert", "-O", "qcow", "{image}", "out.qcow"],
    ["check"]],
    ids=lambda a: " ".join(a))
def test_encrypted_refused_as_qemu_refuses_it(encrypted: Path, args: list[str]) -> None:
    """An AES-encrypted qcow is described (qemu-img info opens it without a
    key) and refused for reading, in qemu's words; nothing is left behind."""
    words = [arg.replace("{image}", encrypted.name) for arg in args]
    if "{image}" not in " ".join(args):
        words.append(encrypted.name)
    ours, qemu = both(words, encrypted.parent)
    assert ours == qemu
    if args[0] != "info":
        assert ours[0] in (1, 2) and "encrypt.key-secret' is required for cipher" in ours[2]
        assert sorted(p.name for p in encrypted.parent.iterdir()) == ["enc.qcow"]
        for leftover in ("out.raw", "out.qcow"):  # qemu's own
            (encrypted.parent / leftover).unlink(missing_ok=True)
    else:
        assert "encrypted" in ours[1]


def test_extents_read_only_metadata(corpus: dict[str, Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Extents come from the tables: no cluster is read, compressed ones neither."""
    with open_image(corpus["compressed"]) as image:
        list(image.extents(0, image.virtual_size))  # tables loaded, the metadata claimed
        reads: list[tuple[int, int]] = []
        real = os.pread

        def counting(fd: int, length: int, offset: int) -> bytes:
            reads.append((offset, length))
            return real(fd, length, offset)

        monkeypatch.setattr(os, "pread", counting)
        kinds = [(e.offset, e.length, e.kind.value) for e in image.extents(0, image.virtual_size)]
    assert reads == []
    assert (16 * KIB, 4 * KIB, "unallocated") in kinds  # the zero cluster: not stored
    assert kinds[0] == (0, 16 * KIB, "data")


@pytest.mark.usefixtures("qemu_img")
def test_one_tebibyte_sparse(tmp_path: Path) -> None:
    """A 1 TiB qcow with data at both ends: a window at its end reads as
    qemu reads it, and compare skips its 4 MiB L1 table's empty stretches
    (qemu answers block status one cluster at a time: its compare of the
    image takes hours)."""
    image = _create(tmp_path, "big.qcow", "1T")
    _write(image, "write -P 0x33 0 4k", f"write -P 0x44 {TIB - 8 * KIB} 5k")
    window = ["bs=1M", f"skip={TIB // MIB - 1}", f"count={TIB // MIB}"]
    ours, theirs = tmp_path / "i.raw", tmp_path / "q.raw"
    assert run_instar("dd", *window, "if=big.qcow", f"of={ours}", cwd=tmp_path).rc == 0
    qemu_img_ok("dd", *window, "if=big.qcow", f"of={theirs}", cwd=tmp_path)
    assert ours.read_bytes() == theirs.read_bytes()
    compare = run_instar("compare", "big.qcow", "big.qcow", cwd=tmp_path)
    assert (compare.rc, compare.stdout) == (0, "Images are identical.\n")


@pytest.mark.usefixtures("qemu_img")
def test_backing_file_needs_its_directory_allowed(corpus: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTAR_ALLOW")
    image = corpus["over-qcow"]
    result = run_instar("dd", f"if={image.name}", "of=/dev/null", cwd=image.parent)
    assert (result.rc, result.stderr) == (1, "instar: backing file 'base.qcow' is outside the "
                                          "allowed directories (none); use --allow DIR to "
                                          "permit it\n")
    info = run_instar("info", image.name, cwd=image.parent)
    assert info.rc == 0 and "backing file: base.qcow\n" in info.stdout


# --- the writer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dd_inputs(tmp_path_factory.mktemp("qcow-writer-inputs"))


def _header(path: Path) -> L.Header:
    return L.Header.parse(path.read_bytes()[: L.HEADER.size])


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("window", DD_WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", DD_INPUTS)
@pytest.mark.parametrize("compress", [[], ["-c"]], ids=["plain", "compressed"])
def test_dd_window_matches_qemu(inputs: Path, tmp_path: Path, name: str, window: list[str],
                                compress: list[str]) -> None:
    """qemu-img dd (which has no -c) is the reference: status, messages, size,
    bytes; the empty window fails as qemu's, and leaves nothing behind."""
    source = f"if={inputs / name}"
    ours, theirs = tmp_path / "out.qcow", tmp_path / "q" / "out.qcow"
    theirs.parent.mkdir()
    result = run_instar("dd", *compress, "-O", "qcow", *window, source, "of=out.qcow",
                        cwd=tmp_path)
    qemu = run_qemu_img("dd", "-O", "qcow", *window, source, "of=out.qcow", cwd=theirs.parent)
    assert (result.rc, result.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    if window == ["count=0"]:
        assert result.rc == 1 and not ours.exists()
        assert "Image size is too small, cannot be zero length" in result.stderr
        return
    assert result.rc == 0
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"]
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)
    mine, qemus = _header(ours), _header(theirs)
    assert mine == qemus  # cluster and table sizes, where the L1 table is, no mtime


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("compress", [[], ["-c"]], ids=["plain", "compressed"])
def test_convert_matches_qemu(corpus: dict[str, Path], tmp_path: Path,
                              compress: list[str]) -> None:
    """convert [-c] -O qcow: qemu's header, the same bytes; -c stores clusters
    compressed where they shrink and as they are where they do not."""
    source = corpus["compressed"].parent / "mixed.raw"
    ours, theirs = tmp_path / "i.qcow", tmp_path / "q.qcow"
    assert run_instar("convert", *compress, "-O", "qcow", str(source), str(ours)).rc == 0
    if compress:  # instar exits 0 where qemu exits 1, silently, with the same image
        qemu_convert_compressed(source, theirs)
    else:
        qemu_img_ok("convert", "-O", "qcow", str(source), str(theirs))
    assert _header(ours) == _header(theirs)
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path) == source.read_bytes()
    kinds = _cluster_kinds(ours)
    assert kinds == _cluster_kinds(theirs)
    assert ("compressed" in kinds) == bool(compress)


def _cluster_kinds(path: Path) -> list[str]:
    """What qemu-img map says of each 4 KiB cluster: stored, compressed (data
    at no offset) or not in the image."""
    import json

    kinds: list[str] = []
    for extent in json.loads(qemu_img_ok("map", "--output=json", str(path))):
        kind = ("stored" if "offset" in extent else "compressed") if extent["data"] else "none"
        kinds += [kind] * (extent["length"] // (4 * KIB))
    return kinds


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", ["written", "top", "compressed", "over-qed"])
@pytest.mark.parametrize("target", ["qcow", "qcow2", "qed"])
def test_convert_from_qcow(corpus: dict[str, Path], tmp_path: Path, name: str,
                           target: str) -> None:
    """qcow to qcow, qcow2 and qed: what qemu reads of instar's output equals the source."""
    image = corpus[name]
    out = tmp_path / f"out.{target}"
    result = run_instar("convert", "-O", target, image.name, str(out), cwd=image.parent)
    assert result.rc == 0, result.stderr
    compare = run_qemu_img("compare", "-F", target, image.name, str(out), cwd=image.parent)
    assert compare.rc == 0, compare.stdout + compare.stderr


@pytest.mark.usefixtures("qemu_img")
def test_empty_input_fails_as_qemu(tmp_path: Path) -> None:
    (tmp_path / "empty.raw").write_bytes(b"")
    ours, qemu = both(["convert", "-O", "qcow", "empty.raw", "out.qcow"], tmp_path)
    assert ours[0] == qemu[0] == 1 and ours[2] == qemu[2]
    assert ours[2] == ("PROG: out.qcow: error while converting qcow: Image size is too small, "
                       "cannot be zero length\n")
    assert (tmp_path / "out.qcow").stat().st_size == 0  # qemu's, left behind
    (tmp_path / "out.qcow").unlink()
    assert run_instar("convert", "-O", "qcow", "empty.raw", "out.qcow", cwd=tmp_path).rc == 1
    assert not (tmp_path / "out.qcow").exists()


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("option", ["cluster_size=4k", "table_size=4", "compat=1.1"])
def test_unknown_options_like_qemu(inputs: Path, tmp_path: Path, option: str) -> None:
    args = ["convert", "-O", "qcow", "-o", option, str(inputs / "pattern.raw"), "o.qcow"]
    ours, qemu = both(args, tmp_path)
    assert ours == qemu and ours[0] == 1


@pytest.mark.parametrize("option", ["encryption=on", "encrypt.format=aes", "backing_file=x",
                                    "backing_fmt=raw", "size=1M"])
def test_options_refused(inputs: Path, tmp_path: Path, option: str) -> None:
    key = option.split("=")[0]
    result = run_instar("convert", "-O", "qcow", "-o", option, str(inputs / "pattern.raw"),
                        "o.qcow", cwd=tmp_path)
    assert (result.rc, result.stderr) == (
        1, f"instar: o.qcow: error while converting qcow: the qcow option '{key}' is not "
        "supported yet\n")
    assert list(tmp_path.iterdir()) == []


def test_options_listed(tmp_path: Path) -> None:
    result = run_instar("convert", "-O", "qcow", "-o", "help", "a", "b")
    assert (result.rc, result.stdout) == (0, "Supported qcow options:\n")


def test_declared_size_rounds_to_sectors() -> None:
    assert [FORMAT.declared_size(n) for n in (0, 1, 511, 512, 513, 3000)] == [
        0, 512, 512, 512, 1024, 3072]


def test_past_the_table_limit_refused(tmp_path: Path) -> None:
    """An L1 table over 32 MiB (more than 8 TiB of disk): instar's limit, not
    qemu's; refused before anything is written."""
    huge = tmp_path / "huge.raw"
    with huge.open("wb") as handle:
        handle.truncate(8 * TIB + 2 * MIB)
    result = run_instar("convert", "-O", "qcow", str(huge), "o.qcow", cwd=tmp_path)
    assert (result.rc, result.stderr) == (
        1, f"instar: o.qcow: error while converting qcow: the L1 table of a qcow image of "
        f"{8 * TIB + 2 * MIB} bytes would be over instar's limit of 33554432 bytes\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.raw"]


def test_compressed_entries_as_qemu_lays_them_out(corpus: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """-c: compressed clusters sector-aligned, their sizes exact, under a cluster."""
    out = tmp_path / "c.qcow"
    source = corpus["compressed"].parent / "mixed.raw"
    assert run_instar("convert", "-c", "-O", "qcow", str(source), str(out)).rc == 0
    data = out.read_bytes()
    header = _header(out)
    l1 = struct.unpack(">2Q", data[header.l1_table_offset : header.l1_table_offset + 16])
    entries = struct.unpack(">512Q", data[l1[0] : l1[0] + 4096])
    compressed = [L.compressed_range(e, 12) for e in entries if e & L.COMPRESSED]
    assert compressed and all(host % 512 == 0 and 0 < size < 4096 for host, size in compressed)
