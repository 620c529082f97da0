"""dmg (UDIF) images built here from patterned data, one chunk type after
another, read by instar and by qemu-img side by side: info (human and JSON),
convert -O raw, dd windows, probing by the ``.dmg`` name (and not by
anything else), the XML plist and the resource fork forms.

The layout (hdiutil's): the data fork (each chunk's bytes, one after
another), the chunk table as mish blocks, base64 in the plist's ``<data>``
elements or as resources of a resource fork, then the 512-byte koly trailer.
A mish block: "mish", version, first sector, sector count, data offset,
..., then 40-byte chunk entries (type, comment, sector, sector count, offset,
length) ending with a 0xFFFFFFFF entry.

qemu 7.2 as Debian builds it (this machine's) has neither its dmg-bz2 nor its
dmg-lzfse module: it drops such chunks with a warning and fails to read
them. instar reads bzip2 (as qemu does when built with dmg-bz2): a bzip2
image must read as qemu reads its zlib twin. qemu-img also prints Debian's
"module ... not found" lines at each open of a dmg; the comparisons drop them
(`helpers.Result.normalised_stderr`).
"""

from __future__ import annotations

import base64
import bz2
import dataclasses
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import READ_WINDOWS, assert_same, pattern, qemu_img_ok, run_instar, run_qemu_img

KiB = 1 << 10
SECTOR = 512
TYPES = {"zero": 0, "raw": 1, "ignore": 2, "adc": 0x80000004, "zlib": 0x80000005,
         "bzip2": 0x80000006, "lzfse": 0x80000007, "comment": 0x7FFFFFFE}
LAST = 0xFFFFFFFF
PLIST_HEAD = b"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
\t<key>resource-fork</key>
\t<dict>
\t\t<key>blkx</key>
\t\t<array>
"""
PLIST_TAIL = b"""\t\t</array>
\t</dict>
</dict>
</plist>
"""


@dataclass
class Chunk:
    """One chunk: ``kind`` (a TYPES name), the guest bytes it stands for
    (zeros for zero and ignore chunks: only their length counts), and what
    the file holds for it (None: encoded from ``data`` by its kind)."""

    kind: str
    data: bytes
    stored: bytes | None = None
    sectors: int | None = None  # what the entry says (None: the data's sectors)

    def encoded(self) -> bytes:
        if self.stored is not None:
            return self.stored
        if self.kind == "zlib":
            return zlib.compress(self.data, 9)
        if self.kind == "bzip2":
            return bz2.compress(self.data, 9)
        if self.kind == "raw":
            return self.data
        if self.kind in ("lzfse", "adc"):
            return b"\x5a" * 100  # never decoded by anyone
        return b""


@dataclass
class Dmg:
    """An image of ``partitions`` (each a mish block of chunks, one after
    another in the guest), its table in the plist or a resource fork."""

    partitions: list[list[Chunk]]
    form: str = "plist"  # or "rsrc"
    sectors: int | None = None  # the trailer's sector count (None: every chunk's)
    plist_before: bytes = b""  # text before the first <dict> of the array
    entries: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    # Raw entry changes: (partition, chunk, (type, comment, sector, count, offset, length)).

    def build(self) -> bytes:
        fork = bytearray()
        blocks = []
        first = 0
        for number, chunks in enumerate(self.partitions):
            base = len(fork)  # the mish block's data offset
            entries = []
            sector = 0
            for chunk in chunks:
                stored = chunk.encoded()
                count = chunk.sectors if chunk.sectors is not None else len(chunk.data) // SECTOR
                entries.append((TYPES[chunk.kind], 0, sector, count, len(fork) - base,
                                len(stored)))
                fork += stored
                sector += count
            for partition, index, entry in self.entries:
                if partition == number:
                    entries[index] = entry
            entries.append((LAST, 0, sector, 0, len(fork) - base, 0))
            head = struct.pack(">4sIQQQII", b"mish", 1, first, sector, base, 0, 0)
            head = head.ljust(200, b"\0") + struct.pack(">I", len(entries))
            blocks.append(head + b"".join(struct.pack(">IIQQQQ", *e) for e in entries))
            first += sector
        data_length = len(fork)
        rsrc = xml = (0, 0)
        if self.form == "rsrc":
            resources = b"".join(struct.pack(">I", len(b)) + b for b in blocks)
            fork_start = len(fork)
            fork += struct.pack(">IIII", 256, 256 + len(resources), len(resources), 0)
            fork += bytes(256 - 16) + resources
            rsrc = (fork_start, len(fork) - fork_start)
        else:
            text = PLIST_HEAD + self.plist_before
            for number, block in enumerate(blocks):
                encoded = base64.b64encode(block)
                lines = b"\n".join(b"\t\t\t\t" + encoded[i:i + 44]
                                   for i in range(0, len(encoded), 44))
                text += (b"\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n" + lines
                         + b"\n\t\t\t\t</data>\n\t\t\t\t<key>ID</key>\n\t\t\t\t<string>"
                         + str(number).encode() + b"</string>\n\t\t\t</dict>\n")
            text += PLIST_TAIL
            xml = (len(fork), len(text))
            fork += text
        sectors = first if self.sectors is None else self.sectors
        trailer = bytearray(512)
        struct.pack_into(">4sIII", trailer, 0, b"koly", 4, 512, 1)
        struct.pack_into(">QQQQ", trailer, 0x18, 0, data_length, *rsrc)
        struct.pack_into(">QQ", trailer, 0xD8, *xml)
        struct.pack_into(">Q", trailer, 0x1EC, sectors)
        return bytes(fork + trailer)

    def contents(self) -> bytes:
        """What the disk reads as."""
        data = b"".join(chunk.data if chunk.kind not in ("zero", "ignore") else
                        bytes(len(chunk.data)) for chunks in self.partitions for chunk in chunks)
        size = len(data) if self.sectors is None else self.sectors * SECTOR
        return data[:size].ljust(size, b"\0")


def data(size: int, seed: int) -> bytes:
    return pattern(size, seed=seed)


def every_kind(kind: str) -> list[list[Chunk]]:
    """Partitions with chunks of ``kind`` among raw, zero and ignore ones:
    whole chunks, a one-sector chunk, a 1 MiB chunk (hdiutil's size)."""
    return [
        [Chunk(kind, data(SECTOR, 1))],
        [Chunk(kind, data(64 * KiB, 2)), Chunk("zero", bytes(32 * KiB)),
         Chunk(kind, data(1 << 20, 3)), Chunk("raw", data(3 * SECTOR, 4)),
         Chunk("ignore", bytes(8 * KiB)), Chunk(kind, bytes(16 * KiB))],
        [Chunk("zero", bytes(100 * KiB)), Chunk(kind, data(5 * SECTOR, 5))],
    ]


IMAGES = {
    "zlib.dmg": Dmg(every_kind("zlib")),
    "raw.dmg": Dmg(every_kind("raw")),
    "zero.dmg": Dmg([[Chunk("zero", bytes(1 << 20))], [Chunk("ignore", bytes(3 << 20))]]),
    "zlib-rsrc.dmg": Dmg(every_kind("zlib"), form="rsrc"),
    "raw-rsrc.dmg": Dmg(every_kind("raw"), form="rsrc"),
    "one-sector.dmg": Dmg([[Chunk("raw", data(SECTOR, 9))]]),
    "shorter-than-its-chunks.dmg": Dmg(every_kind("zlib"), sectors=300),
    "comments.dmg": Dmg([[Chunk("zlib", data(4 * KiB, 6)), Chunk("comment", b""),
                          Chunk("raw", data(4 * KiB, 7))]]),
    "no-sectors.dmg": Dmg([[Chunk("raw", b"")]]),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dmg")
    for name, image in IMAGES.items():
        (directory / name).write_bytes(image.build())
    return directory


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_info_matches_qemu(images: Path, name: str) -> None:
    for f in ([], ["-f", "dmg"]):
        for output in ("human", "json"):
            assert_same(["info", *f, f"--output={output}", name], images)
    assert '"format": "dmg"' in run_instar("info", "--output=json", name, cwd=images).stdout


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_contents_match_qemu_and_the_data(images: Path, name: str, tmp_path: Path) -> None:
    for f in ([], ["-f", "dmg"]):
        qemu_img_ok("convert", *f, "-O", "raw", name, str(tmp_path / "q.raw"), cwd=images)
        result = run_instar("convert", *f, "-O", "raw", name, str(tmp_path / "i.raw"), cwd=images)
        assert (result.rc, result.stderr) == (0, "")
        ours = (tmp_path / "i.raw").read_bytes()
        assert ours == (tmp_path / "q.raw").read_bytes() == IMAGES[name].contents()


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", ["zlib.dmg", "raw-rsrc.dmg", "shorter-than-its-chunks.dmg"])
@pytest.mark.parametrize("window", READ_WINDOWS, ids=" ".join)
def test_dd_windows_match_qemu(images: Path, name: str, window: list[str],
                               tmp_path: Path) -> None:
    q = run_qemu_img("dd", f"if={name}", f"of={tmp_path / 'q.raw'}", *window, cwd=images)
    i = run_instar("dd", f"if={name}", f"of={tmp_path / 'i.raw'}", *window, cwd=images)
    assert (i.rc, i.normalised_stderr()) == (q.rc, q.normalised_stderr())
    if q.rc == 0:
        assert (tmp_path / "i.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


@pytest.mark.usefixtures("qemu_img")
def test_probed_by_the_name_only(images: Path, tmp_path: Path) -> None:
    """Without ``.dmg`` a dmg is raw to qemu and to instar; ``-f dmg`` reads
    it whatever its name; ``.dmg`` alone (no more to the name) is not one."""
    image = (images / "zlib.dmg").read_bytes()
    for name in ("disk.img", "disk.DMG", "disk.dmg.bak", ".dmg", "x.dmg"):
        (tmp_path / name).write_bytes(image)
        for f in ([], ["-f", "dmg"]):
            assert_same(["info", "--output=json", *f, name], tmp_path)
            assert_same(["dd", *f, f"if={name}", "of=/dev/null", "count=1"], tmp_path)


def zlib_twin(kind: str) -> Dmg:
    return Dmg([[dataclasses.replace(chunk, kind="zlib" if chunk.kind == kind else chunk.kind)
                 for chunk in part] for part in every_kind(kind)])


@pytest.mark.usefixtures("qemu_img")
def test_bzip2_reads_as_qemu_reads_its_zlib_twin(tmp_path: Path) -> None:
    """qemu reads bzip2 chunks only with its dmg-bz2 module, which this
    machine's qemu lacks (it fails such reads, which the test checks so that
    a qemu that gains the module is compared directly): instar's bzip2 image
    must read as qemu reads the same chunks compressed with zlib."""
    (tmp_path / "b.dmg").write_bytes(Dmg(every_kind("bzip2")).build())
    (tmp_path / "z.dmg").write_bytes(zlib_twin("bzip2").build())
    reference = "z.dmg"
    if run_qemu_img("convert", "-O", "raw", "b.dmg", "q.raw", cwd=tmp_path).rc == 0:
        reference = "b.dmg"
    qemu_img_ok("convert", "-O", "raw", reference, "q.raw", cwd=tmp_path)
    result = run_instar("convert", "-O", "raw", "b.dmg", "i.raw", cwd=tmp_path)
    assert (result.rc, result.stderr) == (0, "")
    assert (tmp_path / "i.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
    ours = run_instar("info", "b.dmg", cwd=tmp_path)
    assert ours.stdout == run_qemu_img("info", "b.dmg", cwd=tmp_path).stdout


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(("kind", "says"), [
    ("lzfse", "is lzfse-compressed, which instar cannot read (qemu reads it only when built "
     "with its dmg-lzfse module)"),
    ("adc", "is ADC-compressed, which instar cannot read (nor can qemu)"),
])
def test_chunks_qemu_cannot_read_are_refused_where_read(kind: str, says: str,
                                                        tmp_path: Path) -> None:
    """qemu drops such chunks at open (a warning) and fails reads of their
    sectors: instar describes the image alike, reads what lies outside them
    as qemu does, and refuses a read of them in one line naming the type."""
    (tmp_path / "x.dmg").write_bytes(Dmg(every_kind(kind)).build())
    assert run_instar("info", "x.dmg", cwd=tmp_path).stdout == run_qemu_img(
        "info", "x.dmg", cwd=tmp_path).stdout
    assert run_qemu_img("convert", "-O", "raw", "x.dmg", "q.raw", cwd=tmp_path).rc == 1
    ours = run_instar("convert", "-O", "raw", "x.dmg", "i.raw", cwd=tmp_path)
    assert ours.rc == 1 and ours.stderr.count("\n") == 1, ours.stderr
    assert "the chunk at guest offset 0x0 " + says in ours.stderr
    assert not (tmp_path / "i.raw").exists()
    # The zero chunk after the first of them (sectors 129 on) reads alike.
    window = ["bs=512", "skip=129", "count=193"]  # count: qemu's absolute end
    q = run_qemu_img("dd", "if=x.dmg", "of=q.raw", *window, cwd=tmp_path)
    i = run_instar("dd", "if=x.dmg", "of=i.raw", *window, cwd=tmp_path)
    assert (q.rc, i.rc) == (0, 0)
    assert (tmp_path / "i.raw").read_bytes() == (tmp_path / "q.raw").read_bytes() == bytes(
        32 * KiB)


def test_a_billion_laughs_plist_is_just_text(tmp_path: Path) -> None:
    """Entities are never expanded: the plist is searched for <data> elements,
    never parsed as XML, as qemu does; a DTD of nested entities costs nothing."""
    laughs = b'<!DOCTYPE lolz [<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, b"&lol%d;" % (i - 1) * 10 if i > 1 else b"&lol;" * 10)
        for i in range(1, 10)) + b"]>\n<lolz>&lol9;</lolz>\n"
    image = Dmg(every_kind("zlib"), plist_before=laughs)
    (tmp_path / "x.dmg").write_bytes(image.build())
    result = run_instar("convert", "-O", "raw", "x.dmg", "x.raw", cwd=tmp_path)
    assert (result.rc, result.stderr) == (0, "")
    assert (tmp_path / "x.raw").read_bytes() == image.contents()
