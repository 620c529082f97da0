"""Reading qcow2 images (versions 2 and 3) as an `Image`.

The guest offset is mapped through the L1 table and cached L2 tables into
runs: host data, zeros, unallocated (the backing image, or zeros) and
compressed clusters. ``read`` reads host-contiguous data with one pread per
run; ``extents`` never touches data clusters. Every value read from the image
is checked before use (DESIGN.md): a malformed image raises FormatError.
"""

from __future__ import annotations

import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator

from instar.errors import FormatError, UnsupportedError
from instar.files import InputFile
from instar.formats.base import Resolver
from instar.formats.qcow2 import layout as L
from instar.image import Extent, ExtentKind, Image, check_range, merge_extents
from instar.safety import MAX_HEADER_EXTENSION_BYTES, MAX_METADATA_CACHE_BYTES, MAX_TABLE_BYTES

MAX_REFTABLE_BYTES = 8 << 20  # qemu's QCOW_MAX_REFTABLE_SIZE
RUN_BATCH_CLUSTERS = 4096  # clusters mapped at once by extents()

# Kinds of mapped runs (plain ints: the mapping loop is the hot path).
_DATA, _ZERO, _UNALLOCATED, _COMPRESSED = 0, 1, 2, 3
_EXTENT_KIND = {
    _DATA: ExtentKind.DATA,
    _COMPRESSED: ExtentKind.DATA,
    _ZERO: ExtentKind.ZERO,
    _UNALLOCATED: ExtentKind.UNALLOCATED,
}


def _be_u64_array(data: bytes) -> array[int]:
    """Big-endian u64 table bytes as native integers."""
    table = array("Q", data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


class Qcow2Image:
    """A qcow2 image: L1/L2 mapping over the image file (or its data file)."""

    def __init__(
        self,
        file: InputFile,
        header: L.Header,
        l1: array[int],
        data_file: InputFile | None,
        backing: Image | None,
        extensions: L.Extensions | None = None,
        backing_name: str | None = None,
    ) -> None:
        self.file = file
        self.header = header
        # What the header says beyond the mapping, for instar info.
        self.extensions = extensions if extensions is not None else L.Extensions()
        self.backing_name = backing_name
        self.data_file = data_file
        self._l1 = l1
        self._data_file = data_file
        self._host = data_file if data_file is not None else file
        self._backing = backing
        self._bits = header.cluster_bits
        self._cluster = header.cluster_size
        self._extended = header.extended_l2
        self._l2_entries = L.l2_entries(self._bits, self._extended)
        self._l2_span = self._l2_entries << self._bits
        self._subcluster = self._cluster // L.SUBCLUSTERS
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        self._cache_limit = max(1, MAX_METADATA_CACHE_BYTES // self._cluster)
        self._last_compressed: tuple[int, bytes] | None = None
        # qemu sees whole sectors: a size that is no multiple of 512 is rounded down.
        self._virtual_size = header.size // L.SECTOR * L.SECTOR

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    @property
    def backing(self) -> Image | None:
        return self._backing

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return self._l2_span

    def l2_table(self, l1_index: int) -> array[int] | None:
        """L2 table ``l1_index`` (None if unallocated), for block status."""
        return self._l2_table(l1_index)

    # --- mapping -----------------------------------------------------------

    def _l2_table(self, l1_index: int) -> array[int] | None:
        """The L2 table for ``l1_index`` (None if unallocated), through the LRU cache."""
        entry = self._l1[l1_index]
        offset = entry & L.L1E_OFFSET_MASK
        if offset == 0:
            return None
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
            return table
        if offset & (self._cluster - 1):
            raise FormatError(f"L2 table offset {offset:#x} unaligned (L1 index {l1_index:#x})")
        table = _be_u64_array(self.file.pread_exact(offset, self._cluster, "L2 table"))
        self._cache[offset] = table
        if len(self._cache) > self._cache_limit:
            self._cache.popitem(last=False)
        return table

    def _runs(self, offset: int, length: int) -> list[list[int]]:
        """``[kind, guest offset, length, host]`` runs covering the range, coalesced.

        ``host`` is the host offset for data runs and the L2 entry for
        compressed ones. Data runs are merged only when host-contiguous, so
        each becomes one pread. The list grows with the range: callers
        reading huge ranges go through `_run_batches`.
        """
        runs: list[list[int]] = []
        position, end = offset, offset + length
        while position < end:
            position = self._map_some(runs, position, end)
        return runs

    def _run_batches(self, offset: int, length: int) -> Iterator[list[list[int]]]:
        """The runs of a range in batches of at most `RUN_BATCH_CLUSTERS` clusters.

        Memory stays bounded however large the range (``extents`` of a whole disk).
        """
        position, end = offset, offset + length
        while position < end:
            runs: list[list[int]] = []
            stop = min(end, position + (RUN_BATCH_CLUSTERS << self._bits))
            while position < stop:
                position = self._map_some(runs, position, stop, end)
            yield runs

    def _map_some(
        self, runs: list[list[int]], position: int, stop: int, end: int | None = None
    ) -> int:
        """Map from ``position`` to ``stop`` or the end of its L2 table; returns where it stopped.

        The range of an unallocated L2 table is mapped whole in one step (up to
        ``end`` when given, past ``stop``), so a sparse disk costs one step per table.
        """
        l1_index = position // self._l2_span
        table = self._l2_table(l1_index)
        if table is None:
            stop = max(stop, end or stop)
        stop = min(stop, (l1_index + 1) * self._l2_span)
        if table is None:
            _add(runs, _UNALLOCATED, position, stop - position, 0)
        elif self._extended:
            self._map_extended(runs, table, l1_index, position, stop)
        else:
            self._map_standard(runs, table, l1_index, position, stop)
        return stop

    def _map_standard(
        self, runs: list[list[int]], table: array[int], l1_index: int, position: int, stop: int
    ) -> None:
        mask = self._cluster - 1
        base = l1_index * self._l2_entries
        while position < stop:
            within = position & mask
            count = min(stop - position, self._cluster - within)
            entry = table[(position >> self._bits) - base]
            if entry & L.OFLAG_COMPRESSED:
                self._check_compressed_allowed(position)
                _add(runs, _COMPRESSED, position, count, entry)
            elif entry & L.OFLAG_ZERO:
                _add(runs, _ZERO, position, count, 0)
            else:
                host = self._host_cluster(entry, position)
                if host is None:
                    _add(runs, _UNALLOCATED, position, count, 0)
                else:
                    _add(runs, _DATA, position, count, host + within)
            position += count

    def _map_extended(
        self, runs: list[list[int]], table: array[int], l1_index: int, position: int, stop: int
    ) -> None:
        mask = self._cluster - 1
        base = l1_index * self._l2_entries
        while position < stop:
            within = position & mask
            count = min(stop - position, self._cluster - within)
            index = 2 * ((position >> self._bits) - base)
            entry, bitmap = table[index], table[index + 1]
            if entry & L.OFLAG_COMPRESSED:
                self._check_compressed_allowed(position)
                _add(runs, _COMPRESSED, position, count, entry)
                position += count
                continue
            host = self._host_cluster(entry, position)
            alloc, zero = bitmap & L.SUBCLUSTER_ALLOC_MASK, bitmap >> 32
            if alloc & zero or (host is None and alloc):
                raise FormatError(
                    f"invalid subcluster bitmap {bitmap:#018x} at guest offset "
                    f"{position - within:#x}"
                )
            self._map_subclusters(runs, position, count, within, host, alloc, zero)
            position += count

    def _map_subclusters(
        self,
        runs: list[list[int]],
        position: int,
        count: int,
        within: int,
        host: int | None,
        alloc: int,
        zero: int,
    ) -> None:
        """Runs for ``count`` bytes of one extended-L2 cluster, subcluster by subcluster."""
        size = self._subcluster
        end = position + count
        while position < end:
            index = within // size
            piece = min(end - position, size - within % size)
            bit = 1 << index
            if zero & bit:
                _add(runs, _ZERO, position, piece, 0)
            elif alloc & bit:
                assert host is not None
                _add(runs, _DATA, position, piece, host + within)
            else:
                _add(runs, _UNALLOCATED, position, piece, 0)
            position += piece
            within += piece

    def _host_cluster(self, entry: int, position: int) -> int | None:
        """The checked host offset of a standard cluster, None if unallocated.

        Offset 0 means unallocated, except in an external data file, where
        the COPIED flag marks guest cluster 0 stored at host offset 0.
        """
        host: int = entry & L.L2E_OFFSET_MASK
        if host == 0 and not (self._data_file is not None and entry & L.OFLAG_COPIED):
            return None
        if host & (self._cluster - 1):
            raise FormatError(
                f"cluster allocation offset {host:#x} unaligned "
                f"(guest offset {position & ~(self._cluster - 1):#x})"
            )
        if host >= self._host.size:
            where = "data file" if self._data_file is not None else "file"
            raise FormatError(
                f"cluster at guest offset {position & ~(self._cluster - 1):#x} points to "
                f"{host:#x}, beyond the end of the {where}"
            )
        return host

    def _check_compressed_allowed(self, position: int) -> None:
        if self._data_file is not None:
            raise FormatError(
                f"compressed cluster at guest offset {position:#x} in an image "
                "with an external data file"
            )

    # --- reading -----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        parts: list[bytes] = []
        for kind, position, count, host in self._runs(offset, length):
            if kind == _DATA:
                data = self._host.pread(host, count)
                parts.append(data if len(data) == count else data + bytes(count - len(data)))
            elif kind == _ZERO:
                parts.append(bytes(count))
            elif kind == _UNALLOCATED:
                parts.append(self._read_backing(position, count))
            else:
                cluster = self._decompress(host, position)
                within = position & (self._cluster - 1)
                parts.append(cluster[within : within + count])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_backing(self, offset: int, length: int) -> bytes:
        """Unallocated bytes: the backing image's, zeros past its end or without one."""
        backing = self._backing
        inside = 0 if backing is None else max(0, min(length, backing.virtual_size - offset))
        if not inside:
            return bytes(length)
        assert backing is not None
        data = backing.read(offset, inside)
        return data if inside == length else data + bytes(length - inside)

    def _decompress(self, entry: int, position: int) -> bytes:
        """One compressed cluster, decompressed to exactly a cluster (bounded)."""
        if self._last_compressed is not None and self._last_compressed[0] == entry:
            return self._last_compressed[1]
        shift = L.compressed_shift(self._bits)
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self._bits - 8)) - 1)) + 1
        size = sectors * L.SECTOR - (host & (L.SECTOR - 1))
        where = f"compressed cluster at guest offset {position & ~(self._cluster - 1):#x}"
        if host >> 56 or host >= self.file.size:
            raise FormatError(f"{where} points to {host:#x}, beyond the end of the file")
        # qemu does not write the tail of the last sector: the file may end before it.
        data = self.file.pread(host, min(size, self.file.size - host))
        cluster = self._inflate(data, where)
        self._last_compressed = (entry, cluster)
        return cluster

    def _inflate(self, data: bytes, where: str) -> bytes:
        try:
            if self.header.compression_type == L.COMPRESSION_ZSTD:
                zstd = L.zstd_module()
                out: bytes = zstd.ZstdDecompressor().decompress(data, max_length=self._cluster)
            else:
                # Any raw deflate window decodes with the largest one.
                out = zlib.decompressobj(-15).decompress(data, self._cluster)
        except (zlib.error, ValueError, EOFError) as error:
            raise FormatError(f"{where} does not decompress: {error}") from None
        except Exception as error:  # zstd.ZstdError, which lives in a lazy import
            if type(error).__name__ != "ZstdError":
                raise
            raise FormatError(f"{where} does not decompress: {error}") from None
        if len(out) != self._cluster:
            raise FormatError(f"{where} decompresses to {len(out)} bytes, not a whole cluster")
        return out

    # --- extents -----------------------------------------------------------

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        return merge_extents(self._extents(offset, length))

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        for runs in self._run_batches(offset, length):
            for kind, position, count, _host in runs:
                if kind == _UNALLOCATED and self._backing is not None:
                    yield from self._backing_extents(position, count)
                else:
                    yield Extent(position, count, _EXTENT_KIND[kind])

    def _backing_extents(self, offset: int, length: int) -> Iterator[Extent]:
        assert self._backing is not None
        inside = max(0, min(length, self._backing.virtual_size - offset))
        if inside:
            yield from self._backing.extents(offset, inside)
        if inside < length:
            yield Extent(offset + inside, length - inside, ExtentKind.ZERO)

    def close(self) -> None:
        if self._backing is not None:
            self._backing.close()
        if self._data_file is not None:
            self._data_file.close()
        self.file.close()
        self._cache.clear()


def _add(runs: list[list[int]], kind: int, position: int, count: int, host: int) -> None:
    """Append a run, merging it into the previous one when they continue each other."""
    if runs:
        last = runs[-1]
        if (
            last[0] == kind
            and kind != _COMPRESSED
            and last[1] + last[2] == position
            and (kind != _DATA or last[3] + last[2] == host)
        ):
            last[2] += count
            return
    runs.append([kind, position, count, host])


# --- opening -----------------------------------------------------------------


def open_image(file: InputFile, resolver: Resolver) -> Qcow2Image:
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
    backing = None
    name = read_backing_name(header, file)
    if name is not None:
        backing = resolver.open_backing(name, extensions.backing_format, file)
    return Qcow2Image(file, header, l1, data_file, backing, extensions, name)


def check_header(header: L.Header, file: InputFile) -> None:
    """The header's own fields: version, sizes, table offsets (qemu's messages)."""
    if header.version == 1:
        raise UnsupportedError(
            f"Could not open '{file.name}': qcow (version 1) images are not supported"
        )
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
        raise UnsupportedError(
            f"Could not open '{file.name}': encrypted images are not supported yet"
        )
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
            f"Could not open '{file.name}': Unsupported qcow2 feature(s): "
            + _describe_features(unknown, extensions)
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
