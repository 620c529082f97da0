"""QED: the reader and the writer against qemu-img 7.2 and qemu-io.

Reader: images qemu-img and qemu-io make (converted, written with zero
clusters, small and large clusters and tables, odd and empty sizes, the
need-check feature set, backing chains over raw, qcow2 and qed) are copied
by ``instar dd`` and ``qemu-img dd`` over the same windows and compared byte
for byte, as are ``convert -O raw``, ``info`` (human, JSON, backing chain),
``map``, ``check`` (damaged copies too), ``compare`` and probing. Writer:
``dd -O qed`` over the window matrix and ``convert -O qed`` with qemu's
options, against the same runs of qemu-img: same status and messages, same
virtual size, the same bytes read back, and ``qemu-img check`` clean.
Damaged images are rows of tests/test_conformance.py and hostile ones
classes of tests/hostile_corpus.py.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from corpus_parity import ReadParity
from helpers import (
    DD_INPUTS,
    DD_WINDOWS,
    assert_option_refused_like_qemu,
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
from instar.formats.qed import FORMAT
from instar.formats.qed import layout as L

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

KIB, MIB = 1 << 10, 1 << 20


# --- the corpus ------------------------------------------------------------------------------


def _create(directory: Path, name: str, size: str, *args: str) -> Path:
    qemu_img_ok("create", "-q", "-f", "qed", *args, name, size, cwd=directory)
    return directory / name


def _write(path: Path, *commands: str) -> None:
    for command in commands:
        qemu_io(path, command, "qed", cwd=path.parent)


def _set_features(path: Path, features: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(16)
        handle.write(struct.pack("<Q", features))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu-made images, each named as the tests name it (relative to its directory)."""
    directory = tmp_path_factory.mktemp("qed-corpus")
    images: dict[str, Path] = {}
    raw = bytearray(pattern(3 * MIB + 1000, seed=5))
    raw[MIB + 4321 : 2 * MIB + 99] = bytes(MIB + 99 - 4321)
    (directory / "patterned.raw").write_bytes(bytes(raw))
    qemu_img_ok("convert", "-O", "qed", "patterned.raw", "converted.qed", cwd=directory)
    images["converted"] = directory / "converted.qed"
    written = _create(directory, "written.qed", "5M")
    _write(written, "write -P 0x11 0 100k", "write -z 200k 300k", "write -P 0x22 1M 64k",
           "write -z 2M 1M", "write -P 0x33 4000k 1k", "write -P 0x34 5119k 1k")
    images["written"] = written
    small = _create(directory, "small.qed", "9M", "-o", "cluster_size=4k,table_size=2")
    _write(small, "write -P 0x41 0 5k", "write -P 0x42 4092k 8k", "write -z 5M 12k",
           "write -P 0x43 9212k 4k")  # L2 tables of 4 MiB: data across their ends
    images["small"] = small
    large = _create(directory, "large.qed", "9M", "-o", "cluster_size=2M,table_size=8")
    _write(large, "write -P 0x51 1M 3M", "write -P 0x52 8M 512")
    images["large"] = large
    odd = _create(directory, "odd.qed", "1000000")
    _write(odd, "write -P 0x61 976k 512", "write -P 0x62 3k 1k")
    images["odd"] = odd
    images["empty"] = _create(directory, "empty.qed", "0")
    need_check = directory / "need-check.qed"
    shutil.copyfile(written, need_check)
    _set_features(need_check, L.FEATURE_NEED_CHECK)
    images["need-check"] = need_check
    # Backing chains: over raw (the format fixed as raw), qcow2 and qed; shorter backing files.
    (directory / "base.raw").write_bytes(pattern(2 * MIB, seed=7))
    over_raw = _create(directory, "over-raw.qed", "3M", "-b", "base.raw", "-F", "raw")
    _write(over_raw, "write -P 0x71 64k 64k", "write -z 1M 64k", "write -P 0x72 2500k 4k")
    images["over-raw"] = over_raw
    qemu_img_ok("convert", "-O", "qcow2", "base.raw", "base.qcow2", cwd=directory)
    qemu_io(directory / "base.qcow2", "write -z 128k 64k", "qcow2")
    over_qcow2 = _create(directory, "over-qcow2.qed", "3M", "-b", "base.qcow2", "-F", "qcow2")
    _write(over_qcow2, "write -P 0x81 0 4k", "write -z 512k 64k", "write -P 0x82 2M 1M")
    images["over-qcow2"] = over_qcow2
    over_qed = _create(directory, "over-qed.qed", "4M", "-b", "over-qcow2.qed", "-F", "qed")
    _write(over_qed, "write -P 0x91 1M 4k", "write -z 2M 64k", "write -P 0x92 3M 8k")
    images["over-qed"] = over_qed
    return images


NAMES = ["converted", "written", "small", "large", "odd", "empty", "need-check", "over-raw",
         "over-qcow2", "over-qed"]


class TestQedReadParity(ReadParity):
    fmt = "qed"
    corpus_names = NAMES


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(("name", "fmt"), [("converted", "qcow2"), ("converted", "qcow"),
                                           ("converted", "vpc"), ("base.qcow2", "qed"),
                                           ("patterned.raw", "qed")])
def test_wrong_format_named_like_qemu(corpus: dict[str, Path], name: str, fmt: str) -> None:
    """-f naming the wrong driver: each driver's own refusal, as qemu words it."""
    directory = corpus["converted"].parent
    image = corpus[name].name if name in corpus else name
    ours, qemu = both(["info", "-f", fmt, image], directory)
    assert ours == qemu
    assert ours[0] == 1


def test_extents_read_only_metadata(corpus: dict[str, Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Extents come from the tables: no data cluster is read, zero clusters are ZERO."""
    with open_image(corpus["written"]) as image:
        list(image.extents(0, image.virtual_size))  # tables loaded, the metadata claimed
        reads: list[tuple[int, int]] = []
        real = os.pread

        def counting(fd: int, length: int, offset: int) -> bytes:
            reads.append((offset, length))
            return real(fd, length, offset)

        monkeypatch.setattr(os, "pread", counting)
        kinds = [(e.offset, e.length, e.kind.value) for e in image.extents(0, image.virtual_size)]
    assert reads == []
    assert (256 * KIB, 192 * KIB, "zero") in kinds and (2 * MIB, MIB, "zero") in kinds
    assert kinds[0] == (0, 128 * KIB, "data")  # 100k written: the whole 64 KiB clusters


@pytest.mark.usefixtures("qemu_img")
def test_backing_file_needs_its_directory_allowed(corpus: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy applies to a QED backing file: refused unless allowed; info
    still names it without opening it. (The output is a file: qemu-img and
    instar both refuse a character device such as /dev/null as dd's output.)"""
    monkeypatch.delenv("INSTAR_ALLOW")
    image = corpus["over-qcow2"]
    out = tmp_path / "out.raw"
    result = run_instar("dd", f"if={image.name}", f"of={out}", cwd=image.parent)
    assert result.rc == 1
    assert result.stderr == ("instar: backing file 'base.qcow2' is outside the allowed "
                             "directories (none); use --allow DIR to permit it\n")
    assert not out.exists()
    info = run_instar("info", image.name, cwd=image.parent)
    assert info.rc == 0 and "backing file: base.qcow2\n" in info.stdout
    allowed = run_instar("dd", "--allow", ".", f"if={image.name}", f"of={out}",
                         cwd=image.parent)
    assert allowed.rc == 0, allowed.stderr
    assert out.read_bytes() == qemu_read_raw(image, tmp_path)


# --- check ---------------------------------------------------------------------------------------


def _entry_at(path: Path, table: int, index: int) -> int:
    """Where entry ``index`` of the L1 table (``table`` 0) or of the first L2 table lies."""
    data = path.read_bytes()
    l1 = struct.unpack("<Q", data[40:48])[0]
    if table == 0:
        return l1 + 8 * index
    return struct.unpack("<Q", data[l1 : l1 + 8])[0] + 8 * index


def _entry(path: Path, table: int, index: int) -> int:
    at = _entry_at(path, table, index)
    value: int = struct.unpack("<Q", path.read_bytes()[at : at + 8])[0]
    return value


def _poke(path: Path, at: int, value: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(at)
        handle.write(struct.pack("<Q", value))


def _damage(kind: str, path: Path) -> None:
    """One kind of damage qemu-img check counts, done to a copy of "written"."""
    first_cluster, first_table = _entry(path, 1, 0), _entry(path, 0, 0)
    damage = {
        "two-entries-one-cluster": (1, 5, first_cluster),
        "cluster-past-eof": (1, 6, 1 << 40),
        "cluster-unaligned": (1, 7, first_cluster + 512),
        "cluster-is-the-l1-table": (1, 8, 64 * KIB),
        "l2-table-past-eof": (0, 3, 1 << 40),
        "l2-table-named-twice": (0, 1, first_table),
        "l1-entry-of-1": (0, 2, 1),
        # The L1 table is checked whole, as qemu does, not only as far as the disk goes.
        "entry-in-the-l1-table-past-the-disk": (0, 1000, 1 << 40),
    }
    if kind == "leaked-clusters":
        os.truncate(path, path.stat().st_size + 3 * 64 * KIB)
    else:
        table, index, value = damage[kind]
        _poke(path, _entry_at(path, table, index), value)


DAMAGE = ["leaked-clusters", "two-entries-one-cluster", "cluster-past-eof", "cluster-unaligned",
          "cluster-is-the-l1-table", "l2-table-past-eof", "l2-table-named-twice",
          "l1-entry-of-1", "entry-in-the-l1-table-past-the-disk"]
CHECK_ARGS = [[], ["--output=json"]]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", CHECK_ARGS, ids=lambda a: " ".join(a) or "human")
@pytest.mark.parametrize("name", NAMES)
def test_check_matches_qemu(corpus: dict[str, Path], name: str, args: list[str]) -> None:
    image = corpus[name]
    ours, qemu = both(["check", *args, image.name], image.parent)
    assert ours == qemu


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", CHECK_ARGS, ids=lambda a: " ".join(a) or "human")
@pytest.mark.parametrize("kind", DAMAGE)
def test_check_counts_damage_as_qemu(corpus: dict[str, Path], tmp_path: Path, kind: str,
                                     args: list[str]) -> None:
    """Corruptions (each bad offset, each second reference) and leaks, as
    qemu-img check counts them (it prints no line of its own)."""
    image = tmp_path / "d.qed"
    shutil.copyfile(corpus["written"], image)
    _damage(kind, image)
    ours, qemu = both(["check", *args, "d.qed"], tmp_path)
    assert ours == qemu
    assert ours[0] in (2, 3)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("cluster", ["4k", "64k"])
def test_check_numbers_clusters_as_qemu(tmp_path: Path, cluster: str) -> None:
    """Files past C - 1 clusters (16 MiB of 4 KiB clusters), where qemu's
    cluster numbers drift (it divides by the cluster size less one), with a
    leak and a cluster named twice: qemu's counts."""
    image = _create(tmp_path, "big.qed", "64M", "-o", f"cluster_size={cluster}")
    _write(image, "write -P 0x21 0 24M", "write -P 0x22 40M 1M")
    os.truncate(image, image.stat().st_size + 8 * KIB)
    _poke(image, _entry_at(image, 1, 9), _entry(image, 1, 1))
    for args in CHECK_ARGS:
        ours, qemu = both(["check", *args, "big.qed"], tmp_path)
        assert ours == qemu
        assert ours[0] == 2


# --- the writer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dd_inputs(tmp_path_factory.mktemp("qed-writer-inputs"))


def check_clean(image: Path) -> None:
    """qemu-img check finds no errors and no leaked clusters."""
    result = run_qemu_img("check", "-f", "qed", str(image))
    assert result.rc == 0, result.stdout + result.stderr
    assert "No errors were found on the image." in result.stdout, result.stdout
    assert "leaked" not in result.stdout


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("window", DD_WINDOWS, ids=lambda w: " ".join(w) or "whole")
@pytest.mark.parametrize("name", DD_INPUTS)
def test_dd_window_matches_qemu(inputs: Path, tmp_path: Path, name: str,
                                window: list[str]) -> None:
    source = f"if={inputs / name}"
    ours, theirs = tmp_path / "i.qed", tmp_path / "q.qed"
    result = run_instar("dd", "-O", "qed", *window, source, f"of={ours}", cwd=tmp_path)
    qemu = run_qemu_img("dd", "-O", "qed", *window, source, f"of={theirs}", cwd=tmp_path)
    assert (result.rc, result.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert result.rc == 0
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"]
    check_clean(ours)
    assert run_instar("check", str(ours)).stdout.startswith("No errors were found on the image.")
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)


CONFIGS = ["", "cluster_size=4k", "table_size=16", "cluster_size=2M,table_size=8",
           "table_size=2", "cluster_size=4k,table_size=2"]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: o or "default")
@pytest.mark.parametrize("name", ["pattern.raw", "hole.qcow2"])
def test_convert_matches_qemu(inputs: Path, tmp_path: Path, name: str, options: str) -> None:
    """convert -O qed with qemu's options: the header qemu writes, the same
    size and bytes, check clean, and the file no longer than it needs."""
    extra = ["-o", options] if options else []
    ours, theirs = tmp_path / "i.qed", tmp_path / "q.qed"
    assert run_instar("convert", "-O", "qed", *extra, str(inputs / name), str(ours)).rc == 0
    qemu_img_ok("convert", "-O", "qed", *extra, str(inputs / name), str(theirs))
    mine, qemus = (L.Header.parse(path.read_bytes()[:64]) for path in (ours, theirs))
    assert mine == qemus
    check_clean(ours)
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)
    assert ours.stat().st_size <= theirs.stat().st_size


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", ["written", "over-qed", "small", "empty"])
@pytest.mark.parametrize("target", ["qed", "qcow2", "vpc"])
def test_convert_from_qed(corpus: dict[str, Path], tmp_path: Path, name: str,
                          target: str) -> None:
    """qed to qed, qcow2 and vpc: what qemu reads of instar's output equals the source."""
    image = corpus[name]
    out = tmp_path / f"out.{target}"
    result = run_instar("convert", "-O", target, image.name, str(out), cwd=image.parent)
    assert result.rc == 0, result.stderr
    compare = run_qemu_img("compare", "-F", target, image.name, str(out), cwd=image.parent)
    assert compare.rc == 0, compare.stdout + compare.stderr
    if target == "qed":
        check_clean(out)


@pytest.mark.usefixtures("qemu_img")
def test_empty_image_as_qemu_writes_it(inputs: Path, tmp_path: Path) -> None:
    """dd count=0: a size-0 image of a header and an L1 table, as qemu's."""
    ours, theirs = tmp_path / "i.qed", tmp_path / "q.qed"
    assert run_instar("dd", "-O", "qed", "count=0", f"if={inputs / 'pattern.raw'}",
                      f"of={ours}").rc == 0
    qemu_img_ok("dd", "-O", "qed", "count=0", f"if={inputs / 'pattern.raw'}", f"of={theirs}")
    assert ours.read_bytes() == theirs.read_bytes()
    check_clean(ours)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("option", [
    "cluster_size=2048", "cluster_size=3000", "cluster_size=128M", "cluster_size=64M",
    "table_size=3", "table_size=32", "table_size=0", "table_size=4294967296", "table_size=2k",
    "table_size=4.0", "table_size=9223372036854775808", "table_size=-1", "table_size=1",
    "cluster_size=4k,table_size=1", "cluster_size=foo", "size=1M", "backing_fmt=raw",
])
def test_bad_options_refused_like_qemu(inputs: Path, tmp_path: Path, option: str) -> None:
    """qemu's refusals word for word (a table of one cluster: created, then
    unopenable), nothing left behind."""
    if option in ("size=1M", "backing_fmt=raw"):  # qemu takes these; instar refuses them
        result = run_instar("convert", "-O", "qed", "-o", option,
                            str(inputs / "pattern.raw"), str(tmp_path / "o.qed"))
        key = option.split("=")[0]
        assert (result.rc, result.stderr) == (1, f"instar: {tmp_path / 'o.qed'}: error while "
                                              f"converting qed: the qed option '{key}' is not "
                                              "supported yet\n")
        assert list(tmp_path.iterdir()) == []
        return
    assert_option_refused_like_qemu("qed", option, inputs / "pattern.raw", tmp_path)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("option", ["table_size=0x4", "table_size= 4", "table_size=010",
                                    "table_size=4294967300", "cluster_size=4294971392"])
def test_option_spellings_as_qemu_reads_them(inputs: Path, tmp_path: Path, option: str) -> None:
    """Hex and octal table sizes, and values qemu cuts to 32 bits: the header
    qemu writes. A cluster size past 2^32 leaves the L1 table where the
    whole number says (4 GiB on), and the gap is leaked, in qemu's image too."""
    ours, theirs = tmp_path / "i.qed", tmp_path / "q.qed"
    source = inputs / "hole.qcow2"
    assert run_instar("convert", "-O", "qed", "-o", option, str(source), str(ours)).rc == 0
    qemu_img_ok("convert", "-O", "qed", "-o", option, str(source), str(theirs))
    assert ours.read_bytes()[:64] == theirs.read_bytes()[:64]
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)
    if not option.startswith("cluster_size"):
        check_clean(ours)
        return
    mine, qemus = (run_qemu_img("check", str(path)) for path in (ours, theirs))
    assert mine.rc == qemus.rc == 3
    assert mine.stdout.splitlines()[:2] == qemus.stdout.splitlines()[:2]
    assert "1048832 leaked clusters were found on the image." in mine.stdout


def test_compression_refused(qemu_img: str, inputs: Path, tmp_path: Path) -> None:
    args = ["convert", "-c", "-O", "qed", str(inputs / "pattern.raw"), str(tmp_path / "o.qed")]
    ours, qemu = run_instar(*args), run_qemu_img(*args)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert ours.stderr == "instar: Compression not supported for this file format\n"


def test_declared_size_rounds_to_sectors() -> None:
    assert [FORMAT.declared_size(n) for n in (0, 1, 511, 512, 513, 3000)] == [
        0, 512, 512, 512, 1024, 3072]


def test_largest_image_is_written(qemu_img: str, tmp_path: Path) -> None:
    """256 GiB, qemu's largest with 4 KiB clusters and tables of 16: a full
    L1 table, nothing else; with tables of 8, qemu's refusal."""
    huge = tmp_path / "huge.raw"
    with huge.open("wb") as handle:
        handle.truncate(256 << 30)
    ours = tmp_path / "i.qed"
    options = ["-o", "cluster_size=4k,table_size=16"]
    assert run_instar("dd", "-O", "qed", *options, "bs=4M", f"if={huge}", f"of={ours}").rc == 0
    assert qemu_info(ours)["virtual-size"] == 256 << 30
    assert ours.stat().st_size == 17 * 4 * KIB
    check_clean(ours)
    options = ["-o", "cluster_size=4k,table_size=8"]
    args = ["convert", "-O", "qed", *options, str(huge), str(tmp_path / "o.qed")]
    too_big, qemu = run_instar(*args), run_qemu_img(*args)
    assert (too_big.rc, too_big.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert "less than 68719476736 bytes" in too_big.stderr
