"""A qcow (version 1) image emptied after a commit, as qemu 7.2 empties it.

qemu's qcow driver empties an image by zeroing its whole L1 table (the
entries the virtual size needs) and cutting the file right after it: every
L2 table and data cluster, which qemu packs after the L1 table, goes, and the
image then reads everything through its backing file. instar does the same
in two steps of one `ImageUpdate`: the L1 table zeroed (``pointers``), then,
after a flush, the file cut (``release``). A crash between them leaves an
image that reads through its backing file with unreferenced clusters at its
end (qemu has no check for qcow, and reads it the same).

Refused before anything is written: an image whose backing file name lies
past the L1 table's end (qemu makes the header point past the end of the
file then; qemu-img itself always writes the name before the table).
"""

from __future__ import annotations

from instar.errors import UnsupportedError
from instar.formats.qcow.reader import QcowDriver
from instar.mutate import ImageUpdate


def _l1_end(driver: QcowDriver) -> int:
    return driver.header.l1_table_offset + driver.header.l1_entries * 8


def check_emptiable(driver: QcowDriver) -> None:
    """Refuse an image that cutting the file after its L1 table would damage."""
    header = driver.header
    if header.backing_file_offset + header.backing_file_size > _l1_end(driver):
        raise UnsupportedError("emptying a qcow image whose backing file name lies after its "
                               "L1 table is not supported; use -d to keep its data")


def make_empty(driver: QcowDriver, update: ImageUpdate,
               data_update: ImageUpdate | None = None) -> None:
    """Zero the L1 table, then cut the file after it (``data_update``: qcow
    has no data file, so it is None)."""
    header = driver.header
    update.phase("pointers")
    update.write(header.l1_table_offset, bytes(header.l1_entries * 8))
    update.phase("release")
    update.truncate(_l1_end(driver))
