"""Inspecting an upload while it streams: `InspectingStream`, a file-like wrapper.

Services receive images as streams (an HTTP upload going to a store) and want
the verdict without keeping the image in memory, and before the last byte if
the image is plainly unsafe (OpenStack's format_inspector wraps uploads in an
InspectWrapper for this). `InspectingStream` passes every byte through
unchanged and keeps only what the verdict needs, in bounded memory:

- the head of the stream (``HEAD_BYTES``): the probe, the ISO and partition
  signatures, and the headers of every format;
- the regions the headers point to, once known (``CAPTURE_BUDGET`` bytes at
  most): each time a captured region completes, the format's reader opens
  what has been captured (in the sandboxed worker) and names the next region
  it needs, if that is still ahead in the stream;
- the last ``TAIL_BYTES`` that passed: at the end, a VHD footer, a
  streamOptimized VMDK's footer and grain directory; mid-stream, the
  structures that follow a region just captured.

At the end of the stream the verdict of steps 1 and 2 of `instar.inspection`
is computed over those regions: the same as ``inspect(path,
structure=False)`` on the file. With ``spool`` (the default), the stream is
also written to a sparse temporary file (zero chunks become holes), and
`verdict` is then ``inspect`` on that file, structural walk included: the same
verdict as on the file, computed by the same code. Memory stays bounded
either way; the spool uses disk for the stream's non-zero bytes.

A stream whose headers point back to bytes that passed before they were
known to matter (or past the budget) cannot be checked as the file would be:
its header verdict has the finding ``stream-incomplete``.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile

from instar.errors import InstarError
from instar.files import ExactReads
from instar.runtime_types import TYPE_CHECKING, cast
from instar.verdict import InspectPolicy, Verdict

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import IO, Any

    from instar.events import EventSink
    from instar.files import InputFile
    from instar.opener import Broker
    from instar.safety import AllowedDirs
    from instar.worker import SandboxSettings

HEAD_BYTES = 4 << 20
TAIL_BYTES = 1 << 20
CAPTURE_BUDGET = 32 << 20  # bytes of regions the headers point to, kept at once
MIN_REGION = 64 << 10  # a region is captured with what follows it, up to this length
MAX_PASSES = 32  # times the headers are read again for a region they need
UNKNOWN_SIZE = 1 << 62  # the stream's size as readers see it before its end
NEAR_THE_END = 1 << 40  # reads this close to UNKNOWN_SIZE are relative to the end
CHUNK = 1 << 20  # what iterating the wrapper reads at a time

# Findings the rest of a stream cannot take back (but see `_final`): an
# intermediate verdict with one of these unsafe stops the upload early, where
# asked (``abort_unsafe``).
FINAL_CODES = frozenset({"format-mismatch", "multiple-formats", "backing-file", "data-file",
                         "external-extent", "unknown-features", "format-refused",
                         "vmdk-create-type"})


def _final(code: str, verdict: Verdict) -> bool:
    """Whether the rest of the stream cannot take a finding back: a raw start
    may still turn out to be a fixed VHD (its footer ends the stream)."""
    if code == "format-mismatch":
        return verdict.format != "raw"
    return code in FINAL_CODES


class NotCaptured(Exception):
    """A reader asked for bytes the stream did not keep (``offset``, ``length``)."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(f"{length} bytes at offset {offset} were not captured")
        self.offset = offset
        self.length = length


class UnsafeStreamError(InstarError):
    """Raised by `InspectingStream.read` (with ``abort_unsafe``) as soon as the
    stream's headers show the image is unsafe; ``verdict`` is what they show."""

    def __init__(self, verdict: Verdict) -> None:
        first = verdict.unsafe_findings[0]
        super().__init__(f"the upload is not safe: {first.code}: {first.message}")
        self.verdict = verdict


class CaptureView(ExactReads):
    """What a reader sees of a stream: the captured pieces, at their offsets.

    A read of anything else raises `NotCaptured`; past ``size`` (the end of
    the stream, or `UNKNOWN_SIZE` before it) it reads nothing, as a file does,
    and before the end is known so does a read relative to it (a footer).
    """

    fd = -1
    is_regular = True
    is_block_device = False
    identity = (0, 0)

    def __init__(self, name: str, size: int, pieces: list[tuple[int, bytes]]) -> None:
        self.name = name
        self.size = size
        self._pieces = sorted((start, data) for start, data in pieces if data)

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        if self.size == UNKNOWN_SIZE and offset >= UNKNOWN_SIZE - NEAR_THE_END:
            return b""  # the end is not known yet: nothing is there yet
        end = min(offset + length, self.size)
        parts: list[bytes] = []
        position = offset
        for start, data in self._pieces:
            stop = start + len(data)
            if stop <= position or start > position:
                continue
            take = data[position - start: min(stop, end) - start]
            parts.append(take)
            position += len(take)
            if position >= end:
                return b"".join(parts)
        raise NotCaptured(position, end - position)

    def close(self) -> None:
        pass


def _header_job(view: CaptureView, claimed: str | None, policy: InspectPolicy,
                final: bool) -> dict[str, Any]:
    """The header verdict over ``view`` (in the worker): {"verdict": data}, or
    {"need": [offset, length]} for a region a reader asked for (``final``: the
    stream has ended, so what is missing will never come: say so)."""
    from instar.inspection import _detection_findings, inspect_file

    # Readers take an InputFile; a CaptureView reads as one (pread, size, name).
    file = cast("InputFile", view)
    try:
        return {"verdict": inspect_file(file, claimed, policy, structure=False).to_data()}
    except NotCaptured as missing:
        if not final:
            return {"need": [missing.offset, missing.length]}
        try:
            fmt, found, findings = _detection_findings(view, claimed, policy)
        except NotCaptured:
            fmt, found, findings = "raw", ["raw"], []
        findings.append(policy.finding(
            "stream-incomplete",
            f"the image's structures at offset {missing.offset} ({missing.length} bytes) "
            "had passed before the headers pointed to them, or lie past the capture "
            "budget: the stream cannot be checked as the file would be"))
        verdict = Verdict(view.name, fmt, found, None, findings, claimed)
        return {"verdict": verdict.to_data()}


class InspectingStream:
    """A readable file-like object over ``source`` that inspects what passes.

    ``fmt``: the format the upload is claimed to be (None: no claim);
    ``name``: the name verdicts give it; ``policy``: an `InspectPolicy`;
    ``spool``: also keep the stream in a sparse temporary file (in
    ``spool_dir``) so that `verdict` is the full one (else the header
    verdict); ``allow``: directories files the image names may come from,
    where the policy accepts them (the spool's verdict only); ``abort_unsafe``:
    `read` raises `UnsafeStreamError` once the headers show the image is unsafe.

    Read it to the end (``read``, ``readinto`` or iteration), then call
    `verdict`; ``close`` removes the spool.
    """

    def __init__(
        self,
        source: IO[bytes],
        fmt: str | None = None,
        *,
        name: str = "<stream>",
        policy: InspectPolicy | None = None,
        spool: bool = True,
        spool_dir: str | None = None,
        allow: AllowedDirs = (),
        abort_unsafe: bool = False,
        sandbox: SandboxSettings | None = None,
    ) -> None:
        self._source = source
        self.claimed = fmt
        self.name = name
        self.policy = policy or InspectPolicy()
        self._allow = list(allow)
        self._abort = abort_unsafe
        self._sandbox = sandbox
        self.position = 0
        self._head = bytearray()
        self._wanted: dict[int, bytearray] = {}  # start -> bytes captured so far
        self._lengths: dict[int, int] = {}  # start -> length wanted
        self._captured = 0  # bytes the wanted regions may hold, together
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0
        self._passes = 0
        self._eof = False
        self._closed = False
        self.early: Verdict | None = None  # the last verdict of the headers mid-stream
        self._header: Verdict | None = None
        self._full: Verdict | None = None
        self._zeros = b""
        self._spool_dir: str | None = None
        self._spool_fd = -1
        if spool:
            self._spool_dir = tempfile.mkdtemp(prefix="instar-spool-", dir=spool_dir)
            self._spool_path = os.path.join(self._spool_dir, "upload")
            self._spool_fd = os.open(self._spool_path,
                                     os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)

    # -- the file-like side

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the source (all of the rest with -1), inspected."""
        if self._closed:
            raise ValueError("I/O operation on a closed InspectingStream")
        chunk = self._source.read(size) if size is not None and size >= 0 \
            else self._source.read()
        data = bytes(chunk) if not isinstance(chunk, bytes) else chunk
        self._take(data, end=not data and size != 0)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def __enter__(self) -> InspectingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the spool (removing it) and the source where it can be closed."""
        if self._closed:
            return
        self._closed = True
        if self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1
        if self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)
            self._spool_dir = None
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    # -- what passes

    def _take(self, data: bytes, end: bool) -> None:
        start, length = self.position, len(data)
        if length:
            completed = False
            if start < HEAD_BYTES:
                self._head += data[: HEAD_BYTES - start]
                completed = len(self._head) == HEAD_BYTES
            for region, captured in self._wanted.items():
                want, after = self._lengths[region], region + len(captured)
                if len(captured) < want and start <= after < start + length:
                    captured += data[after - start: after - start + want - len(captured)]
                    completed = completed or len(captured) == want
            self._keep_tail(data)
            self._spool(start, data)
            self.position += length
            if completed:
                self._header_pass(final=False)
        if end and not self._eof:
            self._eof = True
            self._header_pass(final=True)

    def _keep_tail(self, data: bytes) -> None:
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail and self._tail_size - len(self._tail[0]) >= TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())

    def _spool(self, offset: int, data: bytes) -> None:
        if self._spool_fd < 0:
            return
        if len(self._zeros) != len(data):
            self._zeros = bytes(len(data))
        if data != self._zeros:  # zeros stay a hole
            from instar.files import pwrite_all

            pwrite_all(self._spool_fd, data, offset)

    def _view(self, final: bool) -> CaptureView:
        """The captured pieces: the head, the wanted regions, and the last
        bytes that passed (the tail at the end; mid-stream, the recent bytes,
        where the next structure a region points to often lies)."""
        size = self.position if final else UNKNOWN_SIZE
        pieces = [(0, bytes(self._head))]
        pieces += [(start, bytes(data)) for start, data in self._wanted.items()]
        if self._tail:
            tail = b"".join(self._tail)
            pieces.append((self.position - len(tail), tail))
        return CaptureView(self.name, size, pieces)

    def _header_pass(self, final: bool) -> None:
        """Read the headers over what was captured: a verdict, or the next region."""
        if not final and self._passes >= MAX_PASSES:
            return
        self._passes += 1
        view = self._view(final)
        claimed, policy = self.claimed, self.policy

        def job(broker: Broker, send: EventSink) -> dict[str, Any]:
            return _header_job(view, claimed, policy, final)

        from instar.safety import PathPolicy
        from instar.worker import run_job

        result = run_job(job, PathPolicy([]), self._sandbox, inputs=[])
        if "need" in result:
            offset, length = (int(value) for value in result["need"])
            self._want(offset, length)
            return
        verdict = Verdict.from_data(result["verdict"])
        if final:
            self._header = verdict
            return
        self.early = verdict
        if self._abort and any(_final(finding.code, verdict)
                               for finding in verdict.unsafe_findings):
            raise UnsafeStreamError(verdict)

    def _want(self, offset: int, length: int) -> None:
        """Keep ``length`` bytes at ``offset`` from now on, if they are still to
        come, with what lies between here and there where the budget allows:
        the structure a region points to next often lies before it."""
        if offset < self.position or offset in self._wanted:
            return  # passed: the final pass will say the stream is incomplete
        room = CAPTURE_BUDGET - self._captured
        length = max(length, MIN_REGION)
        if offset + length - self.position <= room:
            length, offset = offset + length - self.position, self.position
        length = min(length, room)
        if length <= 0:
            return  # past the budget
        self._wanted[offset] = bytearray()
        self._lengths[offset] = length
        self._captured += length

    # -- the answer

    def header_verdict(self) -> Verdict:
        """The verdict of the headers (what ``inspect(path, structure=False)``
        says of the file), once the stream has been read to its end."""
        self._drain()
        assert self._header is not None
        return self._header

    def verdict(self) -> Verdict:
        """The verdict: with a spool, ``inspect`` of the whole stream (the same
        as on the file); without, `header_verdict`. Reads the rest of the
        stream first if it was not read to its end."""
        self._drain()
        if self._spool_dir is None:
            return self.header_verdict()
        if self._full is None:
            from instar.inspection import inspect

            os.ftruncate(self._spool_fd, self.position)
            self._full = inspect(self._spool_path, self.claimed, policy=self.policy,
                                 allow=self._allow, sandbox=self._sandbox, name=self.name)
        return self._full

    def _drain(self) -> None:
        if self._closed and not self._eof:
            raise ValueError("the stream was closed before its end")
        while not self._eof:
            self.read(CHUNK)


__all__ = ["CaptureView", "InspectingStream", "NotCaptured", "UnsafeStreamError"]
