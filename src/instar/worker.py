"""Running a job in a sandboxed worker process: the process, the channel, the host's side.

The host forks a worker before any thread exists. The worker closes every
descriptor but its end of a socket pair, imports everything it could need,
confines itself (`instar.sandbox`) and runs the job. The job reaches files
only through its broker, here a `WorkerBroker` that asks the host over the
socket; the host checks each request against the policy (`HostBroker`),
opens the file itself and passes the descriptor (SCM_RIGHTS). No image data
crosses the socket: the worker reads and writes the descriptors it holds.

Everything the worker sends is plain data (`instar.wire`), never pickle:
the host treats the worker as compromised-until-proven-otherwise and only
decodes plain data (events, requests, a result, an error by class name from
instar.errors).
The host also enforces the wall-clock limit by killing the worker.
"""

from __future__ import annotations

import _socket
import _thread
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence

from instar import errors, wire
from instar.errors import InstarError, WorkerLimitError
from instar.events import (
    Advance,
    Event,
    EventSink,
    Line,
    Mapped,
    Notice,
    Progress,
    map_entry_from_data,
)
from instar.files import InputFile
from instar.formats import registry
from instar.formats.base import OutputFile
from instar.opener import Broker, HostBroker
from instar.runtime_types import TYPE_CHECKING, NamedTuple
from instar.safety import PathPolicy
from instar.sandbox import DEFAULT_TIMEOUT, LayerState, Limits, apply, prepare
from instar.signals import TERMINATING, deferred, signal_name, system_signals
from instar.worker_imports import import_extensions, import_from_host, module_reply

if TYPE_CHECKING:
    from typing import Any

    Job = Callable[[Broker, EventSink], Any]  # returns plain data (instar.wire)

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20  # no message from a worker may be larger


class SandboxSettings(NamedTuple):
    """How to run jobs: ``mode`` auto (apply what the kernel has, say what is
    missing), require (refuse to run without every layer) or off (in-process)."""

    mode: str = "auto"
    limits: Limits = Limits()
    timeout: float = DEFAULT_TIMEOUT


# --- the channel ------------------------------------------------------------------------------


class Channel:
    """Length-prefixed frames of plain data (`instar.wire`) over a stream
    socket, with descriptors."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        body = wire.encode(message)
        frame = _HEADER.pack(len(body)) + body
        if fds:  # they travel with the frame's first byte
            rights = b"".join(_FD.pack(fd) for fd in fds)
            sent = self.sock.sendmsg([frame[:1]],
                                     [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
            frame = frame[sent:]
        self.sock.sendall(frame)

    def receive(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message and the descriptors that came with it; (None, [])
        at the end of the stream."""
        first, ancillary, _flags, _address = self.sock.recvmsg(1, _RIGHTS_SPACE)
        fds = _received_fds(ancillary)
        if not first:
            return None, fds
        header = first + self._exactly(_HEADER.size - 1)
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME:
            raise ProtocolError(f"a message of {length} bytes")
        message = wire.decode(self._exactly(length))
        if not isinstance(message, dict):
            raise ProtocolError("a message that is not a dict")
        return message, fds

    def _exactly(self, length: int) -> bytes:
        parts, got = [], 0
        while got < length:
            chunk = self.sock.recv(min(length - got, 1 << 20))
            if not chunk:
                raise ProtocolError("the stream ended inside a message")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)


_FD = struct.Struct("i")
_MAX_FDS = 16  # descriptors one message may carry
_RIGHTS_SPACE = _socket.CMSG_SPACE(_MAX_FDS * _FD.size)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in a message's ancillary data (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD.size
            fds += [fd for (fd,) in _FD.iter_unpack(data[:usable])]
    return fds


class ProtocolError(Exception):
    """The other side sent something that is not the protocol."""


# --- errors and events as data ----------------------------------------------------------------


def error_to_data(error: BaseException) -> dict[str, Any]:
    """An exception as plain data: instar's errors by class, OSError by errno."""
    if isinstance(error, OSError) and not isinstance(error, InstarError):
        return {"type": "OSError", "errno": error.errno or 0,
                "strerror": error.strerror or str(error)}
    if isinstance(error, InstarError):
        attrs = {k: v for k, v in vars(error).items()
                 if isinstance(v, str | int | bool) or v is None}
        return {"type": type(error).__name__, "message": str(error), "attrs": attrs}
    if isinstance(error, MemoryError):
        return {"type": "MemoryError"}
    return {"type": "internal", "message": f"{type(error).__name__}: {error}"}


def error_from_data(data: dict[str, Any], limits: Limits) -> BaseException:
    """The exception ``error_to_data`` described; only instar's own classes."""
    kind = data.get("type")
    if kind == "OSError":
        return OSError(int(data.get("errno", 0)), str(data.get("strerror", "")))
    if kind == "MemoryError":
        return WorkerLimitError(
            f"the image needs more memory than the worker may use "
            f"({limits.memory >> 20} MiB; --max-memory)"
        )
    cls = getattr(errors, str(kind), None)
    if isinstance(cls, type) and issubclass(cls, InstarError):
        error = cls.__new__(cls)
        Exception.__init__(error, str(data.get("message", "")))
        attrs = data.get("attrs")
        if isinstance(attrs, dict):
            for key, value in attrs.items():
                if isinstance(key, str) and (isinstance(value, str | int | bool) or value is None):
                    setattr(error, key, value)
        return error
    return InstarError(f"internal error in the worker: {data.get('message', kind)}")


def event_to_data(event: Event) -> dict[str, Any]:
    return {"event": type(event).__name__, "fields": list(event)}


_EVENTS: dict[str, tuple[type[Event], tuple[type, ...]]] = {
    "Progress": (Progress, (int, int)),
    "Advance": (Advance, (int, int)),
    "Line": (Line, (str,)),
    "Notice": (Notice, (str,)),
    "Mapped": (Mapped, (list,)),
}


def event_from_data(data: dict[str, Any]) -> Event:
    kind, fields = data.get("event"), data.get("fields")
    spec = _EVENTS.get(str(kind))
    if spec is None or not isinstance(fields, list) or len(fields) != len(spec[1]):
        raise ProtocolError(f"an unknown event {kind!r}")
    cls, types = spec
    if not all(isinstance(value, kind_) for value, kind_ in zip(fields, types, strict=True)):
        raise ProtocolError(f"a malformed {kind} event")
    if cls is Mapped:
        return Mapped([map_entry_from_data(entry) for entry in fields[0]])
    return cls(*fields)


# --- the worker's side --------------------------------------------------------------------


class WorkerBroker:
    """The broker inside the worker: every file (and every module imported
    once confined) comes from the host. One request and its answer at a time:
    a compression thread's import waits for the job's open."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._turn = _thread.RLock()
        self.opened: list[InputFile] = []

    def tell(self, message: dict[str, Any]) -> None:
        """Send ``message``, which needs no answer (an event, the result)."""
        with self._turn:
            self._channel.send(message)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """The host's answer to ``request``, which carries no descriptor."""
        return self._ask(request)[0]

    def _ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._turn:
            self._channel.send(request)
            reply, fds = self._channel.receive()
        if reply is None:
            raise ProtocolError("the host went away")
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise error_from_data(reply["error"], Limits())
        return reply, fds

    def _file(self, request: dict[str, Any]) -> InputFile:
        reply, fds = self._ask(request)
        if not fds:  # the kernel dropped it: the worker holds all the files it may
            raise errors.PolicyError(
                f"'{reply['name']}': the worker may hold at most {Limits().open_files} "
                "open files")
        file = InputFile(fds[0], str(reply["name"]))
        self.opened.append(file)
        return file

    def open_image_file(self, path: str) -> InputFile:
        return self._file({"request": "open_image_file", "path": path})

    def open_named_file(self, name: str, relative_to: str, role: str) -> InputFile:
        return self._file({"request": "open_named_file", "name": name,
                           "relative_to": relative_to, "role": role})

    def open_named_for_update(self, name: str, relative_to: str, role: str) -> InputFile:
        return self._file({"request": "open_named_for_update", "name": name,
                           "relative_to": relative_to, "role": role})

    def create_output(self, target: str) -> OutputFile:
        reply, fds = self._ask({"request": "create_output", "target": target})
        return OutputFile(fds[0], target, in_place=bool(reply["in_place"]))

    def open_image_for_update(self, path: str) -> InputFile:
        return self._file({"request": "open_image_for_update", "path": path})

    def open_output_in_place(self, target: str) -> OutputFile:
        _reply, fds = self._ask({"request": "open_output_in_place", "target": target})
        return OutputFile(fds[0], target, in_place=True)

    def check_output(self, target: str) -> None:
        self._ask({"request": "check_output", "target": target})

    def commit_output(self, durable: bool) -> None:
        self._ask({"request": "commit_output", "durable": durable})

    def close(self) -> None:
        for file in self.opened:
            file.close()
        self.opened.clear()


def _worker_main(sock: _socket.socket, job: Job, settings: SandboxSettings) -> int:
    """The worker: confine, run the job, report; returns the exit status.
    Modules the job needs come from the host once the worker is confined."""
    channel = Channel(sock)
    _keep_only(sock.fileno())
    states = apply(settings.limits)
    missing = [state for state in states if not state.on]
    if missing and settings.mode == "require":
        channel.send({"error": error_to_data(errors.PolicyError(
            "the sandbox is required but not complete: "
            + "; ".join(f"{s.name}: {s.detail}" for s in missing)))})
        return 1
    channel.send({"layers": [[s.name, s.on, s.detail] for s in states]})
    broker = WorkerBroker(channel)
    import_from_host(broker.ask)

    def send_event(event: Event) -> None:
        broker.tell(event_to_data(event))

    try:
        result = job(broker, send_event)
        broker.tell({"result": result})
    except BaseException as error:  # every failure goes to the host as data
        broker.tell({"error": error_to_data(error)})
    finally:
        broker.close()
    return 0


def _keep_only(fd: int) -> None:
    """Close every descriptor but ``fd``; stdin, stdout and stderr read and
    write nothing (a worker must not reach the host's terminal)."""
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        if os.environ.get("INSTAR_WORKER_STDERR") == "1" and target == 2:
            continue
        os.dup2(null, target)
    os.close(null)
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 16)


# --- the host's side --------------------------------------------------------------------------


_settings: SandboxSettings | None = None


def configure(settings: SandboxSettings | None) -> SandboxSettings | None:
    """Set the settings jobs of this process use when none are given (None:
    from the environment); returns the previous ones."""
    global _settings
    previous, _settings = _settings, settings
    return previous


def current_settings() -> SandboxSettings:
    """The configured settings, else INSTAR_SANDBOX's mode (default auto)."""
    if _settings is not None:
        return _settings
    return SandboxSettings(mode=os.environ.get("INSTAR_SANDBOX", "auto"))


def run_job(job: Job, policy: PathPolicy, settings: SandboxSettings | None = None,
            events: EventSink | None = None,
            host_side: Callable[[HostBroker, Any], Any] | None = None, *,
            inputs: Sequence[str], outputs: Sequence[str] = (),
            force_share: bool = False) -> Any:
    """Run ``job`` in a sandboxed worker (in-process with mode off) and return
    its result; the host serves its requests with a `HostBroker` under
    ``policy``, and removes an output the job did not commit. ``host_side``
    turns the result into the answer while the host's files are still open
    (info's file facts). The job may open only the images in ``inputs`` and
    create only the outputs in ``outputs``, besides what the policy allows;
    ``force_share`` (-U) reads images a running qemu holds locks on."""
    settings = settings or current_settings()
    sink = events or (lambda event: None)
    host = HostBroker(policy, frozenset(inputs), frozenset(outputs), force_share)
    try:
        if settings.mode == "off":
            result = job(host, sink)
        else:
            result = _run_forked(job, host, settings, sink)
        return result if host_side is None else host_side(host, result)
    finally:
        host.close()


def _run_forked(job: Job, host: HostBroker, settings: SandboxSettings,
                events: EventSink) -> Any:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a stream that cannot flush loses nothing of ours
            pass
    import_extensions()  # once per process: every later worker inherits them
    registry.import_all()  # every job probes (and create names its format)
    prepare()
    parent = os.getpid()
    pid = 0
    host_end: _socket.socket | None = None
    try:
        # From the fork until the host is inside this try, a terminating signal
        # waits: the worker is always known here, so always killed below.
        with deferred():
            host_end, worker_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the worker, measured by its own tests
                status = 1
                try:
                    _become_worker(parent)
                    host_end.close()
                    status = _worker_main(worker_end, job, settings)
                finally:
                    os._exit(status)
            worker_end.close()
        return _serve(Channel(host_end), pid, host, settings, events)
    finally:
        with deferred():  # a second signal must not leave the worker running
            if host_end is not None:
                host_end.close()
            if pid > 0:
                _kill(pid)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


_PR_SET_PDEATHSIG = 1


def _become_worker(parent: int) -> None:
    """The first steps of a new worker: terminating signals end it at once
    (the host, which gets them too, does the cleanup), and it dies with the
    host: the kernel kills it if the host ends without killing it first."""
    for number in TERMINATING:
        system_signals.signal(number, system_signals.SIG_DFL)
    try:
        import ctypes  # in the worker only: the host never needs it

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, system_signals.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the host died before the line above
        os._exit(1)


def report_missing_layers(states: list[LayerState]) -> None:
    """auto mode: say on stderr which layers this kernel lacks (one line each).
    A closed or full stderr loses the warning, never the job."""
    for state in states:
        if not state.on and sys.stderr is not None:
            try:
                sys.stderr.write(f"instar: warning: sandbox layer {state.name} is off: "
                                 f"{state.detail}\n")
            except OSError:
                pass


def _serve(channel: Channel, pid: int, host: HostBroker, settings: SandboxSettings,
           events: EventSink) -> Any:
    """Answer the worker until its result comes. The output it commits takes
    its name only then: a worker stopped (timeout, limit, death) after asking
    leaves nothing behind, and the result and the output never disagree."""
    deadline = time.monotonic() + settings.timeout
    commit: bool | None = None  # the durability the worker's commit asked for
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(pid, settings)
        channel.sock.settimeout(remaining)
        try:
            message, fds = channel.receive()
        except TimeoutError:
            raise _timed_out(pid, settings) from None
        except (ProtocolError, ValueError, OSError) as error:
            raise InstarError(f"the worker broke the protocol: {error}") from None
        for fd in fds:  # a worker never sends descriptors
            os.close(fd)
        if message is None:
            raise _died(pid, settings)
        try:
            if "result" in message:
                if commit is not None:
                    host.commit_output(commit)
                return message["result"]
            if "error" in message:
                raise error_from_data(message["error"], settings.limits)
            if "event" in message:
                events(event_from_data(message))
            elif "layers" in message:
                report_missing_layers([LayerState(str(n), bool(o), str(d))
                                       for n, o, d in message["layers"]])
            elif message.get("request") == "commit_output":
                commit = bool(message["durable"])
                channel.send({"done": True})
            elif "request" in message:
                _answer(channel, host, message)
            else:
                raise ProtocolError("an unknown message")
        except (ProtocolError, KeyError, TypeError, ValueError) as error:
            raise InstarError(f"the worker broke the protocol: {error}") from None


def _answer(channel: Channel, host: HostBroker, message: dict[str, Any]) -> None:
    """Carry out one request of the worker, or tell it why not."""
    request = message["request"]
    try:
        if request == "open_image_file":
            file = host.open_image_file(str(message["path"]))
            channel.send({"name": file.name}, [file.fd])
        elif request == "open_image_for_update":
            file = host.open_image_for_update(str(message["path"]))
            channel.send({"name": file.name}, [file.fd])
        elif request == "open_named_file":
            file = host.open_named_file(str(message["name"]), str(message["relative_to"]),
                                        str(message["role"]))
            channel.send({"name": file.name}, [file.fd])
        elif request == "open_named_for_update":
            file = host.open_named_for_update(str(message["name"]),
                                              str(message["relative_to"]),
                                              str(message["role"]))
            channel.send({"name": file.name}, [file.fd])
        elif request == "create_output":
            out = host.create_output(str(message["target"]))
            channel.send({"in_place": out.in_place}, [out.fd])
        elif request == "open_output_in_place":
            out = host.open_output_in_place(str(message["target"]))
            channel.send({"in_place": True}, [out.fd])
        elif request == "check_output":
            host.check_output(str(message["target"]))
            channel.send({"done": True})
        elif request == "module":
            channel.send(module_reply(str(message["name"])))
        else:
            raise ProtocolError(f"an unknown request {request!r}")
    except (InstarError, OSError) as error:
        channel.send({"error": error_to_data(error)})


def _kill(pid: int) -> None:
    try:
        os.kill(pid, system_signals.SIGKILL)
    except ProcessLookupError:
        pass


def _timed_out(pid: int, settings: SandboxSettings) -> WorkerLimitError:
    _kill(pid)
    return WorkerLimitError(
        f"the worker took longer than {settings.timeout:g} s and was stopped (--timeout)"
    )


def _died(pid: int, settings: SandboxSettings) -> WorkerLimitError:
    """Why the worker ended without an answer."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number in (system_signals.SIGXCPU, system_signals.SIGKILL):
            return WorkerLimitError(
                f"the worker used more than {settings.limits.cpu} s of CPU and was "
                "stopped (--max-cpu)"
            )
        return WorkerLimitError(f"the worker died ({signal_name(number)})")
    return WorkerLimitError(f"the worker ended without an answer (status {os.WEXITSTATUS(status)})")


__all__ = [
    "Channel", "SandboxSettings", "WorkerBroker", "WorkerLimitError", "configure",
    "current_settings", "run_job",
]
