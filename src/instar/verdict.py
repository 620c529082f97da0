"""``inspect``'s answer as data: `Finding`, `Verdict`, the finding codes and the policy.

A verdict says which format a file is, how large its disk is, and whether it
is safe to hand to a converter, with one `Finding` per reason it is not. Each
finding has a stable code (the `CODES` table; docs/inspect.md explains each)
and a one-line message; a finding the policy allows stays in the list, marked
``allowed``, and does not make the verdict unsafe.

`InspectPolicy` is what turns findings into allowed ones: codes to accept
(``--allow-backing`` accepts ``backing-file``), the VMDK create types allowed,
the formats refused. A policy file (`load_policy`) sets the same in a few
``key = value`` lines.

Everything here is plain data that crosses the worker boundary as JSON
(`Verdict.to_data`), and the printers (human and JSON) are here too. Kept
light: the worker imports this module.
"""

from __future__ import annotations

from instar.runtime_types import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Any

# Every finding code and what it means. A code never changes meaning; new
# ones may be added.
CODES: dict[str, str] = {
    "format-mismatch": "the claimed format is not the detected one",
    "multiple-formats": "the file is more than one format at once (a polyglot)",
    "backing-file": "the image names a backing file (qcow2, qed) or a parent (vmdk, vhd, vhdx)",
    "data-file": "the image keeps its data in an external data file (qcow2)",
    "external-extent": "a VMDK descriptor names extent files",
    "outside-allowed": "a file the image names lies outside the allowed directories",
    "vmdk-create-type": "a VMDK create type the policy does not allow",
    "unknown-features": "incompatible feature bits no reader knows (qcow2)",
    "corrupt": "the image's structure is corrupt",
    "vhdx-log": "a VHDX log holds writes not yet in place",
    "format-refused": "a format the policy refuses (qed, qcow and luks by default)",
    "unsupported": "instar cannot read this image, so it cannot check it",
    "partition-table": "an MBR partition table that is not valid",
    "stream-incomplete": "a stream could not be inspected as the file would be",
}

# What a policy allows unless told otherwise.
DEFAULT_VMDK_TYPES = ("monolithicSparse", "streamOptimized")
DEFAULT_REFUSED_FORMATS = ("qed", "qcow", "luks")


class Finding(NamedTuple):
    """One reason an image may not be safe: a stable ``code`` (a key of
    `CODES`) and a one-line ``message``; ``allowed`` once the policy accepts it."""

    code: str
    message: str
    allowed: bool = False


class InspectPolicy(NamedTuple):
    """What the verdict accepts.

    ``accept``: finding codes that are allowed (reported, not unsafe).
    ``vmdk_types``: the VMDK create types that raise no finding.
    ``refused_formats``: formats that raise ``format-refused``.
    """

    accept: frozenset[str] = frozenset()
    vmdk_types: tuple[str, ...] = DEFAULT_VMDK_TYPES
    refused_formats: tuple[str, ...] = DEFAULT_REFUSED_FORMATS

    def allows(self, code: str) -> bool:
        return code in self.accept

    def finding(self, code: str, message: str) -> Finding:
        """A finding of ``code``, allowed if this policy accepts it."""
        assert code in CODES, code
        return Finding(code, message, self.allows(code))

    def to_data(self) -> dict[str, Any]:
        return {"accept": sorted(self.accept), "vmdk_types": list(self.vmdk_types),
                "refused_formats": list(self.refused_formats)}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> InspectPolicy:
        return cls(frozenset(str(code) for code in data["accept"]),
                   tuple(str(name) for name in data["vmdk_types"]),
                   tuple(str(name) for name in data["refused_formats"]))


def make_policy(
    *,
    accept: tuple[str, ...] | list[str] | frozenset[str] = (),
    vmdk_types: tuple[str, ...] | list[str] | None = None,
    allow_formats: tuple[str, ...] | list[str] = (),
    base: InspectPolicy | None = None,
) -> InspectPolicy:
    """A policy from ``base`` (default: the default policy) with more codes
    accepted, other VMDK create types (replacing the base's) and formats taken
    off the refused list. Unknown codes raise ValueError."""
    from instar.errors import InvalidArgumentError

    base = base or InspectPolicy()
    unknown = [code for code in accept if code not in CODES]
    if unknown:
        raise InvalidArgumentError(
            f"unknown finding code {unknown[0]!r} (known: {', '.join(CODES)})")
    return InspectPolicy(
        base.accept | frozenset(accept),
        tuple(vmdk_types) if vmdk_types is not None else base.vmdk_types,
        tuple(name for name in base.refused_formats if name not in allow_formats),
    )


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_policy(text: str, name: str = "policy") -> InspectPolicy:
    """A policy file: ``key = value`` lines, ``#`` comments, blank lines.

    Keys: ``accept`` (finding codes, comma-separated), ``vmdk-types`` (the
    allowed create types, replacing the default two), ``allow-formats``
    (formats taken off the refused list), ``refuse-formats`` (formats added to
    it), ``allow-backing``, ``allow-data-file``, ``allow-extents`` (``yes`` or
    ``no``). A key may appear once; anything else is an error naming the line.
    """
    from instar.errors import UsageError

    accept: set[str] = set()
    vmdk_types: list[str] | None = None
    refused = list(DEFAULT_REFUSED_FORMATS)
    seen: set[str] = set()
    switches = {"allow-backing": "backing-file", "allow-data-file": "data-file",
                "allow-extents": "external-extent"}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        where = f"{name} line {number}"
        if not sep:
            raise UsageError(f"{where}: expected 'key = value'")
        if key in seen:
            raise UsageError(f"{where}: '{key}' is given twice")
        seen.add(key)
        if key == "accept":
            for code in _split(value):
                if code not in CODES:
                    raise UsageError(f"{where}: unknown finding code '{code}'")
                accept.add(code)
        elif key == "vmdk-types":
            vmdk_types = _split(value)
        elif key == "allow-formats":
            refused = [fmt for fmt in refused if fmt not in _split(value)]
        elif key == "refuse-formats":
            refused += [fmt for fmt in _split(value) if fmt not in refused]
        elif key in switches:
            if value not in ("yes", "no"):
                raise UsageError(f"{where}: '{key}' takes yes or no")
            if value == "yes":
                accept.add(switches[key])
        else:
            raise UsageError(f"{where}: unknown key '{key}'")
    return InspectPolicy(frozenset(accept),
                         tuple(vmdk_types) if vmdk_types is not None else DEFAULT_VMDK_TYPES,
                         tuple(refused))


def load_policy(path: str) -> InspectPolicy:
    """The policy file at ``path`` (read on the host: it is the user's, not an image's)."""
    from instar.errors import UsageError

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(1 << 20)
    except OSError as error:
        raise UsageError(f"cannot read the policy file '{path}': {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the policy file '{path}' is not UTF-8 text") from None
    return parse_policy(text, path)


class Verdict:
    """What ``inspect`` says about one file.

    ``format``: the detected format (qemu's name: "raw", "qcow2", "vpc"...);
    ``formats_found``: every format whose signature the file holds, the
    detected one first; ``virtual_size``: the disk's size in bytes, None when
    the image could not be opened; ``claimed``: the format the caller said it
    is (-f), if any; ``findings`` in the order found.
    """

    def __init__(self, filename: str, format: str, formats_found: list[str],
                 virtual_size: int | None, findings: list[Finding],
                 claimed: str | None = None) -> None:
        self.filename = filename
        self.format = format
        self.formats_found = formats_found
        self.virtual_size = virtual_size
        self.findings = findings
        self.claimed = claimed

    @property
    def safe(self) -> bool:
        """True when every finding is allowed."""
        return all(finding.allowed for finding in self.findings)

    @property
    def unsafe_findings(self) -> list[Finding]:
        return [finding for finding in self.findings if not finding.allowed]

    @property
    def codes(self) -> list[str]:
        """The codes of the findings that make it unsafe, each once, in order."""
        return list(dict.fromkeys(finding.code for finding in self.unsafe_findings))

    @property
    def exit_code(self) -> int:
        """``instar inspect``'s: 0 safe, 2 unsafe."""
        return 0 if self.safe else 2

    def __repr__(self) -> str:
        return (f"<Verdict {self.filename!r} format={self.format!r} "
                f"safe={self.safe} codes={self.codes}>")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verdict) and self.to_data() == other.to_data()

    __hash__ = None  # type: ignore[assignment]  # mutable

    # -- crossing the worker boundary

    def to_data(self) -> dict[str, Any]:
        return {"filename": self.filename, "format": self.format,
                "formats_found": list(self.formats_found), "virtual_size": self.virtual_size,
                "claimed": self.claimed,
                "findings": [list(finding) for finding in self.findings]}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Verdict:
        size = data["virtual_size"]
        claimed = data["claimed"]
        return cls(str(data["filename"]), str(data["format"]),
                   [str(name) for name in data["formats_found"]],
                   None if size is None else int(size),
                   [Finding(str(code), str(message), bool(allowed))
                    for code, message, allowed in data["findings"]],
                   None if claimed is None else str(claimed))

    # -- printing

    def qobject(self) -> dict[str, Any]:
        """The verdict as a QObject (``--output json``), in schema order."""
        result: dict[str, Any] = {"filename": self.filename, "format": self.format}
        if self.claimed is not None:
            result["claimed-format"] = self.claimed
        result["formats-found"] = list(self.formats_found)
        if self.virtual_size is not None:
            result["virtual-size"] = self.virtual_size
        result["safe"] = self.safe
        result["findings"] = [
            {"code": finding.code, "message": finding.message, "allowed": finding.allowed}
            for finding in self.findings
        ]
        return result

    def render_json(self) -> str:
        from instar.qobject import to_json

        return to_json(self.qobject()) + "\n"

    def render_human(self) -> str:
        """The facts as ``qemu-img info`` words them, then the findings, one
        per line (``CODE: MESSAGE``, allowed ones marked); control characters
        in names from the image are escaped."""
        from instar.cli.output import escape_controls as shown
        from instar.sizes import size_to_str

        lines = [f"image: {shown(self.filename)}", f"file format: {self.format}"]
        if self.claimed is not None:
            lines.append(f"claimed format: {shown(self.claimed)}")
        if len(self.formats_found) > 1:
            lines.append(f"formats found: {', '.join(self.formats_found)}")
        if self.virtual_size is not None:
            lines.append(f"virtual size: {size_to_str(self.virtual_size)} "
                         f"({self.virtual_size} bytes)")
        lines.append(f"safe: {'yes' if self.safe else 'no'}")
        if self.findings:
            lines.append("findings:")
            lines.extend(
                f"    {finding.code}{' (allowed)' if finding.allowed else ''}: "
                f"{shown(finding.message)}"
                for finding in self.findings
            )
        return "\n".join(lines) + "\n"


__all__ = [
    "CODES", "DEFAULT_REFUSED_FORMATS", "DEFAULT_VMDK_TYPES", "Finding", "InspectPolicy",
    "Verdict", "load_policy", "make_policy", "parse_policy",
]
