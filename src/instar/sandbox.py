"""The worker's confinement: the layers a worker applies before it reads an image byte.

In this order, each where the kernel has it:

1. **rlimits**: address space, CPU seconds, file size, open files; no core dumps.
2. **no_new_privs**: nothing the worker runs can gain privileges.
3. **namespaces**: a new user and network namespace (no network at all).
4. **Landlock**: no file system access at all; where the ABI has them, no TCP
   and no signals or abstract sockets outside the worker.
5. **seccomp**: an allow-list of system calls; everything else (open, exec,
   socket, connect, ptrace, mount, kill...) fails with EPERM.

The worker already holds every file it needs (the host passes descriptors), so
none of this takes anything it uses. `apply` confines the calling process and
says which layers it could not apply and why; `status` asks a throw-away
child, for ``instar --sandbox-status``.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable

from instar.runtime_types import TYPE_CHECKING, NamedTuple
from instar.signals import system_signals

if TYPE_CHECKING:
    from typing import Any

LAYERS = ("rlimits", "no_new_privs", "namespaces", "landlock", "seccomp")

MiB = 1 << 20
DEFAULT_MAX_MEMORY = 1 << 30
DEFAULT_MAX_CPU = 600  # seconds of CPU
DEFAULT_TIMEOUT = 3600.0  # seconds of wall clock, enforced by the host
MAX_OPEN_FILES = 4096  # compare opens two images; a VMDK may name 1024 extents


class Limits(NamedTuple):
    """What a worker may use. ``file_size`` bounds every file it writes
    (0: none at all, for commands that write nothing)."""

    memory: int = DEFAULT_MAX_MEMORY
    cpu: int = DEFAULT_MAX_CPU
    file_size: int = resource.RLIM_INFINITY
    open_files: int = MAX_OPEN_FILES


def _libc() -> Any:
    """The C library, for the calls Python has no wrapper for (loaded only in a
    worker: the host never needs ctypes)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


# --- 1. rlimits ---------------------------------------------------------------------------


def _lower(limit: int, soft: int, hard: int) -> None:
    """Set ``limit`` to at most ``soft``/``hard``, never above what the
    process already has: a user's ``ulimit -f`` (which qemu-img obeys) still
    holds in the worker, and raising a hard limit would fail anyway."""
    current_soft, current_hard = resource.getrlimit(limit)

    def smaller(a: int, b: int) -> int:
        if a == resource.RLIM_INFINITY:
            return b
        if b == resource.RLIM_INFINITY:
            return a
        return min(a, b)

    new_hard = smaller(hard, current_hard)
    resource.setrlimit(limit, (smaller(smaller(soft, current_soft), new_hard), new_hard))


def _apply_rlimits(limits: Limits) -> str:
    _lower(resource.RLIMIT_CORE, 0, 0)
    _lower(resource.RLIMIT_AS, limits.memory, limits.memory)
    # The soft limit sends SIGXCPU (the host reports it); the hard one kills.
    _lower(resource.RLIMIT_CPU, limits.cpu, limits.cpu + 1)
    # Writing past the file size limit fails with EFBIG instead of killing.
    system_signals.signal(system_signals.SIGXFSZ, system_signals.SIG_IGN)
    _lower(resource.RLIMIT_FSIZE, limits.file_size, limits.file_size)
    _lower(resource.RLIMIT_NOFILE, limits.open_files, limits.open_files)
    size = "none" if limits.file_size == 0 else (
        "unlimited" if limits.file_size == resource.RLIM_INFINITY
        else f"{limits.file_size // MiB} MiB")
    return (f"memory {limits.memory // MiB} MiB, CPU {limits.cpu} s, files written {size}, "
            f"{limits.open_files} open files, no core dumps")


# --- 2. no_new_privs ------------------------------------------------------------------------

PR_SET_NO_NEW_PRIVS = 38


def _apply_no_new_privs() -> str:
    _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    return "set"


# --- 3. namespaces --------------------------------------------------------------------------

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def _apply_namespaces() -> str:
    """A new user namespace (no mapping: the worker is nobody there) and a
    network namespace with nothing in it. Needs a single-threaded process."""
    _check(_libc().unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare")
    return "new user and network namespaces"


# --- 4. Landlock ----------------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
# Every file system right of each ABI version (the rights are numbered in order).
_FS_RIGHTS_BY_ABI = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (raises OSError where there is none)."""
    import ctypes

    return _check(
        _libc().syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)),
        "landlock_create_ruleset",
    )


def _apply_landlock() -> str:
    """Handle every right the ABI knows and allow none: no file can be opened,
    created, executed or listed."""
    import ctypes

    class RulesetAttr(ctypes.Structure):
        _fields_ = (
            ("handled_access_fs", ctypes.c_uint64),
            ("handled_access_net", ctypes.c_uint64),
            ("scoped", ctypes.c_uint64),
        )

    abi = landlock_abi()
    attr = RulesetAttr((1 << _FS_RIGHTS_BY_ABI.get(abi, 16)) - 1, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset = _check(
        _libc().syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                        ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        _check(_libc().syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)
    extra = ", no TCP" if abi >= 4 else ""
    extra += ", no signals or abstract sockets outside" if abi >= 6 else ""
    return f"no file system access{extra} (ABI {abi})"


# --- 5. seccomp -------------------------------------------------------------------------------

# What a worker does once confined: read and write the descriptors it holds,
# manage memory, run threads (the reader and the compression pool), talk to
# the host over its socket, and exit. Nothing that names a path.
_ALLOWED_SYSCALLS = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "lseek", "close", "fstat", "ftruncate", "fallocate", "fsync",
    "fdatasync", "copy_file_range", "sendfile", "fadvise64", "dup", "dup3",
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    "futex", "set_robust_list", "get_robust_list", "rseq", "sched_yield", "sched_getaffinity",
    "gettid", "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "getrandom", "exit", "exit_group", "restart_syscall",
    "sendmsg", "recvmsg", "sendto", "recvfrom", "poll", "ppoll", "pselect6", "select",
    "fcntl", "getrlimit", "sysinfo", "uname",
)
CLONE_THREAD = 0x00010000
AT_EMPTY_PATH = 0x1000


def _import_pyseccomp() -> Any:
    """pyseccomp, imported without `ctypes.util` and without `typing`.

    pyseccomp looks its two libraries up with ``ctypes.util.find_library``,
    whose import (subprocess, tempfile, shutil...) and two runs of ldconfig
    were most of a worker's start-up, and imports typing (with re and enum)
    for its annotations: together more than instar's own start-up. The
    sonames are fixed on Linux, and its annotations and casts need nothing
    but names, so pyseccomp is lent a ``ctypes.util`` that names the
    libraries and a ``typing`` with what it takes from it (`_lent_modules`);
    where that fails (other sonames, another pyseccomp) the real ones are used."""
    import ctypes
    import sys
    import weakref  # pyseccomp's, loaded before anything is lent

    del weakref
    lent = {name: module for name, module in _lent_modules().items()
            if name not in sys.modules}  # what is loaded already costs nothing more
    if "pyseccomp" not in sys.modules and lent:
        sys.modules.update(lent)
        if "ctypes.util" in lent:
            ctypes.util = lent["ctypes.util"]  # type: ignore[attr-defined]
        try:
            import pyseccomp
            return pyseccomp
        except Exception:  # other sonames, another pyseccomp: the real modules below
            pass
        finally:
            for name in lent:
                del sys.modules[name]
            if "ctypes.util" in lent:
                del ctypes.util  # type: ignore[attr-defined]
    import pyseccomp
    return pyseccomp


# The libraries pyseccomp loads, by their Linux sonames.
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


class _Subscriptable:
    """``Union[int, str]`` and the like, as pyseccomp's annotations spell them."""

    def __class_getitem__(cls, _parameters: object) -> type[_Subscriptable]:
        return cls


def _lent_modules() -> dict[str, Any]:
    """The ``ctypes.util`` and ``typing`` pyseccomp is lent while it is imported."""
    import types
    from collections.abc import Collection, Iterable

    util = types.ModuleType("ctypes.util")
    util.find_library = _SONAMES.get  # type: ignore[attr-defined]
    typing = types.ModuleType("typing")
    names = {"Any": object, "Union": _Subscriptable, "Collection": Collection,
             "Iterable": Iterable, "cast": lambda _kind, value: value,
             "overload": lambda function: function}
    for name, value in names.items():
        setattr(typing, name, value)
    return {"ctypes.util": util, "typing": typing}


_FILTER: list[Any] = []  # the allow-list, once built


def _seccomp_filter() -> Any:
    """The allow-list, built (libseccomp loaded) while files can still be opened;
    built once per process: workers forked later inherit it (`prepare`)."""
    if _FILTER:
        return _FILTER[0]
    sc = _import_pyseccomp()

    rules = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    for name in _ALLOWED_SYSCALLS:
        try:
            rules.add_rule(sc.ALLOW, name)
        except (OSError, ValueError):
            continue  # not a system call on this architecture
    # Threads, not processes: clone only with CLONE_THREAD; clone3 hides its
    # flags in memory, so it fails with ENOSYS and glibc falls back to clone.
    rules.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # fstat is newfstatat(fd, "", AT_EMPTY_PATH) in glibc: never a path lookup.
    rules.add_rule(sc.ALLOW, "newfstatat",
                   sc.Arg(3, sc.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
    # Reading limits is fine; prlimit64 may not set any (new_limit NULL).
    rules.add_rule(sc.ALLOW, "prlimit64", sc.Arg(2, sc.EQ, 0))
    _FILTER.append(rules)
    return rules


def _apply_seccomp(rules: Any) -> str:
    if isinstance(rules, BaseException):
        raise rules
    rules.load()
    return "allow-list: no open, exec, socket, connect, ptrace, mount, kill"


# --- applying and reporting ---------------------------------------------------------------


class LayerState(NamedTuple):
    name: str
    on: bool
    detail: str  # what is on ("Landlock ABI 7"), or why it is not


def prepare() -> None:
    """Do in the host, before forking, the part of confinement that does not
    depend on the job: load libseccomp and build the allow-list. A process
    that runs many jobs (the Python API) then pays it once, not per worker."""
    try:
        _seccomp_filter()
    except (OSError, ImportError, ValueError):
        pass  # apply() reports the layer as off


def apply(limits: Limits) -> list[LayerState]:
    """Confine this process (a freshly forked, single-threaded worker), layer
    by layer in order; a layer that fails is reported and the rest still apply."""
    try:
        seccomp: Any = _seccomp_filter()
    except (OSError, ImportError, ValueError) as error:
        seccomp = error
    steps: tuple[tuple[str, Callable[[], str]], ...] = (
        ("rlimits", lambda: _apply_rlimits(limits)),
        ("no_new_privs", _apply_no_new_privs),
        ("namespaces", _apply_namespaces),
        ("landlock", _apply_landlock),
        ("seccomp", lambda: _apply_seccomp(seccomp)),
    )
    states = []
    for name, step in steps:
        try:
            states.append(LayerState(name, True, step()))
        except (OSError, ImportError, AttributeError, ValueError) as error:
            states.append(LayerState(name, False, _why(error)))
    return states


def _why(error: BaseException) -> str:
    if isinstance(error, ImportError):
        return f"cannot load it ({error})"
    if isinstance(error, OSError) and error.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
        return "the kernel does not have it"
    return str(error) or type(error).__name__


def status(limits: Limits | None = None) -> list[LayerState]:
    """What `apply` would give, found in a throw-away child process."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            states = apply(limits or Limits())
            text = "\n".join(f"{s.name}\t{int(s.on)}\t{s.detail}" for s in states)
            os.write(write_end, text.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    states = []
    for line in b"".join(chunks).decode().splitlines():
        name, on, detail = line.split("\t", 2)
        states.append(LayerState(name, on == "1", detail))
    return states
