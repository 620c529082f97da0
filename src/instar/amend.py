"""amend as qemu-img 7.2 does it: a qcow2 image's options changed in place.

qemu-img's order (``img_amend``): the image opened read-write (probed unless
``-f`` names it), with its backing chain; ``-o help`` answers once the format
is known; a format without option amendment is refused; the options are
parsed against the format's amend options (one that only creation takes
gets qemu's hint); then the format checks everything and plans
(`instar.formats.qcow2.amend.plan_amend`) and the steps are written in
qemu's order: the header changes, the size (the resize code), a downgrade,
the image read again between two. Every write goes through
`instar.mutate.ImageUpdate`.
"""

from __future__ import annotations

import os

from instar.errors import ImageOpenError, OptionError
from instar.events import EventSink
from instar.formats.options import CreateOptions, ParsedOptions, parse_options
from instar.mutate import ImageUpdate
from instar.opener import Broker
from instar.safety import AllowedDirs, PathPolicy
from instar.worker import SandboxSettings, run_job
from instar.writable import open_for_update, opened_for_writing, repair_if_dirty


def amend(path: str, options: list[tuple[str, str]], *, fmt: str | None = None,
          help_only: bool = False, allow: AllowedDirs = (),
          events: EventSink | None = None,
          sandbox: SandboxSettings | None = None) -> str:
    """``qemu-img amend [-f fmt] -o OPTIONS path`` with ``options`` as ``-o``'s
    (key, value) pairs, in order. Returns the image's format; with
    ``help_only`` nothing is changed (the caller prints that format's amend
    options). ``events`` gets qemu's warning for a probed raw image."""
    policy = PathPolicy.from_allow(allow)

    def job(broker: Broker, send: EventSink) -> str:
        return _amend_job(broker, send, path, options, fmt, help_only)

    return str(run_job(job, policy, sandbox, events, inputs=[path], outputs=[path]))


def no_amendment(format_name: str) -> OptionError:
    return OptionError(f"Format driver '{format_name}' does not support option amendment")


def _parse(given: list[tuple[str, str]]) -> ParsedOptions:
    """The amend options, or qemu's error (with its hint when the creation
    options would have taken them)."""
    from instar.formats.qcow2 import Qcow2Format
    from instar.formats.qcow2.amend import AMEND_OPTIONS

    try:
        return parse_options(AMEND_OPTIONS, CreateOptions(given), refuse_unsupported=False)
    except OptionError as error:
        try:  # qemu-img appends the creation options to the amend options
            parse_options(AMEND_OPTIONS.extended(Qcow2Format.create_options.options),
                          CreateOptions(given), refuse_unsupported=False)
        except OptionError:
            raise error from None
        error.hint = "This option is only supported for image creation"
        raise


def _amend_job(broker: Broker, send: EventSink, path: str, options: list[tuple[str, str]],
               fmt_name: str | None, help_only: bool) -> str:

    file, opener = open_for_update(broker, path)
    try:
        fmt = opener.choose_format(file, path, fmt_name)
        node = opener.open_file_node(file, path, fmt.name, with_backing=True, depth=0)
        for notice in opened_for_writing(node, path, probed=fmt_name is None):
            send(notice)
        node = repair_if_dirty(opener, file, path, node, send)
        if help_only:
            return fmt.name
        if fmt.name != "qcow2":
            raise no_amendment(fmt.name)
        from instar.formats.qcow2 import layout as L
        from instar.formats.qcow2.amend import downgrade, plan_amend
        from instar.formats.qcow2.reader import Qcow2Driver
        from instar.formats.qcow2.resize import resize_qcow2

        driver = node.image.driver
        assert isinstance(driver, Qcow2Driver)
        if driver.header.incompatible_features & L.INCOMPAT_CORRUPT:
            raise ImageOpenError(path, "qcow2: Image is corrupt; cannot be opened read/write")
        parsed = _parse(options)
        backing = node.image.backing
        current = node.image.virtual_size
        new_size = parsed.number("size") if "size" in parsed.given else 0
        zero_fill = (new_size > current and backing is not None
                     and backing.virtual_size > current)
        plan = plan_amend(driver, parsed, driver.backing_name, zero_fill)
        update = ImageUpdate(file.fd, path)

        def next_step() -> tuple[Qcow2Driver, ImageUpdate]:
            """The image read again after a step, and the next step's update
            (its changes counted on from the last, for `mutate.stop_after`).
            A step after a new data file name is never needed (a data file
            refuses size and downgrade), so the new one is not opened, as
            qemu does not open it."""
            update.finish()
            if file.is_regular:
                file.size = os.fstat(file.fd).st_size
            again = opener.open_file_node(file, path, "qcow2", with_backing=True,
                                          depth=0).image.driver
            assert isinstance(again, Qcow2Driver)
            following = ImageUpdate(file.fd, path)
            following.changes = update.changes
            return again, following

        written = False
        if plan.header_changes():
            plan.write_header(driver, update)
            written = True
        if plan.new_size:
            if written:
                driver, update = next_step()
            resize_qcow2(driver, update, plan.new_size, "off", zero_fill)
            written = True
        if plan.downgrade:
            if written:
                driver, update = next_step()
            downgrade(driver, update, plan.new_version, driver.backing_name,
                      None if plan.new_size else plan.zeros)
        update.finish()
        return fmt.name
    finally:
        opener.close()
