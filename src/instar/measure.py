"""``instar measure``: what a new image needs, as ``qemu-img measure`` says it.

qemu-img measure asks the output format's driver for two figures: the bytes
the image needs ("required"), and what it would take with every block
allocated ("fully allocated"). From ``--size`` the image is empty; from an
image to convert, the driver counts the units that hold data by qemu's block
status of the whole chain (``bdrv_block_status_above``: ZERO is skipped, DATA
counted), which `ImageSource` walks through the read core's `StatusLayer`.

Each format states its own figures (``FormatBase.measure``): raw and qcow2
qemu 7.2's exactly (``qcow2/measure.py``); vmdk, vpc, vhdx, vdi and
parallels, which qemu 7.2 cannot measure, from their writers' layouts, so the figure and the writer
cannot disagree. The image is read in the sandboxed worker; a size alone needs
no worker.
"""

from __future__ import annotations

from instar.errors import FormatError, InstarError, OutputError, UnsupportedError
from instar.events import EventSink
from instar.formats import registry
from instar.formats.base import Format, Measurement, PersistentBitmap
from instar.formats.options import (
    CreateOptions,
    OptionsArgument,
    as_create_options,
    parse_options,
    refused,
)
from instar.image import DATA, ZERO, Image, StatusLayer
from instar.opener import Broker, ImageOpener, OpenedNode, open_error
from instar.qobject import to_json
from instar.runtime_types import TYPE_CHECKING
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job

if TYPE_CHECKING:
    from typing import Any

# The file protocol's creation options, which qemu-img measure accepts for any
# format (qemu_opts_append of bdrv_file's list); they change no figure.
FILE_OPTIONS = (
    refused("size", "size"),
    refused("preallocation", "str"),
    refused("nocow", "bool"),
    refused("extent_size_hint", "size"),
)
INT64 = 1 << 63


class ImageSource:
    """The image to convert, as a format's measure function sees it (`MeasureSource`)."""

    def __init__(self, image: Image, bitmaps: tuple[PersistentBitmap, ...] | None) -> None:
        self._image = image
        self._bitmaps = bitmaps

    @property
    def virtual_size(self) -> int:
        return self._image.virtual_size

    @property
    def bitmaps(self) -> tuple[PersistentBitmap, ...] | None:
        return self._bitmaps

    def data_units(self, unit: int, start: int = 0, end: int | None = None) -> int:
        """Units of ``unit`` bytes (counted from 0) in ``[start, end)`` holding
        DATA that is not ZERO, down the whole chain. As qemu's loop does, a
        unit with data is counted once and the walk moves to its end."""
        end = self.virtual_size if end is None else min(end, self.virtual_size)
        layer = StatusLayer(self._image)
        count = 0
        offset = start
        try:
            while offset < end:
                flags, _, run_end = layer.query(offset)
                stop = min(run_end, end)
                if flags & DATA and not flags & ZERO:
                    last = (stop - 1) // unit
                    count += last - offset // unit + 1
                    stop = min(end, (last + 1) * unit)
                offset = stop
        except (InstarError, OSError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise FormatError(f"Unable to get block status: {reason}") from None
        return count


def output_format(name: str) -> Format:
    """The format to measure for, with qemu-img measure's messages otherwise."""
    if name in registry.QEMU_CANNOT_CREATE:  # dmg, bochs, cloop: instar reads them too
        raise UnsupportedError(registry.unsupported_message(name, writing=True))
    fmt = registry.get(name)
    if fmt is not None:
        return fmt
    if name == "luks":  # qemu measures it, with a secret instar has no way to take
        raise UnsupportedError("luks: measuring this format is not supported")
    if name in registry.QEMU_DRIVERS:
        raise UnsupportedError(f"Block driver '{name}' does not support size measurement")
    raise OutputError(f"Unknown file format '{name}'")


def measure_for(format_name: str, options: CreateOptions, size: int | None,
                source: ImageSource | None) -> Measurement:
    """The figures of ``format_name`` with ``options``, for ``size`` bytes
    (``--size``) or the image ``source``: in qemu's order, the format, then
    its options (qemu's messages: `OptionError`), then the driver's figures."""
    fmt = output_format(format_name)
    schema = fmt.create_options.extended(FILE_OPTIONS)
    parsed = parse_options(schema, options, refuse_unsupported=False)
    if size is None:  # qemu reads the size option even when it measures an image
        given = parsed.get("size")
        size = given if isinstance(given, int) else 0
    return fmt.measure(parsed, size, source)


def persistent_bitmaps(node: OpenedNode) -> tuple[PersistentBitmap, ...] | None:
    """What qemu loads when it opens the image: a qcow2 v3 image's persistent
    bitmaps (a broken directory fails the open, as in qemu); None for any
    other image, which cannot hold them."""
    if node.format.name != "qcow2":
        return None
    from instar.formats.qcow2.info import read_bitmaps
    from instar.formats.qcow2.reader import Qcow2Driver

    driver = node.image.driver
    assert isinstance(driver, Qcow2Driver)
    try:
        entries = read_bitmaps(driver) if driver.header.version >= 3 else None
    except (FormatError, OSError) as error:
        raise open_error(node.path, error) from None
    if entries is None:
        return None
    bitmaps = []
    for entry in entries:
        assert isinstance(entry, dict)
        name, granularity = entry["name"], entry["granularity"]
        assert isinstance(name, str) and isinstance(granularity, int)
        bitmaps.append(PersistentBitmap(len(name.encode("utf-8", "surrogateescape")),
                                        granularity))
    return tuple(bitmaps)


def _measure_job(broker: Broker, path: str, fmt: str | None, format_name: str,
                 options: CreateOptions) -> list[int | None]:
    """Open the image (and its chain) through ``broker``, then measure."""
    opener = ImageOpener(broker=broker)
    try:
        node = opener.open_node(path, fmt)
        source = ImageSource(node.image, persistent_bitmaps(node))
        return list(measure_for(format_name, options, None, source))
    finally:
        opener.close()


def measure(
    path: str | None = None,
    *,
    size: int | None = None,
    fmt: str | None = None,
    output_format_name: str = "raw",
    options: OptionsArgument = None,
    allow: AllowedDirs = (),
    sandbox: SandboxSettings | None = None,
    force_share: bool = False,
) -> Measurement:
    """``qemu-img measure``: the figures of a new ``output_format_name`` image
    of ``size`` bytes, or converted from the image at ``path`` (exactly one
    of the two). ``options`` are ``-o``'s (a `CreateOptions` or a dict)."""
    if (path is None) == (size is None):
        raise ValueError("measure takes a path or a size, not both, not neither")
    create_options = as_create_options(options)
    if path is None:
        assert size is not None
        return measure_for(output_format_name, create_options, size, None)
    image_path = path

    def job(broker: Broker, send: EventSink) -> list[int | None]:
        return _measure_job(broker, image_path, fmt, output_format_name, create_options)

    result: Any = run_job(job, PathPolicy.from_allow(allow), sandbox, inputs=[path],
                          force_share=force_share)
    return Measurement(*result)


def _int64(value: int) -> int:
    """A figure as qemu's JSON shows it: the int64 it is stored in."""
    return value - (1 << 64) if value >= INT64 else value


def render(measurement: Measurement, output: str = "human") -> str:
    """What qemu-img measure prints: two or three lines, or a JSON object
    (keys in qemu's QDict order, which puts "bitmaps" first)."""
    if output == "json":
        data: dict[str, Any] = {"required": _int64(measurement.required),
                                "fully-allocated": _int64(measurement.fully_allocated)}
        if measurement.bitmaps is not None:
            data["bitmaps"] = _int64(measurement.bitmaps)
        return to_json(data) + "\n"
    text = (f"required size: {measurement.required}\n"
            f"fully allocated size: {measurement.fully_allocated}\n")
    if measurement.bitmaps is not None:
        text += f"bitmaps size: {measurement.bitmaps}\n"
    return text


__all__ = ["ImageSource", "Measurement", "measure", "measure_for", "render"]
