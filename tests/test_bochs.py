"""Bochs growing redologs, built here with struct from patterned data, read by
instar and by qemu-img side by side: info (human and JSON), convert -O raw,
dd windows, probing with and without -f, and qemu's header checks with
qemu's messages.

The layout (Bochs' redolog, little-endian): a 512-byte header (names,
version, header size, catalog entries, bitmap size, extent size, disk
size), the catalog (an extent index per entry, 0xFFFFFFFF unallocated),
then each allocated extent: its sector bitmap (least significant bit
first), padded to sectors, then its sectors."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import READ_WINDOWS, assert_same, pattern, qemu_img_ok, run_instar, run_qemu_img

KiB = 1 << 10
SECTOR = 512
UNALLOCATED = 0xFFFFFFFF


@dataclass
class Bochs:
    """A growing redolog: ``stored`` maps guest sectors to their 512 bytes;
    extents are allocated in the order of ``order`` (extent numbers) then of
    their first stored sector. Fields left None are what bximage writes."""

    disk: int
    extent: int = 4 * KiB
    bitmap: int = 512
    stored: dict[int, bytes] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    version: int = 2
    catalog: int | None = None
    header_size: int = 512
    entries: dict[int, int] = field(default_factory=dict)  # catalog entries forced
    cut: int | None = None  # truncate the file there

    def catalog_entries(self) -> int:
        return self.catalog if self.catalog is not None else -(-self.disk // self.extent)

    def header(self) -> bytes:
        data = b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0")
        data += b"Growing".ljust(16, b"\0")
        data += struct.pack("<IIIII", self.version << 16, self.header_size,
                            self.catalog_entries(), self.bitmap, self.extent)
        if self.version == 1:
            data += struct.pack("<Q", self.disk)
        else:
            data += struct.pack("<IQ", 0, self.disk)
        return data.ljust(512, b"\0")

    def build(self) -> bytes:
        per_extent = self.extent // SECTOR
        extents = list(self.order)
        for sector in sorted(self.stored):
            if sector // per_extent not in extents:
                extents.append(sector // per_extent)
        catalog = [UNALLOCATED] * self.catalog_entries()
        for number, extent in enumerate(extents):
            catalog[extent] = number
        for index, value in self.entries.items():
            catalog[index] = value
        catalog_bytes = struct.pack(f"<{len(catalog)}I", *catalog)
        bitmap_blocks = -(-self.bitmap // SECTOR)
        span = SECTOR * (bitmap_blocks + per_extent)
        data_offset = self.header_size + 4 * len(catalog)
        image = bytearray(self.header())
        image[len(image):] = bytes(max(0, self.header_size - len(image)))
        image[self.header_size : self.header_size + len(catalog_bytes)] = catalog_bytes
        for number, extent in enumerate(extents):
            at = data_offset + number * span
            bits = 0
            for sector, content in self.stored.items():
                if sector // per_extent == extent:
                    bits |= 1 << (sector % per_extent)
                    where = at + SECTOR * (bitmap_blocks + sector % per_extent)
                    image[len(image):] = bytes(max(0, where + SECTOR - len(image)))
                    image[where : where + SECTOR] = content
            mask = bits.to_bytes(-(-per_extent // 8), "little")
            image[len(image):] = bytes(max(0, at + len(mask) - len(image)))
            image[at : at + len(mask)] = mask
        if self.cut is not None:
            del image[self.cut:]
        return bytes(image)

    def contents(self) -> bytes:
        """What the disk reads as: stored sectors, zeros elsewhere."""
        data = bytearray(self.disk // SECTOR * SECTOR)
        for sector, content in self.stored.items():
            data[sector * SECTOR : (sector + 1) * SECTOR] = content
        return bytes(data)


def sectors(first: int, count: int, seed: int) -> dict[int, bytes]:
    block = pattern(count * SECTOR, seed=seed)
    return {first + i: block[i * SECTOR : (i + 1) * SECTOR] for i in range(count)}


IMAGES = {
    # Whole extents, a partly stored extent, extents stored out of order.
    "mixed.bochs": Bochs(1 << 20, stored={**sectors(0, 16, 1), **sectors(100, 3, 2),
                                          **sectors(1500, 40, 3), 2047: pattern(512, 4)},
                         order=[150]),
    "sparse-bitmap.bochs": Bochs(256 * KiB, extent=32 * KiB, bitmap=8,
                                 stored={s: pattern(512, s) for s in range(0, 512, 3)}),
    "version-1.bochs": Bochs(512 * KiB, version=1, stored=sectors(17, 200, 5)),
    "odd-disk.bochs": Bochs(300 * KiB + 700, stored=sectors(590, 10, 6)),
    "big-extent.bochs": Bochs(16 << 20, extent=8 << 20, bitmap=2048,
                              stored={**sectors(5, 9, 7), **sectors(20000, 4, 8)}),
    "empty.bochs": Bochs(2 << 20),
    "zero-size.bochs": Bochs(0),
    "spare-catalog.bochs": Bochs(64 * KiB, catalog=100, stored=sectors(3, 2, 9),
                                 entries={90: 0x7FFFFFFF}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bochs")
    for name, image in IMAGES.items():
        (directory / name).write_bytes(image.build())
    return directory


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_info_matches_qemu(images: Path, name: str) -> None:
    for f in ([], ["-f", "bochs"]):
        for output in ("human", "json"):
            assert_same(["info", *f, f"--output={output}", name], images)
    assert '"format": "bochs"' in run_instar("info", "--output=json", name, cwd=images).stdout


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_contents_match_qemu_and_the_data(images: Path, name: str, tmp_path: Path) -> None:
    for f in ([], ["-f", "bochs"]):
        qemu_img_ok("convert", *f, "-O", "raw", name, str(tmp_path / "q.raw"), cwd=images)
        result = run_instar("convert", *f, "-O", "raw", name, str(tmp_path / "i.raw"), cwd=images)
        assert (result.rc, result.stderr) == (0, "")
        ours = (tmp_path / "i.raw").read_bytes()
        assert ours == (tmp_path / "q.raw").read_bytes() == IMAGES[name].contents()


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


def test_extents_never_read_unstored_sectors(images: Path) -> None:
    """The mapping tells stored sectors from the rest: the copy engine skips them."""
    import instar

    with instar.open_image(str(images / "mixed.bochs")) as image:
        kinds = [(e.offset, e.length, e.kind.value) for e in image.extents(0, 64 * KiB)]
    assert kinds == [(0, 8 * KiB, "data"), (8 * KiB, 100 * SECTOR - 8 * KiB, "zero"),
                     (100 * SECTOR, 3 * SECTOR, "data"), (103 * SECTOR, 64 * KiB - 103 * SECTOR,
                                                          "zero")]


BASE = Bochs(1 << 20, stored=sectors(0, 8, 11))


def header_case(**fields: object) -> bytes:
    return dataclasses.replace(BASE, **fields).build()  # type: ignore[arg-type]


def poked(at: int, data: bytes) -> bytes:
    image = bytearray(BASE.build())
    image[at : at + len(data)] = data
    return bytes(image)


HEADER_CASES = {
    "catalog-too-large": header_case(catalog=0x100001),
    "extent-256": poked(80, struct.pack("<I", 256)),
    "extent-not-power-of-two": poked(80, struct.pack("<I", 3 * KiB)),
    "extent-16M": poked(80, struct.pack("<I", 16 << 20)),
    "extent-zero": poked(80, struct.pack("<I", 0)),
    "catalog-too-small": header_case(catalog=10),
    "version-3": poked(64, struct.pack("<I", 3 << 16)),
    "subtype-undoable": poked(48, b"Undoable\0"),
    "magic-not-terminated": poked(22, b"!"),
    "disk-not-a-sector-multiple": header_case(disk=(1 << 20) - 100),
    "header-is-short": BASE.build()[:300],
}


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("name", sorted(HEADER_CASES))
def test_header_checks_are_qemus(name: str, tmp_path: Path) -> None:
    """What qemu refuses at open, instar refuses with qemu's words (probed, or
    with ``-f bochs``); what it opens, instar describes alike."""
    (tmp_path / "x.bochs").write_bytes(HEADER_CASES[name])
    for f in ([], ["-f", "bochs"]):
        assert_same(["info", *f, "x.bochs"], tmp_path)


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(("name", "image", "says", "qemu_reads"), [
    ("catalog-past-EOF", BASE.build()[:600], "the catalog (256 entries at offset 512) lies "
     "beyond the end of the file", True),
    ("extent-past-EOF", header_case(entries={0: 5000}), "catalog entry 0 points beyond the end "
     "of the file", True),
    ("extent-named-twice", header_case(entries={1: 0}), "is mapped by two guest ranges, at "
     "guest offsets 0x0 and 0x1000", True),
    ("extent-over-the-header", header_case(disk=64 * KiB, header_size=256),
     "is also the image header", True),
])
def test_bad_catalogs_are_refused_where_qemu_reads(name: str, image: bytes, says: str,
                                                   qemu_reads: bool, tmp_path: Path) -> None:
    """qemu reads these (zeros past the end of the file, one extent twice);
    instar refuses to read them, in one line, and info describes them as qemu's."""
    (tmp_path / "x.bochs").write_bytes(image)
    q = run_qemu_img("convert", "-O", "raw", "x.bochs", "q.raw", cwd=tmp_path)
    assert (q.rc == 0) == qemu_reads, q.stderr
    ours = run_instar("convert", "-O", "raw", "x.bochs", "i.raw", cwd=tmp_path)
    assert ours.rc == 1 and says in ours.stderr and ours.stderr.count("\n") == 1, ours.stderr
    assert not (tmp_path / "i.raw").exists()
    assert_same(["info", "x.bochs"], tmp_path)
