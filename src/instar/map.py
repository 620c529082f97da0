"""``instar map``: qemu-img map's entries, from the read core's block status.

qemu-img map (7.2) asks the top layer of the chain for the status of the rest
of the range (``bdrv_block_status``, one layer on its own), and while a layer
holds neither data nor zeros there, asks the layer below: the depth counts the
layers it went down. A layer that has nothing and nothing below (or is past
the end of a shorter backing file) answers zeros itself, not "present".
`StatusLayer` with ``above=False`` is that walk. Consecutive answers that
agree (depth, present, zero, data, file, and offsets that continue each
other) are merged into one entry; an entry is printed only once the next one
is known not to merge with it, so on a failure the entries before the pending
one have been printed, as qemu's.

The walk runs in the worker (`_map_job`) and sends entries in batches
(`Mapped` events); the host renders them (`human_line`, `json_entry`).
"""

from __future__ import annotations

from collections.abc import Iterator

from instar.errors import InstarError
from instar.events import EventSink, MapEntry, Mapped, map_entry_from_data
from instar.image import ALLOCATED, DATA, OFFSET_VALID, ZERO, Image, StatusLayer
from instar.opener import Broker, ImageOpener
from instar.safety import AllowedDirs, PathPolicy
from instar.sizes import INT64_MAX
from instar.worker import SandboxSettings, run_job

BATCH = 2048  # entries per event: few messages for a fragmented image, bounded memory
# qemu-img map's human output cannot show an entry of data without an offset.
UNMAPPABLE = "File contains external, encrypted or compressed clusters."


def map_end(size: int, start: int, max_length: int | None) -> int:
    """Where the walk stops: qemu's ``MIN(start + max_length, size)`` in
    int64 arithmetic, where a sum past 2^63 - 1 wraps to a negative number
    (and nothing is mapped)."""
    if max_length is None:
        return size
    total = start + max_length
    if total > INT64_MAX:
        total -= 1 << 64
    return min(total, size)


def mergeable(current: MapEntry, following: MapEntry) -> bool:
    """qemu's ``entry_mergeable``: ``following`` extends ``current``."""
    if current.length == 0:
        return False
    if (current.zero, current.data, current.depth, current.present, current.filename) != (
        following.zero, following.data, following.depth, following.present, following.filename
    ):
        return False
    if current.offset is None or following.offset is None:
        return current.offset is None and following.offset is None
    return current.offset + current.length == following.offset


def entries(image: Image, start: int, end: int) -> Iterator[MapEntry]:
    """qemu-img map's entries for ``[start, end)``, merged; always at least
    one (an empty one at ``start`` when the range is empty, as qemu's)."""
    pending = MapEntry(start, 0, 0, False, False, False, None, None)
    if start < end:
        layer = StatusLayer(image, start, above=False)
        offset = start
        while offset < end:
            status = layer.status(offset)
            stop = min(status.end, end)
            flags = status.flags
            offset_valid = bool(flags & OFFSET_VALID)
            entry = MapEntry(
                offset, stop - offset, status.depth, bool(flags & ALLOCATED),
                bool(flags & ZERO), bool(flags & DATA),
                status.host if offset_valid else None,
                status.file.name if offset_valid and status.file is not None else None,
            )
            if mergeable(pending, entry):
                pending = pending._replace(length=pending.length + entry.length)
            else:
                if pending.length:
                    yield pending
                pending = entry
            offset = stop
    yield pending


def human_refuses(entry: MapEntry, first: bool) -> bool:
    """qemu's human output stops at data it cannot place. It checks each entry
    after turning every entry but the first that is not plain data into
    zeros, so zeros stop it only at the first entry."""
    return entry.data and entry.offset is None and (first or not entry.zero)


def _hex(value: int) -> str:
    """C's ``%#x``: no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"


HUMAN_HEADER = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"


def human_line(entry: MapEntry, shown_name: str) -> str:
    """The human line of an entry of plain data (others print nothing)."""
    offset = entry.offset if entry.offset is not None else 0
    return f"{_hex(entry.start):<16}{_hex(entry.length):<16}{_hex(offset):<16}{shown_name}\n"


def json_entry(entry: MapEntry) -> str:
    """One entry of ``--output=json``, without the separator."""
    text = (
        f'{{ "start": {entry.start}, "length": {entry.length}, "depth": {entry.depth}, '
        f'"present": {_bool(entry.present)}, "zero": {_bool(entry.zero)}, '
        f'"data": {_bool(entry.data)}'
    )
    if entry.offset is not None:
        text += f', "offset": {entry.offset}'
    return text + "}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def map_image(
    path: str,
    fmt: str | None = None,
    *,
    start: int = 0,
    max_length: int | None = None,
    human: bool = False,
    allow: AllowedDirs = (),
    events: EventSink,
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> MapEntry | None:
    """Walk ``path`` as ``qemu-img map`` does. Every entry but the last goes
    to ``events`` in `Mapped` batches (the first batch, empty, once the image
    is open); the last, which qemu prints without a separator after it, is
    returned. With ``human`` the walk stops after the first entry that
    `human_refuses` (sent, not returned: None is)."""
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> list[object] | None:
        final = _map_job(broker, send, path, fmt, start, max_length, human)
        return None if final is None else list(final)

    result = run_job(job, policy, sandbox, events, inputs=[path], force_share=force_share)
    return None if result is None else map_entry_from_data(result)


def _map_job(broker: Broker, send: EventSink, path: str, fmt: str | None, start: int,
             max_length: int | None, human: bool) -> MapEntry | None:
    """map itself, reaching files only through ``broker`` (it may run in a worker)."""
    opener = ImageOpener(broker=broker)
    try:
        image = opener.open_node(path, fmt).image
        send(Mapped([]))  # open: the header may be printed
        batch: list[MapEntry] = []
        previous: MapEntry | None = None  # sent once the walk goes past it
        try:
            for entry in entries(image, start, map_end(image.virtual_size, start, max_length)):
                if previous is not None:
                    batch.append(previous)
                    if len(batch) >= BATCH:
                        send(Mapped(batch))
                        batch = []
                if human and human_refuses(entry, entry.start == start):  # the first starts there
                    batch.append(entry)
                    return None
                previous = entry
        except (InstarError, OSError) as error:
            if previous is not None:  # not the last: qemu printed it, and a separator
                batch.append(previous)
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise InstarError(f"Could not read file metadata: {reason}") from None
        finally:
            if batch:
                send(Mapped(batch))
        return previous
    finally:
        opener.close()


__all__ = ["UNMAPPABLE", "entries", "human_line", "human_refuses", "json_entry", "map_image",
           "mergeable"]
