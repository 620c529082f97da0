"""Creating the output safely: an unnamed file beside the target, named when complete.

A new output, or one that replaces an existing file, is written into an
anonymous file (O_TMPFILE) in the target's directory and linked into place
only once complete: a failure or a signal at any point leaves nothing behind
and the old file as it was. The replacement keeps what qemu-img keeps when it
writes over a file (mode, owner and group). A block device is written in
place (zeros included), since it cannot be replaced.

Some existing files cannot be replaced without losing what qemu-img keeps:
one with other hard links (a new inode would leave them holding the old
image), one in a directory the user may not write (no new file can be made
there), one whose owner or group the user cannot give a new file. These are
written through their own inode, as qemu-img writes them: truncated, then
filled. A failure then leaves what qemu-img would leave, a partial image.

An output that is one of the inputs is refused before anything is written;
an output whose file the job reads (``convert -n`` into a qcow2, vmdk...) is
always replaced, never written in place.

Errors from the file system while writing (ENOSPC, EFBIG, EIO) become
`WriteError`, qemu-img convert's "error while writing at byte N: REASON";
errors while reading the input become `ReadError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Collection, Iterable, Iterator

from instar.copy import ZERO_GRANULARITY, copy_image
from instar.errors import (
    CommitError,
    CreationError,
    ImageOpenError,
    InstarError,
    OutputError,
    ReadError,
    TooLargeError,
    WriteError,
)
from instar.events import EventSink, Notice
from instar.files import InputFile
from instar.formats.base import Format, OutputFile, ParsedOptions, Writer
from instar.image import Extent, Image
from instar.runtime_types import TYPE_CHECKING, NamedTuple
from instar.signals import deferred

if TYPE_CHECKING:
    from instar.opener import Broker

# Why a new file cannot be made beside the target: the directory is not writable.
_NO_NEW_FILE = (errno.EACCES, errno.EPERM)


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class AtomicOutput:
    """An output file that appears at ``target`` only after ``commit``.

    ``inputs`` are the identities (st_dev, st_ino) of the files the job reads:
    such a target is always replaced, never truncated to be written in place.
    """

    def __init__(self, target: str, inputs: Collection[tuple[int, int]] = ()) -> None:
        self.target = target
        # Write through a symbolic link to where it points, as qemu would.
        self._final = os.path.realpath(target)
        self._inputs = frozenset(inputs)
        self._temp: str | None = None  # a named temporary file, when O_TMPFILE is unusable
        self._anonymous = False  # an O_TMPFILE file, linked into place by commit
        self._rewriting = False  # the existing file itself, written in place
        self.file: OutputFile | None = None

    def create(self) -> OutputFile:
        """Open the file to write into: a new unnamed file, a block device, or
        the existing target itself (see the module's docstring for when)."""
        if not self.target:  # qemu opens "" (ENOENT); its real path would be the cwd
            raise self._creation_error(_os_error(errno.ENOENT))
        try:
            info: os.stat_result | None = os.stat(self._final)
        except FileNotFoundError:
            info = None
        except OSError as error:
            raise self._creation_error(error) from None
        if info is None:
            fd = self._new_file_or_none(may_rewrite=False)
            assert fd is not None
            self.file = OutputFile(fd, self.target)
            return self.file
        if stat.S_ISDIR(info.st_mode):
            raise self._creation_error(_os_error(errno.EISDIR))
        if stat.S_ISBLK(info.st_mode):
            device = self._open(self._final, os.O_WRONLY)
            self.file = OutputFile(device, self.target, in_place=True)
            return self.file
        if stat.S_ISCHR(info.st_mode):  # qemu's raw driver: it cannot size one
            raise CreationError("Cannot grow device files")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a socket: never replaced by a file
            raise CreationError(f"Could not resize file: {os.strerror(errno.EINVAL)}")
        return self._replace(info)

    def _replace(self, info: os.stat_result) -> OutputFile:
        """The existing regular file: qemu-img opens it for writing, so one the
        user may not write is refused with qemu's message; then a new file
        takes its place, or it is written in place when a new one would lose
        its links or owner."""
        existing = self._open(self._final, os.O_WRONLY)
        fd: int | None = None
        try:
            info = os.fstat(existing)  # the file opened, whatever happened since the stat
            may_rewrite = (info.st_dev, info.st_ino) not in self._inputs
            if not (may_rewrite and info.st_nlink > 1):
                fd = self._new_file_or_none(may_rewrite)
            if fd is not None and not self._keep_owner(fd, info) and may_rewrite:
                self._discard_new_file(fd)
                fd = None
            if fd is None:  # write through the existing inode, as qemu-img does
                os.ftruncate(existing, 0)
                self._rewriting = True
                self.file = OutputFile(existing, self.target)
                existing = -1
                return self.file
            os.fchmod(fd, stat.S_IMODE(info.st_mode))  # after fchown, which clears set-id bits
            self.file = OutputFile(fd, self.target)
            fd = None
            return self.file
        except OSError as error:
            raise self._creation_error(error) from None
        finally:
            if existing >= 0:
                os.close(existing)
            if fd is not None:
                self._discard_new_file(fd)

    def _new_file_or_none(self, may_rewrite: bool) -> int | None:
        """A new file beside the target, or None where the directory takes no
        new file and the target may be written in place instead."""
        try:
            return self._new_file()
        except _NoNewFile as refused:
            if may_rewrite:
                return None
            raise self._creation_error(refused.error) from None

    @staticmethod
    def _keep_owner(fd: int, info: os.stat_result) -> bool:
        """Give the new file the target's owner and group; False where this
        user may not (EPERM: neither root nor the owner, or not in the group;
        EINVAL: an id this user namespace cannot map)."""
        mine = os.fstat(fd)
        if (mine.st_uid, mine.st_gid) == (info.st_uid, info.st_gid):
            return True
        try:
            os.fchown(fd, info.st_uid, info.st_gid)
        except OSError as error:
            if error.errno in (errno.EPERM, errno.EINVAL):
                return False
            raise
        return True

    def _discard_new_file(self, fd: int) -> None:
        os.close(fd)
        self._anonymous = False
        if self._temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)
            self._temp = None

    def _new_file(self) -> int:
        """An unnamed file in the target's directory (a named temporary file
        where O_TMPFILE is unsupported). Raises `_NoNewFile` when the directory
        refuses new files, CreationError for any other failure."""
        fd = self._open_anonymous()
        if fd is not None:
            return fd
        self._temp = self._temp_name()
        try:
            return os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o644)
        except OSError as error:
            self._temp = None
            if error.errno in _NO_NEW_FILE:
                raise _NoNewFile(error) from None
            raise self._creation_error(error) from None

    def _temp_name(self) -> str:
        directory, base = os.path.split(self._final)
        return os.path.join(directory, f".{base}.{os.urandom(4).hex()}.instar-tmp")

    def _open_anonymous(self) -> int | None:
        """An unnamed file in the target's directory, or None where that is unsupported."""
        if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
            return None
        directory = os.path.dirname(self._final) or "."
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return None
            if error.errno in _NO_NEW_FILE:
                raise _NoNewFile(error) from None
            raise self._creation_error(error) from None
        self._anonymous = True
        return fd

    def _open(self, path: str, flags: int) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise self._creation_error(error) from None

    def _creation_error(self, error: OSError, cls: type[CreationError] = CreationError
                        ) -> CreationError:
        return cls(f"Could not create '{self.target}': {error.strerror}")

    def commit(self, durable: bool = True) -> None:
        """Make the output visible under its name; durable (fsynced) first by default.

        ``durable=False`` is ``qemu-img convert``'s default cache mode (unsafe):
        the rename is still atomic for other processes, but a power loss may
        lose data the kernel had not written yet. A terminating signal that
        arrives meanwhile is held until the output has its name, so the name
        never ends up on a temporary file. Failures are CreationErrors with
        qemu's "Could not create" wording: the output could not take its name.
        """
        assert self.file is not None
        try:
            with deferred():
                self._commit(self.file, durable)
        except OSError as error:
            raise self._creation_error(error, CommitError) from None

    def _commit(self, out: OutputFile, durable: bool) -> None:
        if durable:
            os.fsync(out.fd)
        if self._anonymous:
            # Give the finished file a name, then move it over the target.
            self._temp = self._temp_name()
            directory, name = os.path.split(self._temp)
            dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                # A directory fd makes os.link use linkat(AT_SYMLINK_FOLLOW), which
                # follows /proc's link to the open file; plain link() would not.
                os.link(f"/proc/self/fd/{out.fd}", name, dst_dir_fd=dir_fd,
                        follow_symlinks=True)
            finally:
                os.close(dir_fd)
            self._anonymous = False
        if self._temp is not None:
            os.rename(self._temp, self._final)
            self._temp = None
            if durable:
                dir_fd = os.open(os.path.dirname(self._final) or ".",
                                 os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        self.file = None
        self._rewriting = False
        os.close(out.fd)

    def abort(self) -> None:
        """Drop the unfinished output: an unnamed file vanishes with its last
        descriptor, a named temporary file is removed; the target is as it was
        (unless it was being written in place)."""
        with deferred():
            out, self.file = self.file, None
            if out is not None:
                os.close(out.fd)
            self._anonymous = self._rewriting = False
            if self._temp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._temp)
                self._temp = None


class _NoNewFile(Exception):
    """The target's directory takes no new file (EACCES, EPERM)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror)
        self.error = error


def refuse_same_file(target: str, inputs: Iterable[InputFile]) -> None:
    """Refuse an output that is (any spelling of) one of the input files."""
    try:
        info = os.stat(target)
    except OSError:
        return
    for file in inputs:
        if (info.st_dev, info.st_ino) == file.identity:
            raise OutputError(
                f"{target}: output is the same file as input '{file.name}';"
                " refusing to overwrite it"
            )


class OutputSpec(NamedTuple):
    """What to write: the format, the declared virtual size, the parsed
    creation options and the zero-detection granularity (0: write zeros as
    data). Plain data, so it can be handed to a worker."""

    format: Format
    virtual_size: int
    options: ParsedOptions
    zero_granularity: int = ZERO_GRANULARITY


def _reason(error: OSError | OverflowError) -> str:
    """The strerror of a failure to write; an offset or size past what the
    platform's off_t holds (Python's OverflowError) is the kernel's EFBIG."""
    if isinstance(error, OverflowError):
        return os.strerror(errno.EFBIG)
    return error.strerror or os.strerror(error.errno or errno.EIO)


class _ReportingWriter:
    """A Writer whose file system errors say where they happened: qemu-img
    convert reports the guest offset of the write that failed. Metadata a
    writer writes when it closes belongs to no single write; its failures are
    reported at the end of the image."""

    def __init__(self, writer: Writer, end: int) -> None:
        self._writer = writer
        self._end = end

    def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            self._writer.write(offset, data)
        except (OSError, OverflowError) as error:
            raise WriteError(offset, _reason(error)) from None

    def write_zeroes(self, offset: int, length: int) -> None:
        try:
            self._writer.write_zeroes(offset, length)
        except (OSError, OverflowError) as error:
            raise WriteError(offset, _reason(error)) from None

    def close(self) -> None:
        try:
            self._writer.close()
        except (OSError, OverflowError) as error:
            raise WriteError(self._end, _reason(error)) from None

    def abort(self) -> None:
        self._writer.abort()


class _ReportingImage:
    """An Image whose read errors (EIO from a failing disk) say where, as
    qemu-img convert's "error while reading at byte N" does."""

    def __init__(self, image: Image) -> None:
        self._image = image

    @property
    def virtual_size(self) -> int:
        return self._image.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self._image.read(offset, length)
        except OSError as error:
            raise ReadError(offset, _reason(error)) from None

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        position = offset
        try:
            for extent in self._image.extents(offset, length):
                position = extent.offset + extent.length
                yield extent
        except OSError as error:
            raise ReadError(position, _reason(error), block_status=True) from None

    def close(self) -> None:
        self._image.close()


def _copy(image: Image, writer: Writer, end: int, events: EventSink | None,
          zero_granularity: int = ZERO_GRANULARITY) -> None:
    """copy_image with qemu's messages for the file system's errors."""
    copy_image(_ReportingImage(image), _ReportingWriter(writer, end), events=events,
               zero_granularity=zero_granularity)


def _sync(out: OutputFile, end: int) -> None:
    """fsync the output; a failure (EIO: the kernel could not write back what
    it had accepted) is a failure to write it."""
    try:
        os.fsync(out.fd)
    except OSError as error:
        raise WriteError(end, _reason(error)) from None


def fill_output(
    image: Image,
    out: OutputFile,
    spec: OutputSpec,
    *,
    events: EventSink | None = None,
    notice: Notice | None = None,
) -> None:
    """Create the image ``spec`` describes in the already-open ``out`` and copy
    ``image`` into it: the half of writing an output that reads image bytes,
    so it can run anywhere the output's fd is (a worker).

    ``notice`` is sent once the output image exists, before the copy (where
    qemu-img dd prints its skip warning). Raises CreationError when the
    format refuses or cannot start the image, WriteError or ReadError when
    the file system fails during the copy.
    """
    try:
        writer = spec.format.create(out, spec.virtual_size, spec.options)
    except ImageOpenError:  # qemu creates such an image, then cannot open it: its words
        raise
    except TooLargeError:  # the size refused: create words it its own way
        raise
    except InstarError as error:  # the driver refused: qemu prefixes its message
        raise CreationError(str(error)) from None
    except (OSError, OverflowError) as error:  # it could not write its first structures
        raise CreationError(_reason(error)) from None
    if notice is not None and events is not None:
        events(notice)
    try:
        _copy(image, writer, spec.virtual_size, events, spec.zero_granularity)
    except BaseException:
        writer.abort()
        raise


def write_image(
    image: Image,
    target: str,
    spec: OutputSpec,
    *,
    broker: Broker | None = None,
    events: EventSink | None = None,
    notice: Notice | None = None,
    durable: bool = True,
) -> None:
    """Create ``target`` as ``spec`` says and copy ``image`` into it: the
    broker (the host) creates the output, `fill_output` fills it, the broker
    commits it; on any failure the broker's close removes it.

    A durable output is fsynced here, where a failure can still be reported
    as qemu's write error, before the host gives it its name."""
    own = broker is None
    if broker is None:
        from instar.opener import HostBroker
        from instar.safety import PathPolicy

        broker = HostBroker(PathPolicy([]))
    try:
        if not target and spec.format.name == "vmdk":
            raise CreationError("No filename provided")  # qemu's vmdk checks before creating
        out_file = broker.create_output(target)
        spec = _with_data_file(spec, target, broker)
        fill_output(image, out_file, spec, events=events, notice=notice)
        if durable:
            _sync(out_file, spec.virtual_size)
            if spec.options.data_file is not None:
                _sync(spec.options.data_file, spec.virtual_size)
        broker.commit_output(durable)
    finally:
        if own:
            broker.close()


def _with_data_file(spec: OutputSpec, target: str, broker: Broker) -> OutputSpec:
    """The spec with its external data file (qcow2's ``-o data_file``) created,
    after the image as qemu creates them, through the broker: the name as
    given (relative to the working directory, as qemu creates it), appearing
    only when the image does (the broker refuses the image's own name)."""
    from instar.formats.options import data_file_name

    name = data_file_name(spec.options)
    if name is None:
        return spec
    try:
        broker.check_output(name)
    except OutputError:  # a file the job reads: qemu holds it, and cannot lock it to write
        error = CreationError('Failed to get "write" lock')
        error.hint = f"Is another process using the image [{name}]?"
        raise error from None
    data = broker.create_output(name)
    return spec._replace(options=spec.options._replace(data_file=data))


def open_in_place(target: str) -> OutputFile:
    """The existing image ``target`` opened to be written over (host side)."""
    if not target:
        raise OutputError("Could not open '': The 'file' block driver requires a file name")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as error:
        raise OutputError(f"Could not open '{target}': Could not open '{target}': "
                          f"{error.strerror}") from None
    return OutputFile(fd, target, in_place=True)


def write_in_place(
    image: Image,
    out: OutputFile,
    fmt: Format,
    options: ParsedOptions,
    events: EventSink | None = None,
    durable: bool = True,
) -> None:
    """Write ``image`` over the existing raw image open as ``out`` (``convert -n``).

    Zeros are written too (the old contents must go); the file keeps its size.
    """
    size = os.lseek(out.fd, 0, os.SEEK_END)
    if size < image.virtual_size:
        raise OutputError("output file is smaller than input file")
    writer = fmt.create(out, size, options)
    _copy(image, writer, image.virtual_size, events)
    if durable:
        _sync(out, image.virtual_size)
