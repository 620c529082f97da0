"""``instar inspect``: one verdict on an upload, computed in the sandboxed worker.

The verdict (`instar.verdict.Verdict`) is built in three steps, each adding
findings:

1. detection (`instar.detect`): the format qemu would probe, every other
   signature the file holds (polyglots), the claimed format against the
   detected one, the formats the policy refuses, an MBR's partition table;
2. opening the image with its format's own reader, as ``convert`` would, but
   with an `InspectResolver` in place of the chain resolver: every file the
   image names (backing file, parent, data file, extent) becomes a finding
   instead of being opened, and is opened only where the policy accepts the
   finding and the directories allow the file (a data file or an extent is
   part of the image; a backing file is only checked against the
   directories). What the reader refuses becomes a finding: unknown
   incompatible features, features instar cannot read, and every other
   malformed structure (``corrupt``). The open image says what else is to
   be said: the VMDK create type, a VHDX log that held pending writes;
3. the structural walk (``walk``): every mapping of the image is asked for
   (so every table is loaded, and the reader's checks run: aliasing, tables
   and clusters outside the file) and every compressed unit inflated (never
   past its unit); what the reader refuses there is ``corrupt``. The
   `STRUCTURE_CHECKS` hooks add what a format's structural check finds.

Steps 1 and 2 read only the regions a header points to, which is what a
stream can offer as it passes (`instar.inspect_stream`); step 3 reads every
table. Exit status: 0 safe, 2 unsafe, 1 could not inspect.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from instar.detect import Readable, claim_fits, detect, mbr_problems, normal_name
from instar.errors import (
    FormatError,
    ImageOpenError,
    InstarError,
    PolicyError,
    UnknownFeatureError,
    UnsupportedError,
)
from instar.formats import registry
from instar.image import COMPRESSED, BlockImage, Driver, Image
from instar.opener import AbsentBacking, combine_path
from instar.runtime_types import TYPE_CHECKING, cast
from instar.verdict import Finding, InspectPolicy, Verdict

if TYPE_CHECKING:
    from typing import Any

    from instar.events import EventSink
    from instar.files import InputFile
    from instar.formats.base import Format
    from instar.opener import Broker
    from instar.safety import AllowedDirs
    from instar.worker import SandboxSettings

# The finding each role of a named file raises (the roles the readers give).
ROLE_CODES = {"backing file": "backing-file", "data file": "data-file", "extent": "external-extent"}


class NotOpened(Exception):
    """A file the image names was not opened (the verdict says why): the
    reader stops there. Not a FormatError: no reader may take it for one."""


class InspectResolver:
    """The `Resolver` inspect gives a reader: it records every file the image
    names as a finding, opens nothing the policy does not accept, and never
    opens a backing file's image (its name is checked against the allowed
    directories when accepted: a later convert would open it)."""

    def __init__(self, broker: Broker | None, policy: InspectPolicy,
                 findings: list[Finding]) -> None:
        self.broker = broker
        self.policy = policy
        self.findings = findings

    def _named(self, role: str, name: str, child: InputFile) -> bool:
        """Record the finding; whether the policy accepts it and the file may be opened."""
        code = ROLE_CODES.get(role, "backing-file")
        path = combine_path(child.name, name)
        self.findings.append(self.policy.finding(code, f"the image names the {role} '{path}'"))
        return self.policy.allows(code) and self.broker is not None

    def _open(self, name: str, child: InputFile, role: str) -> InputFile:
        assert self.broker is not None
        try:
            return self.broker.open_named_file(name, child.name, role)
        except PolicyError as error:
            self.findings.append(self.policy.finding("outside-allowed", str(error)))
            raise NotOpened(role) from None
        except OSError as error:
            path = combine_path(child.name, name)
            raise ImageOpenError(path, f"Could not open {role} '{path}': "
                                       f"{error.strerror or error}") from None

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        if self._named("backing file", name, child):
            self._open(name, child, "backing file").close()
        return AbsentBacking()

    def open_file(self, name: str, child: InputFile, what: str) -> InputFile:
        if not self._named(what, name, child):
            raise NotOpened(what)
        return self._open(name, child, what)


# --- step 1: detection --------------------------------------------------------------------------


def _detection_findings(file: Readable, claimed: str | None,
                        policy: InspectPolicy) -> tuple[str, list[str], list[Finding]]:
    detection = detect(file)
    findings: list[Finding] = []
    fmt = detection.format
    if claimed is not None and not claim_fits(claimed, detection):
        findings.append(policy.finding(
            "format-mismatch", f"the image is claimed to be {claimed} but is {fmt}"))
    if detection.polyglot:
        findings.append(policy.finding(
            "multiple-formats",
            f"the file is {fmt} and also holds the signature of "
            f"{', '.join(name for name in detection.found[1:] if name != fmt)}"))
    if fmt in policy.refused_formats:
        findings.append(policy.finding("format-refused", f"{fmt} images are refused by policy"))
    if detection.disk_at_start and "mbr" in detection.found:
        findings.extend(policy.finding("partition-table", f"invalid MBR: {problem}")
                        for problem in mbr_problems(file.pread(0, 512)))
    return fmt, detection.found, findings


# --- step 2: opening ----------------------------------------------------------------------------


def _open(fmt: Format, file: InputFile, resolver: InspectResolver,
          findings: list[Finding], policy: InspectPolicy) -> Driver | None:
    """The image's layer as its reader opens it, or None (the findings say why)."""
    try:
        driver = fmt.open(file, resolver)
        BlockImage(driver)  # its own checks of the size
        return driver
    except NotOpened:
        return None
    except UnknownFeatureError as error:
        findings.append(policy.finding("unknown-features", str(error)))
    except UnsupportedError as error:
        findings.append(policy.finding("unsupported", str(error)))
    except FormatError as error:
        findings.append(policy.finding("corrupt", str(error)))
    return None


def _vmdk_create_type(driver: Driver | None, file: Readable) -> tuple[bool, str | None]:
    """Whether the VMDK's descriptor could be read, and the create type it
    declares (None: no descriptor, or none declared): from the open image,
    else (unopened: its extents not allowed, or it is corrupt) from the file.
    qemu calls every monolithic file monolithicSparse (or streamOptimized)
    whatever its descriptor says; other readers go by the descriptor, and so
    does the verdict."""
    from instar.formats.vmdk import layout as vmdk_layout
    from instar.formats.vmdk.reader import VmdkDriver, embedded_descriptor

    try:
        if file.pread(0, 4) == b"KDMV":  # a sparse extent: its descriptor is embedded
            header = vmdk_layout.SparseHeader.unpack(file.pread(0, vmdk_layout.SECTOR))
            if not (header.desc_offset and header.desc_sectors):
                return True, None  # none, by the specification (qemu still reads sector 1)
            descriptor = driver.descriptor if isinstance(driver, VmdkDriver) else \
                embedded_descriptor(cast("InputFile", file), header)
            return True, descriptor.create_type if descriptor is not None else None
        if isinstance(driver, VmdkDriver):  # a descriptor file, opened
            kind = driver.descriptor.create_type if driver.descriptor is not None else None
            return True, kind
        head = file.pread(0, min(file.size, vmdk_layout.MAX_DESCRIPTOR_BYTES))
        if not vmdk_layout.looks_like_descriptor(head[:2048]):
            return False, None
        text = head.decode("utf-8", "surrogateescape").split("\0", 1)[0]
        return True, vmdk_layout.parse_descriptor(text).create_type
    except (FormatError, struct.error):
        return False, None  # the reader said what is wrong with it


def _format_facts(name: str, driver: Driver | None, file: Readable,
                  policy: InspectPolicy) -> list[Finding]:
    """What an open image (or, for a VMDK, its descriptor) says beyond its mapping."""
    findings = []
    if name == "vmdk":
        known, kind = _vmdk_create_type(driver, file)
        allowed = ' or '.join(policy.vmdk_types) or 'an allowed one'
        if known and kind is None:
            findings.append(policy.finding(
                "vmdk-create-type", f"the VMDK has no descriptor: its create type is "
                f"unknown, not {allowed}"))
        elif kind is not None and kind not in policy.vmdk_types:
            findings.append(policy.finding(
                "vmdk-create-type", f"the VMDK create type is {kind}, not {allowed}"))
        findings += _embedded_extent_names(driver, policy)
    if name == "qcow2" and driver is not None:
        from instar.formats.qcow2 import layout as qcow2_layout
        from instar.formats.qcow2.reader import Qcow2Driver

        if isinstance(driver, Qcow2Driver) and \
                driver.header.incompatible_features & qcow2_layout.INCOMPAT_CORRUPT:
            findings.append(policy.finding(
                "corrupt", "the image is marked corrupt (qcow2's corrupt bit): qemu found "
                "its metadata inconsistent and will not write to it"))
    if getattr(driver, "log_replayed", False):
        findings.append(policy.finding(
            "vhdx-log", "the VHDX log holds writes not yet in place (the image was not "
            "closed cleanly); qemu refuses to read it without replaying them"))
    return findings


def _embedded_extent_names(driver: Driver | None, policy: InspectPolicy) -> list[Finding]:
    """Extent lines of a monolithic VMDK's embedded descriptor that name a path:
    qemu never opens them (the file is its own extent), other readers may."""
    from instar.formats.vmdk.reader import VmdkDriver

    if not isinstance(driver, VmdkDriver) or driver.descriptor is None:
        return []
    if any(extent.kind for extent in driver.disk_extents):
        return []  # a descriptor file: its extents were named through the resolver
    return [policy.finding("external-extent",
                           f"the embedded descriptor names the extent '{line.name}'")
            for line in driver.descriptor.extents if "/" in line.name]


# --- step 3: the walk ---------------------------------------------------------------------------


def walk(image: BlockImage) -> None:
    """Ask for the mapping of the whole image and read every compressed run
    (each unit inflated once, never past its unit, and long enough for what
    the disk needs): the reader's checks raise FormatError on what is corrupt.
    Data is never read otherwise: the walk costs the image's metadata."""
    driver = image.driver
    for run in driver.map(0, driver.virtual_size):
        if run.flags & COMPRESSED:
            image.read(run.start, run.end - run.start)


def _reader_walk(fmt: Format, image: BlockImage, policy: InspectPolicy) -> list[Finding]:
    try:
        walk(image)
    except FormatError as error:
        return [policy.finding("corrupt", str(error))]
    except UnsupportedError as error:
        return [policy.finding("unsupported", str(error))]
    return []


def _check_walk(fmt: Format, image: BlockImage, policy: InspectPolicy) -> list[Finding]:
    """The corruptions the format's structural check (``instar check``) finds,
    where the format has one (``Format.check`` returning a result whose
    ``findings`` have a kind, a code and a message)."""
    check = getattr(fmt, "check", None)
    if check is None:
        return []

    try:
        result = check(image.driver)
    except (InstarError, OSError):
        return []  # no check for this format, or it could not look: the walk reports
    return [policy.finding("corrupt", f"{item.message} ({item.code})")
            for item in getattr(result, "findings", ())
            if getattr(item, "kind", None) == "corruption"]


StructureCheck = Callable[["Format", BlockImage, InspectPolicy], list[Finding]]
# What step 3 runs over an open image, in order: each returns its findings.
STRUCTURE_CHECKS: list[StructureCheck] = [_reader_walk, _check_walk]


# --- the verdict --------------------------------------------------------------------------------


def inspect_file(file: InputFile, claimed: str | None, policy: InspectPolicy, *,
                 structure: bool = True, broker: Broker | None = None) -> Verdict:
    """The verdict on the open ``file`` (run where image bytes may be parsed:
    the worker). Without ``structure``, steps 1 and 2 only (what a stream
    gives); without a ``broker`` no file the image names is ever opened."""
    fmt_name, found, findings = _detection_findings(file, claimed, policy)
    virtual_size: int | None = None
    fmt = registry.get(fmt_name)
    driver: Driver | None = None
    if fmt is None:
        findings.append(policy.finding(
            "unsupported", f"instar cannot read {fmt_name} images yet, so it cannot check "
            "what they name or how they are built"))
    else:
        resolver = InspectResolver(broker, policy, findings)
        driver = _open(fmt, file, resolver, findings, policy)
    try:
        findings += _format_facts(fmt_name, driver, file, policy)
        if driver is not None and fmt is not None:
            virtual_size = driver.virtual_size
            if structure:
                image = BlockImage(driver)
                for check in STRUCTURE_CHECKS:
                    findings += check(fmt, image, policy)
    finally:
        if driver is not None:
            driver.close()
    return Verdict(file.name, fmt_name, found, virtual_size, _unique(findings),
                   None if claimed is None else claimed)


def _unique(findings: list[Finding]) -> list[Finding]:
    """Each finding once (a reader may fail the same way twice), in order."""
    return list(dict.fromkeys(findings))


def _inspect_job(broker: Broker, path: str, claimed: str | None, policy: InspectPolicy,
                 structure: bool, name: str | None = None) -> Verdict:
    if not path:
        raise ImageOpenError(path, "The 'file' block driver requires a file name")
    try:
        file = broker.open_image_file(path)
    except OSError as error:
        raise ImageOpenError(path, f"Could not open '{path}': {error.strerror}") from None
    if not (file.is_regular or file.is_block_device):
        raise ImageOpenError(path, f"'file' driver requires '{path}' to be a regular file")
    if name is not None:
        file.name = name
    return inspect_file(file, claimed, policy, structure=structure, broker=broker)


def inspect(
    path: str,
    fmt: str | None = None,
    *,
    policy: InspectPolicy | None = None,
    allow: AllowedDirs = (),
    structure: bool = True,
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
    name: str | None = None,
) -> Verdict:
    """The verdict on the image ``path``, claimed to be ``fmt`` (None: no claim).

    ``policy`` (default `InspectPolicy()`) says which findings are allowed;
    ``allow``: directories files the image names may be opened from, where
    the policy accepts naming them. ``structure=False`` skips the structural
    walk (what a stream can check as it passes). ``name``: the name the
    verdict and its messages give the file (default ``path``). Raises
    `ImageOpenError` (or another `InstarError`) when the file cannot be
    inspected at all; an image that is malformed is a verdict, not an error.
    """
    import os

    from instar.safety import PathPolicy
    from instar.worker import run_job

    path = os.fspath(path)
    chosen = policy or InspectPolicy()
    if fmt is not None:
        _check_claim(fmt)

    def job(broker: Broker, send: EventSink) -> dict[str, Any]:
        return _inspect_job(broker, path, fmt, chosen, structure, name).to_data()

    data = run_job(job, PathPolicy.from_allow(allow), sandbox, inputs=[path],
                   force_share=force_share)
    return Verdict.from_data(data)


def _check_claim(fmt: str) -> None:
    """A claimed format must be a format name (qemu's, or vhd, iso)."""
    from instar.errors import InvalidArgumentError

    name = normal_name(fmt)
    if name not in registry.known_names() and name not in registry.QEMU_DRIVERS \
            and name != "iso":
        raise InvalidArgumentError(f"Unknown format '{fmt}'")




class UnsafeImageError(InstarError):
    """``--require-safe``: an input's verdict is unsafe (``verdict`` says why)."""

    def __init__(self, verdict: Verdict) -> None:
        first = verdict.unsafe_findings[0]
        more = len(verdict.unsafe_findings) - 1
        super().__init__(f"'{verdict.filename}' is not safe to read: {first.code}: "
                         f"{first.message}" + (f" (and {more} more)" if more else ""))
        self.verdict = verdict


def require_safe(paths: list[str], fmt: str | None, *, allow: AllowedDirs = (),
                 policy: InspectPolicy | None = None, force_share: bool = False) -> None:
    """Raise `UnsafeImageError` for the first of ``paths`` whose verdict is
    unsafe (``convert``/``dd --require-safe``, before anything is written)."""
    for path in paths:
        verdict = inspect(path, fmt, policy=policy, allow=allow, force_share=force_share)
        if not verdict.safe:
            raise UnsafeImageError(verdict)


__all__ = ["STRUCTURE_CHECKS", "InspectResolver", "UnsafeImageError", "inspect", "inspect_file",
           "require_safe", "walk"]
