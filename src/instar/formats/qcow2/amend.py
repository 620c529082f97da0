"""qcow2 amend: qemu 7.2's ``qcow2_amend_options`` for what instar supports.

Supported: ``lazy_refcounts`` on and off, ``compat`` 0.10 <-> 1.1 where no
cluster needs converting, ``size`` (the resize code, shrinking allowed as
amend allows it), ``refcount_bits`` (`refcount_order`, alone in a command),
and the options whose value is already the image's (``data_file_raw=off``,
the same backing file). qemu's
refusals come in qemu's order (the option loop, then upgrade, refcount
width, backing file, lazy refcounts, size, downgrade) and every check is
made before the first write; where qemu fails part way it has already
rewritten the header, instar has written nothing.

Changing the version rewrites the header as qemu's ``qcow2_update_header``
lays it out (`header_update`, which rebase shares), in one write, as qemu
writes it. The lazy refcounts bit
alone is one write of the 8-byte compatible features field.

A downgrade expands zero clusters first, as qemu does, for an image without
a backing file (`ZeroExpansion`).

Not supported yet (one line, nothing written): ``refcount_bits`` with
another change in the same command, encryption options, a downgrade of an
image with a backing file and zero clusters (qemu allocates clusters for
them), zstd compression, persistent bitmaps, and ``size`` with a version
change in the same
command.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from instar.errors import AmendError, FormatError, UnsupportedError
from instar.formats.options import Option, OptionSchema, ParsedOptions
from instar.formats.qcow2 import layout as L
from instar.formats.qcow2.reader import Qcow2Driver
from instar.mutate import ImageUpdate

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


def amend_qcow2(driver: Qcow2Driver, update: ImageUpdate, options: ParsedOptions,
                backing_name: str | None) -> int | None:
    """Amend the image's header as ``options`` asks; returns the new size
    when ``size`` asks for a resize (the caller resizes), else None."""
    header = driver.header
    given = options.given
    texts = options.texts
    old_version = new_version = header.version
    lazy = bool(header.compatible_features & L.COMPAT_LAZY_REFCOUNTS)
    wanted_lazy = lazy
    data_file_raw = bool(header.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW)
    refcount_bits = 1 << header.refcount_order
    new_size = 0
    # qemu's option loop, in its option list's order.
    if "size" in given:
        new_size = options.number("size")
    if "compat" in given:
        compat = texts["compat"]
        if compat in ("0.10", "v2"):
            new_version = 2
        elif compat in ("1.1", "v3"):
            new_version = 3
        else:
            raise AmendError(f"Unknown compatibility level {compat}")
    if "data_file" in given and not header.incompatible_features & L.INCOMPAT_DATA_FILE:
        raise AmendError("data-file can only be set for images that use an external "
                         "data file")
    if "data_file_raw" in given:
        wanted_raw = options.flag("data_file_raw")
        if wanted_raw and not data_file_raw:
            raise AmendError("data-file-raw cannot be set on existing images")
        if wanted_raw != data_file_raw:
            raise UnsupportedError("amend -o data_file_raw=off is not supported yet")
    if "data_file" in given:
        raise UnsupportedError("amend -o data_file is not supported yet")
    if "lazy_refcounts" in given:
        wanted_lazy = options.flag("lazy_refcounts")
    if "refcount_bits" in given:
        refcount_bits = options.number("refcount_bits")
        if not 0 < refcount_bits <= 64 or refcount_bits & (refcount_bits - 1):
            raise AmendError("Refcount width must be a power of two and may not exceed 64 "
                             "bits")
    if any(name.startswith("encrypt.") for name in given):
        if not header.crypt_method:
            raise AmendError("Can't amend encryption options - encryption not present")
        raise UnsupportedError("amending encryption options is not supported yet")
    _check_supported(driver)
    order_change: RefcountOrderChange | None = None
    # After the loop, in qemu's order.
    if refcount_bits != 1 << header.refcount_order:
        if new_version < 3 and refcount_bits != 16:
            raise AmendError("Refcount widths other than 16 bits require compatibility "
                             "level 1.1 or above (use compat=1.1 or greater)")
        from instar.formats.qcow2.refcount_order import RefcountOrderChange

        # qemu changes the width here, before the checks below; planned (and
        # its refusals made) here, written once they pass.
        order_change = RefcountOrderChange(driver, refcount_bits.bit_length() - 1)
    if "backing_file" in given or "backing_fmt" in given:
        file = texts.get("backing_file") if "backing_file" in given else None
        fmt = texts.get("backing_fmt") if "backing_fmt" in given else None
        if file != backing_name or fmt != (driver.extensions.backing_format
                                           if backing_name else None):
            error = AmendError("Cannot amend the backing file")
            error.hint = "You can use 'qemu-img rebase' instead."
            raise error
    if wanted_lazy and not lazy and new_version < 3:
        raise AmendError("Lazy refcounts only supported with compatibility level 1.1 and "
                         "above (use compat=1.1 or greater)")
    if new_size and new_version != old_version:
        raise UnsupportedError("amend -o size with compat in one command is not supported "
                               "yet")
    if order_change is not None:
        if new_version != old_version or wanted_lazy != lazy or new_size:
            raise UnsupportedError("amend -o refcount_bits with compat, lazy_refcounts or "
                                   "size in one command is not supported yet")
        order_change.write(update)
        return None
    zeros: ZeroExpansion | None = None
    if new_version < old_version:
        _check_downgrade(driver)
        zeros = ZeroExpansion(driver, has_backing=backing_name is not None)
        wanted_lazy = False  # qemu clears every compatible feature
    if new_version == old_version:
        if wanted_lazy != lazy:
            features = header.compatible_features ^ L.COMPAT_LAZY_REFCOUNTS
            update.phase("header")
            update.write(_COMPATIBLE_FIELD, features.to_bytes(8, "big"))
    else:
        if new_version > old_version:
            _check_upgrade(driver)
        area = _header_area(driver, new_version, wanted_lazy, backing_name)
        if zeros is not None:
            zeros.write(update)
        update.phase("header")
        update.write(0, area)
    return new_size or None


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


def _check_downgrade(driver: Qcow2Driver) -> None:
    """qemu's ``qcow2_downgrade`` refusals, then instar's."""
    header = driver.header
    if header.refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if header.incompatible_features & L.INCOMPAT_DATA_FILE:
        raise AmendError("Cannot downgrade an image with a data file")
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


def _header_area(driver: Qcow2Driver, version: int, lazy: bool,
                 backing_name: str | None) -> bytes:
    """The first cluster's header area as qemu's ``qcow2_update_header``
    writes it for ``version`` (`header_update`), zero-padded over what the
    old header used, for one write."""
    from instar.formats.qcow2.header_update import header_area, header_bytes_in_use

    backing_format = driver.extensions.backing_format if backing_name is not None else None
    try:
        area = header_area(driver, backing_name, backing_format, version=version,
                           compatible=L.COMPAT_LAZY_REFCOUNTS if lazy else 0)
    except OSError as error:
        raise FormatError(f"Failed to update the image header: {error.strerror}") from None
    return area.ljust(header_bytes_in_use(driver), b"\0")
