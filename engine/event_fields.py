"""Field checks for event v1 (``engine/events.py``): limits, readers and their error messages.

The public limits (``MAX_ID_LENGTH``, ``MAX_QUERY_LENGTH``, ``MAX_PURCHASE_ITEMS``,
``MAX_INTEGER``, ``MAX_MONEY``) live here. The readers return the value on the fast path
for well-formed input; only bad input builds an ``InvalidEvent`` that names the field.
Underscore names are internal to this module and ``engine/events.py``.
"""

from __future__ import annotations

from typing import Any, Final

from engine.errors import InvalidEvent

MAX_ID_LENGTH: Final = 128
MAX_QUERY_LENGTH: Final = 512
MAX_PURCHASE_ITEMS: Final = 500
#: Largest integer accepted (2**53 - 1): JSON-safe for every consumer, doubles included.
MAX_INTEGER: Final = 9_007_199_254_740_991

_MISSING: Final = object()
#: Above this an int cannot become a float (only reachable by calling parse_event directly).
_MAX_FLOAT_INT: Final = 2**1023
MAX_MONEY: Final = 1e12
"""Largest accepted price or amount: in cents it stays far below 2**53, where sums are exact
in every store (Redis, Lua, Python) and every JSON reader."""
_EXPECT_ID: Final = f"a string of 1 to {MAX_ID_LENGTH} characters"
_EXPECT_MONEY: Final = "a number from 0 to 1e12"
_JSON_TYPES: Final[dict[type, str]] = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


# -- error construction (slow path only) -----------------------------------------------------


def _path(name: str, item: int) -> str:
    return name if item < 0 else f"items[{item}].{name}"


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value)) or f"a Python {type(value).__name__}"


def _shorten(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


def _missing(path: str, expected: str) -> InvalidEvent:
    return InvalidEvent("missing_field", f"required field {path!r} is missing ({expected})", path)


def _wrong_type(path: str, expected: str, value: object) -> InvalidEvent:
    return InvalidEvent(
        "wrong_type", f"field {path!r} must be {expected}, got {_json_type(value)}", path
    )


def _bad_id(name: str, value: object, item: int = -1) -> InvalidEvent:
    path = _path(name, item)
    if value is _MISSING:
        return _missing(path, _EXPECT_ID)
    if type(value) is not str:
        return _wrong_type(path, _EXPECT_ID, value)
    code = "too_short" if not value else "too_long"
    return InvalidEvent(code, f"field {path!r} must be {_EXPECT_ID}, got {len(value)}", path)


def _bad_number(name: str, value: object, expected: str, item: int = -1) -> InvalidEvent:
    path = _path(name, item)
    if value is _MISSING:
        return _missing(path, expected)
    if type(value) is not float and type(value) is not int:
        return _wrong_type(path, expected, value)
    return InvalidEvent("out_of_range", f"field {path!r} must be {expected}, got {value!r}", path)


# -- field readers: a fast path for good input, then the slow path that explains --------------


def _id(obj: dict[str, Any], name: str, item: int = -1) -> str:
    value = obj.get(name, _MISSING)
    if type(value) is str and 0 < len(value) <= MAX_ID_LENGTH:
        return value
    raise _bad_id(name, value, item)


def _optional_id(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None or (type(value) is str and 0 < len(value) <= MAX_ID_LENGTH):
        return value
    raise _bad_id(name, value)


def _money(obj: dict[str, Any], name: str, item: int = -1) -> float:
    value = obj.get(name, _MISSING)
    kind = type(value)
    if kind is float:
        if 0.0 <= value <= MAX_MONEY:  # also rejects NaN
            return value  # type: ignore[no-any-return]
    elif kind is int and 0 <= value <= MAX_MONEY:
        return float(value)
    raise _bad_number(name, value, _EXPECT_MONEY, item)


def _integer(obj: dict[str, Any], name: str, minimum: int, item: int = -1) -> int:
    value = obj.get(name, _MISSING)
    if type(value) is int and minimum <= value <= MAX_INTEGER:
        return value
    # JSON Schema's "integer" is any number with a zero fractional part, so 5.0 counts.
    if type(value) is float and value.is_integer() and minimum <= value <= MAX_INTEGER:
        return int(value)
    expected = f"an integer from {minimum} to {MAX_INTEGER}"
    if type(value) is float and not value.is_integer():
        raise _wrong_type(_path(name, item), expected, value)
    raise _bad_number(name, value, expected, item)
