"""Creation options (``-o key=value`` and ``-c``): one schema per format, one parser.

Each format lists its options once, as an `OptionSchema` of `Option` (qemu's
name and type, instar's default, the ``-o help`` line). `parse_options` is the
only code that reads option text: it checks every ``key=value`` in command-line
order as qemu's option parser does (unknown key, then the value against its
type), refuses ``-c`` where the format cannot compress, and returns
`ParsedOptions`, typed values with the defaults applied. ``declared_size`` and
the writer both read that one result, so the two can never disagree about what
an option means.

What a value means for the format (which subformats exist, which cluster sizes)
is the writer's business and worded as qemu's driver words it; this module only
does what qemu's generic option parser does, with its messages.
"""

from __future__ import annotations

from collections.abc import Mapping

from instar.errors import CreationError, OptionError
from instar.record import Record
from instar.runtime_types import TYPE_CHECKING, NamedTuple
from instar.sizes import UINT64_MAX, SizeStatus, parse_size

if TYPE_CHECKING:
    from typing import Literal

    from instar.formats.base import OutputFile

    OptionType = Literal["str", "size", "num", "bool"]
OptionValue = str | int | bool

# The spellings qemu-img 7.2 takes for a bool option (measured: case matters, no
# white space, nothing else; tests/test_options.py holds it to that).
BOOL_TRUE = ("on", "yes", "true", "y")
BOOL_FALSE = ("off", "no", "false", "n")

_C_SPACE = " \t\n\v\f\r"
_SIZE_HINT = (
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)


class CreateOptions(Record):
    """Creation options as the command line gives them, not yet checked.

    ``options`` keeps every ``-o`` pair in order, repeats included: qemu checks
    each occurrence, and the last one wins.
    """

    __slots__ = ("compress", "options")

    def __init__(self, options: list[tuple[str, str]] | None = None,
                 compress: bool = False) -> None:
        self.options: list[tuple[str, str]] = [] if options is None else options
        self.compress = compress


# What the Python API takes as ``options=``: CreateOptions, or ``-o``'s pairs.
OptionsArgument = CreateOptions | Mapping[str, str] | None


def as_create_options(options: OptionsArgument) -> CreateOptions:
    """``options`` as CreateOptions: a mapping is ``-o key=value,...`` (no ``-c``).

    Keys and values must be strings, as on the command line; anything else is
    refused here rather than failing deep inside a writer.
    """
    if options is None:
        return CreateOptions()
    if isinstance(options, CreateOptions):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be CreateOptions or a dict, not {type(options).__name__}")
    pairs = list(options.items())
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"options take str keys and values, as -o does: {key!r}={value!r}")
    return CreateOptions(options=pairs)


class Option(NamedTuple):
    """One creation option: qemu's name and type, the default, the ``-o help`` text.

    ``supported`` False marks an option qemu takes and instar refuses ("not
    supported yet"): its value is still checked first, as qemu would check it,
    and it is not listed by ``-o help``. ``protocol`` marks an option of qemu's
    file protocol that the format takes through it (``preallocation``): qemu's
    ``-o help`` lists it only when a file name says which protocol.
    """

    name: str
    type: OptionType
    default: OptionValue | None
    help: str = ""
    supported: bool = True
    protocol: bool = False

    def help_line(self) -> str:
        """The option as ``qemu-img convert -o help`` lays it out."""
        kind = "bool (on/off)" if self.type == "bool" else self.type
        return f"  {f'{self.name}=<{kind}>':<22} - {self.help}"

    def parse(self, text: str) -> OptionValue:
        """``text`` as this option's type, with qemu's option-parser messages."""
        if self.type == "bool":
            return _parse_bool(self.name, text)
        if self.type == "size":
            return _parse_size(self.name, text)
        if self.type == "num":
            return _parse_num(self.name, text)
        return text


def data_file_name(options: ParsedOptions) -> str | None:
    """The external data file ``-o data_file`` names, for a format that
    implements the option (qcow2), else None."""
    option = options.schema.find("data_file")
    if option is None or not option.supported or "data_file" not in options.given:
        return None
    return options.texts.get("data_file", "")


def refused(name: str, type: OptionType) -> Option:
    """An option qemu takes that instar does not implement (yet)."""
    return Option(name, type, None, supported=False)


class BackingReference(NamedTuple):
    """The backing file a new image names: the name as given and its format;
    for a vmdk, the backing file's CID (its descriptor's parentCID)."""

    name: str
    format: str
    cid: int | None = None


class _SchemaFields(NamedTuple):
    format_name: str
    options: tuple[Option, ...] = ()
    compress: bool = False
    backing: bool = False


class OptionSchema(_SchemaFields):
    """Every creation option of one format, whether it takes ``-c``, and
    whether its writer can record a backing file (``backing``)."""

    __slots__ = ()

    def __new__(cls, format_name: str, options: tuple[Option, ...] = (),
                compress: bool = False, backing: bool = False) -> OptionSchema:
        names = [option.name for option in options]
        if len(set(names)) != len(names):
            raise ValueError(f"{format_name}: an option is listed twice")
        for option in options:
            if option.supported and option.default is None:
                raise ValueError(f"{format_name}: option {option.name} has no default")
        return super().__new__(cls, format_name, options, compress, backing)

    def find(self, name: str) -> Option | None:
        """The option called ``name`` (qemu's spelling, exactly), or None."""
        for option in self.options:
            if option.name == name:
                return option
        return None

    def listed(self, protocol: bool = False) -> tuple[Option, ...]:
        """The options ``-o help`` lists: those instar implements, sorted as
        qemu sorts; the file protocol's only with ``protocol`` (a file name given)."""
        return tuple(sorted((o for o in self.options
                             if o.supported and (protocol or not o.protocol)),
                            key=lambda o: o.name))

    def extended(self, extra: tuple[Option, ...]) -> OptionSchema:
        """This schema and the options of ``extra`` it lacks, as qemu's
        ``qemu_opts_append`` adds the protocol's creation options to a format's."""
        added = tuple(option for option in extra if self.find(option.name) is None)
        return OptionSchema(self.format_name, self.options + added, self.compress, self.backing)

    def defaults(self) -> ParsedOptions:
        """The options of a command line that gives none."""
        return parse_options(self, CreateOptions())


class ParsedOptions(NamedTuple):
    """Checked creation options: a typed value for every option the format implements.

    ``given`` names the options the command line set (a writer may treat an
    explicit default differently, as qemu's vmdk does with ``-c``); ``texts``
    holds what each said, last occurrence, for a driver that reads the text
    again as qemu's QAPI visitor does (`qapi_int`). ``backing`` is the
    backing file a new empty image names (``instar create -b``, only for a
    schema with ``backing``); never set by ``-o``, so convert cannot set it.
    ``data_file`` is the open external data file (qcow2's ``-o data_file``),
    created beside the image by `output.write_image` before the writer starts.
    """

    schema: OptionSchema
    values: Mapping[str, OptionValue]
    given: frozenset[str] = frozenset()
    compress: bool = False
    texts: Mapping[str, str] = {}  # never changed: read only, as all of ParsedOptions
    backing: BackingReference | None = None
    data_file: OutputFile | None = None

    def flag(self, name: str) -> bool:
        """A bool option's value."""
        value = self._value(name, "bool")
        assert isinstance(value, bool)
        return value

    def number(self, name: str) -> int:
        """A size or num option's value (a num may be negative, as qemu takes ``-1``)."""
        value = self._value(name, "size", "num")
        assert isinstance(value, int) and not isinstance(value, bool)
        return value

    def text(self, name: str) -> str:
        """A str option's value."""
        value = self._value(name, "str")
        assert isinstance(value, str)
        return value

    def get(self, name: str) -> OptionValue | None:
        """Any option's value, implemented or not; None when it has no default
        and the command line did not set it (how measure reads qemu's options,
        which instar's writers may not implement)."""
        if self.schema.find(name) is None:
            raise KeyError(f"{self.schema.format_name} has no option {name}")
        return self.values.get(name)

    def _value(self, name: str, *types: OptionType) -> OptionValue:
        option = self.schema.find(name)
        if option is None or not option.supported or option.type not in types:
            raise KeyError(f"{self.schema.format_name} has no {'/'.join(types)} option {name}")
        return self.values[name]


def parse_options(schema: OptionSchema, given: CreateOptions, *,
                  refuse_unsupported: bool = True) -> ParsedOptions:
    """Check ``given`` against ``schema`` as qemu-img does, before anything is created.

    In qemu's order: each pair left to right (an unknown key or a malformed
    value is an `OptionError`, printed without the output's name), then ``-c``,
    then options instar refuses (a `CreationError`, which callers prefix as
    qemu prefixes a driver's refusal), unless ``refuse_unsupported`` is off:
    measure creates nothing and reads them all (`ParsedOptions.get`).
    """
    values: dict[str, OptionValue] = {
        option.name: option.default
        for option in schema.options
        if option.supported and option.default is not None
    }
    order: list[str] = []
    texts: dict[str, str] = {}
    for key, text in given.options:
        option = schema.find(key)
        if option is None:
            raise OptionError(f"Invalid parameter '{key}'")
        values[key] = option.parse(text)
        texts[key] = text
        if key not in order:
            order.append(key)
    if given.compress and not schema.compress:
        raise OptionError("Compression not supported for this file format")
    for key in order if refuse_unsupported else ():
        option = schema.find(key)
        if option is not None and not option.supported:
            raise CreationError(f"the {schema.format_name} option '{key}' is not supported yet")
    return ParsedOptions(schema, values, frozenset(order), given.compress, texts)


def qapi_int(name: str, text: str) -> int:
    """``text`` as qemu's QAPI visitor reads an option into an 'int' member
    after the option parser took it (qed's table-size): C strtoll in base 0
    over the whole text, in signed 64 bits; otherwise qemu's message, which
    the caller prefixes as a driver's refusal."""
    parsed = _c_integer(text)
    value = 0 if parsed is None else -parsed[1] if parsed[0] else parsed[1]
    if parsed is None or not -(1 << 63) <= value < 1 << 63:
        raise CreationError(f"Parameter '{name}' expects integer")
    return value


def _parse_bool(name: str, text: str) -> bool:
    if text in BOOL_TRUE:
        return True
    if text in BOOL_FALSE:
        return False
    raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")


def _parse_num(name: str, text: str) -> int:
    """C strtoull, base 0, over the whole text. A ``-`` is kept as a sign
    (strtoull would wrap the value modulo 2**64; qemu's drivers read the text
    back signed)."""
    parsed = _c_integer(text)
    if parsed is None:
        raise OptionError(f"Parameter '{name}' expects a number")
    negative, value = parsed
    if value > UINT64_MAX:
        raise OptionError(f"Value '{text}' is too large for parameter '{name}'")
    return -value if negative else value


def _c_integer(text: str) -> tuple[bool, int] | None:
    """C's base-0 integer text over the whole of ``text`` (strtoll, strtoull):
    white space, a sign, then decimal, ``0x`` hex or ``0`` octal digits, as
    (negative, magnitude); None when it is not one."""
    body = text.lstrip(_C_SPACE)
    negative = body.startswith("-")
    if body[:1] in ("+", "-"):
        body = body[1:]
    if body[:2] in ("0x", "0X"):
        digits, base = body[2:], 16
    elif body.startswith("0"):
        digits, base = body, 8
    else:
        digits, base = body, 10
    allowed = "0123456789abcdefABCDEF" if base == 16 else "0123456789"[:base]
    if not digits or any(char not in allowed for char in digits):
        return None
    return negative, int(digits, base)


def parse_size_option(name: str, text: str) -> int:
    """A size as qemu parses an option of type size (qemu-img resize's size)."""
    return _parse_size(name, text)


def _parse_size(name: str, text: str) -> int:
    """qemu_strtosz; a syntax error is followed by qemu's two unprefixed lines
    about suffixes."""
    parsed = parse_size(text)
    if parsed.status is SizeStatus.RANGE:
        raise OptionError(f"Value '{text}' is out of range for parameter '{name}'")
    if parsed.status is SizeStatus.SYNTAX:
        error = OptionError(f"Parameter '{name}' expects a non-negative number below 2^64")
        error.hint = _SIZE_HINT
        raise error
    return parsed.value
