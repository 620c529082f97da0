"""Creation options (``-o``, ``-c``) against qemu-img 7.2: one schema per format.

Every bool option of every format, in every spelling qemu-img accepts and some
it refuses, gives the same outcome as ``qemu-img convert -o``: the same exit
status and message when refused; when accepted, the same declared virtual size
and the same effect in the image, for ``instar convert`` and ``instar dd``.
The schema itself is checked against ``qemu-img convert -o help``.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from helpers import (
    assert_option_refused_like_qemu,
    qemu_img_ok,
    qemu_info,
    run_instar,
    run_qemu_img,
    write_pieces,
)
from instar.errors import CreationError, OptionError
from instar.formats import registry
from instar.formats.base import Format
from instar.formats.options import (
    BOOL_FALSE,
    BOOL_TRUE,
    CreateOptions,
    Option,
    OptionSchema,
    parse_options,
    refused,
)
from instar.formats.vhdx import layout as vhdx_layout

MiB = 1 << 20
FORMATS = ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels"]
# (format, bool option): every bool option instar takes, per its schema (checked below).
BOOL_OPTIONS = [
    ("qcow2", "extended_l2"),
    ("qcow2", "lazy_refcounts"),
    ("vmdk", "compat6"),
    ("vmdk", "zeroed_grain"),
    ("vpc", "force_size"),
    ("vhdx", "block_state_zero"),
    ("vdi", "static"),
]
# Options that make a bool option's effect visible (a zero 1 MiB block in a vhdx).
EXTRA = {"block_state_zero": ",block_size=1M"}
# What qemu-img 7.2 accepts, measured: exactly these, lower case, nothing around them.
ACCEPTED = {"on": True, "yes": True, "true": True, "y": True,
            "off": False, "no": False, "false": False, "n": False}
REFUSED = ["ON", "On", "Yes", "TRUE", "Y", "N", "1", "0", "", " on", "on ", "of", "enable"]
# The input: 3 MiB + 1000 bytes (CHS rounding changes it), data, a zero MiB, data.
INPUT_SIZE = (3 << 20) + 1000


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("options") / "in.raw"
    write_pieces(path, [(0, b"\x11" * 4096), (2 * MiB, b"\x22" * 4096),
                        (INPUT_SIZE - 1000, b"\x33" * 1000)])
    return path


def _effect(fmt: str, option: str, path: Path) -> object:
    """What ``option`` changed in the image at ``path``, read without instar's code
    where qemu-img shows it."""
    if fmt == "qcow2":
        info = qemu_info(path)
        specific = info["format-specific"]
        assert isinstance(specific, dict)
        return specific["data"][option.replace("_", "-")]
    data = path.read_bytes()
    if option in ("compat6", "hwversion"):
        found = re.search(rb'ddb\.virtualHWVersion = "([^"]*)"', data)
        assert found is not None
        return found.group(1)
    if option == "zeroed_grain":
        return struct.unpack_from("<I", data, 8)[0] & 4  # header flags: zeroed-grain GTEs
    if option == "force_size":
        return data[-512 + 28 : -512 + 32]  # footer creator: "qem2" when forced
    if option == "static":
        return struct.unpack_from("<I", data, 76)[0]  # image type: 2 static, 1 dynamic
    if option == "block_state_zero":
        start = vhdx_layout.REGION_TABLE_OFFSETS[0]
        table = data[start : start + vhdx_layout.REGION_TABLE_SIZE]
        regions = vhdx_layout.decode_region_table(table)
        bat = next(r for r in regions if r.guid == vhdx_layout.BAT_REGION)
        return struct.unpack_from("<Q", data, bat.file_offset + 8)[0] & 7  # block 1's state
    raise AssertionError(f"no effect known for {fmt} {option}")


def _outcomes(
    fmt: str, option: str, dash_o: str, source: Path, tmp_path: Path
) -> list[tuple[object, object]]:
    """(virtual size, effect of ``option``) of qemu-img convert's, instar convert's and
    instar dd's outputs for ``-o dash_o``; each must succeed."""
    qemu, ours, dd = (tmp_path / f"{name}.{fmt}" for name in ("qemu", "ours", "dd"))
    qemu_img_ok("convert", "-O", fmt, "-o", dash_o, str(source), str(qemu))
    result = run_instar("convert", "-O", fmt, "-o", dash_o, str(source), str(ours))
    assert result.rc == 0, result.stderr
    result = run_instar("dd", "-O", fmt, "-o", dash_o, f"if={source}", f"of={dd}")
    assert result.rc == 0, result.stderr
    return [(qemu_info(path)["virtual-size"], _effect(fmt, option, path))
            for path in (qemu, ours, dd)]


# --- bool options: every spelling qemu accepts -------------------------------------------------

@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("spelling", list(ACCEPTED))
@pytest.mark.parametrize(("fmt", "option"), BOOL_OPTIONS, ids=[o for _, o in BOOL_OPTIONS])
def test_bool_spelling_accepted_like_qemu(
    fmt: str, option: str, spelling: str, source: Path, tmp_path: Path
) -> None:
    dash_o = f"{option}={spelling}{EXTRA.get(option, '')}"
    qemu, ours, dd = _outcomes(fmt, option, dash_o, source, tmp_path)
    assert ours == dd == qemu


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("prefix", ["", "no"], ids=["bare", "no-prefix"])
@pytest.mark.parametrize(("fmt", "option"), BOOL_OPTIONS, ids=[o for _, o in BOOL_OPTIONS])
def test_bool_short_form_like_qemu(
    fmt: str, option: str, prefix: str, source: Path, tmp_path: Path
) -> None:
    """qemu's -o short form: ``name`` is name=on, ``noname`` is name=off."""
    extra = EXTRA.get(option, "")
    qemu, ours, dd = _outcomes(fmt, option, f"{prefix}{option}{extra}", source, tmp_path)
    assert ours == dd == qemu
    (tmp_path / "spelled").mkdir()
    value = "off" if prefix else "on"
    spelled = _outcomes(fmt, option, f"{option}={value}{extra}", source, tmp_path / "spelled")
    assert spelled == [qemu] * 3


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(("fmt", "option"), BOOL_OPTIONS, ids=[o for _, o in BOOL_OPTIONS])
def test_bool_effect_is_visible(fmt: str, option: str, source: Path, tmp_path: Path) -> None:
    """The probes above can fail: on and off differ in qemu's own images."""
    effects = []
    for value in ("on", "off"):
        target = tmp_path / f"{value}.{fmt}"
        qemu_img_ok("convert", "-O", fmt, "-o", f"{option}={value}{EXTRA.get(option, '')}",
                    str(source), str(target))
        effects.append(_effect(fmt, option, target))
    assert effects[0] != effects[1]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("spelling", REFUSED, ids=lambda s: repr(s))
@pytest.mark.parametrize(("fmt", "option"), BOOL_OPTIONS, ids=[o for _, o in BOOL_OPTIONS])
def test_bool_spelling_refused_like_qemu(
    fmt: str, option: str, spelling: str, source: Path, tmp_path: Path
) -> None:
    assert_option_refused_like_qemu(fmt, f"{option}={spelling}", source, tmp_path)


def test_bool_spellings_parse_to_their_value() -> None:
    for fmt, option in BOOL_OPTIONS:
        schema = _format(fmt).create_options
        for spelling, value in ACCEPTED.items():
            parsed = parse_options(schema, CreateOptions([(option, spelling)]))
            assert parsed.flag(option) is value
        for spelling in REFUSED:
            with pytest.raises(OptionError, match=f"^Parameter '{option}' expects 'on' or 'off'$"):
                parse_options(schema, CreateOptions([(option, spelling)]))
    assert set(BOOL_TRUE) | set(BOOL_FALSE) == set(ACCEPTED)


def test_bool_options_listed_are_the_schemas() -> None:
    found = [(fmt, o.name) for fmt in FORMATS for o in _format(fmt).create_options.listed()
             if o.type == "bool"]
    assert sorted(found) == sorted(BOOL_OPTIONS)


# --- vpc force_size: the size CHS rounding changes ---------------------------------------------

@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("spelling", ["yes", "true", "on", "y", "off", "no", "false", "n"])
def test_vpc_force_size_on_one_mib(spelling: str, tmp_path: Path) -> None:
    """1 MiB is 1079296 bytes after CHS rounding; forced, it stays 1048576 (qemu)."""
    source = tmp_path / "1m.raw"
    write_pieces(source, [(0, b"\x44" * 512)], size=MiB)
    (tmp_path / "out").mkdir()
    outcomes = _outcomes("vpc", "force_size", f"force_size={spelling}", source, tmp_path / "out")
    expected = MiB if ACCEPTED[spelling] else 1079296
    assert [size for size, _ in outcomes] == [expected] * 3
    vpc = _format("vpc")
    parsed = parse_options(vpc.create_options, CreateOptions([("force_size", spelling)]))
    assert vpc.declared_size(MiB, parsed) == expected


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("dash_o", ["force_size=on,force_size=off", "force_size=off,force_size=on",
                                    "force_size,noforce_size", "noforce_size,force_size=y"])
def test_repeated_option_last_wins_like_qemu(dash_o: str, source: Path, tmp_path: Path) -> None:
    qemu, ours, dd = _outcomes("vpc", "force_size", dash_o, source, tmp_path)
    assert ours == dd == qemu


# --- refusals: order of checks and messages ------------------------------------------------------

REFUSALS = [
    ("qcow2", "lazy_refcounts=x,foo=1"),  # left to right: the bad value comes first
    ("qcow2", "foo=1,lazy_refcounts=x"),
    ("qcow2", "lazy_refcounts=ON,lazy_refcounts=on"),  # every occurrence is checked
    ("qcow2", "encryption=x"),  # an option instar refuses still has qemu's type
    ("qcow2", "preallocation=metadata,lazy_refcounts=x"),
    ("qcow2", "compress=on"),  # -c is no -o option
    ("vmdk", "compress=on"),
    ("vmdk", "compat6=on,hwversion=7"),
    ("vpc", "subformat=x,force_size=x"),
    ("vpc", "subformat"),  # short form on a str option: subformat=on
    ("vpc", "nofoo"),
    ("qcow2", "no"),
    ("qcow2", "cluster_size"),
    ("raw", "foo=1"),
    ("vhdx", "noblock_state_zero,block_size=x"),
    ("vdi", "static=on,cluster_size=1M"),
    ("vdi", "nostatic=on"),
]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize(("fmt", "dash_o"), REFUSALS, ids=[f"{f}:{o}" for f, o in REFUSALS])
def test_refusal_like_qemu(fmt: str, dash_o: str, source: Path, tmp_path: Path) -> None:
    assert_option_refused_like_qemu(fmt, dash_o, source, tmp_path)


# refcount_bits is qemu's one num option here: strtoull, then read back signed by the driver.
NUMBERS = ["16", " 16", "+16", "0x10", "020", "16 ", "1e3", "16k", "", "0x", "08", "- 1",
           "-1", "-16", "0", "99999999999999999999", "-18446744073709551616",
           "18446744073709551615", "9223372036854775808", "-9223372036854775809",
           "-9223372036854775808", "-9223372036854775808,compat=0.10", "+-1",
           "18446744073709551615,compression_type=lz4"]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("text", NUMBERS, ids=lambda t: repr(t))
def test_num_option_like_qemu(text: str, source: Path, tmp_path: Path) -> None:
    args = ["convert", "-O", "qcow2", "-o", f"refcount_bits={text}", str(source), "out.qcow2"]
    for side in ("q", "i"):
        (tmp_path / side).mkdir()
    qemu = run_qemu_img(*args, cwd=tmp_path / "q")
    ours = run_instar(*args, cwd=tmp_path / "i")
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    if qemu.rc == 0:
        ours_info, qemu_info_ = (qemu_info(tmp_path / side / "out.qcow2") for side in "iq")
        for key in ("virtual-size", "cluster-size", "format-specific"):
            assert ours_info[key] == qemu_info_[key]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("text", ["", ",", ",,", "lazy_refcounts=on,", ",lazy_refcounts=on",
                                  ",,lazy_refcounts=on", "lazy_refcounts=on,,,", "help,"],
                         ids=lambda t: repr(t))
def test_option_list_grammar_like_qemu(text: str, source: Path, tmp_path: Path) -> None:
    args = ["convert", "-O", "qcow2", "-o", text, str(source), "out.qcow2"]
    qemu = run_qemu_img(*args, cwd=tmp_path)
    ours = run_instar(*args, cwd=tmp_path)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert ours.rc == 1 and ours.stderr.startswith("instar: Invalid option list: ")


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("args", [["-n", "-o", "lazy_refcounts=on", "in.raw", "t.qcow2"],
                                  ["-n", "-o", "help", "in.raw", "t.qcow2"],
                                  ["-o", "foo=1", "-n"]], ids=lambda a: " ".join(a))
def test_options_refused_without_creation_like_qemu(
    args: list[str], source: Path, tmp_path: Path
) -> None:
    """convert -n creates nothing, so qemu refuses -o whatever it holds."""
    (tmp_path / "in.raw").symlink_to(source)
    qemu_img_ok("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), str(INPUT_SIZE))
    before = (tmp_path / "t.qcow2").read_bytes()
    qemu = run_qemu_img("convert", "-O", "qcow2", *args, cwd=tmp_path)
    ours = run_instar("convert", "-O", "qcow2", *args, cwd=tmp_path)
    assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    assert ours.stderr == "instar: -o has no effect when skipping image creation\n"
    assert (tmp_path / "t.qcow2").read_bytes() == before


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("dash_o", ["hwversion=", "hwversion=7", "compat6=on", "compat6=off"])
def test_vmdk_hardware_version_like_qemu(dash_o: str, source: Path, tmp_path: Path) -> None:
    qemu, ours, dd = _outcomes("vmdk", "hwversion", dash_o, source, tmp_path)
    assert ours == dd == qemu


@pytest.mark.usefixtures("qemu_img")
def test_compression_refused_after_option_errors_like_qemu(source: Path, tmp_path: Path) -> None:
    """qemu checks -o before -c, and -c before what the driver checks (subformat)."""
    for dash_o in ["force_size=x", "foo=1", "subformat=x"]:
        args = ["convert", "-c", "-O", "vpc", "-o", dash_o, str(source), "out.vhd"]
        qemu = run_qemu_img(*args, cwd=tmp_path)
        ours = run_instar(*args, cwd=tmp_path)
        assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
        assert ours.rc == 1


# --- -o help is the schema ---------------------------------------------------------------------

def _qemu_option_types(fmt: str, protocol: bool = False) -> dict[str, str]:
    """name -> type of every option ``qemu-img convert -O fmt -o help`` lists;
    with ``protocol``, as ``create -o help`` lists them for a file name (the
    file protocol's options too)."""
    args = ("create", "-f", fmt, "-o", "help", "x.img") if protocol else (
        "convert", "-O", fmt, "-o", "help")
    lines = run_qemu_img(*args).stdout.splitlines()[1:]
    found = (re.match(r"  (\S+)=<([^>]+)>", line) for line in lines)
    return {match.group(1): match.group(2) for match in found if match}


@pytest.mark.parametrize("fmt", FORMATS)
def test_help_lists_exactly_the_schema(fmt: str) -> None:
    schema = _format(fmt).create_options
    result = run_instar("convert", "-O", fmt, "-o", "help")
    assert result.rc == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"Supported {fmt} options:"
    names = [line.split("=")[0].strip() for line in lines[1:]]
    assert names == sorted(o.name for o in schema.options if o.supported and not o.protocol)
    assert lines[1:] == [option.help_line() for option in schema.listed()]


@pytest.mark.usefixtures("qemu_img")
@pytest.mark.parametrize("fmt", FORMATS)
def test_schema_names_and_types_are_qemus(fmt: str) -> None:
    """Every option in a schema (refused ones too) is a qemu-img option of the same type."""
    qemu = _qemu_option_types(fmt)
    with_protocol = _qemu_option_types(fmt, protocol=True)
    for option in _format(fmt).create_options.options:
        kind = "bool (on/off)" if option.type == "bool" else option.type
        assert (with_protocol if option.protocol else qemu).get(option.name) == kind, option.name
        assert option.protocol == (option.name not in qemu), option.name


# --- the schema machinery ----------------------------------------------------------------------

def test_defaults_applied_and_given_recorded() -> None:
    schema = _format("vhdx").create_options
    defaults = schema.defaults()
    assert defaults.flag("block_state_zero") is True
    assert defaults.number("log_size") == MiB
    assert defaults.text("subformat") == "dynamic"
    assert defaults.given == frozenset()
    parsed = parse_options(schema, CreateOptions([("log_size", "2M"), ("block_size", "0")]))
    assert parsed.number("log_size") == 2 * MiB
    assert parsed.given == {"log_size", "block_size"}


def test_values_are_typed() -> None:
    schema = _format("qcow2").create_options
    given = CreateOptions([("cluster_size", "4k"), ("refcount_bits", "0x8")])
    parsed = parse_options(schema, given)
    assert parsed.number("cluster_size") == 4096
    assert parsed.number("refcount_bits") == 8
    with pytest.raises(KeyError):
        parsed.flag("cluster_size")  # a size, not a bool
    with pytest.raises(KeyError):
        parsed.text("data_file")  # refused: never a value
    with pytest.raises(KeyError):
        parsed.text("nonsense")


def test_unknown_key_and_compression_refused() -> None:
    schema = _format("vpc").create_options
    with pytest.raises(OptionError, match=r"^Invalid parameter 'cluster_size'$"):
        parse_options(schema, CreateOptions([("cluster_size", "4k")]))
    with pytest.raises(OptionError, match=r"^Compression not supported for this file format$"):
        parse_options(schema, CreateOptions(compress=True))
    assert parse_options(_format("qcow2").create_options, CreateOptions(compress=True)).compress


def test_refused_option_is_a_creation_error_after_the_checks() -> None:
    schema = _format("qcow2").create_options
    with pytest.raises(CreationError, match=r"^the qcow2 option 'data_file' is not supported yet$"):
        parse_options(schema, CreateOptions([("data_file", "d"), ("lazy_refcounts", "on")]))
    with pytest.raises(OptionError, match="lazy_refcounts"):
        parse_options(schema, CreateOptions([("data_file", "d"), ("lazy_refcounts", "x")]))


def test_schema_refuses_duplicates_and_missing_defaults() -> None:
    with pytest.raises(ValueError, match="twice"):
        OptionSchema("x", (Option("a", "bool", False), Option("a", "str", "")))
    with pytest.raises(ValueError, match="no default"):
        OptionSchema("x", (Option("a", "bool", None),))
    assert OptionSchema("x", (refused("a", "str"),)).listed() == ()


def _format(name: str) -> Format:
    fmt = registry.get(name)
    assert fmt is not None
    return fmt
