"""Changing an existing image in place, in a crash-safe order.

Every change instar makes to an image it did not create goes through one
`ImageUpdate`, so the order of the writes is in one place and can be tested:

1. ``data``: new clusters and tables, written where nothing points yet, with
   the refcounts that claim them (a crash here leaves leaked clusters at most);
2. ``pointers``: the tables that point at them (a crash here leaves the old
   structure, or the new one, each complete);
3. ``header``: the header's own fields last (the size, the table offsets);
4. ``release``: what the old structure held is freed only after that (a crash
   here leaks it, it never frees something still in use).

Between phases the file is flushed (fsync), so the kernel cannot reorder a
later phase before an earlier one. Writes within a phase may land in any
order, so a phase never holds two writes that depend on each other.

`stop_after` is the tests' hook: set to k, the k-th change is made and the
next one raises `StoppedUpdate` instead, as if the machine had stopped there.
"""

from __future__ import annotations

import os

from instar.errors import StoppedUpdate, UpdateError
from instar.files import pwrite_all, write_zeros

PHASES = ("data", "pointers", "header", "release")

# The tests' hook: after this many changes (writes, truncations, allocations)
# the next raises StoppedUpdate. None in normal use.
stop_after: int | None = None


class ImageUpdate:
    """The writes of one update of the file open read-write as ``fd``, made
    phase by phase (`PHASES`), each phase flushed before the next begins."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.changes = 0  # made so far (the hook counts them)
        self._phase = 0

    def phase(self, name: str) -> None:
        """Start phase ``name``: flush what the phases before it wrote. Phases
        only move forward; one may be skipped."""
        index = PHASES.index(name)
        if index < self._phase:
            raise AssertionError(f"phase {name} after {PHASES[self._phase]}")
        if index > self._phase:
            self.flush()
            self._phase = index

    def _change(self) -> None:
        if stop_after is not None and self.changes >= stop_after:
            raise StoppedUpdate(f"stopped after {self.changes} changes")
        self.changes += 1

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``."""
        self._change()
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as error:
            raise UpdateError(f"Could not write to '{self.name}': {error.strerror}") from None

    def zeros(self, offset: int, length: int) -> None:
        """Explicit zeros over ``[offset, offset + length)`` (preallocation=full)."""
        self._change()
        try:
            write_zeros(self.fd, offset, length)
        except OSError as error:
            raise UpdateError(f"Could not write zeros for preallocation: "
                              f"{error.strerror}") from None

    def allocate(self, offset: int, length: int) -> None:
        """Reserve ``[offset, offset + length)`` on the file system (posix_fallocate)."""
        self._change()
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as error:
            raise UpdateError(f"Could not preallocate new data: {error.strerror}") from None

    def truncate(self, size: int) -> None:
        """Give the file the length ``size``."""
        self._change()
        try:
            os.ftruncate(self.fd, size)
        except OSError as error:
            raise UpdateError(f"Failed to resize '{self.name}': {error.strerror}") from None

    def flush(self) -> None:
        """Everything written so far reaches the disk before anything after."""
        try:
            os.fsync(self.fd)
        except OSError as error:
            raise UpdateError(f"Could not flush '{self.name}': {error.strerror}") from None

    def finish(self) -> None:
        """The last flush: the update is complete on disk."""
        self.flush()


class SequentialWrites:
    """Writes that continue each other (clusters appended one after another)
    gathered into fewer, larger writes of ``update``: at most ``limit`` bytes
    wait; `flush` writes what waits (before the next phase, or a failure's
    clean-up)."""

    def __init__(self, update: ImageUpdate, limit: int = 2 << 20) -> None:
        self.update = update
        self.limit = limit
        self._start = 0
        self._pieces: list[bytes] = []
        self._size = 0

    def write(self, offset: int, data: bytes) -> None:
        if self._pieces and offset != self._start + self._size:
            self.flush()
        if not self._pieces:
            self._start = offset
        self._pieces.append(data)
        self._size += len(data)
        if self._size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if self._pieces:
            data = b"".join(self._pieces)
            self._pieces, self._size = [], 0
            self.update.write(self._start, data)


class UnitWrites:
    """The data phase of an in-place guest write, shared by the formats'
    updaters: new units (clusters, blocks) appended one after another past
    every unit in use, from unit number ``first`` on (unit ``n`` lies at
    ``origin + n * unit``), and units the image holds rewritten where they
    are. Nothing names an appended unit until the caller's pointers phase
    (`pointing`), so until then `abandon` can cut the file back to ``size``,
    its length before the update."""

    def __init__(self, update: ImageUpdate, *, unit: int, first: int, size: int,
                 origin: int = 0) -> None:
        self.update = update
        self.unit = unit
        self.first = first
        self.size = size
        self.origin = origin
        self.count = 0  # units appended (or reserved) so far
        self._appended = SequentialWrites(update)
        self._in_place = SequentialWrites(update)
        self._pointed = False

    def host(self, number: int) -> int:
        """The host offset of unit ``number``."""
        return self.origin + number * self.unit

    @property
    def next_number(self) -> int:
        """The number the next appended unit gets (past all appended so far)."""
        return self.first + self.count

    def reserve(self) -> int:
        """The number of one more appended unit, its bytes to come through
        `write_appended` (in pieces, or not all of them)."""
        number = self.next_number
        self.count += 1
        return number

    def append(self, data: bytes) -> int:
        """``data`` (a whole unit) as the next appended unit: its number."""
        number = self.reserve()
        self._appended.write(self.host(number), data)
        return number

    def write_appended(self, offset: int, data: bytes) -> None:
        """``data`` at ``offset``, inside a unit `reserve` gave."""
        self._appended.write(offset, data)

    def rewrite(self, offset: int, data: bytes) -> None:
        """``data`` at ``offset``, in a unit the image holds already."""
        self._in_place.write(offset, data)

    def flush(self) -> None:
        """What waits written, before the caller's tables and pointers."""
        self._appended.flush()
        self._in_place.flush()

    def pointing(self) -> None:
        """The pointers phase has begun: an entry may name an appended unit,
        which must stay from now on."""
        self._pointed = True

    def abandon(self) -> None:
        """After a failure: what waits dropped, and the appended units cut
        off again unless something may point at them already."""
        self._appended = SequentialWrites(self.update)
        self._in_place = SequentialWrites(self.update)
        if self.count and not self._pointed:
            self.update.truncate(self.size)
            self.count = 0
