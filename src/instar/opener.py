"""Opening images: the host broker that opens files, and the chain opener that reads them.

Two sides, so that everything reading image bytes can run in a worker process:

- `HostBroker` (host side) is the only code that turns a name into an open
  file: the images the user named, and "the file named N, relative to image
  file F, in role R" (a backing file, data file, extent, parent), after
  checking it against the policy. It raises plain facts (OSError,
  PolicyError); it never reads a byte of an image.
- `ImageOpener` (worker side) asks a broker for each file, probes, hands the
  file to its format and wraps the format's layer in a `BlockImage`; format
  code asks for the files an image names through a `ChainResolver`. It
  composes qemu's messages ("Could not open 'F': ...") from the facts that
  formats and the broker raise.

`ImageOpener.open` gives the Image (dd, convert); `ImageOpener.open_node`
also says which format and file it chose (info, compare), and can leave the
backing file unopened, as qemu-img info does (BDRV_O_NO_BACKING).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from instar.errors import (
    ChainDepthError,
    CreationError,
    DriverError,
    FormatError,
    ImageOpenError,
    PolicyError,
    UnsupportedError,
)
from instar.files import InputFile
from instar.formats import registry
from instar.formats.base import Format, OutputFile
from instar.image import BlockImage, Extent, Image
from instar.record import Record
from instar.runtime_types import TYPE_CHECKING, NamedTuple, Protocol
from instar.safety import MAX_CHAIN_DEPTH, PathPolicy

if TYPE_CHECKING:
    from instar.output import AtomicOutput


class Broker(Protocol):
    """What the worker asks the host for: open files, never paths to open."""

    opened: list[InputFile]  # every file opened so far

    def open_image_file(self, path: str) -> InputFile:
        """A file the user named (raises OSError)."""
        ...

    def open_named_file(self, name: str, relative_to: str, role: str) -> InputFile:
        """The file an image names: ``name`` relative to the image file
        ``relative_to``, for ``role`` ("backing file", "data file", "extent");
        raises PolicyError when the policy refuses it, OSError when it cannot
        be opened. The file's ``name`` is the combined path, as qemu shows it."""
        ...

    def check_output(self, target: str) -> None:
        """Refuse ``target`` if it is (any spelling of) one of the inputs."""
        ...

    def open_image_for_update(self, path: str) -> InputFile:
        """The image the user named to change in place (resize), open for
        reading and writing (raises OSError)."""
        ...

    def open_named_for_update(self, name: str, relative_to: str, role: str) -> InputFile:
        """The file an image names (``name`` relative to ``relative_to``),
        open for reading and writing once the policy allows it: commit's base
        (raises PolicyError, OSError)."""
        ...

    def create_output(self, target: str) -> OutputFile:
        """A new output that appears at ``target`` only once committed (or a
        block device, written in place)."""
        ...

    def open_output_in_place(self, target: str) -> OutputFile:
        """The existing raw image ``target``, to write over (``convert -n``)."""
        ...

    def commit_output(self, durable: bool) -> None:
        """Give the outputs created so far their names, in the order they were
        created (after an fsync if ``durable``)."""
        ...

    def close(self) -> None:
        """Close every file; an output not committed is removed."""
        ...


class HostBroker(Record):
    """Opens files on the host side: only the images and outputs the user
    named (``inputs``, ``outputs``; None: any, for in-process use), and files
    images name once the policy allows them. Remembers each file opened, so
    an output that is an input is refused. ``force_share`` (-U): read images
    a running qemu holds locks on."""

    __slots__ = ("_in_place", "_outputs", "force_share", "inputs", "opened", "outputs", "policy")

    def __init__(self, policy: PathPolicy, inputs: frozenset[str] | None = None,
                 outputs: frozenset[str] | None = None, force_share: bool = False) -> None:
        self.policy = policy
        self.inputs = inputs
        self.outputs = outputs
        self.force_share = force_share
        self.opened: list[InputFile] = []
        self._outputs: list[AtomicOutput] = []  # created, not yet committed
        self._in_place: list[int] = []

    def open_image_file(self, path: str) -> InputFile:
        if self.inputs is not None and path not in self.inputs:
            raise PolicyError(f"'{path}' was not named on the command line")
        return self._open(path)

    def _open(self, path: str, resolved: str | None = None, *,
              writable: bool = False) -> InputFile:
        """``path`` opened (for reading, or reading and writing), kept for
        closing, and refused with qemu's message where a running qemu's lock
        conflicts: a write lock with reading (unless ``force_share``), any
        lock with writing."""
        file = open_input_file(path, resolved, writable=writable)
        self.opened.append(file)
        if writable or not self.force_share:
            from instar.locks import read_conflict, write_conflict

            conflict = (write_conflict if writable else read_conflict)(file.fd)
            if conflict is not None:
                error = ImageOpenError(path, conflict)
                error.hint = f"Is another process using the image [{path}]?"
                raise error
        return file

    def open_image_for_update(self, path: str) -> InputFile:
        if self.outputs is not None and path not in self.outputs:
            raise PolicyError(f"'{path}' was not named as the image to change")
        return self._open(path, writable=True)

    def _check_target(self, target: str) -> None:
        if self.outputs is not None and target not in self.outputs:
            raise PolicyError(f"'{target}' was not named as the output")

    def open_named_file(self, name: str, relative_to: str, role: str) -> InputFile:
        return self._open_named(name, relative_to, role, writable=False)

    def open_named_for_update(self, name: str, relative_to: str, role: str) -> InputFile:
        return self._open_named(name, relative_to, role, writable=True)

    def _open_named(self, name: str, relative_to: str, role: str, *,
                    writable: bool) -> InputFile:
        """A file an image names, relative to ``relative_to``, opened on the
        path the policy checked; a regular file or a block device only."""
        if "\0" in name or not name:
            raise FormatError(f"{role} name is not a valid path")
        path = combine_path(relative_to, name)
        resolved = self.policy.check(path, role)
        file = self._open(path, resolved, writable=writable)
        if not (file.is_regular or file.is_block_device):
            raise OSError(errno.EINVAL, f"'file' driver requires '{path}' to be a regular file")
        return file

    def check_output(self, target: str) -> None:
        from instar.output import refuse_same_file

        refuse_same_file(target, self.opened)

    def create_output(self, target: str) -> OutputFile:
        from instar.output import AtomicOutput

        self._check_target(target)
        # A file the job reads (convert -n's old image) is replaced, never rewritten.
        if any(os.path.realpath(target) == os.path.realpath(pending.target)
               for pending in self._outputs):  # qemu cannot lock one file twice
            error = CreationError('Failed to get shared "resize" lock')
            error.hint = f"Is another process using the image [{target}]?"
            raise error
        output = AtomicOutput(target, [file.identity for file in self.opened])
        out = output.create()
        self._outputs.append(output)
        return out

    def open_output_in_place(self, target: str) -> OutputFile:
        from instar.output import open_in_place

        self._check_target(target)
        out = open_in_place(target)
        self._in_place.append(out.fd)
        return out

    def commit_output(self, durable: bool) -> None:
        """Commit every output in order (a qcow2 image's data file before the
        image naming it); if one fails, the ones committed before it are
        removed again, so a job leaves all its outputs or none."""
        assert self._outputs
        done: list[AtomicOutput] = []
        try:
            while self._outputs:
                output = self._outputs[0]
                output.commit(durable)
                done.append(self._outputs.pop(0))
        except BaseException:
            for output in done:  # where it was written (through a symbolic link)
                try:
                    os.unlink(os.path.realpath(output.target))
                except OSError:
                    pass
            raise

    def close(self) -> None:
        for output in self._outputs:
            output.abort()
        self._outputs.clear()
        for fd in self._in_place:
            os.close(fd)
        self._in_place.clear()
        for file in self.opened:
            file.close()
        self.opened.clear()


def open_input_file(path: str, resolved: str | None = None, *,
                    writable: bool = False) -> InputFile:
    """Open ``path`` (read-only): the one place a path becomes an `InputFile`.

    What is opened is the resolved path (the one the policy checked, when it
    checked one), never through a symbolic link that could have been swapped
    in since, and never blocking: a FIFO opens at once and is then refused by
    its type, where a plain open would wait for a writer forever.
    ``writable`` opens it for reading and writing (an image changed in place).
    """
    real = resolved if resolved is not None else os.path.realpath(path)
    mode = os.O_RDWR if writable else os.O_RDONLY
    fd = os.open(real, mode | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return InputFile(fd, path)
    except BaseException:
        os.close(fd)
        raise


class OpenedNode(NamedTuple):
    """One image as opened: its reader, the format chosen and its own file."""

    path: str
    image: BlockImage
    format: Format
    file: InputFile


class ImageOpener:
    """Opens a top image and everything it names, through a broker.

    ``nodes`` (every image, backing files first, the top image last) says
    which format each image was read as; ``opened`` is every file opened.
    """

    def __init__(self, policy: PathPolicy | None = None, *, broker: Broker | None = None) -> None:
        self._owns_broker = broker is None  # a broker given is closed by who gave it
        if broker is None:
            assert policy is not None, "an opener needs a policy or a broker"
            broker = HostBroker(policy)
        self.broker = broker
        self.nodes: list[OpenedNode] = []

    @property
    def opened(self) -> list[InputFile]:
        return self.broker.opened

    def open(self, path: str, fmt_name: str | None = None) -> Image:
        """Open ``path`` as ``fmt_name`` (probed when None) with qemu's messages."""
        return self.open_node(path, fmt_name).image

    def open_node(
        self, path: str, fmt_name: str | None = None, *, with_backing: bool = True,
        checking: bool = False,
    ) -> OpenedNode:
        """Open ``path`` and say how: the Image, its format and its file.

        Without ``with_backing`` the backing file is named but never opened,
        and unallocated parts read as zeros (qemu's BDRV_O_NO_BACKING); data
        files and extents are still opened, as they hold the image itself.
        ``checking`` opens the image for ``check`` (qemu's BDRV_O_CHECK).
        """
        if not path:
            raise ImageOpenError(path, "The 'file' block driver requires a file name")
        try:
            file = self.broker.open_image_file(path)
        except OSError as error:
            raise ImageOpenError(path, f"Could not open '{path}': {error.strerror}") from None
        return self.open_file_node(file, path, fmt_name, with_backing=with_backing, depth=0,
                                   checking=checking)

    def open_named_node(
        self, name: str, relative_to: str, fmt_name: str | None, *, with_backing: bool
    ) -> OpenedNode:
        """The image file ``relative_to`` names as its backing file, through
        the broker's policy (info --backing-chain walks the chain this way)."""
        path = combine_path(relative_to, name)
        try:
            file = self.broker.open_named_file(name, relative_to, "backing file")
        except OSError as error:  # info opens it as an image of its own: named twice
            raise ImageOpenError(path, f"Could not open '{path}': {error.strerror}") from None
        return self.open_file_node(file, path, fmt_name, with_backing=with_backing, depth=0)

    def open_file_node(
        self, file: InputFile, path: str, fmt_name: str | None, *, with_backing: bool,
        depth: int, checking: bool = False,
    ) -> OpenedNode:
        """The node for an already-open ``file``, named ``path`` in messages."""
        if not (file.is_regular or file.is_block_device):
            raise ImageOpenError(path, f"'file' driver requires '{path}' to be a regular file")
        fmt = self.choose_format(file, path, fmt_name)
        kind = ChainResolver if with_backing else NoBackingResolver
        resolver = kind(self, depth, checking)
        try:
            image = BlockImage(fmt.open(file, resolver))
        except ChainDepthError as error:
            if depth:  # up to the top image unwrapped, not once per level
                raise
            raise ImageOpenError(path, str(error)) from None
        except (FormatError, UnsupportedError, OSError) as error:
            raise open_error(path, error) from None
        node = OpenedNode(path, image, fmt, file)
        self.nodes.append(node)
        return node

    def choose_format(self, file: InputFile, path: str, fmt_name: str | None) -> Format:
        """The format named by ``fmt_name``, or probed from the file when None."""
        if fmt_name is None:
            try:
                header = file.pread(0, registry.PROBE_SIZE)
            except OSError as error:
                raise ImageOpenError(path, error.strerror or str(error)) from None
            return registry.probe(header, path)
        fmt = registry.get(fmt_name)
        if fmt is not None:
            return fmt
        if registry.is_recognised_only(fmt_name):
            raise UnsupportedError(
                f"Could not open '{path}': {registry.unsupported_message(fmt_name, writing=False)}"
            )
        raise ImageOpenError(path, f"Unknown driver '{fmt_name}'")

    def close(self) -> None:
        if self._owns_broker:
            self.broker.close()
        self.nodes.clear()


def open_error(path: str, error: FormatError | UnsupportedError | OSError) -> ImageOpenError:
    """qemu's "Could not open 'PATH': REASON" from what a format or the file said
    (with the format's hint, as qemu prints a driver's hint after its error)."""
    if isinstance(error, OSError):
        return ImageOpenError(path, error.strerror or str(error))
    if isinstance(error, DriverError):  # a driver failing without a message: named twice
        return ImageOpenError(path, f"Could not open '{path}': {error}")
    opened = ImageOpenError(path, str(error))
    opened.hint = error.hint  # qemu's advice after the message, if the format gave one
    return opened


def combine_path(base: str, name: str) -> str:
    """qemu's ``path_combine``: ``name`` relative to the directory of ``base``.

    Pure text (the part of ``base`` up to its last '/', then ``name``), so
    names show as qemu shows them: ``./d//x.vmdk`` names ``./d//x-flat.vmdk``.
    """
    if name.startswith("/"):
        return name
    return base[: base.rfind("/") + 1] + name


class ChainResolver(Record):
    """The `Resolver` given to format code for one image in a chain.

    ``checking``: opened for check (qemu's BDRV_O_CHECK), the top image only.
    """

    __slots__ = ("checking", "depth", "opener")
    reads_data = True  # a class attribute, not a field

    def __init__(self, opener: ImageOpener, depth: int, checking: bool = False) -> None:
        self.opener = opener
        self.depth = depth
        self.checking = checking

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        if self.depth + 1 > MAX_CHAIN_DEPTH:
            raise ChainDepthError(f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
        path = combine_path(child.name, name)
        try:
            file = self.opener.broker.open_named_file(name, child.name, "backing file")
        except OSError as error:  # qemu's file layer names the file it cannot open
            raise FormatError(f"Could not open backing file: Could not open '{path}': "
                              f"{error.strerror or error}") from None
        try:
            node = self.opener.open_file_node(file, path, fmt, with_backing=True,
                                              depth=self.depth + 1)
        except ImageOpenError as error:  # a format's reason: qemu names no file before it
            raise FormatError(f"Could not open backing file: {error.reason}") from None
        return node.image

    def open_file(self, name: str, child: InputFile, what: str) -> InputFile:
        try:
            return self.opener.broker.open_named_file(name, child.name, what)
        except OSError as error:
            path = combine_path(child.name, name)
            raise FormatError(f"Could not open {what} '{path}': {error.strerror}") from None

    def open_file_for_update(self, name: str, child: InputFile, what: str) -> InputFile:
        """Like `open_file`, open for reading and writing (through the
        broker's policy): a VMDK base's extents, written by commit. A block
        device is refused: a sparse extent grows, and which extents can be
        written in place on one is not worked out yet."""
        path = combine_path(child.name, name)
        try:
            file = self.opener.broker.open_named_for_update(name, child.name, what)
        except OSError as error:
            raise FormatError(f"Could not open {what} '{path}' for writing: "
                              f"{error.strerror}") from None
        if not file.is_regular:
            raise UnsupportedError(f"writing into a {what} on a block device ('{path}') is "
                                   "not supported yet")
        return file


class AbsentBacking:
    """Stands in for a backing file left unopened: an image of no bytes.

    Formats read past the end of a backing image as zeros, so every
    unallocated cluster reads as zeros, as with qemu's BDRV_O_NO_BACKING.
    """

    virtual_size = 0

    def read(self, offset: int, length: int) -> bytes:
        if offset != 0 or length != 0:
            raise ValueError("the backing file was not opened")
        return b""

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return iter(())

    def close(self) -> None:
        pass


class NoBackingResolver(ChainResolver):
    """Opens data files and extents as usual, never the backing file: info,
    which reads metadata only."""

    __slots__ = ()
    reads_data = False

    def open_backing(self, name: str, fmt: str | None, child: InputFile) -> Image:
        return AbsentBacking()


__all__ = [
    "AbsentBacking",
    "Broker",
    "ChainResolver",
    "HostBroker",
    "ImageOpener",
    "NoBackingResolver",
    "OpenedNode",
    "PolicyError",
    "combine_path",
    "open_error",
    "open_input_file",
]
