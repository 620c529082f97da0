"""GNU getopt_long as qemu-img uses it, with qemu-img's error messages.

Options and operands may be mixed (GNU permuting), ``--`` ends options, short
options cluster (``-Uf raw``), an option's argument may be attached or the
next word, and long options may be abbreviated when unambiguous.
"""

from __future__ import annotations

from instar.errors import UsageError
from instar.record import Record


class GetoptError(UsageError):
    """A bad command line: qemu-img adds a hint line after the message."""

    hint: str | None = "Try 'instar --help' for more information"


class BadOptionError(GetoptError):
    """An option getopt does not take, in qemu-img's words.

    ``glibc_message`` is what glibc's getopt prints itself (after "COMMAND: ")
    for the same option, where a qemu-img command lets getopt complain
    (measure: then its help, exit 0).
    """

    def __init__(self, message: str, glibc_message: str) -> None:
        super().__init__(message)
        self.glibc_message = glibc_message


class Parsed(Record):
    """The options in order, as ("-f", "raw") or ("--help", ""), and the operands."""

    __slots__ = ("operands", "options")

    def __init__(self, options: list[tuple[str, str]] | None = None,
                 operands: list[str] | None = None) -> None:
        self.options: list[tuple[str, str]] = [] if options is None else options
        self.operands: list[str] = [] if operands is None else operands


def gnu_getopt(args: list[str], short: str, long: dict[str, bool]) -> Parsed:
    """Parse ``args``: ``short`` as "hf:O:U", ``long`` maps names to "takes an argument"."""
    takes_argument = {char: short[i + 1 : i + 2] == ":" for i, char in enumerate(short)}
    takes_argument.pop(":", None)
    parsed = Parsed()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            parsed.operands.extend(args[i:])
            break
        if arg.startswith("--"):
            i = _long_option(arg, args, i, long, parsed)
        elif arg.startswith("-") and arg != "-":
            i = _short_options(arg, args, i, takes_argument, parsed)
        else:
            parsed.operands.append(arg)
    return parsed


def _long_option(arg: str, args: list[str], i: int, long: dict[str, bool], parsed: Parsed) -> int:
    name, has_value, value = arg[2:].partition("=")
    matches = [n for n in long if n == name] or [n for n in long if n.startswith(name)]
    if not matches:
        raise BadOptionError(f"unrecognized option '{arg}'", f"unrecognized option '{arg}'")
    if len(matches) > 1:
        possibilities = " ".join(f"'--{match}'" for match in matches)
        raise BadOptionError(f"unrecognized option '{arg}'",
                          f"option '{arg}' is ambiguous; possibilities: {possibilities}")
    full = matches[0]
    if long[full]:
        if not has_value:
            if i >= len(args):
                raise BadOptionError(f"missing argument for option '{arg}'",
                                  f"option '--{full}' requires an argument")
            value = args[i]
            i += 1
    elif has_value:
        raise BadOptionError(f"unrecognized option '{arg}'",
                          f"option '--{full}' doesn't allow an argument")
    parsed.options.append((f"--{full}", value))
    return i


def _short_options(
    arg: str, args: list[str], i: int, takes_argument: dict[str, bool], parsed: Parsed
) -> int:
    for position in range(1, len(arg)):
        char = arg[position]
        if char not in takes_argument:
            raise BadOptionError(f"unrecognized option '{arg}'", f"invalid option -- '{char}'")
        if not takes_argument[char]:
            parsed.options.append((f"-{char}", ""))
            continue
        value = arg[position + 1 :]
        if not value:
            if i >= len(args):
                raise BadOptionError(f"missing argument for option '{arg}'",
                                  f"option requires an argument -- '{char}'")
            value = args[i]
            i += 1
        parsed.options.append((f"-{char}", value))
        break
    return i
