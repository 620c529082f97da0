"""qcow2 (versions 2 and 3): the mapping function of the read core.

`Qcow2Driver.map` answers as qemu's ``qcow2_co_block_status``: runs of
clusters (or subclusters) of one type, host-contiguous where they have a host
offset, never across an L2 table; compressed clusters one by one; a range of
unallocated L2 tables in one run. `instar.image.BlockImage` reads, falls
through to the backing file and walks extents on those answers. Every value
read from the image is checked before use: a malformed image raises
FormatError.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

from instar.errors import FormatError, UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.common import DEFLATE, ZSTD, TableCache, inflate
from instar.formats.qcow2 import layout as L
from instar.image import COMPRESSED, DATA, OFFSET_VALID, ZERO, Driver, Image, Run
from instar.safety import MAX_HEADER_EXTENSION_BYTES, MAX_METADATA_CACHE_BYTES, MAX_TABLE_BYTES

MAX_REFTABLE_BYTES = 8 << 20  # qemu's QCOW_MAX_REFTABLE_SIZE

# qemu's subcluster types, and what block status says of each.
_NORMAL, _ZERO_ALLOC, _UNALLOC_ALLOC, _ZERO_PLAIN, _UNALLOC_PLAIN, _COMPRESSED = range(6)
_FLAGS = (
    DATA | OFFSET_VALID,  # normal: stored here
    ZERO | OFFSET_VALID,  # zero, with a cluster allocated
    OFFSET_VALID,  # allocated cluster, unallocated subcluster: the backing file answers
    ZERO,
    0,  # unallocated: the backing file answers
    DATA | COMPRESSED,
)
_HOSTED = (True, True, True, False, False, False)  # runs must be host-contiguous

_L1_BLOCK = 8192  # L1 entries tested for zero at once
_ZERO_L1_BLOCK = bytes(8 * _L1_BLOCK)

# A cluster as (first subcluster, count, type) pieces, for the common cases.
Pieces = tuple[tuple[int, int, int], ...]


def _be_u64_array(data: bytes) -> array[int]:
    """Big-endian u64 table bytes as native integers."""
    table = array("Q", data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


class Qcow2Driver(Driver):
    """A qcow2 image's own layer: L1 in memory, L2 tables through a cache."""

    def __init__(
        self,
        file: InputFile,
        header: L.Header,
        l1: array[int],
        data_file: InputFile | None,
        extensions: L.Extensions | None = None,
        backing_name: str | None = None,
    ) -> None:
        self.file = file
        self.name = file.name
        self.header = header
        # What the header says beyond the mapping, for instar info.
        self.extensions = extensions if extensions is not None else L.Extensions()
        self.backing_name = backing_name
        self.data_file = data_file
        self.backing_image: Image | None = None
        self._l1 = l1
        self._host = data_file if data_file is not None else file
        self._bits = header.cluster_bits
        self._cluster = header.cluster_size
        self._extended = header.extended_l2
        self._l2_entries = L.l2_entries(self._bits, self._extended)
        self._l2_span = self._l2_entries << self._bits
        self._subclusters = L.SUBCLUSTERS if self._extended else 1
        self._tables: TableCache[array[int]] = TableCache(
            self._load_l2, MAX_METADATA_CACHE_BYTES // self._cluster
        )
        # qemu sees whole sectors: a size that is no multiple of 512 is rounded down.
        self.virtual_size = header.size // L.SECTOR * L.SECTOR
        whole = self._subclusters
        self._whole = {kind: ((0, whole, kind),) for kind in range(6)}

    @property
    def backing(self) -> Image | None:
        return self.backing_image

    # --- the mapping function ----------------------------------------------------

    def map(self, offset: int, length: int) -> Iterator[Run]:
        end = offset + length
        span = self._l2_span
        position = offset
        while position < end:
            l1_index = position // span
            stop = min(end, (l1_index + 1) * span)
            if self._l1[l1_index] & L.L1E_OFFSET_MASK == 0:
                # qemu answers one L2 table's range at a time: pieces of ``span``.
                stop = min(end, self._next_allocated_table(l1_index + 1) * span)
                yield Run(position, stop, 0, step=span, anchor=l1_index * span)
            else:
                yield from self._table_runs(self._tables.get(l1_index), l1_index, position, stop)
            position = stop

    def _next_allocated_table(self, index: int) -> int:
        """The first L1 index from ``index`` on with an L2 table (or the L1's
        end). Empty stretches are skipped a block of entries at a time with a
        memcmp: an empty 2 PiB image has 4 million of them."""
        l1, size = self._l1, len(self._l1)
        while index < size:
            stop = min(size, (index // _L1_BLOCK + 1) * _L1_BLOCK)
            if not _ZERO_L1_BLOCK.startswith(l1[index:stop].tobytes()):
                for position in range(index, stop):
                    if l1[position] & L.L1E_OFFSET_MASK:
                        return position
            index = stop
        return size

    def _load_l2(self, l1_index: int) -> array[int]:
        offset = self._l1[l1_index] & L.L1E_OFFSET_MASK
        if offset & (self._cluster - 1):
            raise FormatError(f"L2 table offset {offset:#x} unaligned (L1 index {l1_index:#x})")
        return _be_u64_array(self.file.pread_exact(offset, self._cluster, "L2 table"))

    def _table_runs(
        self, table: array[int], l1_index: int, position: int, stop: int
    ) -> Iterator[Run]:
        """The runs of ``[position, stop)``, inside one L2 table's range."""
        bits, cluster = self._bits, self._cluster
        piece = cluster >> (self._subclusters.bit_length() - 1)
        base = l1_index * self._l2_entries
        pending: Run | None = None
        pending_kind = -1
        while position < stop:
            cluster_start = position & ~(cluster - 1)
            host, pieces = self._cluster_pieces(table, (position >> bits) - base, cluster_start)
            for first, count, kind in pieces:
                run_start = max(position, cluster_start + first * piece)
                run_end = min(stop, cluster_start + (first + count) * piece)
                if run_end <= run_start:
                    continue
                within = run_start - cluster_start
                if kind == _COMPRESSED:
                    if pending is not None:
                        yield pending
                        pending = None
                    yield Run(run_start, run_end, _FLAGS[kind], self.file, within, host)
                    continue
                hosted = _HOSTED[kind]
                at = host + within if hosted else 0
                if (
                    pending is not None
                    and pending_kind == kind
                    and (not hosted or pending.host + (run_start - pending.start) == at)
                ):
                    pending = pending._replace(end=run_end)
                else:
                    if pending is not None:
                        yield pending
                    pending = Run(run_start, run_end, _FLAGS[kind],
                                  self._host if hosted else None, at)
                    pending_kind = kind
                if first + count < self._subclusters:  # qemu stops at a change in a cluster
                    yield pending
                    pending = None
            position = cluster_start + cluster
        if pending is not None:
            yield pending

    def _cluster_pieces(self, table: array[int], index: int, start: int) -> tuple[int, Pieces]:
        """A cluster's host offset (its L2 entry if compressed) and its pieces."""
        if self._extended:
            entry, bitmap = table[2 * index], table[2 * index + 1]
        else:
            entry, bitmap = table[index], 0
        if entry & L.OFLAG_COMPRESSED:
            if self.data_file is not None:
                raise FormatError(
                    f"compressed cluster at guest offset {start:#x} in an image "
                    "with an external data file"
                )
            return entry, self._whole[_COMPRESSED]
        host: int = entry & L.L2E_OFFSET_MASK
        allocated = host != 0 or (self.data_file is not None and bool(entry & L.OFLAG_COPIED))
        if not self._extended:
            if entry & L.OFLAG_ZERO:
                return host, self._whole[_ZERO_ALLOC if host else _ZERO_PLAIN]
            if not allocated:
                return 0, self._whole[_UNALLOC_PLAIN]
            return self._checked_host(host, start), self._whole[_NORMAL]
        alloc, zero = bitmap & L.SUBCLUSTER_ALLOC_MASK, bitmap >> 32
        if alloc & zero or (not allocated and alloc):
            raise FormatError(
                f"invalid subcluster bitmap {bitmap:#018x} at guest offset {start:#x}"
            )
        if allocated:
            host = self._checked_host(host, start)
        return host, _subcluster_pieces(alloc, zero, allocated)

    def _checked_host(self, host: int, start: int) -> int:
        """A standard cluster's host offset, checked against alignment and the file."""
        if host & (self._cluster - 1):
            raise FormatError(
                f"cluster allocation offset {host:#x} unaligned (guest offset {start:#x})"
            )
        if host >= self._host.size:
            where = "data file" if self.data_file is not None else "file"
            raise FormatError(
                f"cluster at guest offset {start:#x} points to {host:#x}, "
                f"beyond the end of the {where}"
            )
        return host

    def decompress(self, run: Run) -> bytes:
        """One compressed cluster, decompressed to exactly a cluster (bounded)."""
        entry = run.unit
        assert isinstance(entry, int)
        shift = L.compressed_shift(self._bits)
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self._bits - 8)) - 1)) + 1
        size = sectors * L.SECTOR - (host & (L.SECTOR - 1))
        where = f"compressed cluster at guest offset {run.start - run.host:#x}"
        if host >> 56 or host >= self.file.size:
            raise FormatError(f"{where} points to {host:#x}, beyond the end of the file")
        # qemu does not write the tail of the last sector: the file may end before it.
        data = self.file.pread(host, min(size, self.file.size - host))
        codec = ZSTD if self.header.compression_type == L.COMPRESSION_ZSTD else DEFLATE
        out = inflate(data, self._cluster, codec, where)
        if len(out) != self._cluster:
            raise FormatError(f"{where} decompresses to {len(out)} bytes, not a whole cluster")
        return out

    def close(self) -> None:
        if self.data_file is not None:
            self.data_file.close()
        self.file.close()
        self._tables.clear()


def _subcluster_pieces(alloc: int, zero: int, allocated: bool) -> Pieces:
    """The (first, count, type) runs of an extended L2 cluster's 32 subclusters."""
    pieces: list[tuple[int, int, int]] = []
    for sub in range(L.SUBCLUSTERS):
        bit = 1 << sub
        if allocated:
            kind = _ZERO_ALLOC if zero & bit else _NORMAL if alloc & bit else _UNALLOC_ALLOC
        else:
            kind = _ZERO_PLAIN if zero & bit else _UNALLOC_PLAIN
        if pieces and pieces[-1][2] == kind:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + 1, kind)
        else:
            pieces.append((sub, 1, kind))
    return tuple(pieces)


# --- opening -----------------------------------------------------------------


def open_image(file: InputFile, resolver: Resolver) -> Qcow2Driver:
    """Parse and check the header, then open the data file and backing image it names."""
    header = L.Header.parse(file.pread(0, L.V3_MIN_HEADER_LENGTH + 8))
    check_header(header, file)
    extensions = read_extensions(header, file)
    check_features(header, extensions, file)
    l1 = read_l1(header, file)
    data_file = None
    if header.incompatible_features & L.INCOMPAT_DATA_FILE:
        if extensions.data_file is None:
            raise FormatError("'data-file' is required for this image")
        data_file = resolver.open_file(extensions.data_file, file, "data file")
        if not (data_file.is_regular or data_file.is_block_device):
            # A directory opens and fails every read; qemu's file driver refuses both.
            raise FormatError(
                f"Could not open data file '{data_file.name}': 'file' driver requires "
                f"'{data_file.name}' to be a regular file"
            )
    name = read_backing_name(header, file)
    driver = Qcow2Driver(file, header, l1, data_file, extensions, name)
    if name is not None:
        driver.backing_image = resolver.open_backing(name, extensions.backing_format, file)
    return driver


def check_header(header: L.Header, file: InputFile) -> None:
    """The header's own fields: version, sizes, table offsets (qemu's messages)."""
    if header.version == 1:
        raise UnsupportedError("qcow (version 1) images are not supported")
    if header.version not in (2, 3):
        raise FormatError(f"Unsupported qcow2 version {header.version}")
    if not L.MIN_CLUSTER_BITS <= header.cluster_bits <= L.MAX_CLUSTER_BITS:
        raise FormatError(f"Unsupported cluster size: 2^{header.cluster_bits}")
    cluster = header.cluster_size
    if header.version >= 3:
        if header.header_length < L.V3_MIN_HEADER_LENGTH:
            raise FormatError("qcow2 header too short")
        if header.header_length > cluster:
            raise FormatError("qcow2 header exceeds cluster size")
        if header.refcount_order > 6:
            raise FormatError("Reference count entry width too large; may not exceed 64 bits")
    if header.crypt_method in (1, 2):
        raise UnsupportedError("encrypted images are not supported yet")
    if header.crypt_method != 0:
        raise FormatError(f"Unsupported encryption method {header.crypt_method}")
    if header.size >= 1 << 63:
        raise FormatError(f"virtual size {header.size} is too large")
    _check_table(header, header.refcount_table_offset, "reference count table")
    if header.refcount_table_clusters * cluster > MAX_REFTABLE_BYTES:
        raise FormatError("Reference count table too large")
    if header.nb_snapshots > L.MAX_SNAPSHOTS:
        raise FormatError("Too many snapshots")
    if header.nb_snapshots:
        _check_table(header, header.snapshots_offset, "snapshot table")
    if header.l1_size * 8 > MAX_TABLE_BYTES:
        raise FormatError("Active L1 table too large")
    needed = L.l1_entries_for(header.size, header.cluster_bits, header.extended_l2)
    if header.l1_size < needed:
        raise FormatError("L1 table is too small")
    if header.l1_size:
        _check_table(header, header.l1_table_offset, "L1 table")


def _check_table(header: L.Header, offset: int, what: str) -> None:
    if offset & (header.cluster_size - 1) or offset >= 1 << 63:
        raise FormatError(f"Invalid {what} offset {offset:#x}")


def check_features(header: L.Header, extensions: L.Extensions, file: InputFile) -> None:
    """Feature bits and compression type: refuse what instar does not know."""
    unknown = header.incompatible_features & ~L.INCOMPAT_KNOWN
    if unknown:
        raise UnsupportedError(
            "Unsupported qcow2 feature(s): " + _describe_features(unknown, extensions)
        )
    if header.compression_type not in L.COMPRESSION_NAMES:
        raise FormatError(f"qcow2: unknown compression type: {header.compression_type}")
    flagged = bool(header.incompatible_features & L.INCOMPAT_COMPRESSION)
    if flagged and header.compression_type == L.COMPRESSION_ZLIB:
        raise FormatError("qcow2: Compression type incompatible feature bit must not be set")
    if not flagged and header.compression_type != L.COMPRESSION_ZLIB:
        raise FormatError("qcow2: Compression type incompatible feature bit must be set")
    if header.extended_l2 and header.cluster_bits < L.MIN_EXTENDED_L2_CLUSTER_BITS:
        raise FormatError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )


def _describe_features(mask: int, extensions: L.Extensions) -> str:
    """Unknown feature bits as qemu names them: the table's names, then the rest in hex."""
    names = []
    for bit in range(64):
        name = extensions.feature_names.get((L.FEATURE_INCOMPAT, bit))
        if mask & (1 << bit) and name:
            names.append(name)
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def read_extensions(header: L.Header, file: InputFile) -> L.Extensions:
    """The header extensions between the header and the backing name (or cluster end)."""
    start = header.header_length if header.version >= 3 else L.V2_HEADER_LENGTH
    end = header.backing_file_offset or header.cluster_size
    end = min(end, header.cluster_size, start + MAX_HEADER_EXTENSION_BYTES)
    if end <= start:
        return L.Extensions()
    data = file.pread(start, end - start)  # past the end of file reads as zeros (the end)
    return L.parse_extensions(data)


def read_backing_name(header: L.Header, file: InputFile) -> str | None:
    """The backing file name stored in the first cluster, or None."""
    if header.backing_file_offset == 0:
        return None
    offset, size = header.backing_file_offset, header.backing_file_size
    if offset > header.cluster_size:
        raise FormatError("Invalid backing file offset")
    if size > L.MAX_BACKING_NAME or size > header.cluster_size - offset:
        raise FormatError("Backing file name too long")
    raw = file.pread_exact(offset, size, "backing file name")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("backing file name is not valid UTF-8") from None


def read_l1(header: L.Header, file: InputFile) -> array[int]:
    """The part of the active L1 table that maps the virtual size."""
    needed = L.l1_entries_for(header.size, header.cluster_bits, header.extended_l2)
    if needed == 0:
        return array("Q")
    return _be_u64_array(file.pread_exact(header.l1_table_offset, needed * 8, "L1 table"))
