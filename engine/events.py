"""Event v1: typed events and a fast validator for the decoded JSON (see ``schemas/event.v1.json``).

:func:`parse_event` checks a decoded JSON object by hand (no jsonschema at run time) and accepts
exactly what the JSON Schema accepts; ``tests/unit/test_schemas.py`` keeps the two from drifting.
Unknown extra fields are ignored; optional fields may be absent or ``null``.

>>> event = parse_event({"event_id": "e1", "user_id": "u1", "type": "browse", "ts": 1700000000000,
...                      "item_id": "i9", "category": "shoes", "price": 40})
>>> event
BrowseEvent(event_id='e1', user_id='u1', ts=1700000000000, item_id='i9', category='shoes', \
price=40.0, action='view')
>>> parse_event(event_to_dict(event)) == event
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, TypeAlias, assert_never

import orjson

from engine.errors import InvalidEvent
from engine.event_fields import (
    _MISSING,
    MAX_ID_LENGTH,
    MAX_INTEGER,
    MAX_MONEY,
    MAX_PURCHASE_ITEMS,
    MAX_QUERY_LENGTH,
    _bad_id,
    _id,
    _integer,
    _json_type,
    _missing,
    _money,
    _optional_id,
    _shorten,
    _wrong_type,
)

__all__ = [
    "BROWSE_ACTIONS",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "BrowseAction",
    "BrowseEvent",
    "Event",
    "EventType",
    "PurchaseEvent",
    "PurchaseItem",
    "SearchEvent",
    "decode_event",
    "event_to_dict",
    "parse_event",
]

EventType: TypeAlias = Literal["browse", "search", "purchase"]
BrowseAction: TypeAlias = Literal["view", "cart", "favorite"]

EVENT_TYPES: Final[tuple[EventType, ...]] = ("browse", "search", "purchase")
BROWSE_ACTIONS: Final[tuple[BrowseAction, ...]] = ("view", "cart", "favorite")
SCHEMA_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class BrowseEvent:
    """The user viewed an item, put it in the cart or marked it as a favourite."""

    type: ClassVar[Literal["browse"]] = "browse"
    event_id: str
    user_id: str
    ts: int  #: event time, epoch milliseconds
    item_id: str
    category: str
    price: float
    action: BrowseAction = "view"


@dataclass(frozen=True, slots=True)
class SearchEvent:
    """The user ran a search, optionally restricted to a category."""

    type: ClassVar[Literal["search"]] = "search"
    event_id: str
    user_id: str
    ts: int
    query: str
    category: str | None = None


@dataclass(frozen=True, slots=True)
class PurchaseItem:
    """One order line of a purchase."""

    item_id: str
    category: str
    price: float  #: unit price
    quantity: int


@dataclass(frozen=True, slots=True)
class PurchaseEvent:
    """The user placed an order; ``offer_id`` names the offer redeemed, if any."""

    type: ClassVar[Literal["purchase"]] = "purchase"
    event_id: str
    user_id: str
    ts: int
    order_id: str
    items: tuple[PurchaseItem, ...]
    amount: float
    offer_id: str | None = None


Event: TypeAlias = BrowseEvent | SearchEvent | PurchaseEvent

_ACTIONS: Final[dict[str, BrowseAction]] = {a: a for a in BROWSE_ACTIONS}


# -- per-type parsers ---------------------------------------------------------------------------


def _action(obj: dict[str, Any]) -> BrowseAction:
    value = obj.get("action")
    if value is None:
        return "view"
    action = _ACTIONS.get(value) if type(value) is str else None
    if action is not None:
        return action
    expected = "one of " + ", ".join(map(repr, BROWSE_ACTIONS))
    if type(value) is not str:
        raise _wrong_type("action", expected, value)
    message = f"field 'action' must be {expected}, got {_shorten(value)!r}"
    raise InvalidEvent("invalid_choice", message, "action")


def _parse_browse(obj: dict[str, Any], event_id: str, user_id: str, ts: int) -> BrowseEvent:
    item_id, category, price = obj.get("item_id"), obj.get("category"), obj.get("price")
    raw_action = obj.get("action", "view")
    action = _ACTIONS.get(raw_action) if type(raw_action) is str else None
    if (  # fast path for the common, well-formed event; the slow path below explains
        action is not None
        and type(item_id) is str
        and 0 < len(item_id) <= MAX_ID_LENGTH
        and type(category) is str
        and 0 < len(category) <= MAX_ID_LENGTH
        and type(price) is float
        and 0.0 <= price <= MAX_MONEY
    ):
        return BrowseEvent(event_id, user_id, ts, item_id, category, price, action)
    return BrowseEvent(
        event_id,
        user_id,
        ts,
        _id(obj, "item_id"),
        _id(obj, "category"),
        _money(obj, "price"),
        _action(obj),
    )


def _parse_search(obj: dict[str, Any], event_id: str, user_id: str, ts: int) -> SearchEvent:
    query = obj.get("query", _MISSING)
    if type(query) is not str or len(query) > MAX_QUERY_LENGTH:
        expected = f"a string of at most {MAX_QUERY_LENGTH} characters"
        if query is _MISSING:
            raise _missing("query", expected)
        if type(query) is not str:
            raise _wrong_type("query", expected, query)
        raise InvalidEvent(
            "too_long", f"field 'query' must be {expected}, got {len(query)}", "query"
        )
    return SearchEvent(event_id, user_id, ts, query, _optional_id(obj, "category"))


def _parse_item(value: object, index: int) -> PurchaseItem:
    if type(value) is dict:  # fast path for the common, well-formed order line
        item_id, category = value.get("item_id"), value.get("category")
        price, quantity = value.get("price"), value.get("quantity")
        if (
            type(item_id) is str
            and 0 < len(item_id) <= MAX_ID_LENGTH
            and type(category) is str
            and 0 < len(category) <= MAX_ID_LENGTH
            and type(price) is float
            and 0.0 <= price <= MAX_MONEY
            and type(quantity) is int
            and 1 <= quantity <= MAX_INTEGER
        ):
            return PurchaseItem(item_id, category, price, quantity)
    return _parse_item_checked(value, index)


def _parse_item_checked(value: object, index: int) -> PurchaseItem:
    if not isinstance(value, dict):
        path = f"items[{index}]"
        raise _wrong_type(path, "an object with item_id, category, price, quantity", value)
    return PurchaseItem(
        _id(value, "item_id", index),
        _id(value, "category", index),
        _money(value, "price", index),
        _integer(value, "quantity", 1, index),
    )


def _parse_purchase(obj: dict[str, Any], event_id: str, user_id: str, ts: int) -> PurchaseEvent:
    raw_items = obj.get("items", _MISSING)
    if type(raw_items) is not list or not 0 < len(raw_items) <= MAX_PURCHASE_ITEMS:
        expected = f"an array of 1 to {MAX_PURCHASE_ITEMS} order lines"
        if raw_items is _MISSING:
            raise _missing("items", expected)
        if type(raw_items) is not list:
            raise _wrong_type("items", expected, raw_items)
        message = f"field 'items' must be {expected}, got {len(raw_items)}"
        raise InvalidEvent("out_of_range", message, "items")
    return PurchaseEvent(
        event_id,
        user_id,
        ts,
        _id(obj, "order_id"),
        tuple([_parse_item(value, i) for i, value in enumerate(raw_items)]),
        _money(obj, "amount"),
        _optional_id(obj, "offer_id"),
    )


_Parser: TypeAlias = Callable[[dict[str, Any], str, str, int], Event]
_PARSERS: Final[dict[str, _Parser]] = {
    "browse": _parse_browse,
    "search": _parse_search,
    "purchase": _parse_purchase,
}


def _bad_event_type(value: object) -> InvalidEvent:
    expected = "one of " + ", ".join(map(repr, EVENT_TYPES))
    if value is _MISSING:
        return _missing("type", expected)
    if type(value) is not str:
        return _wrong_type("type", expected, value)
    message = f"field 'type' must be {expected}, got {_shorten(value)!r}"
    return InvalidEvent("unknown_type", message, "type")


def _bad_version(value: object) -> InvalidEvent:
    if type(value) is bool or (type(value) is not int and type(value) is not float):
        return _wrong_type("schema_version", f"{SCHEMA_VERSION} or absent", value)
    message = (
        f"field 'schema_version' is {value!r}, but this engine reads event v{SCHEMA_VERSION} only;"
        " upgrade the engine or publish v1 events"
    )
    return InvalidEvent("unsupported_version", message, "schema_version")


# -- public API ---------------------------------------------------------------------------------


def parse_event(obj: object, *, expected_type: str | None = None) -> Event:
    """Validate a decoded event v1 JSON object and return the typed event.

    ``expected_type`` is the type the source topic carries (``events.browse`` -> ``"browse"``);
    an event of another type raises ``InvalidEvent`` with code ``type_topic_mismatch``.
    Integer-valued numbers such as ``5.0`` count as integers (as in JSON Schema); numbers are
    stored as ``float``. Raises ``InvalidEvent`` naming the field for anything the schema rejects.
    """
    if not isinstance(obj, dict):
        raise InvalidEvent(
            "not_an_object", f"an event must be a JSON object, got {_json_type(obj)}"
        )
    event_type = obj.get("type", _MISSING)
    parser = _PARSERS.get(event_type) if type(event_type) is str else None
    if parser is None:
        raise _bad_event_type(event_type)
    if expected_type is not None and event_type != expected_type:
        if expected_type not in EVENT_TYPES:
            raise ValueError(f"expected_type must be one of {EVENT_TYPES}, got {expected_type!r}")
        raise InvalidEvent(
            "type_topic_mismatch",
            f"a {event_type!r} event arrived where {expected_type!r} events are expected;"
            f" publish it to events.{event_type}",
            "type",
        )
    version = obj.get("schema_version")
    if version is not None and (type(version) is bool or version != SCHEMA_VERSION):
        raise _bad_version(version)
    # The common fields, inlined: this runs for every event.
    event_id = obj.get("event_id", _MISSING)
    if type(event_id) is not str or not 0 < len(event_id) <= MAX_ID_LENGTH:
        raise _bad_id("event_id", event_id)
    user_id = obj.get("user_id", _MISSING)
    if type(user_id) is not str or not 0 < len(user_id) <= MAX_ID_LENGTH:
        raise _bad_id("user_id", user_id)
    ts = obj.get("ts", _MISSING)
    if type(ts) is not int or not 0 <= ts <= MAX_INTEGER:
        ts = _integer(obj, "ts", 0)
    return parser(obj, event_id, user_id, ts)


def decode_event(
    raw: bytes | bytearray | memoryview | str | None,
    *,
    expected_type: str | None = None,
    max_bytes: int | None = None,
) -> Event:
    """Decode a UTF-8 JSON message value and :func:`parse_event` it.

    Raises ``InvalidEvent``: ``invalid_json`` for bytes that are not UTF-8 JSON (or an empty /
    ``None`` value, i.e. a tombstone), ``too_large`` when ``max_bytes`` is set and exceeded
    (counted in characters for ``str``), ``not_an_object`` for JSON that is not an object, and
    the :func:`parse_event` codes.
    """
    if raw is None:
        raise InvalidEvent("invalid_json", "the message has no value (a tombstone?); expected JSON")
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidEvent(
            "too_large", f"the message is {len(raw)} bytes, more than the limit of {max_bytes}"
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("invalid_json", f"the message is not UTF-8 JSON: {exc}") from None
    return parse_event(obj, expected_type=expected_type)


def event_to_dict(event: Event) -> dict[str, Any]:
    """Return the canonical event v1 JSON object for ``event`` (optional ``None`` fields omitted).

    ``parse_event(event_to_dict(e)) == e`` for every event ``e``.
    """
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "type": event.type,
        "ts": event.ts,
    }
    if isinstance(event, BrowseEvent):
        out["item_id"] = event.item_id
        out["category"] = event.category
        out["price"] = event.price
        out["action"] = event.action
    elif isinstance(event, SearchEvent):
        out["query"] = event.query
        if event.category is not None:
            out["category"] = event.category
    elif isinstance(event, PurchaseEvent):
        out["order_id"] = event.order_id
        out["items"] = [
            {
                "item_id": item.item_id,
                "category": item.category,
                "price": item.price,
                "quantity": item.quantity,
            }
            for item in event.items
        ]
        out["amount"] = event.amount
        if event.offer_id is not None:
            out["offer_id"] = event.offer_id
    else:
        assert_never(event)
    return out
