"""qcow2: qemu's copy-on-write format, versions 2 and 3 (read and write).

`layout` holds the on-disk structures, `reader` maps guest offsets to host
data, `writer` creates images sequentially, `info` says what qemu-img info
shows. docs/formats/qcow2.md lists what
is supported and what is refused.
"""

from __future__ import annotations

from instar.formats.base import FormatBase, OptionSchema
from instar.formats.options import Option, refused
from instar.formats.preallocation import QCOW2_OPTION
from instar.formats.qcow2 import layout


class Qcow2Format(FormatBase):
    name = "qcow2"
    reader = "instar.formats.qcow2.reader:open_image"
    updater = "instar.formats.qcow2.guest_writes:GuestWriter"
    writer = "instar.formats.qcow2.writer:create_writer"
    describer = "instar.formats.qcow2.info:describe"
    checker = "instar.formats.qcow2.check:check"
    measurer = "instar.formats.qcow2.measure:measure"
    create_options = OptionSchema(
        "qcow2",
        (
            Option("cluster_size", "size", 65536,
                   "cluster size, a power of two from 512 to 2M (64k)"),
            Option("compat", "str", "1.1", "0.10 (version 2) or 1.1 (version 3, the default)"),
            Option("data_file", "str", "", "File name of an external data file"),
            Option("data_file_raw", "bool", False,
                   "The external data file must stay valid as a raw image"),
            Option("compression_type", "str", "zlib", "zlib (default) or zstd, for -c"),
            Option("extended_l2", "bool", False, "subclusters: 32 per cluster of 16k or more"),
            Option("lazy_refcounts", "bool", False, "set the lazy refcounts flag"),
            Option("refcount_bits", "num", 16, "refcount width: 1, 2, 4, ... 64 (16)"),
            QCOW2_OPTION,
            # qemu-img's other qcow2 options, with qemu's types.
            refused("backing_file", "str"),
            refused("backing_fmt", "str"),
            refused("encrypt.cipher-alg", "str"),
            refused("encrypt.cipher-mode", "str"),
            refused("encrypt.format", "str"),
            refused("encrypt.hash-alg", "str"),
            refused("encrypt.iter-time", "num"),
            refused("encrypt.ivgen-alg", "str"),
            refused("encrypt.ivgen-hash-alg", "str"),
            refused("encrypt.key-secret", "str"),
            refused("encryption", "bool"),
            refused("size", "size"),
        ),
        compress=True,
        backing=True,
    )
    checks_preallocation = True  # qcow2's own option

    def probe(self, header: bytes, filename: str) -> int:
        """The magic decides, whatever the version but 1 (qcow's).

        qemu probes versions 2 and up as qcow2, 1 as qcow and 0 as raw; instar
        claims version 0 too, so that opening refuses it ("Unsupported qcow2
        version 0") instead of copying the file as raw bytes.
        """
        if header[:4] != layout.MAGIC:
            return 0
        return 0 if int.from_bytes(header[4:8].ljust(4, b"\0"), "big") == 1 else 100


FORMAT = Qcow2Format()
