"""Which formats a file's bytes match: one pass over every signature instar knows.

qemu probes the first 2 KiB and takes the best score: that is the detected
format (`registry.probe_name`, every format qemu probes, readable by instar
or not). A polyglot holds a second structure elsewhere that another reader
would take for the disk (OpenStack's format_inspector calls it "multiple
formats detected"). Besides the probe, this module looks where
format_inspector looks, and at the end of the file:

- an ISO 9660 or UDF volume descriptor at 32 KiB ("CD001", "NSR02", "NSR03"
  in the descriptor at 32768);
- an MBR (0x55AA at 510, unless the sector is a FAT boot sector), and a GPT
  header ("EFI PART" at 512);
- a VHD footer ("conectix") in the last 512 bytes: a fixed VHD is nothing but
  a raw disk and this footer, which qemu does not probe; a file qemu probes as
  raw with it is detected as vpc (fixed), one that probes as another format
  is a polyglot.

What a raw disk (or a fixed VHD) holds is its content, not a second format:
an MBR disk, or a hybrid boot ISO (ISO 9660 and MBR at once), is one raw disk
to every reader, not a polyglot.
"""

from __future__ import annotations

import struct

from instar.formats import registry
from instar.runtime_types import NamedTuple, Protocol

PROBE_SIZE = registry.PROBE_SIZE
ISO_OFFSET = 32 << 10  # the first volume descriptor (sector 16 of 2 KiB)
ISO_SIGNATURES = (b"CD001", b"NSR02", b"NSR03")
MBR_SIGNATURE = b"\x55\xaa"
GPT_SIGNATURE = b"EFI PART"
VHD_COOKIE = b"conectix"
VHD_FOOTER = 512
# Names of content a raw disk may hold, not formats of their own for qemu.
RAW_CONTENT = ("iso", "gpt", "mbr")
# Other names for qemu's formats that callers (OpenStack's disk_format) use.
ALIASES = {"vhd": "vpc"}


class Readable(Protocol):
    """What detection reads: an `InputFile`, or a stream's captured regions."""

    size: int
    name: str

    def pread(self, offset: int, length: int) -> bytes: ...


class Detection(NamedTuple):
    """``format``: the detected format (qemu's name); ``found``: every format
    or raw content signature the file holds, the detected format first;
    ``disk_at_start``: the file starts with the disk's own bytes (raw, a fixed
    VHD), so what the disk holds (a partition table, an ISO volume) is content."""

    format: str
    found: list[str]
    disk_at_start: bool = False

    @property
    def polyglot(self) -> bool:
        """More than one way to read the file. The content of a raw disk is
        not another format: an MBR disk, a GPT disk or a hybrid boot ISO (ISO
        9660 and MBR at once) is one raw disk to every reader."""
        extras = self.found[1:]
        if self.disk_at_start:
            extras = [name for name in extras if name not in RAW_CONTENT]
        return bool(extras)


def is_fat_boot_sector(sector: bytes) -> bool:
    """format_inspector's test: a FAT volume's boot sector also ends in 0x55AA;
    two FATs and media type 0xF8 (a fixed disk) mark one."""
    return len(sector) >= 0x16 and sector[0x10] == 2 and sector[0x15] == 0xF8


def raw_content(file: Readable) -> list[str]:
    """The ISO, GPT and MBR signatures ``file`` holds."""
    found = []
    descriptor = file.pread(ISO_OFFSET, 6)
    if descriptor[1:6] in ISO_SIGNATURES:
        found.append("iso")
    first = file.pread(0, 520)
    if first[512:520] == GPT_SIGNATURE:
        found.append("gpt")
    elif first[510:512] == MBR_SIGNATURE and not is_fat_boot_sector(first):
        found.append("mbr")
    return found


def has_vhd_footer(file: Readable) -> bool:
    return file.size >= VHD_FOOTER and file.pread(file.size - VHD_FOOTER, 8) == VHD_COOKIE


def detect(file: Readable) -> Detection:
    """The format qemu probes, corrected for a fixed VHD, and every other
    signature the file holds."""
    header = file.pread(0, PROBE_SIZE)
    probed = registry.probe_name(header, file.name)
    if probed == "qcow2" and header[4:8] == b"\0\0\0\1":
        probed = "qcow"  # qemu's qcow driver probes version 1, qcow2 versions 2 and up
    found = [probed]
    at_start = probed == "raw"
    if has_vhd_footer(file):
        if probed == "raw":
            probed = found[0] = "vpc"  # a fixed VHD
        elif probed != "vpc":  # a dynamic VHD's footer copy is at both ends
            found.append("vpc")
    found += raw_content(file)
    return Detection(probed, found, at_start)


def normal_name(name: str) -> str:
    """qemu's name for a format named by a caller (``vhd`` is ``vpc``)."""
    return ALIASES.get(name, name)


def claim_fits(claimed: str, detection: Detection) -> bool:
    """Whether the format a caller claims is the one detected. ``iso`` is a
    raw disk holding an ISO 9660 volume; a fixed VHD may be claimed as vpc."""
    name = normal_name(claimed)
    if name == detection.format:
        return True
    if name == "iso":
        return detection.format == "raw" and "iso" in detection.found
    return False


# --- the MBR, as format_inspector checks it -----------------------------------------------------

_PARTITION = struct.Struct("<B3sB3sII")
PROTECTIVE = 0xEE


def mbr_problems(sector: bytes) -> list[str]:
    """What is wrong with an MBR's partition table, by format_inspector's
    rules: a boot flag other than 0 or 0x80; a GPT protective partition
    that does not start at LBA 1 (CHS 0/2/0) or is not alone; no partition."""
    problems = []
    used = []
    protective = False
    for index in range(4):
        start = 446 + 16 * index
        boot, chs, kind, _end, lba, _count = _PARTITION.unpack(sector[start:start + 16])
        if boot not in (0, 0x80):
            problems.append(f"partition {index} has the boot flag {boot:#x}")
        if kind:
            used.append(index)
        if kind == PROTECTIVE:
            protective = True
            if chs != b"\x00\x02\x00" or lba != 1:
                problems.append(f"the GPT protective partition {index} does not start at "
                                "sector 1")
    if protective and used != [0]:
        problems.append("a GPT protective MBR defines other partitions")
    if not used:
        problems.append("the partition table defines no partition")
    return problems


__all__ = ["Detection", "claim_fits", "detect", "mbr_problems", "normal_name", "raw_content"]
