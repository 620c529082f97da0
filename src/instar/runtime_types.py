"""typing's NamedTuple, Protocol, Generic, TypeVar and cast, without importing typing.

Every instar command starts a new Python process, and ``import typing`` costs
more there than anything instar itself does before its work begins: it loads
``re`` and ``enum`` with it, about 30 million instructions (8 ms) on every
command and again in every worker that has to import it. mypy reads the
definitions under ``TYPE_CHECKING`` (typing's own, so every check is kept);
at run time the stand-ins below give the same behaviour instar relies on:

- ``class X(NamedTuple)`` with annotated fields, defaults, methods and
  properties becomes the class ``collections.namedtuple`` makes;
- ``class P(Protocol)`` is a plain class (instar never checks a protocol
  with isinstance);
- ``Generic[T]`` subscripts to the class itself; ``TypeVar`` is only a name;
- ``cast`` returns its value.

Names used only in annotations (``Any``, ``Literal``, ``IO``...) are imported
from typing under ``if TYPE_CHECKING:`` where they are used.
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Generic, NamedTuple, Protocol, TypeVar, cast
else:
    from collections import namedtuple

    _CLASS_KEYS = frozenset(("__module__", "__qualname__", "__annotations__"))

    class _NamedTupleType(type):
        """Turns ``class X(NamedTuple)`` into ``collections.namedtuple``'s class."""

        def __new__(mcls, name, bases, namespace):
            if not bases:  # NamedTuple itself
                return super().__new__(mcls, name, bases, namespace)
            fields = tuple(namespace.get("__annotations__", {}))
            defaults = [namespace[field] for field in fields if field in namespace]
            cls = namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            for key, value in namespace.items():
                if key not in _CLASS_KEYS and key not in fields:
                    setattr(cls, key, value)
            cls.__qualname__ = namespace["__qualname__"]
            return cls

    class NamedTuple(metaclass=_NamedTupleType):
        pass

    class Protocol:
        __slots__ = ()

    class Generic:
        __slots__ = ()

        def __class_getitem__(cls, _parameters):
            return cls

    def TypeVar(name, *_constraints, **_options):
        return name

    def cast(_kind, value):
        return value


__all__ = ["TYPE_CHECKING", "Generic", "NamedTuple", "Protocol", "TypeVar", "cast"]
