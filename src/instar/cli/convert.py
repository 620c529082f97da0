"""``instar convert``: qemu-img convert's common options, messages and exit codes.

    instar convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache]
                   [-O output_fmt] [-o options] [-S sparse_size] [-r rate_limit]
                   [-m num_coroutines] [-W] [--allow dir] FILE [FILE...] OUTPUT

``-t`` is the output's cache mode as in qemu-img: the default, ``unsafe``, does
not flush; any other mode fsyncs the output before it takes its name.
Accepted and ignored, as knobs that do not change the result (values checked as
qemu-img checks them): ``-T`` (source cache mode), ``-m`` (coroutines), ``-r``
(rate limit), ``-W`` (out-of-order writes).
"""

from __future__ import annotations

from instar.cli.access import AccessOptions
from instar.cli.dd import check_option_list, parse_creation_options
from instar.cli.getopt import gnu_getopt
from instar.cli.numbers import NumberError, convert_number
from instar.cli.progress import ProgressMeter, show_events
from instar.errors import UnsupportedError, UsageError
from instar.formats.base import CreateOptions
from instar.sizes import INT64_MAX, parse_long

HELP = """\
usage: instar convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache]
                      [-O output_fmt] [-o options] [-S sparse_size] [-r rate_limit]
                      [-m num_coroutines] [-W] [--allow dir] [--require-safe]
                      filename [filename2 [...]] output_filename

Convert images (concatenated in order) into a new image, as qemu-img convert does.
  -f fmt             format of the input images (probed when absent)
  -O output_fmt      format of the output: raw (default), qcow2, vmdk, vpc or vhdx
  -o options         creation options (key=value,...); '-o help' lists the format's
  -c                 compress the output (qcow2; vmdk streamOptimized)
  -S sparse_size     zero runs this long stay unallocated (a multiple of 512 up to 16M,
                     default 4k; 0 writes zeros too, fully allocating the output)
  -n                 write over an existing target image instead of creating one
  -t cache           cache mode of the output: unsafe (the default) does not flush it;
                     writeback, writethrough, directsync and none fsync it
  -T src_cache       cache mode of the inputs: checked, no effect
  -r rate_limit      a size: checked, no effect (instar does not throttle)
  -m num_coroutines  1 to 16: checked, no effect
  -W                 accepted, no effect (instar writes in order)
  -p                 show progress
  -q                 quiet: no progress
  -U, --force-share  read inputs a running qemu holds a write lock on
  --allow dir        backing and data files may also come from dir (not in qemu-img)
  --require-safe     refuse an input that instar inspect calls unsafe, before
                     writing anything (not in qemu-img)
  -h, --help         show this help

Not supported (refused): --object objectdef, --image-opts, --target-image-opts,
  -B backing_file, -F backing_fmt, -l snapshot_param, -C, --salvage, --target-is-zero,
  --bitmaps, --skip-broken-bitmaps
"""

SHORT_OPTIONS = "hf:O:co:S:pqnUt:T:m:Wr:B:F:l:C"
LONG_OPTIONS = {"help": False, "image-opts": False, "target-image-opts": False,
                "force-share": False, "object": True, "allow": True, "salvage": False,
                "target-is-zero": False, "bitmaps": False, "skip-broken-bitmaps": False,
                "require-safe": False}
UNSUPPORTED = ("--image-opts", "--target-image-opts", "--object", "-B", "-F", "-l", "-C",
               "--salvage", "--target-is-zero", "--bitmaps", "--skip-broken-bitmaps")
MAX_SPARSE = 16 << 20
CACHE_MODES = ("none", "writeback", "unsafe", "directsync", "writethrough")
MAX_COROUTINES = 16


def _sparse_size(text: str) -> int:
    name = "buffer size for sparse output"
    try:
        value = convert_number(name, text, 0, (1 << 63) - 1)
    except NumberError as error:
        if "Must be between" not in str(error):
            raise
        value = -1
    if value < 0 or value % 512 or value > MAX_SPARSE:
        raise UsageError(
            f"Invalid {name} specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. "
            "Select 0 to disable sparse detection (fully allocates output)."
        )
    return value


def _print_option_help(format_name: str) -> int:
    from instar.convert import output_format

    fmt = output_format(format_name)
    print(f"Supported {fmt.name} options:")
    for option in fmt.create_options.listed():
        print(option.help_line())
    return 0


def run(args: list[str]) -> int:
    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    input_format: str | None = None
    out_format = "raw"
    options = CreateOptions()
    sparse = 4096
    progress = quiet = no_create = False
    access = AccessOptions()
    wants_help = require_safe = False
    cache, source_cache = "unsafe", "writeback"
    for option, value in access.command_options(parsed):
        if option == "-f":
            input_format = value
        elif option == "-O":
            out_format = value
        elif option == "-c":
            options.compress = True
        elif option == "-o":
            check_option_list(value)
            if value == "help" or value.startswith("help,") or ",help" in value:
                wants_help = True
            else:
                parse_creation_options(value, options.options)
        elif option == "-S":
            sparse = _sparse_size(value)
        elif option == "-p":
            progress = True
        elif option == "-q":
            quiet = True
        elif option == "-n":
            no_create = True
        elif option == "--require-safe":
            require_safe = True
        elif option == "-t":
            cache = value
        elif option == "-T":
            source_cache = value
        elif option == "-m" and not 1 <= (parse_long(value) or 0) <= MAX_COROUTINES:
            raise UsageError("Invalid number of coroutines. Allowed number of coroutines is "
                             f"between 1 and {MAX_COROUTINES}")
        elif option == "-r":
            convert_number("rate limit", value, 0, INT64_MAX)
        elif option in UNSUPPORTED:
            raise UnsupportedError(f"{option} is not supported")
    if no_create and (options.options or wants_help):
        raise UsageError("-o has no effect when skipping image creation")
    if wants_help:
        return _print_option_help(out_format)
    if len(parsed.operands) < 2:
        raise UsageError("Must specify image file name")
    # qemu-img checks the cache modes after the command line (-t once the output
    # exists, which it then leaves behind; instar before opening anything).
    if source_cache not in CACHE_MODES:
        raise UsageError(f"Invalid source cache option: {source_cache}")
    if cache not in CACHE_MODES:
        raise UsageError(f"Invalid cache option: {cache}")
    if require_safe:
        from instar.inspection import require_safe as check_safe

        check_safe(parsed.operands[:-1], input_format, allow=access.allowed,
                   force_share=access.force_share)
    from instar.convert import convert

    meter = ProgressMeter() if progress and not quiet else None
    convert(
        parsed.operands[:-1],
        parsed.operands[-1],
        input_format=input_format,
        output_format_name=out_format,
        options=options,
        sparse_size=sparse,
        no_create=no_create,
        allow=access.allowed,
        events=show_events(meter),
        force_share=access.force_share,
        durable=cache != "unsafe",
    )
    if meter is not None:
        meter.finish()
    return 0
