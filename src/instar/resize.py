"""resize as qemu-img 7.2 does it: the image's virtual size changed in place.

qemu-img's order (``img_resize``): the image opened read-write (the format
probed unless ``-f`` names it, so a hostile image is refused before a byte is
written), the new size (absolute, or relative to the current one), then its
own checks (positive, preallocation only when growing, ``--shrink`` to
shrink), then the format's truncate: raw changes the file's length; qcow2 and
qed their headers and tables; every other format is qemu's "Image format
driver does not support resize".

All writes go through `instar.mutate.ImageUpdate`, in its crash-safe order.
"""

from __future__ import annotations

from instar.errors import FormatError, ResizeError, UnsupportedError
from instar.events import EventSink, Line
from instar.mutate import ImageUpdate
from instar.opener import Broker
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job
from instar.writable import open_for_update, opened_for_writing, refuse_read_only, repair_if_dirty

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
# qemu's BDRV_MAX_LENGTH: the largest length the block layer takes.
MAX_LENGTH = 9223372035781033984
_INT64 = 1 << 64


def _int64(value: int) -> int:
    """``value`` wrapped to a signed 64-bit integer, as qemu-img computes it."""
    value %= _INT64
    return value - _INT64 if value >= 1 << 63 else value


def resize(
    path: str,
    size: int,
    *,
    relative: int = 0,
    fmt: str | None = None,
    shrink: bool = False,
    preallocation: str = "off",
    quiet: bool = False,
    allow: AllowedDirs = (),
    events: EventSink | None = None,
    sandbox: SandboxSettings | None = None,
) -> None:
    """Resize ``path`` to ``size`` bytes (``relative`` +1 or -1: by ``size``
    bytes), as ``qemu-img resize [-f fmt] [--shrink] [--preallocation=mode]
    path [+|-]size``. ``events`` gets "Image resized." as a `Line` unless
    ``quiet``, and qemu's warning for a probed raw image as a `Notice`."""
    if preallocation not in PREALLOCATION_MODES:
        raise ResizeError(f"Invalid preallocation mode '{preallocation}'")
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> None:
        _resize_job(broker, send, path, size, relative, fmt, shrink, preallocation)
        if not quiet:
            send(Line("Image resized."))

    run_job(job, policy, sandbox, events, inputs=[path], outputs=[path])


def _raw_probe_warning(name: str) -> str:
    return (f"WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, "
            "write operations on block 0 will be restricted.\n"
            "         Specify the 'raw' format explicitly to remove the restrictions.")


def _resize_job(broker: Broker, send: EventSink, path: str, size: int, relative: int,
                fmt_name: str | None, shrink: bool, preallocation: str) -> None:
    """resize itself, reaching files only through ``broker`` (it may run in a worker)."""
    file, opener = open_for_update(broker, path)
    try:
        fmt = opener.choose_format(file, path, fmt_name)
        refuse_read_only(fmt.name, path)
        node = opener.open_file_node(file, path, fmt.name, with_backing=True, depth=0)
        for notice in opened_for_writing(node, path, probed=fmt_name is None):
            send(notice)
        node = repair_if_dirty(opener, file, path, node, send)
        current = node.image.virtual_size
        total = _int64(size if not relative else current + relative * size)
        if total <= 0:
            raise ResizeError("New image size must be positive")
        if total <= current and preallocation != "off":
            raise ResizeError("Preallocation can only be used for growing images")
        if total < current and not shrink:
            refusal = ResizeError("Use the --shrink option to perform a shrink operation.")
            refusal.warning = ("Shrinking an image will delete all data beyond the shrunken "
                             "image's end. Before performing such an operation, make sure "
                             "there is no important data there.")
            raise refusal
        if total > MAX_LENGTH:
            raise ResizeError(f"offset({total}) exceeds maximum({MAX_LENGTH})")
        update = ImageUpdate(file.fd, path)
        driver = node.image.driver
        # qemu's block layer: growing over a longer backing file must read zeros
        # in the new part, not the backing file's data (BDRV_REQ_ZERO_WRITE).
        backing = node.image.backing
        zero_fill = total > current and backing is not None and backing.virtual_size > current
        if fmt.name in ("raw", "file"):
            if not file.is_regular:
                raise UnsupportedError("resizing a block device is not supported")
            _resize_raw(update, file.size, total, preallocation)
        elif fmt.name == "qcow2":
            from instar.formats.qcow2.resize import resize_qcow2

            resize_qcow2(driver, update, total, preallocation,  # type: ignore[arg-type]
                         zero_fill)
        elif fmt.name == "qed":
            from instar.formats.qed.resize import resize_qed

            resize_qed(driver, update, total, preallocation,  # type: ignore[arg-type]
                       zero_fill)
        else:
            raise ResizeError("Image format driver does not support resize")
        update.finish()
    except FormatError as error:
        raise ResizeError(str(error)) from None
    finally:
        opener.close()


def _resize_raw(update: ImageUpdate, length: int, total: int, preallocation: str) -> None:
    """qemu's file driver: the file given exactly ``total`` bytes; the part
    added reserved (falloc) or written with zeros (full) when asked."""
    if preallocation == "metadata":
        raise ResizeError("Unsupported preallocation mode: metadata")
    update.phase("data")
    if preallocation == "falloc" and total > length:
        update.allocate(length, total - length)
    elif preallocation == "full" and total > length:
        update.truncate(total)
        update.zeros(length, total - length)
    else:
        update.truncate(total)
