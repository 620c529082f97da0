"""``instar check`` of VDI and Parallels images against the real ``qemu-img check`` 7.2.

Every image is made by qemu-img and qemu-io, then (for the damaged ones)
edited in place: block map or catalog entries, header fields, the file cut
or extended. instar and qemu-img check the same file from the same
directory and must agree on the exit status, stdout (human and JSON) and
stderr after the program name (`test_check.same`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import qemu_img_ok, qemu_io, run_instar, run_qemu_img, unpack_sample_image
from instar import check_image
from instar.findings import CORRUPTION, LEAK, MAX_FINDINGS
from instar.formats.parallels import layout as parallels_layout
from instar.formats.vdi import layout as vdi_layout
from test_check import both_outputs, same

MiB = 1 << 20
Build = Callable[[Path], str]

pytestmark = pytest.mark.usefixtures("qemu_img")


def _put(path: Path, offset: int, value: int, fmt: str = "<I") -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(struct.pack(fmt, value))


def _get(path: Path, offset: int, fmt: str = "<I") -> int:
    with open(path, "rb") as file:
        file.seek(offset)
        value: int = struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]
        return value


def _resize(path: Path, change: Callable[[int], int]) -> None:
    with open(path, "r+b") as file:
        file.truncate(change(file.seek(0, 2)))


def _named(build: Build, name: str) -> Build:
    build.__name__ = name
    return build


def _cases(builds: list[Build]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("build", builds, ids=[b.__name__ for b in builds])


# --------------------------------------------------------------------------
# VDI


def vdi(size: str, static: bool = False, writes: tuple[str, ...] = ()) -> Build:
    """A VDI image qemu-img makes, then qemu-io's writes (in this order)."""
    def build(tmp: Path) -> str:
        options = ["-o", "static=on"] if static else []
        qemu_img_ok("create", "-q", "-f", "vdi", *options, str(tmp / "v.vdi"), size)
        for command in writes:
            qemu_io(tmp / "v.vdi", command, "vdi")
        return "v.vdi"
    return _named(build, f"vdi {size}{' static' if static else ''}{' data' if writes else ''}")


SCATTERED = tuple(f"write -P {n + 1} {at}M 4k"
                  for n, at in enumerate((39000, 5, 33000, 32767, 32768, 3, 20, 1, 40959)))

VDI_CLEAN: list[Build] = [
    vdi("0"), vdi("1M"), vdi("10M"), vdi("10M", static=True),
    vdi("10M", writes=("write -P 0x11 3M 1M", "write -P 0x22 0 512", "write -P 3 9M 64k")),
    vdi("33M", static=True, writes=("write -P 5 31M 2M",)),
    vdi("40G", static=True), vdi("40G", writes=SCATTERED),
]


@_cases(VDI_CLEAN)
def test_clean_vdi_like_qemu(build: Build, tmp_path: Path) -> None:
    name = build(tmp_path)
    assert both_outputs(tmp_path, name, "vdi") == 0
    same(tmp_path, "-q", name)


def _vdi_header(path: Path) -> vdi_layout.Header:
    return vdi_layout.Header.parse(path.read_bytes()[:512])


def _vdi_rewrite(path: Path, **fields: int) -> None:
    header = _vdi_header(path)._replace(**fields)
    with open(path, "r+b") as file:
        file.write(header.pack())


def _bmap_slot(path: Path, index: int) -> int:
    return _vdi_header(path).offset_bmap + 4 * index


def vdi_poked(change: Callable[[Path], None], base: Build | None = None) -> Build:
    """A builder: qemu's image (10 MiB, four blocks written), then ``change``."""
    made = base or vdi("10M", writes=("write -P 0x11 3M 1M", "write -P 0x22 0 512",
                                      "write -P 3 9M 64k", "write -P 4 6M 4k"))

    def build(tmp: Path) -> str:
        name = made(tmp)
        change(tmp / name)
        return name
    return _named(build, change.__name__)


def _set_entry(index: int, value: int | Callable[[Path], int]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        _put(path, _bmap_slot(path, index), value(path) if callable(value) else value)
    return change


def vdi_entry_too_large(path: Path) -> None:
    """Entries past the blocks of the image: "block index I too large"."""
    _set_entry(1, lambda p: _vdi_header(p).blocks_in_image)(path)
    _set_entry(7, 0xFFFFFFFD)(path)  # the largest value that is not DISCARDED


def vdi_two_entries_one_block(path: Path) -> None:
    _set_entry(5, lambda p: _get(p, _bmap_slot(p, 3)))(path)
    _set_entry(8, lambda p: _get(p, _bmap_slot(p, 3)))(path)


def vdi_discarded_entry(path: Path) -> None:
    """DISCARDED is not allocated: the count disagrees with the header."""
    _set_entry(0, vdi_layout.DISCARDED)(path)


def vdi_allocated_count_high(path: Path) -> None:
    _vdi_rewrite(path, blocks_allocated=_vdi_header(path).blocks_allocated + 3)


def vdi_allocated_count_low(path: Path) -> None:
    _vdi_rewrite(path, blocks_allocated=1)


def vdi_map_longer_than_the_disk(path: Path) -> None:
    """blocks_in_image past the disk: qemu reads the map on into the data."""
    _vdi_rewrite(path, blocks_in_image=4096)


def vdi_cut_in_the_map(path: Path) -> None:
    """The map cut short: qemu reads zeros past the end of the file (block 0
    named again and again); instar's check does too, its reads refuse."""
    _resize(path, lambda size: _vdi_header(path).offset_bmap + 10)


def vdi_cut_in_the_last_block(path: Path) -> None:
    """qemu checks no block against the end of the file: no errors."""
    _resize(path, lambda size: size - 4096)


def vdi_extended(path: Path) -> None:
    _resize(path, lambda size: size + 3 * MiB + 100)


def vdi_differencing(path: Path) -> None:
    """A differencing image: qemu checks its map as a dynamic one's (instar
    refuses to read one without its parent, but checks it as qemu does)."""
    _vdi_rewrite(path, image_type=vdi_layout.TYPE_DIFFERENCING)
    _set_entry(2, 1)(path)


def vdi_static_block_named_twice(path: Path) -> None:
    _set_entry(6, 2)(path)


def vdi_scattered_pages_damaged(path: Path) -> None:
    """A map of two pages of entries: a block of the first page named again
    in the second, one too large there too."""
    _set_entry(40000, lambda p: _get(p, _bmap_slot(p, 5)))(path)
    _set_entry(33001, 41000)(path)


VDI_DAMAGED: list[Build] = [
    *(vdi_poked(change) for change in (
        vdi_entry_too_large, vdi_two_entries_one_block, vdi_discarded_entry,
        vdi_allocated_count_high, vdi_allocated_count_low, vdi_map_longer_than_the_disk,
        vdi_cut_in_the_map, vdi_cut_in_the_last_block, vdi_extended, vdi_differencing)),
    vdi_poked(vdi_static_block_named_twice, vdi("10M", static=True)),
    vdi_poked(vdi_scattered_pages_damaged, vdi("40G", writes=SCATTERED)),
]


@_cases(VDI_DAMAGED)
def test_damaged_vdi_like_qemu(build: Build, tmp_path: Path) -> None:
    name = build(tmp_path)
    expected = 0 if build.__name__ in ("vdi_cut_in_the_last_block", "vdi_extended") else 2
    assert both_outputs(tmp_path, name, "vdi") == expected
    same(tmp_path, "-q", name)


def test_vdi_lines_past_the_limit_are_counted_not_kept(tmp_path: Path) -> None:
    """A map of 1M entries in a file of 2 MiB: past its end they read as
    zeros, each naming block 0 again, one line each from qemu. instar keeps
    the first MAX_FINDINGS lines, counts the others, and says so."""
    name = vdi_poked(lambda path: _vdi_rewrite(path, blocks_in_image=1 << 20))(tmp_path)
    ours = run_instar("check", name, cwd=tmp_path)
    theirs = run_qemu_img("check", name, cwd=tmp_path)
    qemu_lines = theirs.stderr.splitlines()
    assert len(qemu_lines) > MAX_FINDINGS + 1000
    assert (ours.rc, ours.stdout) == (theirs.rc, theirs.stdout) == (2, theirs.stdout)
    assert ours.stderr.splitlines() == [
        *qemu_lines[:MAX_FINDINGS],
        f"instar: {len(qemu_lines) - MAX_FINDINGS} more lines like these were not kept "
        f"(instar keeps the first {MAX_FINDINGS})",
    ]


# --------------------------------------------------------------------------
# Parallels


def parallels(size: str, cluster: str | None = None, writes: tuple[str, ...] = ()) -> Build:
    """A Parallels image qemu-img makes, then qemu-io's writes (in this order)."""
    def build(tmp: Path) -> str:
        options = ["-o", f"cluster_size={cluster}"] if cluster else []
        qemu_img_ok("create", "-q", "-f", "parallels", *options, str(tmp / "p.img"), size)
        for command in writes:
            qemu_io(tmp / "p.img", command, "parallels")
        return "p.img"
    return _named(build, f"parallels {size}{f' {cluster}' if cluster else ''}"
                  f"{' data' if writes else ''}")


WRITES = ("write -P 1 3M 1M", "write -P 2 0 512", "write -P 3 7M 100k", "write -P 4 1M 4k")
ACROSS_CHUNKS = tuple(f"write -P {n + 1} {at}M 4k" for n, at in enumerate(
    (65535, 65536, 70000, 65537, 1, 0, 65534, 102399, 2)))

PARALLELS_CLEAN: list[Build] = [
    parallels("0"), parallels("10M"), parallels("10M", writes=WRITES),
    parallels("100M", "64k"), parallels("100M", "64k", writes=WRITES),
    parallels("100M", "4k"),  # qemu: the catalog's clusters leak from creation
    parallels("100M", "4k", writes=("write -P 5 50M 64k", "write -P 6 1M 8k")),
    parallels("100G", writes=ACROSS_CHUNKS),  # 102400 entries: the counts across chunks
    # A catalog of 33 MiB, over the 32 MiB instar's reads hold: checked all the same.
    parallels("33G", "4k", writes=("write -P 7 32G 8k", "write -P 8 0 4k")),
]


@_cases(PARALLELS_CLEAN)
def test_clean_parallels_like_qemu(build: Build, tmp_path: Path) -> None:
    name = build(tmp_path)
    assert both_outputs(tmp_path, name, "parallels") in (0, 3)
    same(tmp_path, "-q", name)


def _catalog_slot(index: int) -> int:
    return parallels_layout.HEADER_SIZE + 4 * index


def _parallels_header(path: Path) -> parallels_layout.Header:
    return parallels_layout.Header.parse(path.read_bytes()[:parallels_layout.HEADER_SIZE])


def _parallels_rewrite(path: Path, **fields: int) -> None:
    header = _parallels_header(path)._replace(**fields)
    with open(path, "r+b") as file:
        file.write(header.pack())


def parallels_poked(change: Callable[[Path], None], base: Build | None = None) -> Build:
    """A builder: qemu's image (10 MiB of 1 MiB clusters, four written), then ``change``."""
    made = base or parallels("10M", writes=WRITES)

    def build(tmp: Path) -> str:
        name = made(tmp)
        change(tmp / name)
        return name
    return _named(build, change.__name__)


def _entry(index: int, value: int | Callable[[Path], int]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        _put(path, _catalog_slot(index), value(path) if callable(value) else value)
    return change


def _clusters(path: Path) -> int:
    """The file's length in clusters of a version 2 image: the entry just past it."""
    return path.stat().st_size // (_parallels_header(path).tracks * 512)


def parallels_cluster_past_eof(path: Path) -> None:
    _entry(1, 100)(path)
    _entry(9, lambda p: _clusters(p) + 1)(path)


def parallels_cluster_at_eof(path: Path) -> None:
    """A cluster starting exactly at the end of the file: qemu finds no error."""
    _entry(1, _clusters)(path)


def parallels_entries_near_2_to_the_32(path: Path) -> None:
    _entry(1, 0xFFFFFFFE)(path)
    _entry(2, 0xFFFFFFFF)(path)
    _entry(4, 0xFFFFFFFF)(path)


def parallels_two_entries_one_cluster(path: Path) -> None:
    """qemu 7.2 does not look for entries naming one cluster: no error."""
    _entry(5, lambda p: _get(p, _catalog_slot(0)))(path)


def parallels_fragmented(path: Path) -> None:
    """Entries in an order the clusters do not follow in the file."""
    _entry(4, lambda p: _get(p, _catalog_slot(0)) + 1)(path)
    _entry(5, lambda p: _get(p, _catalog_slot(3)))(path)
    _entry(6, lambda p: _get(p, _catalog_slot(3)) + 1)(path)


def parallels_not_closed(path: Path) -> None:
    """The "inuse" mark: "image was not closed correctly"."""
    _parallels_rewrite(path, inuse=parallels_layout.INUSE_MAGIC)


def parallels_cut_before_the_last_cluster(path: Path) -> None:
    _resize(path, lambda size: MiB)


def parallels_cut_in_a_sector(path: Path) -> None:
    _resize(path, lambda size: 3 * MiB - 100)


def parallels_extended_by_clusters(path: Path) -> None:
    _resize(path, lambda size: size + 3 * MiB)


def parallels_extended_into_a_sector(path: Path) -> None:
    """qemu takes the file's length in whole sectors: 1000 bytes leak 1024."""
    _resize(path, lambda size: size + 1000)


def parallels_catalog_past_the_disk(path: Path) -> None:
    """More catalog entries than the disk has clusters: qemu counts them all,
    reading the rest of the first cluster (zeros), then the first data
    cluster's bytes as entries (each outside the image)."""
    _parallels_rewrite(path, catalog_entries=(MiB - 64) // 4 + 20_000)


def parallels_v1_damaged(path: Path) -> None:
    """Version 1 entries count sectors: one past the end, one out of order,
    and the inuse mark."""
    _entry(5, 0x100)(path)
    _entry(6, 0x180)(path)
    _entry(9, 0x281)(path)
    _entry(10, 0x5000)(path)
    _parallels_rewrite(path, inuse=parallels_layout.INUSE_MAGIC)


def _sample(name: str) -> Build:
    def build(tmp: Path) -> str:
        unpack_sample_image(name, tmp)
        return name
    return _named(build, name)


PARALLELS_DAMAGED: list[Build] = [
    *(parallels_poked(change) for change in (
        parallels_cluster_past_eof, parallels_cluster_at_eof, parallels_entries_near_2_to_the_32,
        parallels_two_entries_one_cluster, parallels_fragmented, parallels_not_closed,
        parallels_cut_before_the_last_cluster, parallels_cut_in_a_sector,
        parallels_extended_by_clusters, parallels_extended_into_a_sector,
        parallels_catalog_past_the_disk)),
    parallels_poked(parallels_v1_damaged, _sample("parallels-v1")),
    parallels_poked(lambda path: _entry(65536, 500)(path), parallels("100G", writes=ACROSS_CHUNKS)),
]


@_cases(PARALLELS_DAMAGED)
def test_damaged_parallels_like_qemu(build: Build, tmp_path: Path) -> None:
    name = build(tmp_path)
    both_outputs(tmp_path, name, "parallels")
    same(tmp_path, "-q", name)


# --------------------------------------------------------------------------
# the findings as data


def test_vdi_result_is_data(tmp_path: Path) -> None:
    name = vdi_poked(vdi_two_entries_one_block)(tmp_path)
    _set_entry(1, 1 << 20)(tmp_path / name)
    result = check_image(str(tmp_path / name))
    assert result.format == "vdi" and result.exit_code == 2
    assert [f.code for f in result.of_kind(CORRUPTION)] == [
        "block-index-too-large", "block-used-twice", "block-used-twice",
        "allocated-count-mismatch"]
    assert (result.corruptions, result.total_clusters, result.image_end_offset) == (4, 0, 0)


def test_parallels_result_is_data(tmp_path: Path) -> None:
    name = parallels_poked(parallels_not_closed)(tmp_path)
    _entry(8, 1000)(tmp_path / name)
    _resize(tmp_path / name, lambda size: 2000 * MiB)
    result = check_image(str(tmp_path / name))
    assert result.format == "parallels" and result.exit_code == 2
    assert [(f.kind, f.code) for f in result.findings] == [
        (CORRUPTION, "image-not-closed"), (LEAK, "leaked-space")]
    assert (result.corruptions, result.leaks, result.allocated_clusters,
            result.total_clusters, result.image_end_offset) == (1, 999, 5, 10, 1001 * MiB)


def test_add_each_makes_only_the_lines_it_keeps() -> None:
    """A run of lines: all counted, only those kept (up to MAX_FINDINGS) made."""
    from instar.findings import CheckResult

    result, made = CheckResult(), []

    def message(i: int) -> str:
        made.append(i)
        return f"line {i}"

    result.add_each(CORRUPTION, "code", MAX_FINDINGS - 2, message)
    result.add_each(LEAK, "code", 5, message)
    assert (result.corruptions, result.leaks, result.findings_dropped) == (MAX_FINDINGS - 2, 5, 3)
    assert len(made) == len(result.findings) == MAX_FINDINGS
    assert result.findings[-1].kind == LEAK and result.exit_code == 2
