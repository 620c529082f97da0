"""Writing qcow2 images sequentially, as the copy engine feeds them.

Layout of a new image: the header cluster, the L1 table, then data clusters
in guest order with each L2 table written right after the data it maps (as
soon as the copy moves past its range), refcount blocks written as soon as
the clusters they count are all allocated, and at the end the refcount table
and the last refcount blocks. Clusters are allocated strictly upwards, so
the writer holds only what is still changing (bounded memory):

- the L1 table (at most 32 MiB, qemu's limit; 8 bytes per 512 MiB of disk
  with 64 KiB clusters),
- one L2 table, one refcount block and one partly written data cluster,
- for ``-c``, the clusters being compressed (about 8 MiB in flight),
- one refcount table entry per refcount block (at most 8 MiB, qemu's limit).

Zero data is never allocated: it reads back as zeros from unallocated
clusters. With ``preallocation`` every cluster is allocated at the start
instead, where `preallocated.PreallocatedLayout` puts it, and data goes
straight there. With ``-c`` every cluster is compressed on a small thread pool
(zlib and zstd release the GIL) and written in order; a cluster that does not
shrink is stored uncompressed, as qemu does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from instar.errors import OutputError, TooLargeError, UsageError
from instar.files import pwrite_all, write_zeros
from instar.formats.base import OutputFile, ParsedOptions
from instar.formats.cluster_writer import (
    ZERO_CHECK_BELOW,
    ClusterImageWriter,
    ClusterTables,
    raw_deflate,
)
from instar.formats.common import CompressionPool, UnitSequencer, pack_table
from instar.formats.options import BackingReference, data_file_name
from instar.formats.preallocation import qcow2_mode, reserve
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.preallocated import PreallocatedLayout
from instar.runtime_types import NamedTuple
from instar.safety import MAX_TABLE_BYTES
from instar.sizes import UINT64_MAX

MAX_REFTABLE_BYTES = 8 << 20  # qemu refuses to open images with a larger refcount table

_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_V3_HINT = "(use version=v3 or greater)"


class Qcow2Options(NamedTuple):
    """Creation options as the writer uses them (the defaults are the schema's)."""

    cluster_bits: int
    version: int
    refcount_order: int
    extended_l2: bool
    compression_type: int
    lazy_refcounts: bool
    backing: BackingReference | None = None
    preallocation: str = "off"
    data_file: OutputFile | None = None  # the external data file, open
    data_file_name: str = ""  # its name as the header extension records it
    data_file_raw: bool = False


def _check_backing(backing: BackingReference, version: int, cluster_size: int,
                   data_file: str | None) -> None:
    """qemu's refusals of a backing file name: over 1023 bytes, or not fitting
    in the header cluster after the header and the backing format (and data
    file) extensions."""
    name = backing.name.encode("utf-8", "surrogateescape")
    header = L.V3_HEADER_LENGTH if version >= 3 else L.V2_HEADER_LENGTH
    needed = (header + len(L.pack_extension(L.EXT_BACKING_FORMAT, backing.format.encode()))
              + len(_data_file_extension(data_file)) + 8 + len(name))
    reason = ("Invalid argument" if len(name) > 1023
              else "No space left on device" if needed > cluster_size else None)
    if reason is not None:
        raise UsageError(f"Could not assign backing file '{backing.name}' with format "
                         f"'{backing.format}': {reason}")


def _data_file_extension(name: str | None) -> bytes:
    """The header extension naming the external data file (none without one)."""
    if name is None:
        return b""
    return L.pack_extension(L.EXT_DATA_FILE, name.encode("utf-8", "surrogateescape"))


def check_options(options: ParsedOptions) -> Qcow2Options:
    """What the parsed ``-o`` options mean for a new image; qemu's driver messages
    for combinations it refuses, before any writing."""
    cluster_size = options.number("cluster_size")
    refcount_bits = options.number("refcount_bits")
    extended_l2 = options.flag("extended_l2")
    lazy_refcounts = options.flag("lazy_refcounts")
    compat = options.text("compat")
    if compat not in _COMPAT:
        raise UsageError(f"Parameter 'version' does not accept value '{compat}'")
    version = _COMPAT[compat]
    preallocation = qcow2_mode(options)  # QAPI's order: after the version
    if options.compress and preallocation != "off":  # convert refuses it first
        raise UsageError("Compression and preallocation not supported at the same time")
    # qemu's driver reads the number back as a signed 64-bit integer.
    if not -(1 << 63) <= refcount_bits < 1 << 63:
        raise UsageError("Parameter 'refcount-bits' expects integer")
    compression = options.text("compression_type")
    if compression not in ("zlib", "zstd"):
        raise UsageError(f"Parameter 'compression-type' does not accept value '{compression}'")
    if not (512 <= cluster_size <= 2 << 20) or cluster_size & (cluster_size - 1):
        raise UsageError("Cluster size must be a power of two between 512 and 2048k")
    cluster_bits = cluster_size.bit_length() - 1
    if extended_l2 and version < 3:
        raise UsageError(
            f"Extended L2 entries are only supported with compatibility level 1.1 and above "
            f"{_V3_HINT}"
        )
    if extended_l2 and cluster_bits < L.MIN_EXTENDED_L2_CLUSTER_BITS:
        raise UsageError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    if lazy_refcounts and version < 3:
        raise UsageError(
            f"Lazy refcounts only supported with compatibility level 1.1 and above {_V3_HINT}"
        )
    if options.backing is not None and preallocation != "off" and not extended_l2:
        raise UsageError("Backing file and preallocation can only be used at the same time "
                         "if extended_l2 is on")
    as_u64 = refcount_bits & UINT64_MAX  # qemu's power-of-two test takes it unsigned
    if refcount_bits > 64 or not as_u64 or as_u64 & (as_u64 - 1):
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise UsageError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            f"{_V3_HINT}"
        )
    data_file = data_file_name(options)
    data_file_raw = options.flag("data_file_raw")
    if data_file_raw and data_file is None:
        raise UsageError("data-file-raw requires data-file")
    if data_file_raw and options.backing is not None:
        raise UsageError("Backing file and data-file-raw cannot be used at the same time")
    if data_file_raw and preallocation == "off":  # every cluster mapped where it is
        preallocation = "metadata"
    if data_file is not None and version < 3:
        raise UsageError(
            f"External data files are only supported with compatibility level 1.1 and above "
            f"{_V3_HINT}"
        )
    if data_file is not None and options.data_file is None:  # a caller that cannot create it
        raise UsageError("the qcow2 option 'data_file' is not supported here")
    if compression == "zstd" and version < 3:
        raise UsageError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and "
            f"above {_V3_HINT}"
        )
    if refcount_bits < 1:  # -2**63 passes the test above as 2**63
        raise UsageError("Reference count entry width too large; may not exceed 64 bits")
    backing = options.backing
    if backing is not None:
        _check_backing(backing, version, cluster_size, data_file)
    header = (L.V3_HEADER_LENGTH + len(_data_file_extension(data_file)) + 8)
    if header > cluster_size:  # qemu has no answer: its header update fails
        raise UsageError("The external data file name does not fit in the image header")
    return Qcow2Options(
        data_file=options.data_file,
        data_file_name=data_file or "",
        data_file_raw=data_file_raw,
        backing=backing,
        cluster_bits=cluster_bits,
        version=version,
        refcount_order=refcount_bits.bit_length() - 1,
        extended_l2=extended_l2,
        compression_type=L.COMPRESSION_ZSTD if compression == "zstd" else L.COMPRESSION_ZLIB,
        lazy_refcounts=lazy_refcounts,
        preallocation=preallocation,
    )


class RefcountTracker:
    """Host cluster allocation, strictly upwards, with refcounts kept one block at a time.

    Every cluster below ``next`` is in use. The counts of the refcount block
    range being allocated live in ``block``; a finished range's block is
    written into a newly allocated cluster straight away.
    """

    def __init__(self, fd: int, cluster_bits: int, refcount_order: int) -> None:
        self._fd = fd
        self._cluster = 1 << cluster_bits
        self._bits = 1 << refcount_order
        self.entries = self._cluster * 8 // self._bits  # clusters one block counts
        self.max_refcount = (1 << self._bits) - 1
        self.next = 0
        self._range = 0
        self._block = bytearray(self._cluster)
        self._pending: list[tuple[int, bytes]] = []
        self.table: list[int] = []  # refcount block offsets, by range
        self._full = self._ones_block()

    def _ones_block(self) -> bytes:
        block = bytearray(self._cluster)
        self._fill_ones(block, 0, self.entries)
        return bytes(block)

    def _fill_ones(self, block: bytearray, index: int, count: int) -> None:
        """Set ``count`` fresh (zero) entries from ``index`` to 1."""
        bits = self._bits
        if bits >= 8:
            width = bits // 8
            block[index * width : (index + count) * width] = (1).to_bytes(width, "big") * count
            return
        per_byte = 8 // bits
        while count and index % per_byte:  # head: a partial byte
            block[index * bits // 8] |= 1 << (index * bits % 8)
            index, count = index + 1, count - 1
        whole = count // per_byte
        if whole:
            pattern = sum(1 << (k * bits) for k in range(per_byte))
            first = index // per_byte
            block[first : first + whole] = bytes([pattern]) * whole
            index, count = index + whole * per_byte, count - whole * per_byte
        for i in range(index, index + count):  # tail
            block[i * bits // 8] |= 1 << (i * bits % 8)

    def _get(self, index: int) -> int:
        bits = self._bits
        if bits >= 8:
            width = bits // 8
            return int.from_bytes(self._block[index * width : (index + 1) * width], "big")
        return (self._block[index * bits // 8] >> (index * bits % 8)) & self.max_refcount

    def _set(self, index: int, value: int) -> None:
        bits = self._bits
        if bits >= 8:
            width = bits // 8
            self._block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
            return
        shift = index * bits % 8
        byte = self._block[index * bits // 8] & ~(self.max_refcount << shift)
        self._block[index * bits // 8] = byte | (value << shift)

    def _mark(self, start: int, count: int) -> None:
        """Give the fresh clusters ``[start, start + count)`` a refcount of 1."""
        while count:
            block_range = start // self.entries
            if block_range != self._range:
                self._pending.append((self._range, bytes(self._block)))
                self._range = block_range
                self._block = bytearray(self._cluster)
                if (block_range + 1) * 8 > MAX_REFTABLE_BYTES:
                    raise OutputError(
                        "The image is too large for qcow2's refcount table "
                        "(try a larger cluster size or fewer refcount bits)"
                    )
            index = start - block_range * self.entries
            piece = min(count, self.entries - index)
            if piece == self.entries:
                self._block[:] = self._full
            else:
                self._fill_ones(self._block, index, piece)
            start, count = start + piece, count - piece

    def allocate(self, count: int) -> int:
        """``count`` contiguous new clusters; returns the byte offset of the first."""
        start = self.next
        self.next += count
        self._mark(start, count)
        while self._pending:  # write finished refcount blocks into new clusters
            block_range, content = self._pending.pop(0)
            where = self.next
            self.next += 1
            self._mark(where, 1)
            pwrite_all(self._fd, content, where * self._cluster)
            self._set_table(block_range, where * self._cluster)
        return start * self._cluster

    def can_share(self, cluster: int) -> bool:
        """Whether the last allocated ``cluster`` may take one more reference."""
        return (
            cluster == self.next - 1
            and cluster // self.entries == self._range
            and self._get(cluster - self._range * self.entries) < self.max_refcount
        )

    def share(self, cluster: int) -> None:
        """One more reference to the last allocated cluster (compressed data)."""
        index = cluster - self._range * self.entries
        self._set(index, self._get(index) + 1)

    def _set_table(self, block_range: int, offset: int) -> None:
        while len(self.table) <= block_range:
            self.table.append(0)
        self.table[block_range] = offset

    def finish(self) -> tuple[int, int]:
        """Write the refcount table and the last blocks; (table offset, table clusters)."""
        finished = len(self.table)  # ranges whose blocks are written
        table_clusters = 1
        while True:
            blocks = 0
            while True:  # the least fixed point: blocks counting themselves
                total = self.next + table_clusters + blocks
                needed = -(-total // self.entries) - finished
                if needed == blocks:
                    break
                blocks = needed
            ranges = finished + blocks
            if ranges * 8 <= table_clusters * self._cluster:
                break
            table_clusters += 1
        if ranges * 8 > MAX_REFTABLE_BYTES:
            raise OutputError("The image is too large for qcow2's refcount table")
        table_start = self.next
        self.next += table_clusters + blocks
        self._mark(table_start, table_clusters + blocks)
        self._pending.append((self._range, bytes(self._block)))
        for i, (block_range, content) in enumerate(self._pending):
            where = (table_start + table_clusters + i) * self._cluster
            pwrite_all(self._fd, content, where)
            self._set_table(block_range, where)
        self._pending.clear()
        data = pack_table(self.table, 8, "big", size=table_clusters * self._cluster)
        pwrite_all(self._fd, data, table_start * self._cluster)
        return table_start * self._cluster, table_clusters


def _compressor(compression_type: int, cluster_size: int) -> Callable[[memoryview], bytes | None]:
    """One pool thread's function compressing a cluster; None when it would not shrink."""
    if compression_type == L.COMPRESSION_ZSTD:
        zstd = L.zstd_module()
        context = zstd.ZstdCompressor()  # reused: each frame as zstd.compress() makes it
        end_frame = zstd.ZstdCompressor.FLUSH_FRAME

        def compress_zstd(data: memoryview) -> bytes | None:
            out: bytes = context.compress(data, mode=end_frame)
            return out if len(out) < cluster_size else None

        return compress_zstd

    return raw_deflate(cluster_size)


class Qcow2Writer(ClusterImageWriter):
    """A `Writer` for qcow2: data in increasing guest offsets, metadata at ``close``."""

    def __init__(
        self, out: OutputFile, virtual_size: int, options: Qcow2Options, compress: bool
    ) -> None:
        self._out = out
        self._fd = out.fd
        self._options = options
        self._size = virtual_size
        self._bits = options.cluster_bits
        self._cluster = 1 << self._bits
        entries = L.l2_entries(self._bits, options.extended_l2)
        l1_size = L.l1_entries_for(virtual_size, self._bits, options.extended_l2)
        if l1_size * 8 > MAX_TABLE_BYTES:
            # qemu creates the image empty, then fails to grow its L1 table
            # (create words it as every EFBIG: TooLargeError).
            raise TooLargeError("Could not resize image: Failed to grow the L1 table: "
                                "File too large")
        self._data = options.data_file  # the external data file, or None
        if self._data is not None:
            self._size_data_file(self._data, options.preallocation)
        self._refcounts = RefcountTracker(self._fd, self._bits, options.refcount_order)
        self._refcounts.allocate(1)  # the header cluster
        l1_clusters = -(-l1_size * 8 // self._cluster)
        self._l1_bytes = l1_clusters * self._cluster
        self._l1_offset = self._refcounts.allocate(l1_clusters) if l1_size else 0
        bits = self._bits
        # Preallocated: every cluster placed now (`PreallocatedLayout`).
        self._prealloc = options.preallocation
        self._layout: PreallocatedLayout | None = None
        self._range = -1  # the last L2 table range a preallocated image filled
        if self._prealloc != "off":
            self._start_preallocated(-(-virtual_size // self._cluster), entries)
        self._tables = ClusterTables(
            self._fd, cluster_bits=bits, l1_entries=l1_size, l2_entries=entries,
            table_bytes=self._cluster, byteorder="big",
            allocate=lambda length: self._refcounts.allocate(length >> bits),
            entry_flags=L.OFLAG_COPIED, table_flags=L.OFLAG_COPIED,
            stride=2 if options.extended_l2 else 1, bitmap=L.SUBCLUSTER_ALLOC_MASK,
            table_at=None if self._layout is None else self._table_at,
        )
        # Clusters smaller than the copy engine's zero granularity may arrive
        # all zero; larger ones arrive already free of zero pieces.
        self._clusters = UnitSequencer(
            self._cluster, virtual_size, self._store,
            check_whole=self._cluster < ZERO_CHECK_BELOW,
        )
        self._free_byte = 0  # where the next compressed cluster may start (0: nowhere)
        self._pool = None
        if compress:
            compression_type, cluster = options.compression_type, self._cluster
            self._pool = CompressionPool(
                cluster, lambda: _compressor(compression_type, cluster), self._store_compressed,
                name="qcow2-compress",
            )

    # --- the external data file ---------------------------------------------

    def _data_unit(self) -> int:
        """What qemu allocates in a data file at once: a subcluster with
        extended L2 entries, else a cluster."""
        return self._cluster // L.SUBCLUSTERS if self._options.extended_l2 else self._cluster

    def _size_data_file(self, data: OutputFile, mode: str) -> None:
        """A new data file is as long as the disk, as qemu creates it; when
        preallocated, to the end of the last allocation unit, and filled as
        ``falloc`` and ``full`` ask."""
        if data.in_place:
            return
        unit = self._data_unit()
        length = self._size if mode == "off" else -(-self._size // unit) * unit
        os.ftruncate(data.fd, length)
        reserve(data.fd, 0, length, mode)

    def _store(self, first: int, data: memoryview) -> None:
        """With a data file, guest clusters go to their own offset in it, whole
        (qemu's copy-on-write fills the last one past the disk's end too)."""
        if self._data is None:
            super()._store(first, data)
            return
        host = first << self._bits
        pwrite_all(self._data.fd, data, host)
        for i in range(len(data) >> self._bits):
            cluster = host + (i << self._bits)
            self._tables.set(first + i, cluster | L.OFLAG_COPIED, L.SUBCLUSTER_ALLOC_MASK)

    def _data_written(self, end: int) -> None:
        """Data written into the disk's last, partial allocation unit: qemu's
        write fills that unit of the data file to its end, past the disk's end."""
        unit = self._data_unit()
        last = self._size // unit * unit
        assert self._data is not None
        if end > last and not self._data.in_place:
            aligned = last + unit
            if os.fstat(self._data.fd).st_size < aligned:
                os.ftruncate(self._data.fd, aligned)

    # --- preallocation -------------------------------------------------------

    def _table_at(self, index: int) -> int:
        assert self._layout is not None
        return self._layout.table(index) << self._bits

    def _start_preallocated(self, guest_clusters: int, entries: int) -> None:
        """Allocate every table and data cluster (`PreallocatedLayout`) and fill
        the data as the mode says; guest data then goes straight to its place."""
        layout = PreallocatedLayout(self._prealloc, self._refcounts.next, guest_clusters,
                                    entries, external=self._data is not None)
        if layout.total:
            self._refcounts.allocate(layout.total)
        if not layout.interleaved and not layout.external:  # (a data file is sized already)
            first, count = layout.filled()
            reserve(self._fd, first << self._bits, count << self._bits, self._prealloc)
        self._layout = layout

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._pool is not None and self._data is not None:  # qemu cannot, at its first write
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        if self._layout is None:
            super().write(offset, data)
        else:
            self._place(offset, len(data), memoryview(data))
        if self._data is not None:
            self._data_written(offset + len(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._layout is None:
            super().write_zeroes(offset, length)
        elif self._out.in_place:  # a device keeps old bytes where a new file has holes
            self._place(offset, length, None)

    def close(self) -> None:
        if self._layout is not None:
            self._enter_range(self._layout.tables - 1)  # every table, written or not
        super().close()

    def _place(self, offset: int, length: int, data: memoryview | None) -> None:
        """Guest bytes (or zeros, ``data`` None) written at their preallocated
        place, a table's range at a time (its data is contiguous in the file)."""
        assert self._layout is not None
        bits, end = self._bits, offset + length
        fd = self._fd if self._data is None else self._data.fd
        range_bytes = self._layout.entries << bits
        position = offset
        while position < end:
            index = position // range_bytes
            self._enter_range(index)
            stop = min(end, (index + 1) * range_bytes)
            host = (self._layout.data(position >> bits) << bits) + (position & (self._cluster - 1))
            if data is None:
                write_zeros(fd, host, stop - position)
            else:
                pwrite_all(fd, data[position - offset : stop - offset], host)
                if self._options.extended_l2:
                    self._mark_subclusters(position, stop)
            position = stop

    def _enter_range(self, index: int) -> None:
        """Fill the L2 tables up to ``index`` (each written out as the next
        one starts): every entry points at its preallocated cluster."""
        layout = self._layout
        assert layout is not None
        while self._range < index:
            self._range += 1
            first = self._range * layout.entries
            self._tables.map_run(first, layout.data(first) << self._bits,
                                 layout.range_clusters(self._range))

    def _mark_subclusters(self, start: int, end: int) -> None:
        """Extended L2: the subclusters data was written to are allocated;
        the others stay unallocated, as qemu's preallocation leaves them."""
        size = self._cluster // L.SUBCLUSTERS
        for cluster in range(start >> self._bits, -(-end >> self._bits)):
            base = cluster << self._bits
            first = (max(start, base) - base) // size
            last = -(-(min(end, base + self._cluster) - base) // size)
            self._tables.add_bitmap(cluster, ((1 << (last - first)) - 1) << first)

    def _finish(self) -> None:
        """The refcount structures, then the header; the file ends with the last cluster."""
        table_offset, table_clusters = self._refcounts.finish()
        self._write_header(table_offset, table_clusters)
        if not self._out.in_place:
            os.ftruncate(self._fd, self._refcounts.next * self._cluster)

    # --- compression ---------------------------------------------------------

    def _place_compressed(self, data: bytes) -> int:
        """Write compressed data packed after the previous one; returns its L2 entry.

        A host cluster holding parts of several compressed clusters gets one
        reference for each of them (qemu-img check counts sectors touched).
        """
        size = len(data)
        start = self._free_byte
        first = start >> self._bits
        if start == 0 or not self._refcounts.can_share(first):
            sector_end = -(-size // L.SECTOR) * L.SECTOR
            start = self._refcounts.allocate(-(-sector_end // self._cluster))
        else:
            # can_share() means ``first`` is the last cluster allocated: the
            # next ones, if the data spills over, follow it contiguously.
            sector_end = -(-(start + size) // L.SECTOR) * L.SECTOR
            extra = ((sector_end - 1) >> self._bits) - first
            self._refcounts.share(first)
            if extra:
                self._refcounts.allocate(extra)
        pwrite_all(self._fd, data, start)
        end = start + size
        self._free_byte = end if end & (self._cluster - 1) else 0
        sectors = (end - 1) // L.SECTOR - start // L.SECTOR  # beyond the first one
        return L.OFLAG_COMPRESSED | (sectors << L.compressed_shift(self._bits)) | start

    # --- metadata ------------------------------------------------------------

    def _write_header(self, table_offset: int, table_clusters: int) -> None:
        options = self._options
        v3 = options.version >= 3
        incompatible = 0
        if options.extended_l2:
            incompatible |= L.INCOMPAT_EXTENDED_L2
        if options.compression_type != L.COMPRESSION_ZLIB:
            incompatible |= L.INCOMPAT_COMPRESSION
        if self._data is not None:
            incompatible |= L.INCOMPAT_DATA_FILE
        backing = options.backing
        name = b"" if backing is None else backing.name.encode("utf-8", "surrogateescape")
        extensions = b""
        if backing is not None:  # qemu's order: the backing format first
            extensions += L.pack_extension(L.EXT_BACKING_FORMAT, backing.format.encode())
        if self._data is not None:
            extensions += _data_file_extension(options.data_file_name)
        if v3:
            table = L.pack_extension(L.EXT_FEATURE_TABLE, L.feature_table())
            fixed = L.V3_HEADER_LENGTH + len(extensions) + 8 + len(name)
            if fixed + len(table) <= self._cluster:
                extensions += table
        extensions += bytes(8)  # the end of the header extensions
        length = L.V3_HEADER_LENGTH if v3 else L.V2_HEADER_LENGTH
        name_offset = length + len(extensions)
        assert name_offset + len(name) <= self._cluster  # _check_backing made sure
        header = L.Header(
            version=options.version,
            backing_file_offset=name_offset if name else 0,
            backing_file_size=len(name),
            cluster_bits=self._bits,
            size=self._size,
            crypt_method=0,
            l1_size=self._tables.l1_entries,
            l1_table_offset=self._l1_offset,
            refcount_table_offset=table_offset,
            refcount_table_clusters=table_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible_features=incompatible,
            compatible_features=L.COMPAT_LAZY_REFCOUNTS if options.lazy_refcounts else 0,
            autoclear_features=L.AUTOCLEAR_DATA_FILE_RAW if options.data_file_raw else 0,
            refcount_order=options.refcount_order,
            header_length=length,
            compression_type=options.compression_type,
        )
        data = header.pack() + extensions + name
        pwrite_all(self._fd, data + bytes(self._cluster - len(data)), 0)


def create_writer(out: OutputFile, virtual_size: int, options: ParsedOptions) -> Qcow2Writer:
    """Check the options (before any data), then start writing ``out``."""
    return Qcow2Writer(out, virtual_size, check_options(options), options.compress)
