"""create as qemu-img 7.2 does it: a new image that holds no data.

Creating is writing an image with no data: the format's own writer gets an
empty source of the right virtual size through the same path as convert
(`output.write_image`), so a created image has exactly the layout convert
gives an image with nothing in it, and is replaced atomically the same way.

What qemu-img adds around the writer, in its order (``bdrv_img_create``):
the format, the ``-o`` options (checked against every option qemu knows for
the format, so an unknown one is qemu's "Invalid parameter"), the size given
once, whether the format takes a backing file, the backing file opened (through
the opener and the policy: ``--allow``, INSTAR_ALLOW) for its format and size
unless ``-u``, then the "Formatting" line, then the driver.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping

from instar.errors import (
    CreationError,
    InstarError,
    OptionError,
    OutputError,
    TooLargeError,
    UnsupportedError,
    WriteError,
)
from instar.events import EventSink, Line
from instar.formats.base import Format
from instar.formats.options import (
    BackingReference,
    CreateOptions,
    Option,
    OptionsArgument,
    ParsedOptions,
    as_create_options,
    data_file_name,
    parse_options,
    refused,
)
from instar.image import Extent, ExtentKind
from instar.opener import Broker, ImageOpener
from instar.output import OutputSpec, write_image
from instar.runtime_types import TYPE_CHECKING, NamedTuple
from instar.safety import AllowedDirs, PathPolicy
from instar.sizes import UINT64_MAX
from instar.worker import SandboxSettings, run_job

if TYPE_CHECKING:
    from instar.formats.options import OptionType

    QemuOption = tuple[str, OptionType, str | None]

# (name, qemu's type, the default qemu prints or None) in the order qemu-img 7.2
# prints them on its "Formatting" line: the format's creation options, then the
# file protocol's it lacks (measured with every option given, tests/test_create.py).
_FILE: tuple[QemuOption, ...] = (
    ("nocow", "bool", None), ("preallocation", "str", None), ("extent_size_hint", "size", None),
)
_SIZE: QemuOption = ("size", "size", None)
_BACKING: tuple[QemuOption, ...] = (("backing_file", "str", None), ("backing_fmt", "str", None))
QEMU_OPTIONS: Mapping[str, tuple[QemuOption, ...]] = {
    "raw": (_SIZE, *_FILE),
    "file": (_SIZE, *_FILE),
    "qcow2": (
        ("encryption", "bool", None), ("encrypt.format", "str", None),
        ("encrypt.key-secret", "str", None), ("encrypt.cipher-alg", "str", None),
        ("encrypt.cipher-mode", "str", None), ("encrypt.ivgen-alg", "str", None),
        ("encrypt.ivgen-hash-alg", "str", None), ("encrypt.hash-alg", "str", None),
        ("encrypt.iter-time", "num", None), ("cluster_size", "size", "65536"),
        ("extended_l2", "bool", "off"), ("preallocation", "str", None),
        ("compression_type", "str", "zlib"), _SIZE, ("compat", "str", None), *_BACKING,
        ("data_file", "str", None), ("data_file_raw", "bool", None),
        ("lazy_refcounts", "bool", "off"), ("refcount_bits", "num", "16"),
        _FILE[0], _FILE[2],
    ),
    "vmdk": (
        _SIZE, ("adapter_type", "str", None), *_BACKING, ("compat6", "bool", "off"),
        ("hwversion", "str", "undefined"), ("toolsversion", "str", None),
        ("subformat", "str", None), ("zeroed_grain", "bool", None), *_FILE,
    ),
    "vpc": (_SIZE, ("subformat", "str", None), ("force_size", "bool", None), *_FILE),
    "vhdx": (
        _SIZE, ("log_size", "size", "1048576"), ("block_size", "size", "0"),
        ("subformat", "str", None), ("block_state_zero", "bool", None), *_FILE,
    ),
    "vdi": (_SIZE, ("static", "bool", "off"), *_FILE),
    "parallels": (_SIZE, ("cluster_size", "size", "1048576"), *_FILE),
    "qed": (
        _SIZE, *_BACKING, ("cluster_size", "size", "65536"), ("table_size", "size", None),
        *_FILE,
    ),
    "qcow": (
        _SIZE, *_BACKING, ("encryption", "bool", None), ("encrypt.format", "str", None),
        ("encrypt.key-secret", "str", None), *_FILE,
    ),
}
# Options create itself reads (not the writer): qemu's generic ones.
_CREATE_LEVEL = ("size", "backing_file", "backing_fmt")


class EmptyImage:
    """The source of a created image: ``virtual_size`` bytes, none of them stored."""

    def __init__(self, virtual_size: int) -> None:
        self.virtual_size = virtual_size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        if length:
            yield Extent(offset, length, ExtentKind.UNALLOCATED)

    def close(self) -> None:
        pass


def create_schema(fmt: Format) -> tuple[Option, ...]:
    """The options qemu knows for ``fmt`` that its writer's schema lacks, as
    refused options (create reads size and backing itself)."""
    return tuple(refused(name, kind) for name, kind, _ in QEMU_OPTIONS[fmt.name])


def formatting_line(path: str, fmt_name: str, parsed: ParsedOptions, size: int,
                    backing: BackingReference | None) -> str:
    """qemu-img's "Formatting 'FILE', fmt=FMT OPTIONS" line: every option set
    on the command line or with a default, in qemu's order; strings with
    their commas doubled, sizes and numbers given as their value."""
    given = dict(parsed.texts)
    given["size"] = str(size)
    if backing is not None:
        given["backing_file"] = backing.name
        if backing.format:
            given["backing_fmt"] = backing.format
    words = []
    for name, kind, default in QEMU_OPTIONS[fmt_name]:
        text = given.get(name, default)
        if text is None:
            continue
        if kind == "str":
            text = text.replace(",", ",,")
        elif kind in ("size", "num") and name in given and name != "size":
            value = parsed.get(name)
            text = str(value & UINT64_MAX) if isinstance(value, int) else text
        words.append(f"{name}={text}")
    return f"Formatting '{path}', fmt={fmt_name} " + " ".join(words)


class CreateRequest:
    """What ``create`` was asked, checked on the host before any file is opened."""

    def __init__(self, path: str, fmt: Format, parsed: ParsedOptions, size: int | None,
                 backing: BackingReference | None, open_backing: bool) -> None:
        self.path = path
        self.fmt = fmt
        self.parsed = parsed
        self.size = size
        self.backing = backing
        self.open_backing = open_backing


def _failed(path: str, error: InstarError) -> InstarError:
    """qemu-img create's wording: every failure of the creation names the file."""
    failure = CreationError(f"{path}: {error}")
    failure.hint = error.hint
    return failure


def check_request(path: str, fmt_name: str, options: CreateOptions, size: int | None,
                  backing_file: str | None, backing_fmt: str | None,
                  open_backing: bool) -> CreateRequest:
    """Everything qemu-img checks before it opens a file, in its order."""
    from instar.convert import output_format

    try:
        fmt = output_format(fmt_name)
    except (UnsupportedError, CreationError, InstarError) as error:
        raise _failed(path, error) from None
    schema = fmt.create_options.extended(create_schema(fmt))
    try:
        parsed = parse_options(schema, options, refuse_unsupported=False)
    except OptionError as error:
        raise _failed(path, error) from None
    if "size" in parsed.given:
        if size is not None:
            raise CreationError(f"{path}: The image size must be specified only once")
        given = parsed.get("size")
        assert isinstance(given, int)
        size = given
    knows_backing = schema.find("backing_file") is not None
    if backing_file is not None and not knows_backing:
        raise CreationError(f"{path}: Backing file not supported for file format '{fmt.name}'")
    if backing_fmt is not None and not knows_backing:
        raise CreationError(
            f"{path}: Backing file format not supported for file format '{fmt.name}'")
    name = backing_file if backing_file is not None else _given_text(parsed, "backing_file")
    base_fmt = backing_fmt if backing_fmt is not None else _given_text(parsed, "backing_fmt")
    backing = None
    if name is not None:
        if name == path:
            raise CreationError(f"{path}: Error: Trying to create an image with the same "
                                "filename as the backing file")
        if not name:
            raise CreationError(f"{path}: Expected backing file name, got empty string")
        if not schema.backing:
            raise CreationError(
                f"{path}: creating a {fmt.name} image with a backing file is not supported yet")
        backing = BackingReference(name, base_fmt or "")
    for key in parsed.given:
        option = schema.find(key)
        if option is not None and not option.supported and key not in _CREATE_LEVEL:
            raise CreationError(f"{path}: the {fmt.name} option '{key}' is not supported yet")
    return CreateRequest(path, fmt, parsed, size, backing, open_backing)


def _given_text(parsed: ParsedOptions, name: str) -> str | None:
    return parsed.texts.get(name) if name in parsed.given else None


def create(
    path: str,
    fmt: str = "raw",
    size: int | None = None,
    *,
    options: OptionsArgument = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    open_backing: bool = True,
    quiet: bool = False,
    allow: AllowedDirs = (),
    events: EventSink | None = None,
    sandbox: SandboxSettings | None = None,
) -> None:
    """Create the image ``path`` of format ``fmt`` holding no data, as
    ``qemu-img create [-f fmt] [-o options] [-b backing_file [-F backing_fmt]] [-u]
    path [size]``.

    ``size`` None takes the backing file's virtual size (opened through the
    policy of ``allow``; ``open_backing`` False is ``-u``). ``events`` gets
    qemu's "Formatting" line as a `Line` unless ``quiet``. Failures are
    `InstarError`s worded as qemu-img's, naming ``path``.
    """
    request = check_request(path, fmt, as_create_options(options), size, backing_file,
                            backing_fmt, open_backing)
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> None:
        _create_job(broker, send, request, quiet)

    run_job(job, policy, sandbox, events, inputs=[], outputs=[path, *data_files(request.parsed)])


def data_files(parsed: ParsedOptions) -> list[str]:
    """The second output a qcow2 image with ``-o data_file`` creates, named
    on the command line, so the job may create it."""
    name = data_file_name(parsed)
    return [] if name is None else [name]


class BackingFacts(NamedTuple):
    """What create learns from opening the backing file."""

    format: str
    virtual_size: int
    cid: int | None  # a vmdk's content id (its descriptor's CID), else None


def _open_backing(broker: Broker, request: CreateRequest, fmt_name: str | None = None,
                  with_backing: bool = True, hint: str | None = "Could not open backing image."
                  ) -> BackingFacts:
    """The backing file opened as qemu-img create opens it: relative to the
    new image, through the opener and the policy, as ``fmt_name`` says
    (probed without); its format, virtual size and (vmdk) CID. A failure is
    worded as qemu's, with ``hint`` after it."""
    assert request.backing is not None
    opener = ImageOpener(broker=broker)
    try:
        node = opener.open_named_node(request.backing.name, request.path, fmt_name,
                                      with_backing=with_backing)
        cid = getattr(node.image.driver, "cid", None) if node.format.name == "vmdk" else None
        return BackingFacts(node.format.name, node.image.virtual_size, cid)
    except InstarError as error:
        reason = getattr(error, "reason", None)
        failure = CreationError(f"{request.path}: {reason or error}")
        failure.hint = hint
        raise failure from None
    finally:
        opener.close()


def _vmdk_parent(broker: Broker, request: CreateRequest) -> BackingReference:
    """qemu's vmdk driver names only a vmdk parent, and opens it itself (also
    with ``-u``: probed, without its own backing) for the CID the new
    descriptor's parentCID records."""
    backing = request.backing
    assert backing is not None
    if backing.format != "vmdk":
        raise CreationError(f"{request.path}: backing_file must be a vmdk image")
    if any(char in backing.name for char in '"\n\r\0'):  # it would break the descriptor
        raise UnsupportedError(f"{request.path}: a vmdk backing file name with a quote, a "
                               "line break or a NUL is not supported")
    facts = _open_backing(broker, request, None, with_backing=False, hint=None)
    if facts.format != "vmdk":
        raise CreationError(
            f"{request.path}: Invalid backing file format: {facts.format}. Must be vmdk")
    return backing._replace(cid=facts.cid)


def _create_job(broker: Broker, send: EventSink, request: CreateRequest, quiet: bool) -> None:
    """create itself, reaching files only through ``broker`` (it may run in a worker)."""
    path, backing, size = request.path, request.backing, request.size
    if backing is not None and request.open_backing:
        detected, backing_size, _ = _open_backing(broker, request, backing.format or None)
        if not backing.format:
            failure = CreationError(f"{path}: Backing file specified without backing format")
            failure.hint = f"Detected format of {detected}."
            raise failure
        if size is None:
            size = backing_size
    elif backing is not None and not backing.format:
        raise CreationError(f"{path}: Backing file specified without backing format")
    if size is None:
        raise CreationError(f"{path}: Image creation needs a size parameter")
    fmt, parsed = request.fmt, request.parsed
    if not quiet:
        send(Line(formatting_line(path, fmt.name, parsed, size, backing)))
    if backing is not None and fmt.name == "vmdk":
        backing = _vmdk_parent(broker, request)
    try:
        parsed = parsed._replace(backing=backing)
        declared = fmt.declared_size(size, parsed)
        write_image(EmptyImage(declared), path, OutputSpec(fmt, declared, parsed),
                    broker=broker, durable=False)
    except CreationError as error:
        if _too_large(error):
            raise _failed(path, _size_refused(fmt)) from None
        raise _failed(path, error) from None
    except WriteError as error:
        if _too_large(error):
            raise _failed(path, _size_refused(fmt)) from None
        raise


def _too_large(error: OutputError) -> bool:
    """Whether qemu's driver would have failed with EFBIG: a format's own
    refusal of the size, or the file system's (``ulimit -f``, its largest file)."""
    return isinstance(error, TooLargeError) or (
        error.reason if isinstance(error, WriteError) else str(error)
    ).endswith(os.strerror(errno.EFBIG))


def _size_refused(fmt: Format) -> CreationError:
    """qemu-img create's words for every EFBIG, with its hint where the format
    has a cluster size option (qemu asks for it with a default: always set)."""
    hint = (" (try using a larger cluster size)"
            if any(name == "cluster_size" for name, _, _ in QEMU_OPTIONS[fmt.name]) else "")
    return CreationError(f"The image size is too large for file format '{fmt.name}'{hint}")

