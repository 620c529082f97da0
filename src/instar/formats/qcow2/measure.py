"""``measure -O qcow2``: qemu 7.2's ``qcow2_measure``, figure for figure.

The figures are qemu's formulas, not instar's writer's layout: they count
every L2 table and refcount block of a fully allocated image, so they bound
both what instar's writer produces (it writes only the tables it fills) and
what qemu-img convert does; tests/test_measure.py converts with both and holds
them to it. Options are read as ``qcow2_measure`` reads them, with its
messages, which are not creation's: it knows no ``v3``, and ignores
``lazy_refcounts``, ``compression_type`` and ``data_file``. Arithmetic wraps
as qemu's 64-bit integers do (an image near 8 EiB overflows in qemu too).
"""

from __future__ import annotations

from instar.errors import UnsupportedError, UsageError
from instar.formats.base import Measurement, MeasureSource, ParsedOptions, PersistentBitmap
from instar.formats.qcow2 import layout as L

U64 = (1 << 64) - 1
DEFAULT_CLUSTER_SIZE = 1 << 16
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
L1E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8
L2E_SIZE, L2E_SIZE_EXTENDED = 8, 16
PREALLOC_MODES = ("off", "metadata", "falloc", "full")  # qemu's PreallocMode
BITMAP_DIR_ENTRY_SIZE = 24  # the fixed part of a bitmap directory entry
BITMAP_TABLE_ENTRY_SIZE = 8

# What qemu's QAPI accepts for LUKS creation options, in the order it visits
# them (QCryptoBlockCreateOptionsLUKS), checked before the missing secret.
_LUKS_ENUMS = (
    ("cipher-alg", ("aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128",
                    "serpent-128", "serpent-192", "serpent-256",
                    "twofish-128", "twofish-192", "twofish-256")),
    ("cipher-mode", ("ecb", "cbc", "xts", "ctr")),
    ("ivgen-alg", ("plain", "plain64", "essiv")),
    ("ivgen-hash-alg", ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")),
    ("hash-alg", ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")),
)


def _round_up(value: int, alignment: int) -> int:
    """qemu's ROUND_UP on uint64 (``alignment`` a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1) & U64


def _div_round_up(value: int, divisor: int) -> int:
    return -(-value // divisor)


def measure(options: ParsedOptions, size: int, source: MeasureSource | None) -> Measurement:
    """``qcow2_measure``: options first (in qemu's order and words), then the
    size check on the size option, then the figures."""
    extended_l2 = options.get("extended_l2") is True
    cluster_size = _cluster_size(options, extended_l2)
    version = _version(options)
    refcount_bits = _refcount_bits(options, version)
    prealloc = _prealloc(options)
    has_backing_file = options.get("backing_file") is not None
    luks_payload = _luks_payload(options, cluster_size)

    virtual_size = _round_up(size, cluster_size)
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE
    l2_tables = _div_round_up(virtual_size // cluster_size, cluster_size // l2e_size)
    if l2_tables * L1E_SIZE > MAX_L1_BYTES:
        raise UsageError("The image size is too large (try using a larger cluster size)")

    required = 0
    if source is not None:
        virtual_size = _round_up(source.virtual_size, cluster_size)
        if has_backing_file:
            # The new image's backing file may share nothing with the input.
            required = virtual_size
        else:
            required = source.data_units(cluster_size) * cluster_size
    if prealloc in ("full", "falloc"):
        required = virtual_size
    refcount_order = refcount_bits.bit_length() - 1
    fully = (luks_payload
             + prealloc_size(virtual_size, cluster_size, refcount_order, extended_l2)) & U64
    required = (fully - virtual_size + required) & U64
    bitmaps = None
    if version >= 3 and source is not None and source.bitmaps is not None:
        bitmaps = bitmaps_size(source.bitmaps, source.virtual_size, cluster_size)
    return Measurement(required, fully, bitmaps)


def _cluster_size(options: ParsedOptions, extended_l2: bool) -> int:
    value = options.get("cluster_size")
    cluster_size = DEFAULT_CLUSTER_SIZE if value is None else int(value)
    if not (1 << L.MIN_CLUSTER_BITS <= cluster_size <= 1 << L.MAX_CLUSTER_BITS) or (
        cluster_size & (cluster_size - 1)
    ):
        raise UsageError(
            f"Cluster size must be a power of two between {1 << L.MIN_CLUSTER_BITS} and "
            f"{1 << (L.MAX_CLUSTER_BITS - 10)}k"
        )
    minimum = (1 << L.MIN_CLUSTER_BITS) * L.SUBCLUSTERS
    if extended_l2 and cluster_size < minimum:
        raise UsageError(
            "Extended L2 entries are only supported with cluster sizes of at least "
            f"{minimum} bytes"
        )
    return cluster_size


def _version(options: ParsedOptions) -> int:
    compat = options.get("compat")
    if compat is None or compat == "1.1":
        return 3
    if compat == "0.10":
        return 2
    raise UsageError(f"Invalid compatibility level: '{compat}'")


def _refcount_bits(options: ParsedOptions, version: int) -> int:
    value = options.get("refcount_bits")
    bits = 16 if value is None else int(value) & U64  # qemu reads it as a uint64
    if bits > 64 or not bits or bits & (bits - 1):
        raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise UsageError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or "
            "above (use compat=1.1 or greater)"
        )
    return bits


def _prealloc(options: ParsedOptions) -> str:
    value = options.get("preallocation")
    if value is None:
        return "off"
    if value not in PREALLOC_MODES:
        raise UsageError(f"invalid parameter value: {value}")
    return str(value)


def _luks_payload(options: ParsedOptions, cluster_size: int) -> int:
    """qemu sizes a LUKS header by creating one with the secret; instar takes no
    ``--object``, so every secret is missing, as it is to qemu without one."""
    if options.get("encrypt.format") != "luks":
        return 0
    for name, accepted in _LUKS_ENUMS:
        value = options.get(f"encrypt.{name}")
        if value is not None and value not in accepted:
            raise UsageError(f"Parameter '{name}' does not accept value '{value}'")
    secret = options.get("encrypt.key-secret")
    if secret is None:
        raise UsageError("Parameter 'encrypt.key-secret' is required for cipher")
    raise UnsupportedError(f"No secret with id '{secret}'")


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """``qcow2_calc_prealloc_size``: a fully allocated image, every table included."""
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE
    aligned = _round_up(total_size, cluster_size)
    meta = cluster_size  # the header
    l2_entries = _round_up(aligned // cluster_size, cluster_size // l2e_size)
    meta += l2_entries * l2e_size
    l1_entries = _round_up(l2_entries * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta += l1_entries * L1E_SIZE
    clusters = ((meta + aligned) & U64) // cluster_size
    meta += refcount_metadata_size(clusters, cluster_size, refcount_order)
    return (meta + aligned) & U64


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """``qcow2_refcount_metadata_size``: refcount blocks and table clusters that
    count every cluster, themselves included (the least fixed point)."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    total = -1
    while True:
        blocks = _div_round_up(clusters + table + blocks, refcounts_per_block)
        table = _div_round_up(blocks, blocks_per_table_cluster)
        if clusters + blocks + table == total:
            return (blocks + table) * cluster_size
        total = clusters + blocks + table


def bitmaps_size(bitmaps: tuple[PersistentBitmap, ...], disk_size: int,
                 cluster_size: int) -> int:
    """``qcow2_get_persistent_dirty_bitmap_size``: each bitmap fully allocated,
    its table, and the directory."""
    total = directory = 0
    for bitmap in bitmaps:
        bits = _div_round_up(disk_size, bitmap.granularity)
        clusters = _div_round_up(_div_round_up(bits, 8), cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * BITMAP_TABLE_ENTRY_SIZE, cluster_size)
        directory += (BITMAP_DIR_ENTRY_SIZE + bitmap.name_length + 7) & ~7
    return (total + _round_up(directory, cluster_size)) & U64
