"""QED's backing file changed in place: qemu 7.2's ``bdrv_qed_change_backing_file``.

The header (64 bytes) and the new name right after it, in one write at
offset 0: the backing-file feature bit set or cleared, the "do not probe"
bit set exactly when the new format is raw (QED stores no other format), the
name's offset 64 and its length. A name that does not fit in the header's
clusters is qemu's ENOSPC; a new name with compatible feature bits set
(none is defined, so their layout is unknown) is qemu's ENOTSUP. qemu clears
the autoclear bits when it opens the image read-write; the header written
here has them cleared too.
"""

from __future__ import annotations

import errno

from instar.errors import UnsupportedError
from instar.formats.qed import layout as L
from instar.formats.qed.reader import QedDriver


def backing_header(driver: QedDriver, name: str | None, fmt: str | None) -> bytes:
    """The bytes to write at offset 0 (raises OSError with qemu's errno)."""
    header = driver.header
    if header.features & L.FEATURE_NEED_CHECK:
        raise UnsupportedError("the QED image was not closed cleanly; instar does not check "
                               "and repair it before a rebase yet")
    if name is not None and header.compat_features:
        raise OSError(errno.ENOTSUP, "Operation not supported")
    features = header.features & ~(L.FEATURE_BACKING_FILE | L.FEATURE_BACKING_FORMAT_NO_PROBE)
    encoded = b"" if name is None else name.encode()
    if name is not None:
        features |= L.FEATURE_BACKING_FILE
        if fmt == "raw":
            features |= L.FEATURE_BACKING_FORMAT_NO_PROBE
    if L.HEADER.size + len(encoded) > header.header_bytes:
        raise OSError(errno.ENOSPC, "No space left on device")
    new = header._replace(features=features, autoclear_features=0,
                          backing_filename_offset=L.HEADER.size,
                          backing_filename_size=len(encoded))
    return new.pack() + encoded
