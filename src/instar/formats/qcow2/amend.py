"""qcow2 amend: qemu 7.2's ``qcow2_amend_options`` for what instar supports.

Supported: ``lazy_refcounts`` on and off, ``compat`` 0.10 <-> 1.1 where no
cluster needs converting, ``size`` (the resize code, shrinking allowed as
amend allows it), ``refcount_bits`` (`refcount_order`), ``data_file`` (a new
name for an image that has an external data file; empty: no name, as qemu),
``data_file_raw=off`` (the bit cleared), the same backing file, and any of
them together in one command. qemu's refusals come in qemu's order (the
option loop: encryption, compat, data file, raw bit, refcount width; then
upgrade, refcount width, backing file, lazy refcounts, size, downgrade) and
every check is made before the first write (`plan_amend`); where qemu fails
part way it has already written its first changes, instar has written
nothing.

The steps are written in qemu's order, each crash-safe by itself (a crash
between two leaves the image with the first made): the header changes
(`AmendPlan.write_header`: an upgrade, the refcount width, the data file
name, the raw bit, the lazy refcounts bit, which qemu makes one after
another, in one header write laid out as qemu's last ``qcow2_update_header``
lays it out, `header_update`, which rebase shares), then the size (the
caller, with the resize code), then a downgrade (`downgrade`), which expands
zero clusters first, as qemu does, for an image without a backing file
(`ZeroExpansion`).

Not supported yet (one line, nothing written): encryption (instar opens no
encrypted image), a downgrade of an image with a backing file and zero
clusters (qemu allocates clusters for them), zstd compression, persistent
bitmaps, ``size`` on an image with an external data file.
"""

from __future__ import annotations

from collections.abc import Iterator

from instar.errors import AmendError, FormatError, UnsupportedError
from instar.formats.options import Option, OptionSchema, ParsedOptions
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import Qcow2Driver
from instar.mutate import ImageUpdate
from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.formats.qcow2.refcount_order import RefcountOrderChange

_COMPATIBLE_FIELD = 80  # header: incompatible (72), compatible (80), autoclear (88)

# qemu 7.2's qcow2 amend options, with its types and help texts (-o help).
AMEND_OPTIONS = OptionSchema("qcow2", (
    Option("backing_file", "str", "", "File name of a base image"),
    Option("backing_fmt", "str", "", "Image format of the base image"),
    Option("compat", "str", "", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    Option("data_file", "str", "", "File name of an external data file"),
    Option("data_file_raw", "bool", False,
           "The external data file must stay valid as a raw image"),
    Option("encrypt.iter-time", "num", 0, "Time to spend in PBKDF in milliseconds"),
    Option("encrypt.keyslot", "num", 0, "Select a single keyslot to modify explicitly"),
    Option("encrypt.new-secret", "str", "",
           "New secret to set in the matching keyslots. Empty string to erase"),
    Option("encrypt.old-secret", "str", "", "Select all keyslots that match this password"),
    Option("encrypt.state", "str", "",
           "Select new state of affected keyslots (active/inactive)"),
    Option("lazy_refcounts", "bool", False, "Postpone refcount updates"),
    Option("refcount_bits", "num", 0, "Width of a reference count entry in bits"),
    Option("size", "size", 0, "Virtual disk size"),
))


class AmendPlan:
    """One amend command's changes, every refusal made before the first write
    (`plan_amend`), then written in qemu's order, each step crash-safe on its
    own (`write_header`, the caller's resize, `downgrade`)."""

    def __init__(self, driver: Qcow2Driver, backing_name: str | None) -> None:
        header = driver.header
        self.backing_name = backing_name
        self.old_version = self.new_version = header.version
        self.old_lazy = bool(header.compatible_features & L.COMPAT_LAZY_REFCOUNTS)
        self.lazy = self.old_lazy
        self.old_autoclear = self.autoclear = header.autoclear_features & (
            L.AUTOCLEAR_BITMAPS | L.AUTOCLEAR_DATA_FILE_RAW)
        self.data_file: bytes | None = None  # a new name (b"": none)
        self.order_change: RefcountOrderChange | None = None
        self.new_size = 0  # 0: unchanged
        self.zeros: ZeroExpansion | None = None  # a downgrade's, planned

    @property
    def downgrade(self) -> bool:
        return self.new_version < self.old_version

    def header_changes(self) -> bool:
        """Whether `write_header` has anything to write."""
        return (self.new_version > self.old_version or self.lazy != self.old_lazy
                or self.autoclear != self.old_autoclear or self.data_file is not None
                or self.order_change is not None)

    def write_header(self, driver: Qcow2Driver, update: ImageUpdate) -> None:
        """An upgrade, the refcount width, the data file and its raw bit and
        the lazy refcounts bit, which qemu changes one after another (each
        followed by ``qcow2_update_header``), in one header write: the new
        refcount structure first, then the header as qemu's last update of it
        lays it out, then the old refcount structure freed."""
        header = driver.header
        change = self.order_change
        upgrade = self.new_version > self.old_version
        compatible = L.COMPAT_LAZY_REFCOUNTS if self.lazy else 0
        if not upgrade:
            compatible |= header.compatible_features & ~L.COMPAT_LAZY_REFCOUNTS
        area = _header_area(
            driver, self.new_version if upgrade else header.version, self.backing_name,
            compatible=compatible, autoclear=self.autoclear, data_file=self.data_file,
            refcount_table=(change.table_offset, change.table_clusters) if change else None,
            refcount_order=change.order if change else None)
        if change is not None:
            change.write_structure(update)
        update.phase("header")
        update.write(0, area)
        if change is not None:
            change.release(update)


def plan_amend(driver: Qcow2Driver, options: ParsedOptions, backing_name: str | None,
               zero_fill: bool) -> AmendPlan:
    """qemu 7.2's ``qcow2_amend_options`` checks, in its order, all made here
    (qemu makes the later ones after its first changes are written).
    ``zero_fill``: a growing ``size`` must zero what the backing file would
    show through."""
    header = driver.header
    given = options.given
    texts = options.texts
    plan = AmendPlan(driver, backing_name)
    refcount_bits = 1 << header.refcount_order
    # qemu's option loop, in its option list's order.
    if any(name.startswith("encrypt.") for name in given):
        if not header.crypt_method:
            raise AmendError("Can't amend encryption options - encryption not present")
        raise UnsupportedError("amending encryption options is not supported yet")
    if "size" in given:
        plan.new_size = options.number("size")
    if "compat" in given:
        compat = texts["compat"]
        if compat in ("0.10", "v2"):
            plan.new_version = 2
        elif compat in ("1.1", "v3"):
            plan.new_version = 3
        else:
            raise AmendError(f"Unknown compatibility level {compat}")
    if "data_file" in given:
        if not header.incompatible_features & L.INCOMPAT_DATA_FILE:
            raise AmendError("data-file can only be set for images that use an external "
                             "data file")
        plan.data_file = texts["data_file"].encode("utf-8", "surrogateescape")
    if "data_file_raw" in given:
        if options.flag("data_file_raw"):
            if not plan.old_autoclear & L.AUTOCLEAR_DATA_FILE_RAW:
                raise AmendError("data-file-raw cannot be set on existing images")
        else:
            plan.autoclear &= ~L.AUTOCLEAR_DATA_FILE_RAW
    if "lazy_refcounts" in given:
        plan.lazy = options.flag("lazy_refcounts")
    if "refcount_bits" in given:
        refcount_bits = options.number("refcount_bits")
        if not 0 < refcount_bits <= 64 or refcount_bits & (refcount_bits - 1):
            raise AmendError("Refcount width must be a power of two and may not exceed 64 "
                             "bits")
    _check_supported(driver)
    # After the loop, in qemu's order: upgrade, refcount width, header,
    # backing file, lazy refcounts, size, downgrade.
    if plan.new_version > plan.old_version:
        _check_upgrade(driver)
    order = refcount_bits.bit_length() - 1
    if order != header.refcount_order:
        if plan.new_version < 3 and refcount_bits != 16:
            raise AmendError("Refcount widths other than 16 bits require compatibility "
                             "level 1.1 or above (use compat=1.1 or greater)")
        from instar.formats.qcow2.refcount_order import RefcountOrderChange

        plan.order_change = RefcountOrderChange(driver, order)
    if "backing_file" in given or "backing_fmt" in given:
        file = texts.get("backing_file") if "backing_file" in given else None
        fmt = texts.get("backing_fmt") if "backing_fmt" in given else None
        if file != backing_name or fmt != (driver.extensions.backing_format
                                           if backing_name else None):
            error = AmendError("Cannot amend the backing file")
            error.hint = "You can use 'qemu-img rebase' instead."
            raise error
    if plan.lazy and not plan.old_lazy and plan.new_version < 3:
        raise AmendError("Lazy refcounts only supported with compatibility level 1.1 and "
                         "above (use compat=1.1 or greater)")
    if plan.header_changes():
        _header_area(driver, max(plan.old_version, plan.new_version), backing_name,
                     data_file=plan.data_file)  # qemu's header update failing
    if plan.new_size:
        from instar.formats.qcow2.resize import check_resize

        check_resize(driver, plan.new_size, "off", zero_fill,
                     version=max(plan.old_version, plan.new_version))
    if plan.downgrade:
        _check_downgrade(driver, order, plan.new_size or driver.virtual_size)
        if plan.new_size and zero_fill and backing_name is not None:
            raise UnsupportedError("downgrading a qcow2 image with a backing file and "
                                   "zero clusters (qemu allocates them) is not supported "
                                   "yet")
        plan.zeros = ZeroExpansion(driver, has_backing=backing_name is not None)
    return plan


def downgrade(driver: Qcow2Driver, update: ImageUpdate, version: int,
              backing_name: str | None, zeros: ZeroExpansion | None = None) -> None:
    """qemu's ``qcow2_downgrade`` (checked by `plan_amend`): zero clusters
    expanded (``zeros``: as planned, when no step before changed the tables),
    then the header of ``version``, every feature cleared."""
    if zeros is None:
        zeros = ZeroExpansion(driver, has_backing=backing_name is not None)
    area = _header_area(driver, version, backing_name, compatible=0)
    zeros.write(update)
    update.phase("header")
    update.write(0, area)


def _check_supported(driver: Qcow2Driver) -> None:
    header = driver.header
    if driver.extensions.has_bitmaps or header.autoclear_features & L.AUTOCLEAR_BITMAPS:
        raise UnsupportedError("amending a qcow2 image with persistent bitmaps is not "
                               "supported yet")
    if header.crypt_method:
        raise UnsupportedError("amending an encrypted qcow2 image is not supported yet")


def _check_upgrade(driver: Qcow2Driver) -> None:
    """qemu rewrites a v2 snapshot table whose entries lack the extra data v3
    needs: not done here yet."""
    from instar.formats.qcow2.snapshots import read_snapshot_table

    snapshots, _ = read_snapshot_table(driver)
    if any(snapshot.extra_size < 16 for snapshot in snapshots):
        raise UnsupportedError("upgrading a qcow2 image whose snapshots lack their v3 "
                               "extra data is not supported yet")


def _check_downgrade(driver: Qcow2Driver, refcount_order: int, size: int) -> None:
    """qemu's ``qcow2_downgrade`` refusals (``refcount_order``, ``size``: the
    width and the virtual size by then), then instar's."""
    from instar.formats.qcow2.snapshots import read_snapshot_table

    header = driver.header
    if refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if header.incompatible_features & L.INCOMPAT_DATA_FILE:
        raise AmendError("Cannot downgrade an image with a data file")
    # A v2 snapshot has neither its own size nor a 64-bit VM state size.
    for snapshot in read_snapshot_table(driver)[0]:
        if snapshot.vm_state_size > 0xFFFF_FFFF or snapshot.disk_size != size:
            raise AmendError("Internal snapshots prevent downgrade of image")
    if header.incompatible_features & L.INCOMPAT_COMPRESSION:
        raise UnsupportedError("downgrading a qcow2 image with zstd compression is not "
                               "supported yet")
    features = header.incompatible_features & ~L.INCOMPAT_DIRTY
    if features:
        raise AmendError(f"Cannot downgrade an image with incompatible features "
                         f"{features:#x} set")


class ZeroExpansion:
    """qemu's ``qcow2_expand_zero_clusters`` for an image without a backing
    file: version 2 has no zero flag, so a zero cluster without a host
    cluster becomes unallocated (it reads zeros all the same), and one with a
    host cluster gets explicit zeros there and loses the flag. Every L2 table
    of the image and of its snapshots is looked at, each once. Tables are
    read again when written, so only their offsets are kept."""

    def __init__(self, driver: Qcow2Driver, has_backing: bool) -> None:
        from instar.formats.qcow2.resize import read_active_l1
        from instar.formats.qcow2.snapshots import TableWalk, read_snapshot_table

        self.walk = walk = TableWalk(driver)
        self.cluster = driver.header.cluster_size
        self.size = driver.file.size
        l1_tables = [read_active_l1(driver)]
        for snapshot in read_snapshot_table(driver)[0]:
            l1_tables.append(walk.read_l1(snapshot.l1_offset, snapshot.l1_size,
                                          "Snapshot L1 table"))
        self.tables: list[int] = []  # the L2 tables with zero clusters, in order
        seen: set[int] = set()
        for l1 in l1_tables:
            for offset in walk.l2_tables(l1):
                if offset in seen:
                    continue
                seen.add(offset)
                found = list(self._zeros(offset))
                if found and has_backing and any(not host for _, host in found):
                    raise UnsupportedError("downgrading a qcow2 image with a backing file "
                                           "and zero clusters (qemu allocates them) is not "
                                           "supported yet")
                if found:
                    self.tables.append(offset)

    def _zeros(self, offset: int) -> Iterator[tuple[int, int]]:
        """(slot, host cluster or 0) of each zero cluster of the L2 table at ``offset``."""
        table = self.walk.read_l2(offset)
        for slot, entry in enumerate(table):
            if entry & L.OFLAG_ZERO and not entry & L.OFLAG_COMPRESSED:
                host = entry & L.L2E_OFFSET_MASK
                if host and (host % self.cluster or host + self.cluster > self.size):
                    raise FormatError(f"qcow2 zero cluster {host:#x} lies outside the image")
                yield slot, host

    def write(self, update: ImageUpdate) -> None:
        """Zeros into the host clusters first, then the tables without the flag
        (a crash between leaves zero clusters that read zeros either way)."""
        from instar.formats.qcow2.snapshots import pack_entries

        update.phase("data")
        for offset in self.tables:
            for _, host in self._zeros(offset):
                if host:
                    update.zeros(host, self.cluster)
        update.phase("pointers")
        for offset in self.tables:
            table = self.walk.read_l2(offset)
            for slot, host in self._zeros(offset):
                table[slot] = (table[slot] & ~L.OFLAG_ZERO) if host else 0
            update.write(offset, pack_entries(table))


def _header_area(driver: Qcow2Driver, version: int, backing_name: str | None, *,
                 compatible: int | None = None, autoclear: int | None = None,
                 data_file: bytes | None = None, refcount_table: tuple[int, int] | None = None,
                 refcount_order: int | None = None) -> bytes:
    """The first cluster's header area as qemu's ``qcow2_update_header``
    writes it for ``version`` and the other fields given (`header_update`),
    zero-padded over what the old header used, for one write; qemu's
    message where it does not fit."""
    from instar.formats.qcow2.header_update import header_area, header_bytes_in_use

    backing_format = driver.extensions.backing_format if backing_name is not None else None
    try:
        area = header_area(driver, backing_name, backing_format, refcount_table,
                           version=version, compatible=compatible, autoclear=autoclear,
                           data_file=data_file, refcount_order=refcount_order)
    except OSError as error:
        raise FormatError(f"Failed to update the image header: {error.strerror}") from None
    return area.ljust(header_bytes_in_use(driver), b"\0")
