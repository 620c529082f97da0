"""What a structural check found, as data: `CheckResult` and its `Finding` lines.

``instar check`` prints a result as ``qemu-img check`` 7.2 does; the later
``inspect`` reads the same findings by their codes. A format's checker (the
``checker`` entry of its `FormatBase`) fills one `CheckResult` from the
image's metadata: counters as qemu's ``BdrvCheckResult`` keeps them, and
every line qemu prints on stderr while checking, in order, each with a
stable code and what it counted as.

Kept light (a NamedTuple and a plain class): checkers run in the worker.
"""

from __future__ import annotations

from collections.abc import Callable

from instar.runtime_types import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Any

# What a finding counted as, in qemu's BdrvCheckResult.
CORRUPTION = "corruption"
LEAK = "leak"
CHECK_ERROR = "check-error"  # qemu's "internal errors": the check could not look
NOTE = "note"  # a line that counts nothing (a hint, the second line of a message)
REPAIRED = "repaired"  # ``check -r``: "Repairing ...", counted in the *_fixed counters

# At most this many lines are kept: qemu prints one per cluster whose refcount
# is wrong, and a file of millions of clusters with a zeroed refcount table
# would otherwise hold them all in memory. Counters stay exact.
MAX_FINDINGS = 100_000


class Finding(NamedTuple):
    """One line qemu prints while checking.

    ``prefixed``: qemu prints it with error_report ("qemu-img: ..."), so
    instar prints "instar: ..."; otherwise it is printed as it stands.
    """

    kind: str
    code: str
    message: str
    prefixed: bool = False


class CheckResult:
    """qemu's ImageCheck: the counters, the allocation figures and the lines.

    ``failure`` is the reason (a strerror) the check stopped early, qemu's
    "Check failed: REASON": then nothing but the lines is printed.
    """

    COUNTERS = (
        "check_errors", "corruptions", "leaks", "corruptions_fixed", "leaks_fixed",
        "image_end_offset", "total_clusters", "allocated_clusters", "fragmented_clusters",
        "compressed_clusters",
    )

    def __init__(self, filename: str = "", format: str = "") -> None:
        self.filename = filename
        self.format = format
        self.check_errors = 0
        self.corruptions = 0
        self.leaks = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.image_end_offset = 0
        self.total_clusters = 0
        self.allocated_clusters = 0
        self.fragmented_clusters = 0
        self.compressed_clusters = 0
        self.findings: list[Finding] = []
        self.findings_dropped = 0  # lines past MAX_FINDINGS, counted but not kept
        self.failure: str | None = None

    # -- recording

    def note(self, finding: Finding) -> None:
        """Keep one line (counting nothing by itself)."""
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)
        else:
            self.findings_dropped += 1

    def add(self, kind: str, code: str, message: str, prefixed: bool = False) -> None:
        """A line and what it counts as."""
        if kind == CORRUPTION:
            self.corruptions += 1
        elif kind == LEAK:
            self.leaks += 1
        elif kind == CHECK_ERROR:
            self.check_errors += 1
        self.note(Finding(kind, code, message, prefixed))

    def extend(self, findings: list[Finding], corruptions: int = 0, leaks: int = 0,
               check_errors: int = 0) -> None:
        """Lines whose counts are known (a table's, replayed at each visit):
        no work per line once MAX_FINDINGS are kept."""
        self.corruptions += corruptions
        self.leaks += leaks
        self.check_errors += check_errors
        room = max(0, MAX_FINDINGS - len(self.findings))
        self.findings.extend(findings[:room])
        self.findings_dropped += max(0, len(findings) - room)

    def add_each(self, kind: str, code: str, count: int, message: Callable[[int], str],
                 prefixed: bool = False) -> None:
        """``count`` lines of one kind, the i-th saying ``message(i)`` (qemu
        prints one per entry of a run of map entries): all counted, but only
        made and kept up to MAX_FINDINGS, so a run of millions costs nothing
        per line past the limit."""
        if kind == CORRUPTION:
            self.corruptions += count
        elif kind == LEAK:
            self.leaks += count
        elif kind == CHECK_ERROR:
            self.check_errors += count
        kept = min(count, max(0, MAX_FINDINGS - len(self.findings)))
        self.findings.extend(Finding(kind, code, message(i), prefixed) for i in range(kept))
        self.findings_dropped += count - kept

    def fail(self, reason: str) -> None:
        """The check stops here (qemu returns -errno): "Check failed: REASON"."""
        self.failure = reason

    # -- reading

    def of_kind(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 1 could not check, 2 corrupt, 3 leaks only, 0 clean."""
        if self.failure is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    # -- crossing the worker boundary (plain JSON data)

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        data.update(filename=self.filename, format=self.format, failure=self.failure,
                    findings_dropped=self.findings_dropped,
                    findings=[list(finding) for finding in self.findings])
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> CheckResult:
        result = cls(str(data["filename"]), str(data["format"]))
        for name in cls.COUNTERS:
            setattr(result, name, int(data[name]))
        failure = data.get("failure")
        result.failure = None if failure is None else str(failure)
        result.findings_dropped = int(data.get("findings_dropped", 0))
        result.findings = [
            Finding(str(kind), str(code), str(message), bool(prefixed))
            for kind, code, message, prefixed in data["findings"]
        ]
        return result
