"""What every format module provides: the `Format` and `Writer` protocols.

A format module knows one on-disk layout and nothing else: it never opens a
path (the host side hands it open files through a `Resolver`), and no writer
knows about dd (the copy engine feeds it a Window like any Image).
"""

from __future__ import annotations

from instar.errors import UnsupportedError
from instar.files import InputFile
from instar.formats.options import CreateOptions as CreateOptions  # re-exported
from instar.formats.options import OptionSchema as OptionSchema  # re-exported
from instar.formats.options import ParsedOptions as ParsedOptions  # re-exported
from instar.record import Record
from instar.runtime_types import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from typing import Any

    from instar.findings import CheckResult
    from instar.image import Driver, Image
    from instar.mutate import ImageUpdate


class Resolver(Protocol):
    """Host-side services a reader may ask for: files named inside an image.

    The host resolves the name against the allowlist and the chain-depth
    limit, so format code never touches the file system itself. A resolver
    may have ``checking`` True (read with ``getattr``, default False): qemu's
    BDRV_O_CHECK, the image is opened for ``check``, which reports what
    opening would otherwise refuse (a VHDX BAT entry past the end).
    A resolver may have ``reads_data`` False (read with ``getattr``, default
    True): the image is opened for its metadata only (qemu's BDRV_O_NO_IO:
    ``info``), so a format that needs a key to read its data (an encrypted
    qcow) opens anyway, to be described.
    """

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        """Open the backing image ``name`` that ``child`` refers to."""
        ...

    def open_file(self, name: str, child: InputFile, what: str) -> InputFile:
        """Open a plain file ``child`` names: a qcow2 data file, a VMDK extent...

        ``what`` names the role in messages ("data file", "extent").
        """
        ...


class OutputFile(Record):
    """An open output, created by the host side (a temporary file or a device).

    ``name`` is the target the user named, for messages; ``in_place``: written
    over existing content (a block device, or convert -n), so zeros must be
    written, and the file keeps its size.
    """

    __slots__ = ("fd", "in_place", "name")

    def __init__(self, fd: int, name: str, in_place: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.in_place = in_place


class Writer(Protocol):
    """Writes an image sequentially: increasing offsets, then ``close``.

    ``write_zeroes`` declares a run that must read back as zeros; a fresh
    image already does, so most writers do nothing, but a block device must.
    ``close`` writes the metadata; ``abort`` gives up (the host deletes the file).
    """

    def write(self, offset: int, data: bytes | memoryview) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class GuestUpdater(Protocol):
    """Guest data written into an existing image in place, in a crash-safe
    order (``commit`` writes its base through one): whole units of ``unit``
    bytes, through the `instar.mutate.ImageUpdate` it was made with.

    ``overwrite`` gives guest unit ``number`` the bytes ``data`` (a whole
    unit), or zeros when None, stored as the format stores zeros (a zero
    cluster, or zero bytes); units the image holds already are rewritten.
    ``finish`` writes what the units need (new tables, then the pointers);
    ``write_header`` the header fields they changed (phase header);
    ``release`` frees what the old structure held, after the caller's header
    writes; ``abandon`` gives up after a failure before ``finish``.
    """

    unit: int

    def overwrite(self, number: int, data: bytes | None) -> None: ...

    def finish(self) -> None: ...

    def write_header(self) -> None: ...

    def release(self) -> None: ...

    def abandon(self) -> None: ...


class Format(Protocol):
    """One image format: probing, reading, sizing and creating."""

    name: str
    # Every ``-o`` option and whether ``-c`` works: feeds ``-o help``, `parse_options`,
    # and so ``declared_size`` and ``create``.
    create_options: OptionSchema

    def probe(self, header: bytes, filename: str) -> int:
        """A score for ``header`` (the first 2048 bytes); 0 means "not mine"."""
        ...

    def open(self, file: InputFile, resolver: Resolver) -> Driver:
        """This format's layer of the image in ``file`` (its mapping function);
        raise FormatError if malformed. Files the image names come from
        ``resolver``; the host wraps the layer in a `BlockImage`."""
        ...

    def declared_size(self, length: int, options: ParsedOptions | None = None) -> int:
        """The virtual size a new image gets when asked for ``length`` bytes.

        ``options`` (None: the defaults) matter where a creation option changes
        the rounding (vpc's ``force_size``).
        """
        ...

    def create(self, out: OutputFile, virtual_size: int, options: ParsedOptions) -> Writer:
        """Start writing a new image of ``virtual_size`` bytes into ``out``.

        ``options`` come from `parse_options` with this format's schema; what
        their values mean (and qemu's messages when they make no sense) is the
        writer's to check, before it writes anything.
        """
        ...

    def describe(self, driver: Driver) -> FormatDetails:
        """What ``qemu-img info`` shows beyond the size and name of an image."""
        ...

    def open_updater(self, driver: Driver, update: ImageUpdate, what: str) -> GuestUpdater:
        """The in-place writer of ``driver``'s image (see `GuestUpdater`)."""
        ...

    def check(self, driver: Driver) -> CheckResult:
        """What ``qemu-img check`` finds in the layer ``open`` returned."""
        ...

    def measure(self, options: ParsedOptions, size: int,
                source: MeasureSource | None) -> Measurement:
        """What a new image needs (``qemu-img measure``): of ``size`` bytes
        (the size option), or converted from ``source``."""
        ...


# What ``instar measure`` knows of an image to convert, and what it answers.


class PersistentBitmap(NamedTuple):
    """A persistent dirty bitmap of the image to convert, as qemu sizes its copy."""

    name_length: int  # bytes of its name
    granularity: int


class MeasureSource(Protocol):
    """The image to convert, as a format's measure function sees it (qemu's ``in_bs``)."""

    @property
    def virtual_size(self) -> int:
        """qemu's ``bdrv_getlength``."""
        ...

    @property
    def bitmaps(self) -> tuple[PersistentBitmap, ...] | None:
        """Its persistent bitmaps; None where the image cannot hold any (qemu's
        ``bdrv_supports_persistent_dirty_bitmap``: a qcow2 v3 image only)."""
        ...

    def data_units(self, unit: int, start: int = 0, end: int | None = None) -> int:
        """How many ``unit``-aligned units of ``[start, end)`` hold data, by
        qemu's block status of the whole chain: a converted image allocates
        no other unit. ``start`` is a multiple of ``unit``."""
        ...


class Measurement(NamedTuple):
    """qemu's BlockMeasureInfo: bytes a new image needs, as qemu's int64s."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None  # None: qemu leaves "bitmaps" out


# What ``instar info`` shows about a format: the `describe` hook.
#
# qemu-img info prints what the block driver's get_info / get_specific_info /
# snapshot_list callbacks return; a format module supplies the same facts
# through an optional ``describe`` method. instar.info renders them exactly as
# qemu-img does (key order, spacing, JSON), so a format only states facts.

# A value of qemu's format-specific data (a QAPI object visited to a QObject):
# a dict keeps the QAPI schema's member order (instar.info reorders keys as
# qemu's QDict does), enums are their string names, absent optional members
# are simply left out.
QValue = bool | int | str | list["QValue"] | dict[str, "QValue"]


class SnapshotDetails(NamedTuple):
    """One internal snapshot, as qemu's SnapshotInfo."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int  # qemu splits it into vm-clock-sec / vm-clock-nsec
    icount: int | None = None  # None: the snapshot records no icount


class ChildFile(NamedTuple):
    """A file an image uses besides its own (qcow2 data file, VMDK extent).

    ``name`` is qemu's child name ("data-file", "extents.0"...); qemu 8.0+
    shows it as a child node. ``counts_in_disk_size``: whether its allocated
    size counts in "disk size", as the driver's get_allocated_file_size adds
    it (vmdk adds its extents; qemu-img 7.2 leaves a qcow2 data file out).
    The file is named by its identity (st_dev, st_ino), not held: facts about
    files (allocation, size) are the host's to gather.
    """

    name: str
    identity: tuple[int, int]
    counts_in_disk_size: bool

    @classmethod
    def of(cls, name: str, file: InputFile, counts_in_disk_size: bool) -> ChildFile:
        return cls(name, file.identity, counts_in_disk_size)


class FormatDetails(Record):
    """What ``qemu-img info`` shows beyond the size and name of an image.

    ``dirty`` None means the driver has no get_info (qemu then omits
    "dirty-flag"); ``specific_type``/``specific`` are ImageInfoSpecific's
    union tag and data ("qcow2", {"compat": "1.1", ...}); ``children`` are
    listed in the order qemu opens them.
    """

    __slots__ = ("backing_filename", "backing_format", "children", "cluster_size", "dirty",
                 "encrypted", "snapshots", "specific", "specific_type")

    def __init__(
        self,
        cluster_size: int | None = None,
        encrypted: bool = False,
        dirty: bool | None = False,
        backing_filename: str | None = None,
        backing_format: str | None = None,
        snapshots: list[SnapshotDetails] | None = None,
        specific_type: str | None = None,
        specific: dict[str, QValue] | None = None,
        children: list[ChildFile] | None = None,
    ) -> None:
        self.cluster_size = cluster_size
        self.encrypted = encrypted
        self.dirty = dirty
        self.backing_filename = backing_filename
        self.backing_format = backing_format
        self.snapshots: list[SnapshotDetails] = [] if snapshots is None else snapshots
        self.specific_type = specific_type
        self.specific = specific
        self.children: list[ChildFile] = [] if children is None else children


class FormatBase:
    """What every format shares. A format names the functions that open its
    layer, create its writer and describe an image ("module:function"); they
    are imported on first use, so probing stays cheap. Sizes round up to a
    sector unless the format says otherwise."""

    name: str
    create_options: OptionSchema
    reader: str  # (file, resolver) -> Driver
    writer: str  # (out, virtual_size, options) -> Writer
    describer: str | None = None  # (driver) -> FormatDetails; None: nothing to add
    checker: str | None = None  # (driver) -> CheckResult; None: qemu has no check for it
    # (options, size, source) -> Measurement; None: qemu's "does not support size measurement"
    measurer: str | None = None
    # (driver, update, what) -> GuestUpdater; None: instar does not change
    # this format's guest data in place (yet)
    updater: str | None = None
    # The writer checks (and does) ``preallocation`` itself, in its driver's
    # order; otherwise `create` checks the file protocol's mode first.
    checks_preallocation = False

    def probe(self, header: bytes, filename: str) -> int:
        raise NotImplementedError

    def open(self, file: InputFile, resolver: Resolver) -> Driver:
        driver: Driver = _entry(self.reader)(file, resolver)
        return driver

    def declared_size(self, length: int, options: ParsedOptions | None = None) -> int:
        return -(-length // SECTOR) * SECTOR

    def create(self, out: OutputFile, virtual_size: int, options: ParsedOptions) -> Writer:
        if not self.checks_preallocation:
            # qemu's driver first creates the file through the file protocol,
            # which refuses a mode it does not know; the driver then rewrites
            # the file, so a mode it takes leaves the image as ``off`` would.
            from instar.formats.preallocation import file_mode

            file_mode(options)
        writer: Writer = _entry(self.writer)(out, virtual_size, options)
        return writer

    def describe(self, driver: Driver) -> FormatDetails:
        """Facts about an image from the layer ``open`` returned, from its
        metadata only (never guest data), for ``instar info``."""
        if self.describer is None:
            return FormatDetails()
        details: FormatDetails = _entry(self.describer)(driver)
        return details

    def open_updater(self, driver: Driver, update: ImageUpdate, what: str) -> GuestUpdater:
        """The in-place writer of ``driver``'s image, its writes made through
        ``update``; ``what`` names the command in refusals."""
        if self.updater is None:
            raise UnsupportedError(f"{what}: writing into a {self.name} image in place is "
                                   "not supported yet")
        updater: GuestUpdater = _entry(self.updater)(driver, update, what)
        return updater

    def check(self, driver: Driver) -> CheckResult:
        """qemu-img check's structural walk of the layer ``open`` returned
        (opened with ``Resolver.checking``); ChecksNotSupportedError where
        qemu's driver has no check."""
        if self.checker is None:
            from instar.errors import ChecksNotSupportedError

            raise ChecksNotSupportedError()
        result: CheckResult = _entry(self.checker)(driver)
        return result

    def measure(self, options: ParsedOptions, size: int,
                source: MeasureSource | None) -> Measurement:
        """``qemu-img measure``'s figures, from the format's ``measurer``.

        ``options`` were parsed without refusing what the writer does not
        implement; ``size`` is the size option (``--size``, else ``-o size``,
        else 0), which qemu reads even when it measures an image."""
        if self.measurer is None:
            raise UnsupportedError(
                f"Block driver '{self.name}' does not support size measurement"
            )
        measurement: Measurement = _entry(self.measurer)(options, size, source)
        return measurement


class ReadOnlyFormat(FormatBase):
    """A format qemu-img reads and cannot create (dmg, bochs, cloop): ``-O``
    is refused in qemu's words (`registry.creation_refusal`) before any
    writer would be asked for, and no ``info`` facts beyond size and name
    (qemu's drivers have no get_info: no cluster size, no dirty flag)."""

    writer = ""

    def __init__(self) -> None:
        self.create_options = OptionSchema(self.name)

    def create(self, out: OutputFile, virtual_size: int, options: ParsedOptions) -> Writer:
        raise AssertionError(f"{self.name} cannot be written: refused before creating")

    def describe(self, driver: Driver) -> FormatDetails:
        return FormatDetails(dirty=None)


SECTOR = 512


def _entry(spec: str) -> Any:
    """The function ``module:name`` names, importing its module."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
