"""Names to methods: the one place that turns an option value into code, and rejects unknown ones.

Each method module registers itself with :func:`register`; the CLI lists the choices with
:func:`names`. The public reference code silently fell back to k-means on a misspelled
clustering name; here an unknown name is always an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from moemerge.errors import MoemergeError

F = TypeVar("F", bound=Callable)

_REGISTRY: dict[str, dict[str, Callable]] = {}
_NEEDS: dict[tuple[str, str], frozenset[str]] = {}


def register(kind: str, name: str, needs: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator: make ``fn`` (a function, or a rule object such as a MergeRule) option value ``name`` of ``kind``.

    ``needs``: the optional calibration statistics it reads (fields of
    :class:`moemerge.statistics.LayerStatistics`), which the calibration pass then collects.
    """

    def add(fn: F) -> F:
        table = _REGISTRY.setdefault(kind, {})
        if name in table:
            raise ValueError(f"{kind} {name!r} registered twice")
        table[name] = fn
        _NEEDS[kind, name] = frozenset(needs)
        return fn

    return add


def needs(kind: str, name: str) -> frozenset[str]:
    """The optional statistics that ``name`` of ``kind`` declared it reads (see :func:`register`)."""
    resolve(kind, name)
    return _NEEDS[kind, name]


def names(kind: str) -> list[str]:
    """Registered names of ``kind``, in registration order."""
    return list(_REGISTRY.get(kind, {}))


def resolve(kind: str, name: str) -> Callable:
    """What is registered as ``name`` for ``kind``; unknown names raise MoemergeError."""
    table = _REGISTRY.get(kind, {})
    check_choice(kind, name, list(table))
    return table[name]


def check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    """Raise MoemergeError unless ``value`` is one of ``choices`` (option values that name no function)."""
    if value not in choices:
        raise MoemergeError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")
