"""typing's NamedTuple, Protocol, Generic, TypeVar and cast, and enum's Enum, without
importing typing or enum.

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
- ``cast`` returns its value;
- ``class K(Enum)`` with constant members (``DATA = "data"``) gets members
  with ``name`` and ``value``, enum's repr and str, iteration in order,
  lookup by value (``K("data")``), and pickling and copying by name. (enum
  itself costs about 17 million instructions to import, and ``re`` loads it.)

Names used only in annotations (``Any``, ``Literal``, ``IO``...) are imported
from typing under ``if TYPE_CHECKING:`` where they are used.
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from enum import Enum
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

    class _EnumType(type):
        """Makes each constant of an ``Enum`` subclass's body a member."""

        def __new__(mcls, name, bases, namespace):
            cls = super().__new__(mcls, name, bases, namespace)
            members = {}
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or isinstance(
                        value, property | classmethod | staticmethod):
                    continue
                member = object.__new__(cls)
                member._name_, member._value_ = key, value
                setattr(cls, key, member)
                members[key] = member
            cls._members_ = members
            cls._by_value_ = {member._value_: member for member in members.values()}
            return cls

        def __iter__(cls):
            return iter(cls._members_.values())

        def __len__(cls):
            return len(cls._members_)

        def __contains__(cls, member):
            return isinstance(member, cls) and member._name_ in cls._members_

        def __call__(cls, value):
            if isinstance(value, cls):
                return value
            try:
                return cls._by_value_[value]
            except (KeyError, TypeError):
                raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

    class Enum(metaclass=_EnumType):
        __slots__ = ("_name_", "_value_")

        @property
        def name(self):
            return self._name_

        @property
        def value(self):
            return self._value_

        def __repr__(self):
            return f"<{type(self).__name__}.{self._name_}: {self._value_!r}>"

        def __str__(self):
            return f"{type(self).__name__}.{self._name_}"

        def __reduce_ex__(self, _protocol):
            return getattr, (type(self), self._name_)

        def __copy__(self):
            return self

        def __deepcopy__(self, _memo):
            return self


__all__ = ["TYPE_CHECKING", "Enum", "Generic", "NamedTuple", "Protocol", "TypeVar", "cast"]
