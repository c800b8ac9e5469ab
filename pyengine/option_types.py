"""Option values checked against their declared types: one mechanism for every technique.

``bool`` takes only True/False, ``int`` only integers, ``float`` any real number, ``str``
only strings; ``tuple[X, ...]`` takes a list or tuple of X (or one X, wrapped), never a
string for numbers; ``X | None`` also takes None; ``Any`` is left to the option's own checks.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from pyengine.errors import OptionsError

_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


_DECLARED: dict[type, dict[str, Any]] = {}


def declared_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of a dataclass; {} when the hints cannot be resolved."""
    if cls not in _DECLARED:
        try:
            _DECLARED[cls] = typing.get_type_hints(cls)
        except (NameError, TypeError):
            _DECLARED[cls] = {}
    return _DECLARED[cls]


def _is_scalar(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def describe(hint: Any) -> str:
    """What a value of this type looks like, for the error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _EXPECTED:
        return _EXPECTED[hint]
    if origin in (types.UnionType, typing.Union):
        return " or ".join("none" if a is type(None) else describe(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_PLURAL[args[0]]}" if args[0] in _PLURAL else "a list"
    if origin is tuple:
        kinds = set(args)
        item = _PLURAL[args[0]] if len(kinds) == 1 and args[0] in _PLURAL else "values"
        return f"a list of {len(args)} {item}"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a table (name -> value)"
    return getattr(hint, "__name__", str(hint))


def conform(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits ``hint`` (a single item for a variable tuple is wrapped); else an
    OptionsError naming the option, the value and the expected form."""
    checked = _conform(value, hint)
    if checked is _MISMATCH:
        raise OptionsError(f"option {name}={value!r} is invalid: expected {describe(hint)}")
    return checked


_MISMATCH = object()


def _conform(value: Any, hint: Any) -> Any:
    if hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if hint in _EXPECTED:
        return value if _is_scalar(value, hint) else _MISMATCH
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for option in args:
            if option is type(None):
                if value is None:
                    return value
                continue
            checked = _conform(value, option)
            if checked is not _MISMATCH:
                return checked
        return _MISMATCH
    if origin is tuple:
        variable = len(args) == 2 and args[1] is Ellipsis
        if variable and not isinstance(value, (list, tuple)):
            value = (value,)  # one item for a list of them
        if not isinstance(value, (list, tuple)) or (not variable and len(value) != len(args)):
            return _MISMATCH
        items = [_conform(v, args[0]) for v in value] if variable else [_conform(v, a) for v, a in zip(value, args)]
        return _MISMATCH if any(i is _MISMATCH for i in items) else tuple(items)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return value if isinstance(value, Mapping) else _MISMATCH
    return value  # other declared types (tensors, classes) are checked by the option itself
