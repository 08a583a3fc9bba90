"""A wrapper that keeps secret values out of reprs, logs, tracebacks and error messages."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Secret(Generic[T]):
    """Holds a secret value; ``repr``/``str``/``format`` never show it.

    Contract: the only way to the value is :meth:`reveal`, so every place that uses a secret is greppable.
    Equality compares the wrapped values (useful in tests); hashing is disabled so a secret cannot end up as
    a dict key that someone prints.
    """

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        """Return the wrapped value. Callers must not log or echo it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and bool(self._value == other._value)

    __hash__ = None  # type: ignore[assignment]
