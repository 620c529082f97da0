"""`Record`: the base of small mutable records, in place of ``@dataclass``.

Importing ``dataclasses`` pulls in ``inspect`` and ``ast`` (about 20 ms) and
each dataclass costs about 0.7 ms to create, on the start-up path of every
command and of the sandboxed worker, which fetches its modules from the host.
A record lists its fields in ``__slots__`` and writes its own ``__init__``;
`Record` adds what a dataclass would: equality field by field between records
of the same class (and so no hash), a repr naming the fields, and
`as_dict` for code that read ``vars()``. Immutable records are NamedTuples.
"""

from __future__ import annotations

from instar.runtime_types import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any


class Record:
    """Fields in ``__slots__`` (along the class's bases), compared and shown
    as a dataclass compares and shows them."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(name for klass in reversed(cls.__mro__)
                     for name in vars(klass).get("__slots__", ()))

    def as_dict(self) -> dict[str, Any]:
        """The fields and their values, in order (a shallow copy, as ``vars()``)."""
        return {name: getattr(self, name) for name in self._field_names()}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._field_names())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._field_names())
        return f"{type(self).__qualname__}({fields})"
