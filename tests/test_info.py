"""instar info against the real qemu-img info (7.2): byte-identical stdout.

Parity rows run both programs on the same files ("disk size" depends on the
file system, so both read the same file): a corpus of raw, qcow2, vmdk,
vpc and vhdx images made with qemu-img and qemu-io (INFO_IMAGES, built once), in human
and JSON form, with and without --backing-chain. Formats instar cannot read
yet are still covered at the rendering level: their facts (taken from qemu's
own JSON) are rendered by instar.info and must give qemu's exact text.
Adding an image or a format to the parity table is one row in INFO_IMAGES.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import pattern, qemu_img_ok, qemu_io, run_instar, run_qemu_img, write_pieces
from instar.formats.base import FormatDetails, QValue, SnapshotDetails
from instar.info import NodeInfo, full_backing_filename, render_human, render_json
from instar.qobject import qdict_items, to_json
from instar.sizes import size_to_str

# These images name files beside them: instar may open files in their directories.
pytestmark = pytest.mark.usefixtures("allow_own_directories")

Builder = Callable[[Path], None]


_write = write_pieces


def _qemu_img(p: Path, *args: str) -> None:
    """qemu-img ARGS in the image's directory (names stay relative)."""
    qemu_img_ok(*args, cwd=p.parent)


def _new(fmt: str, size: str, *options: str) -> Builder:
    """qemu-img create -f FMT [-o OPTIONS] NAME SIZE."""
    extra = ["-o", ",".join(options)] if options else []
    return lambda p: _qemu_img(p, "create", "-q", "-f", fmt, *extra, p.name, size)


def _then(*steps: Builder) -> Builder:
    """Builders run one after the other on the same path."""
    def run(p: Path) -> None:
        for step in steps:
            step(p)
    return run


def _io(fmt: str, *commands: str) -> Callable[[Path], None]:
    """qemu-io commands on the image (data, compressed clusters, zeros)."""
    def run(p: Path) -> None:
        for command in commands:
            qemu_io(p.name, command, fmt, cwd=p.parent)
    return run


def _convert(source: str, fmt: str, *options: str) -> Builder:
    """qemu-img convert of a raw image of the corpus (built earlier)."""
    extra = ["-o", ",".join(options)] if options else []
    return lambda p: _qemu_img(p, "convert", "-f", "raw", "-O", fmt, *extra, source, p.name)


def _set_bits(offset: int, bits: int) -> Callable[[Path], None]:
    """OR ``bits`` into the byte at ``offset`` (a header flag qemu-img cannot set)."""
    def run(p: Path) -> None:
        with open(p, "r+b") as file:
            file.seek(offset)
            value = file.read(1)[0]
            file.seek(offset)
            file.write(bytes([value | bits]))
    return run


QCOW2_DIRTY_BYTE = 79  # low byte of the big-endian incompatible features
BACKING_FORMAT_EXTENSION = bytes.fromhex("e2792aca")


def _forget_backing_format(p: Path) -> None:
    """Turn the backing format extension into an unknown one, which qemu skips:
    an image naming its backing file without a format (qemu-img 7.2 can no
    longer create one)."""
    data = bytearray(p.read_bytes()[:4096])
    at = data.index(BACKING_FORMAT_EXTENSION)
    with open(p, "r+b") as file:
        file.seek(at)
        file.write(bytes.fromhex("7e570000"))


def _snapshots(p: Path) -> None:
    _qemu_img(p, "snapshot", "-c", "first", p.name)
    qemu_io(p.name, "write -P 0x11 64k 64k", "qcow2", cwd=p.parent)
    _qemu_img(p, "snapshot", "-c", "a rather long snapshot name, longer than the column", p.name)


def _bitmaps(p: Path) -> None:
    _qemu_img(p, "bitmap", "--add", p.name, "enabled")
    _qemu_img(p, "bitmap", "--add", "--disable", "-g", "128k", p.name, "disabled")


_SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")


def _snapshot_entry(l1: tuple[int, int], id_: bytes, name: bytes, vm_state: int,
                    extra: bytes) -> bytes:
    """One snapshot table entry (qcow2.txt), padded to 8 bytes."""
    entry = _SNAPSHOT_ENTRY.pack(l1[0], l1[1], len(id_), len(name), 1_700_000_000, 5,
                                 3_723_456_000_000, vm_state, len(extra)) + extra + id_ + name
    return entry + bytes(-len(entry) % 8)


def _craft_snapshots(p: Path) -> None:
    """A snapshot table qemu-img does not write: no extra data (icount
    absent, 32-bit VM state size), a 64-bit VM state size, an id and a name
    longer than qemu keeps (127 and 255 bytes) with invalid UTF-8, an icount."""
    with open(p, "r+b") as file:
        header = file.read(72)
        l1_size, l1_offset = struct.unpack_from(">IQ", header, 36)
        table = b"".join([
            _snapshot_entry((l1_offset, l1_size), b"1", b"plain", 123, b""),
            _snapshot_entry((l1_offset, l1_size), b"2", b"large", 7,
                            struct.pack(">QQ", 5 << 30, 1 << 20)),
            _snapshot_entry((l1_offset, l1_size), b"x" * 130, b"n\xc3\xa9\xff" + b"y" * 300, 0,
                            struct.pack(">QQQ", 0, 1 << 20, (1 << 64) - 1)),
            _snapshot_entry((l1_offset, l1_size), b"4", "€-icount".encode(), 0,
                            struct.pack(">QQQQ", 0, 1 << 20, 42, 0)),
        ])
        end = file.seek(0, os.SEEK_END)
        offset = -(-end // 65536) * 65536
        file.seek(offset)
        file.write(table)
        file.truncate(offset + 65536)
        file.seek(60)
        file.write(struct.pack(">IQ", 4, offset))


def _bitmaps_in_use(p: Path) -> None:
    """Mark every bitmap "in use" (as a qemu that died while using them would)."""
    data = bytearray(p.read_bytes())
    at = data.index(bytes.fromhex("23852875"))  # the bitmaps header extension
    count, _, size, offset = struct.unpack_from(">IIQQ", data, at + 8)
    position = offset
    for _ in range(count):
        data[position + 15] |= 1  # low byte of the big-endian flags
        extra, name = struct.unpack_from(">I", data, position + 20)[0], struct.unpack_from(
            ">H", data, position + 18)[0]
        position += -(-(24 + extra + name) // 8) * 8
    assert position <= offset + size
    p.write_bytes(bytes(data))


# name -> how to make it, in order (later rows may use earlier files). One row
# per image; a new format is a new row.
INFO_IMAGES: dict[str, Builder] = {
    "empty.raw": lambda p: _write(p, []),
    "one.raw": lambda p: _write(p, [(0, b"\x01")]),
    "k1000.raw": lambda p: _write(p, [(0, pattern(1000))]),
    "hole1000.raw": lambda p: _write(p, [], 1000),
    "mib.raw": lambda p: _write(p, [(0, pattern(1 << 20))]),
    "mib-plus-one.raw": lambda p: _write(p, [(0, pattern((1 << 20) + 1))]),
    "sparse.raw": lambda p: _write(p, [(70_000, pattern(5000)), (9 << 20, b"\x07")], 12_345_679),
    "created.raw": lambda p: qemu_img_ok("create", "-q", "-f", "raw", str(p), "3M"),
    # qcow2: versions, cluster sizes, compression, extended L2, refcount widths
    "v3.qcow2": _new("qcow2", "1M"),
    "v2.qcow2": _then(_new("qcow2", "1M", "compat=0.10"), _io("qcow2", "write -P 1 0 100k")),
    "c512.qcow2": _then(_new("qcow2", "1M", "cluster_size=512"),
                        _io("qcow2", "write -P 2 1000 3000")),
    "c2m.qcow2": _then(_new("qcow2", "5M", "cluster_size=2M"), _io("qcow2", "write -z 2M 2M")),
    "zlib.qcow2": _then(_new("qcow2", "1M", "compression_type=zlib"),
                        _io("qcow2", "write -c -P 3 0 64k")),
    "zstd.qcow2": _then(_new("qcow2", "1M", "compression_type=zstd"),
                        _io("qcow2", "write -c -P 4 64k 64k")),
    "extl2.qcow2": _then(_new("qcow2", "3M", "extended_l2=on"),
                         _io("qcow2", "write -P 5 4k 4k")),
    "lazy.qcow2": _new("qcow2", "1M", "lazy_refcounts=on"),
    "rc1.qcow2": _new("qcow2", "1M", "refcount_bits=1"),
    "rc64.qcow2": _new("qcow2", "1M", "refcount_bits=64"),
    "odd.qcow2": _new("qcow2", "1000001"),
    "empty.qcow2": _new("qcow2", "0"),
    "dirty.qcow2": _then(_new("qcow2", "1M", "lazy_refcounts=on"),
                         _set_bits(QCOW2_DIRTY_BYTE, 1)),
    "corrupt.qcow2": _then(_new("qcow2", "1M"), _set_bits(QCOW2_DIRTY_BYTE, 2)),
    "snapshots.qcow2": _then(_new("qcow2", "1M"), _snapshots),
    "bitmaps.qcow2": _then(_new("qcow2", "1M"), _bitmaps),
    "bitmaps-in-use.qcow2": _then(_new("qcow2", "1M"), _bitmaps, _bitmaps_in_use),
    "crafted-snapshots.qcow2": _then(_new("qcow2", "1M"), _craft_snapshots),
    "v2-snapshot.qcow2": _then(_new("qcow2", "1M", "compat=0.10"), _snapshots),
    "data-file.qcow2": _then(_new("qcow2", "1M", "data_file=data-file.bin"),
                             _io("qcow2", "write -P 6 0 512k")),
    "data-raw.qcow2": _new("qcow2", "1M", "data_file=data-raw.bin,data_file_raw=on"),
    # backing files: a 3-deep chain, a missing format, a missing backing file
    "base.raw": lambda p: _write(p, [(0, pattern(1 << 20))]),
    "mid.qcow2": _new("qcow2", "1M", "backing_file=base.raw,backing_fmt=raw"),
    "top.qcow2": _then(_new("qcow2", "2M", "backing_file=mid.qcow2,backing_fmt=qcow2"),
                       _snapshots),
    "v2-child.qcow2": _new("qcow2", "1M", "compat=0.10,backing_file=base.raw,backing_fmt=raw"),
    "no-backing-format.qcow2": _then(
        _new("qcow2", "1M", "backing_file=mid.qcow2,backing_fmt=qcow2"), _forget_backing_format
    ),
    # vmdk: every subformat qemu-img creates, and a child
    "sparse.vmdk": _then(_new("vmdk", "1M"), _io("vmdk", "write -P 7 0 100k")),
    "zeroed.vmdk": _then(_new("vmdk", "1M", "zeroed_grain=on"),
                         _io("vmdk", "write -z 0 64k")),
    "compat6.vmdk": _new("vmdk", "1000k", "compat6=on,adapter_type=lsilogic"),
    "stream.vmdk": _convert("mib.raw", "vmdk", "subformat=streamOptimized"),
    "flat.vmdk": _new("vmdk", "1M", "subformat=monolithicFlat"),
    "split-sparse.vmdk": _new("vmdk", "3G", "subformat=twoGbMaxExtentSparse"),
    "split-flat.vmdk": _new("vmdk", "2049M", "subformat=twoGbMaxExtentFlat"),
    "odd.vmdk": _new("vmdk", "1000001"),
    "child.vmdk": _then(_new("vmdk", "1000k", "backing_file=compat6.vmdk,backing_fmt=vmdk"),
                        _io("vmdk", "write -P 8 64k 4k")),
    "grandchild.vmdk": _new("vmdk", "1000k", "backing_file=child.vmdk,backing_fmt=vmdk"),
    "over-vmdk.qcow2": _new("qcow2", "1M", "backing_file=child.vmdk,backing_fmt=vmdk"),
    "missing-backing.qcow2": _then(
        lambda p: _write(p.parent / "gone.raw", [], 1 << 20),
        _new("qcow2", "1M", "backing_file=gone.raw,backing_fmt=raw"),
        lambda p: (p.parent / "gone.raw").unlink(),
    ),
    # vpc: dynamic, fixed (which probes as raw), force_size, odd and empty sizes
    "dynamic.vhd": _then(_new("vpc", "5M"), _io("vpc", "write -P 9 3M 1k")),
    "fixed.vhd": _new("vpc", "1M", "subformat=fixed"),
    "force.vhd": _new("vpc", "1000001", "force_size=on"),
    "force-fixed.vhd": _new("vpc", "3M", "subformat=fixed,force_size=on"),
    "odd.vhd": _new("vpc", "1000001"),
    "empty.vhd": _new("vpc", "0"),
    "converted.vhd": _convert("sparse.raw", "vpc"),
    # vhdx: cluster_size is the block size (fixed images too), nothing format-specific
    "dynamic.vhdx": _new("vhdx", "5M"),
    "fixed.vhdx": _new("vhdx", "3M", "subformat=fixed"),
    "b1m.vhdx": _new("vhdx", "5M", "block_size=1M"),
    "b32m.vhdx": _new("vhdx", "5M", "block_size=32M"),
    "odd.vhdx": _new("vhdx", "1000001"),
    "empty.vhdx": _new("vhdx", "0", "block_size=1M"),  # 64 MiB of BAT with the default
    "written.vhdx": _then(_new("vhdx", "8M"), _io("vhdx", "write -P 0x5a 1M 64k")),
    "zeroed.vhdx": _then(_new("vhdx", "4M", "block_size=1M"),
                         _io("vhdx", "write -P 10 0 2M", "write -z 1M 1M")),
    "converted.vhdx": _convert("sparse.raw", "vhdx"),
    "converted-fixed.vhdx": _convert("mib-plus-one.raw", "vhdx", "subformat=fixed"),
}

# Images whose backing chain qemu-img cannot open (so --backing-chain fails).
FAILING_CHAINS = {"missing-backing.qcow2"}

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
    assert qemu.rc == 0 or name in FAILING_CHAINS, qemu.stderr
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        qemu.rc, qemu.stdout, qemu.normalised_stderr()
    )


# Explicit formats: a fixed VHD is read as vpc only with -f vpc.
FORMAT_ROWS: list[tuple[str, str]] = [
    ("fixed.vhd", "vpc"), ("force-fixed.vhd", "vpc"), ("dynamic.vhd", "vpc"),
    ("v3.qcow2", "qcow2"), ("top.qcow2", "qcow2"), ("sparse.vmdk", "vmdk"),
    ("split-flat.vmdk", "vmdk"), ("stream.vmdk", "raw"), ("flat-flat.vmdk", "raw"),
    ("fixed.vhdx", "vhdx"), ("zeroed.vhdx", "vhdx"), ("converted.vhdx", "raw"),
]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("options", [[], ["--output=json", "--backing-chain"]],
                         ids=["human", "json-chain"])
@pytest.mark.parametrize(("name", "fmt"), FORMAT_ROWS, ids=[f"{n}-{f}" for n, f in FORMAT_ROWS])
def test_info_with_format_matches_qemu(name: str, fmt: str, options: list[str],
                                       images: Path) -> None:
    qemu = run_qemu_img("info", "-f", fmt, *options, name, cwd=images)
    ours = run_instar("info", "-f", fmt, *options, name, cwd=images)
    assert qemu.rc == 0, qemu.stderr
    assert (ours.rc, ours.stdout, ours.stderr) == (qemu.rc, qemu.stdout, qemu.stderr)


def _nested_corpus(directory: Path) -> None:
    """A chain, a data file and split extents in a directory named with a space."""
    directory.mkdir()
    for name in ("base.raw", "mid.qcow2", "top.qcow2", "data-file.qcow2", "split-flat.vmdk",
                 "compat6.vmdk", "child.vmdk"):
        INFO_IMAGES[name](directory / name)


@pytest.mark.usefixtures("qemu_img")
def test_info_absolute_and_nested_paths(tmp_path: Path) -> None:
    """Names of backing files and extents as qemu makes them: relative to the
    image as named, text only (``./d/../d//x`` keeps its slashes)."""
    nested = tmp_path / "sub dir"
    _nested_corpus(nested)
    _write(nested / "x.raw", [(0, b"\x02" * 4096)])
    prefixes = (f"{nested}/", "sub dir/", "./sub dir/../sub dir//")
    for prefix in prefixes:
        for name in ("x.raw", "top.qcow2", "data-file.qcow2", "split-flat.vmdk", "child.vmdk"):
            for options in ([], ["--output=json"], ["--backing-chain"]):
                qemu = run_qemu_img("info", *options, prefix + name, cwd=tmp_path)
                ours = run_instar("info", *options, prefix + name, cwd=tmp_path)
                assert qemu.rc == 0, qemu.stderr
                assert (ours.rc, ours.stdout) == (qemu.rc, qemu.stdout), prefix + name


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
    ["-f", "qcow2", "one.raw"],
    ["-f", "vpc", "one.raw"],
    ["-f", "vpc", "empty.raw"],
    ["-f", "vmdk", "empty.raw"],
    ["-f", "qcow2", "sparse.vmdk"],
    ["-f", "vpc", "v3.qcow2"],
    ["-f", "vhdx", "one.raw"],
    ["-f", "vhdx", "dynamic.vhd"],
    ["-f", "qcow2", "dynamic.vhdx"],
    ["--backing-chain", "missing-backing.qcow2"],
    ["split-sparse-s001.vmdk"],
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
    result = run_instar("info", "-f", "luks", "one.raw", cwd=images)
    assert result.rc == 1 and result.stdout == ""
    assert "luks" in result.stderr


def test_wrong_vmdk_is_refused(images: Path) -> None:
    """qemu says only "invalid VMDK image descriptor"; instar names the line."""
    result = run_instar("info", "-f", "vmdk", "one.raw", cwd=images)
    assert result.rc == 1 and result.stdout == ""
    assert result.stderr.startswith(
        "instar: Could not open 'one.raw': invalid VMDK image descriptor"
    )


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


def test_qemu8_lists_extent_and_data_files(images: Path) -> None:
    """Files under an image are child nodes, the last attached first."""
    split = run_instar("info", "--qemu-version", "8", "split-sparse.vmdk", cwd=images).stdout
    assert [line for line in split.splitlines() if line.startswith("Child node")] == [
        "Child node '/extents.1':", "Child node '/extents.0':", "Child node '/file':"
    ]
    assert "    filename: split-sparse-s002.vmdk\n    protocol type: file\n" in split
    data = run_instar("info", "--qemu-version=8", "--output=json", "data-file.qcow2", cwd=images)
    children = json.loads(data.stdout)["children"]
    assert [(c["name"], c["info"]["filename"]) for c in children] == [
        ("data-file", "data-file.bin"), ("file", "data-file.qcow2")
    ]
