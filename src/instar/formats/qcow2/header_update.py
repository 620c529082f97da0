"""The qcow2 header cluster as qemu 7.2 rewrites it (``qcow2_update_header``).

qemu never patches a qcow2 header in place when a string in it changes (the
backing file name, its format): it rebuilds the whole first cluster from what
it knows and writes it in one write. instar does the same, so the bytes match
qemu's: the header (version 2: 72 bytes; version 3: 112, plus any fields past
112 the image had, kept as they were), then the extensions in qemu's order
(backing format, external data file, the feature name table for version 3
with clusters larger than 4 KiB,
unknown extensions in the order the image had them), the end marker, and the
backing file name, unterminated; zeros to the end of the cluster.

Used by ``rebase`` (the backing file changes) and ``amend`` (the version, the
lazy refcounts bit, the refcount width, the data file's name and its raw bit
change). Extensions instar cannot rewrite faithfully (persistent bitmaps,
encryption) are refused by the caller before this is called.
"""

from __future__ import annotations

import errno

from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import Qcow2Driver, read_backing_name
from instar.safety import MAX_HEADER_EXTENSION_BYTES

# qemu leaves the feature name table (392 bytes) out of clusters this small.
_NO_FEATURE_TABLE_AT = 4096
_QEMU_V3_HEADER = 112  # sizeof(QCowHeader): the compression type byte, padded
# Extensions qemu regenerates from its own state (the rest it keeps as they were).
_KNOWN = (L.EXT_BACKING_FORMAT, L.EXT_FEATURE_TABLE, L.EXT_BITMAPS, L.EXT_CRYPTO,
          L.EXT_DATA_FILE)


def extension_list(driver: Qcow2Driver) -> list[tuple[int, bytes]]:
    """Every header extension of the image as (type, payload), in file order,
    from the area the reader decoded when it opened the image."""
    header, file = driver.header, driver.file
    start = header.header_length if header.version >= 3 else L.V2_HEADER_LENGTH
    end = min(header.backing_file_offset or header.cluster_size, header.cluster_size,
              start + MAX_HEADER_EXTENSION_BYTES)
    return list(L.extension_records(file.pread(start, max(0, end - start))))


def header_area(driver: Qcow2Driver, backing: str | None, backing_format: str | None,
                refcount_table: tuple[int, int] | None = None, *,
                version: int | None = None, compatible: int | None = None,
                refcount_order: int | None = None, data_file: bytes | None = None,
                autoclear: int | None = None) -> bytes:
    """The header area qemu writes for this image (the rest of the first
    cluster is zeros in qemu's write) with the backing file
    ``backing`` (None: none) of format ``backing_format``; ``refcount_table``
    (offset, clusters) where the table moved. Raises OSError with qemu's
    errno where qemu's ``qcow2_change_backing_file`` fails: EINVAL for a name
    longer than 1023 bytes or a backing file under a raw external data file,
    ENOSPC when the header does not fit in the first cluster.

    ``version`` (amend's compat) other than the image's: the header of that
    version, as qemu's upgrade and downgrade write it (every feature bit
    cleared but ``compatible``, 16-bit refcounts, zlib); ``compatible``
    replaces the compatible feature bits (amend's lazy_refcounts),
    ``refcount_order`` the refcount width (amend's refcount_bits, with the new
    table as ``refcount_table``), ``autoclear`` the autoclear bits (amend's
    data_file_raw=off); ``data_file`` names the external data file instead of
    the image's name for it, and ``b""`` leaves the extension out (amend's
    data_file, whose empty value qemu takes as no name)."""
    header, file = driver.header, driver.file
    cluster = header.cluster_size
    raw_data_file = header.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW and \
        header.incompatible_features & L.INCOMPAT_DATA_FILE
    if backing is not None and (raw_data_file or len(backing.encode()) > L.MAX_BACKING_NAME):
        raise OSError(errno.EINVAL, "Invalid argument")
    table_offset, table_clusters = refcount_table or (header.refcount_table_offset,
                                                      header.refcount_table_clusters)
    extra = b""  # header fields past qemu's, kept (version 3)
    same = version is None or version == header.version
    if same and header.version >= 3 and header.header_length > _QEMU_V3_HEADER:
        extra = file.pread(_QEMU_V3_HEADER, header.header_length - _QEMU_V3_HEADER)
        extra = extra.ljust(header.header_length - _QEMU_V3_HEADER, b"\0")
    kept = header.autoclear_features & (L.AUTOCLEAR_BITMAPS | L.AUTOCLEAR_DATA_FILE_RAW)
    features = (header.incompatible_features, header.compatible_features, kept,
                header.refcount_order, header.compression_type)
    if not same:  # qemu's upgrade and downgrade: no feature left to carry over
        features = (0, 0, 0, 4, L.COMPRESSION_ZLIB)
    if compatible is not None:
        features = (features[0], compatible, *features[2:])
    if autoclear is not None:
        features = (*features[:2], autoclear, *features[3:])
    if refcount_order is not None:
        features = (*features[:3], refcount_order, features[4])
    new = L.Header(
        header.version if version is None else version, 0, 0, header.cluster_bits,
        header.size // L.SECTOR * L.SECTOR, header.crypt_method, header.l1_size,
        header.l1_table_offset, table_offset, table_clusters, header.nb_snapshots,
        header.snapshots_offset, features[0], features[1], features[2], features[3],
        _QEMU_V3_HEADER + len(extra), features[4])
    body = bytearray(new.pack() + extra)
    extensions = extension_list(driver)
    if backing_format is not None:
        body += L.pack_extension(L.EXT_BACKING_FORMAT, backing_format.encode())
    if data_file is None and driver.extensions.data_file is not None:
        data_file = driver.extensions.data_file.encode()
    if data_file:
        body += L.pack_extension(L.EXT_DATA_FILE, data_file)
    if new.version >= 3 and cluster > _NO_FEATURE_TABLE_AT:
        body += L.pack_extension(L.EXT_FEATURE_TABLE, L.feature_table())
    for kind, payload in extensions:
        if kind not in _KNOWN:
            body += L.pack_extension(kind, payload)
    body += L.EXT_HEADER.pack(L.EXT_END, 0)
    if len(body) > cluster:
        raise OSError(errno.ENOSPC, "No space left on device")
    if backing is not None:
        name = backing.encode()
        if len(body) + len(name) > cluster:
            raise OSError(errno.ENOSPC, "No space left on device")
        offset = len(body)
        body += name
        body[8:20] = offset.to_bytes(8, "big") + len(name).to_bytes(4, "big")
    return bytes(body)


def header_bytes_in_use(driver: Qcow2Driver) -> int:
    """How much of the first cluster the image uses now (through the end of its
    backing name, or its extension area): the part a rewrite must cover."""
    header, file = driver.header, driver.file
    end = header.header_length if header.version >= 3 else L.V2_HEADER_LENGTH
    for kind, payload in extension_list(driver):
        end += L.EXT_HEADER.size + ((len(payload) + 7) & ~7)
        del kind
    end += L.EXT_HEADER.size
    if read_backing_name(header, file) is not None:
        end = max(end, header.backing_file_offset + header.backing_file_size)
    return min(end, header.cluster_size)


__all__ = ["extension_list", "header_area", "header_bytes_in_use"]
