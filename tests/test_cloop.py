"""cloop images, built here with struct and zlib from patterned data, read by
instar and by qemu-img side by side: info (human and JSON), convert -O raw,
dd windows, probing with and without -f, and qemu's header checks with
qemu's messages. The layout (create_compressed_fs's V2.0): a 128-byte shell
script, the block size and count (big-endian), ``n + 1`` big-endian offsets,
then each block as a zlib stream."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from helpers import READ_WINDOWS, assert_same, pattern, qemu_img_ok, run_instar, run_qemu_img

MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
HEADER = 128
KiB = 1 << 10


def cloop_bytes(data: bytes, block_size: int, *, blocks: int | None = None,
                offsets: list[int] | None = None, streams: list[bytes] | None = None) -> bytes:
    """A cloop image of ``data`` (the last block padded with zeros) in blocks of
    ``block_size``; ``blocks``, ``offsets`` or ``streams`` replace what the
    header, the table or the blocks would say (to damage an image)."""
    count = -(-len(data) // block_size)
    if streams is None:
        streams = [zlib.compress(data[i * block_size:(i + 1) * block_size].ljust(block_size, b"\0"),
                                 9) for i in range(count)]
    if offsets is None:
        offsets = [HEADER + 8 + (len(streams) + 1) * 8]
        for stream in streams:
            offsets.append(offsets[-1] + len(stream))
    header = MAGIC.ljust(HEADER, b"\0") + struct.pack(">II", block_size,
                                                      count if blocks is None else blocks)
    return header + struct.pack(f">{len(offsets)}Q", *offsets) + b"".join(streams)


def patterned(size: int, seed: int) -> bytes:
    """Patterned bytes with a stretch of zeros in the middle."""
    data = bytearray(pattern(size, seed=seed))
    data[size // 3 : size // 2] = bytes(size // 2 - size // 3)
    return bytes(data)


IMAGES = {
    "64k-blocks.cloop": (patterned(1 << 20, 1), 64 * KiB),
    "512-byte-blocks.cloop": (patterned(40 * KiB, 2), 512),
    "ragged-end.cloop": (patterned(300 * KiB + 1536, 3), 128 * KiB),
    "one-block.cloop": (patterned(4 * KiB, 4), 256 * KiB),
    "empty.cloop": (b"", 64 * KiB),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cloop")
    for name, (data, block_size) in IMAGES.items():
        (directory / name).write_bytes(cloop_bytes(data, block_size))
    return directory


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_info_matches_qemu(images: Path, name: str) -> None:
    for f in ([], ["-f", "cloop"]):
        for output in ("human", "json"):
            assert_same(["info", *f, f"--output={output}", name], images)
    info = run_instar("info", "--output=json", name, cwd=images)
    assert '"format": "cloop"' in info.stdout


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_contents_match_qemu_and_the_data(images: Path, name: str, tmp_path: Path) -> None:
    data, block_size = IMAGES[name]
    padded = data.ljust(-(-len(data) // block_size) * block_size, b"\0")
    for f in ([], ["-f", "cloop"]):
        qemu_img_ok("convert", *f, "-O", "raw", name, str(tmp_path / "q.raw"), cwd=images)
        result = run_instar("convert", *f, "-O", "raw", name, str(tmp_path / "i.raw"), cwd=images)
        assert (result.rc, result.stderr) == (0, "")
        assert (tmp_path / "i.raw").read_bytes() == (tmp_path / "q.raw").read_bytes() == padded


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("window", READ_WINDOWS, ids=" ".join)
def test_dd_windows_match_qemu(images: Path, name: str, window: list[str],
                               tmp_path: Path) -> None:
    q = run_qemu_img("dd", f"if={name}", f"of={tmp_path / 'q.raw'}", *window, cwd=images)
    i = run_instar("dd", f"if={name}", f"of={tmp_path / 'i.raw'}", *window, cwd=images)
    assert (i.rc, i.normalised_stderr()) == (q.rc, q.normalised_stderr())
    if q.rc == 0:
        assert (tmp_path / "i.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_compare_with_its_raw_contents(images: Path, tmp_path: Path) -> None:
    data, _ = IMAGES["64k-blocks.cloop"]
    (tmp_path / "c.raw").write_bytes(data)
    result = run_instar("compare", str(images / "64k-blocks.cloop"), str(tmp_path / "c.raw"))
    assert (result.rc, result.stdout) == (0, "Images are identical.\n")


DATA = patterned(256 * KiB, 5)


def damaged(**changes: object) -> bytes:
    return cloop_bytes(DATA, 64 * KiB, **changes)  # type: ignore[arg-type]


def with_field(at: int, value: int) -> bytes:
    image = bytearray(damaged())
    image[at : at + 4] = struct.pack(">I", value)
    return bytes(image)


HEADER_CASES = {
    "block-size-odd": with_field(128, 1000),
    "block-size-zero": with_field(128, 0),
    "block-size-128M": with_field(128, 128 << 20),
    "too-many-blocks": with_field(132, 0x20000000),
    "offsets-size-wraps": with_field(132, 536870911),
    "too-many-offsets": with_field(132, 0x4000000),
    "offsets-decrease": damaged(offsets=[176, 1000, 900, 2000, 3000]),
    "block-over-128M": damaged(offsets=[176, 1000, 1000 + (129 << 20), 2000, 3000]),
    "only-the-script": MAGIC,
    "table-cut-short": damaged()[:150],  # the rest reads as zeros: no longer increasing
}


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(HEADER_CASES))
def test_header_checks_are_qemus(name: str, tmp_path: Path) -> None:
    """What qemu refuses at open, instar refuses with qemu's words; what it
    opens, instar opens and describes alike."""
    (tmp_path / "x.cloop").write_bytes(HEADER_CASES[name])
    theirs = run_qemu_img("info", "x.cloop", cwd=tmp_path)
    ours = run_instar("info", "x.cloop", cwd=tmp_path)
    assert (ours.rc, ours.stdout, ours.normalised_stderr()) == (
        theirs.rc, theirs.stdout, theirs.normalised_stderr())


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(("name", "image", "says"), [
    ("bomb", damaged(streams=[zlib.compress(bytes(1 << 20))] * 4),
     "inflates to more than 65536 bytes"),
    ("short-block", damaged(streams=[zlib.compress(bytes(1000))] * 4),
     "inflates to 1000 bytes, not a whole block"),
    ("table-cut", damaged()[:136], "lies beyond the end of the file"),
    ("block-cut", damaged()[:-100], "ends inside its zlib stream"),
    ("block-is-the-table", damaged(offsets=[136, 1000, 2000, 3000, 4000]),
     "is also the offsets table"),
])
def test_bad_blocks_are_refused_as_qemu_refuses_them(name: str, image: bytes, says: str,
                                                      tmp_path: Path) -> None:
    """qemu opens these and fails to read them (an I/O error); instar says why,
    in one line, and info describes the image as qemu's does."""
    (tmp_path / "x.cloop").write_bytes(image)
    assert run_qemu_img("convert", "-O", "raw", "x.cloop", "q.raw", cwd=tmp_path).rc == 1
    ours = run_instar("convert", "-O", "raw", "x.cloop", "i.raw", cwd=tmp_path)
    assert ours.rc == 1 and says in ours.stderr and ours.stderr.count("\n") == 1
    assert not (tmp_path / "i.raw").exists()
    assert_same(["info", "x.cloop"], tmp_path)
