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

from array import array
from collections.abc import Iterator

from instar.errors import FormatError, UnknownFeatureError, UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.cluster_tables import ClusterTableDriver, Region, backing_name
from instar.formats.common import DEFLATE, ZSTD, first_other, inflate, read_table
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.refcounts import metadata_preallocated, read_reftable
from instar.image import COMPRESSED, DATA, MAX_VIRTUAL_SIZE, OFFSET_VALID, ZERO, Run, file_runs
from instar.safety import MAX_HEADER_EXTENSION_BYTES, MAX_TABLE_BYTES

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

# A cluster as (first subcluster, count, type) pieces, for the common cases.
Pieces = tuple[tuple[int, int, int], ...]


class Qcow2Driver(ClusterTableDriver):
    """A qcow2 image's own layer: L1 in memory, L2 tables through a cache
    (the shared `ClusterTableDriver`), clusters and subclusters by qemu's types."""

    L1_OFFSET_MASK = L.L1E_OFFSET_MASK
    L2_OFFSET_MASK = L.L2E_OFFSET_MASK
    COMPRESSED_FLAG = L.OFLAG_COMPRESSED

    def __init__(
        self,
        file: InputFile,
        header: L.Header,
        l1: array[int],
        data_file: InputFile | None,
        extensions: L.Extensions | None = None,
        backing_name: str | None = None,
    ) -> None:
        super().__init__(
            file, l1, cluster_bits=header.cluster_bits,
            l2_entries=L.l2_entries(header.cluster_bits, header.extended_l2),
            table_bytes=header.cluster_size, byteorder="big", data_file=data_file,
        )
        self.header = header
        # What the header says beyond the mapping, for instar info.
        self.extensions = extensions if extensions is not None else L.Extensions()
        self.backing_name = backing_name
        self._extended = header.extended_l2
        self._subclusters = L.SUBCLUSTERS if self._extended else 1
        if data_file is not None:
            self._allocated_at_zero = L.OFLAG_COPIED  # a data file's cluster 0
        # qemu sees whole sectors: a size that is no multiple of 512 is rounded down.
        self.virtual_size = header.size // L.SECTOR * L.SECTOR
        whole = self._subclusters
        self._whole = {kind: ((0, whole, kind),) for kind in range(6)}
        self._reftable = array("Q")  # read by the first mapping
        # qemu's guess of metadata preallocation, made by the first mapping too:
        # then the file says where data clusters hold zeros (`refcounts`).
        self._recurse = False

    def table_entries(self, table: array[int]) -> array[int]:
        return table[::2] if self._extended else table

    # --- the mapping function ----------------------------------------------------

    def first_mapping(self) -> None:
        """The refcount table, read once: the metadata claims and qemu's guess
        of metadata preallocation (a failed guess is a no, as in qemu)."""
        self._reftable = read_reftable(self.file, self.header)
        super().first_mapping()
        try:
            self._recurse = metadata_preallocated(self.file, self.header, self._reftable)
        except OSError:
            pass  # qemu's guess failed: not preallocated

    def _table_runs(
        self, table: array[int], l1_index: int, position: int, stop: int
    ) -> Iterator[Run]:
        runs = self._cluster_runs(table, l1_index, position, stop)
        return self._file_zeros(runs) if self._recurse else runs

    def _file_zeros(self, runs: Iterator[Run]) -> Iterator[Run]:
        """Data runs cut where the file has holes, which are zeros (qemu's
        BDRV_BLOCK_RECURSE, for images it takes for metadata-preallocated)."""
        for run in runs:
            if run.flags == DATA | OFFSET_VALID:
                yield from file_runs(self._host, run.host, run.end - run.start, run.start, DATA)
            else:
                yield run

    def _cluster_runs(
        self, table: array[int], l1_index: int, position: int, stop: int
    ) -> Iterator[Run]:
        """The runs of ``[position, stop)``, inside one L2 table's range.

        Neighbouring clusters of one kind (and, for stored data, contiguous in
        the file) are one run. The run being extended is kept in plain
        variables, not a Run rebuilt per cluster: this loop is most of the
        CPU a qcow2 read costs in Python. Without subclusters, the entries
        that merely continue the run are skipped without being classified
        (`_same_kind_until`)."""
        bits, cluster = self._bits, self._cluster
        piece = cluster >> (self._subclusters.bit_length() - 1)
        base = l1_index * self._l2_entries
        whole_clusters = not self._extended
        last = ((stop - 1) >> bits) - base + 1  # the entries the range needs
        pending_kind = -1  # none
        pending_start = pending_end = pending_at = 0
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
                    if pending_kind >= 0:
                        yield self._run(pending_kind, pending_start, pending_end, pending_at)
                        pending_kind = -1
                    yield Run(run_start, run_end, _FLAGS[kind], self.file, within, host)
                    continue
                hosted = _HOSTED[kind]
                at = host + within if hosted else 0
                if pending_kind == kind and (
                        not hosted or pending_at + (run_start - pending_start) == at):
                    pending_end = run_end
                else:
                    if pending_kind >= 0:
                        yield self._run(pending_kind, pending_start, pending_end, pending_at)
                    pending_kind, pending_start, pending_end, pending_at = (
                        kind, run_start, run_end, at)
                if first + count < self._subclusters:  # qemu stops at a change in a cluster
                    yield self._run(pending_kind, pending_start, pending_end, pending_at)
                    pending_kind = -1
            position = cluster_start + cluster
            if whole_clusters and pending_kind >= 0 and position < stop:
                following = self._same_kind_until(table, (position >> bits) - base, last,
                                                  _HOSTED[pending_kind])
                position = (base + following) << bits
                pending_end = min(stop, position)
        if pending_kind >= 0:
            yield self._run(pending_kind, pending_start, pending_end, pending_at)

    def _same_kind_until(self, table: array[int], index: int, last: int, hosted: bool) -> int:
        """The first entry from ``index`` (before ``last``) that does not
        continue the run the entry before it ends, without subclusters: an
        entry equal to that one (a kind with no host offset) or to it plus one
        cluster (the next cluster in the file, inside it) has the same type and
        extends the run. Any other entry is left to `_cluster_pieces`."""
        if not hosted:
            return first_other(table, index, last, table[index - 1])
        cluster, mask, host_size = self._cluster, L.L2E_OFFSET_MASK, self._host.size
        expected = table[index - 1] + cluster
        while index < last and table[index] == expected and expected & mask < host_size:
            index, expected = index + 1, expected + cluster
        return index

    def _run(self, kind: int, start: int, end: int, at: int) -> Run:
        """The Run of ``[start, end)`` of ``kind`` (not compressed), its bytes
        at ``at`` in the data file when the kind is stored."""
        return Run(start, end, _FLAGS[kind], self._host if _HOSTED[kind] else None, at)

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
            return self.checked_host(host, start), self._whole[_NORMAL]
        alloc, zero = bitmap & L.SUBCLUSTER_ALLOC_MASK, bitmap >> 32
        if alloc & zero or (not allocated and alloc):
            raise FormatError(
                f"invalid subcluster bitmap {bitmap:#018x} at guest offset {start:#x}"
            )
        if allocated:
            host = self.checked_host(host, start)
        return host, _subcluster_pieces(alloc, zero, allocated)

    # --- the aliasing check ---------------------------------------------------------

    def metadata_regions(self) -> Iterator[Region]:
        """The header, the L1 table, the refcount table and its blocks (qemu's
        overlap check refuses to write there; qemu-img check reports a data
        cluster among them)."""
        header, cluster = self.header, self._cluster
        yield 0, cluster, "the image header"
        if header.l1_size:
            yield header.l1_table_offset, header.l1_size * 8, "the L1 table"
        reftable_bytes = header.refcount_table_clusters * cluster
        if reftable_bytes and header.refcount_table_offset < self.file.size:
            yield header.refcount_table_offset, reftable_bytes, "the refcount table"
            reftable = self._reftable
            index = 0
            while (index := first_other(reftable, index, len(reftable), 0)) < len(reftable):
                block = reftable[index] & L.REFTABLE_OFFSET_MASK
                if block and not block & (cluster - 1):
                    yield block, cluster, "a refcount block"
                index += 1

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes at most) of a compressed cluster's data."""
        shift = L.compressed_shift(self._bits)
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self._bits - 8)) - 1)) + 1
        return host, sectors * L.SECTOR - (host & (L.SECTOR - 1))

    def decompress(self, run: Run) -> bytes:
        """One compressed cluster, decompressed to exactly a cluster (bounded)."""
        entry = run.unit
        assert isinstance(entry, int)
        host, size = self.compressed_range(entry)
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
    check_header(header, file, checking=getattr(resolver, "checking", False))
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


def check_header(header: L.Header, file: InputFile, checking: bool = False) -> None:
    """The header's own fields: version, sizes, table offsets (qemu's messages).

    Opened for ``check`` (``checking``), the snapshot table is left to the
    check, which reports what is wrong with it, as qemu does."""
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
    _check_table(header, header.refcount_table_offset, "reference count table")
    if header.refcount_table_clusters * cluster > MAX_REFTABLE_BYTES:
        raise FormatError("Reference count table too large")
    if header.nb_snapshots > L.MAX_SNAPSHOTS and not checking:
        raise FormatError("Too many snapshots")
    if header.nb_snapshots and not checking:
        _check_table(header, header.snapshots_offset, "snapshot table")
    if header.l1_size * 8 > MAX_TABLE_BYTES:
        raise FormatError("Active L1 table too large")
    # qemu counts the L1 entries the size needs in 64 bits: a size within an
    # L2 table's span of 2^64 wraps round to a few entries.
    entries = L.l2_entries(header.cluster_bits, header.extended_l2)
    span_bits = header.cluster_bits + entries.bit_length() - 1  # entries: a power of two
    needed = ((header.size + (1 << span_bits) - 1) & ((1 << 64) - 1)) >> span_bits
    if needed > 0x7FFF_FFFF:
        raise FormatError("Image is too big")
    if header.l1_size < needed:
        raise FormatError("L1 table is too small")
    if header.size // L.SECTOR * L.SECTOR > MAX_VIRTUAL_SIZE:
        raise FormatError("Could not refresh total sector count: File too large")
    if header.l1_size:
        _check_table(header, header.l1_table_offset, "L1 table")


def _check_table(header: L.Header, offset: int, what: str) -> None:
    if offset & (header.cluster_size - 1) or offset >= 1 << 63:
        raise FormatError(f"Invalid {what} offset {offset:#x}")


def check_features(header: L.Header, extensions: L.Extensions, file: InputFile) -> None:
    """Feature bits and compression type: refuse what instar does not know."""
    unknown = header.incompatible_features & ~L.INCOMPAT_KNOWN
    if unknown:
        raise UnknownFeatureError(
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
    return backing_name(file.pread_exact(offset, size, "backing file name"))


def read_l1(header: L.Header, file: InputFile) -> array[int]:
    """The part of the active L1 table that maps the virtual size."""
    needed = L.l1_entries_for(header.size, header.cluster_bits, header.extended_l2)
    if needed == 0:
        return array("Q")
    return read_table(file, header.l1_table_offset, needed, 8, "big", "L1 table")
