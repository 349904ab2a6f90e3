"""Typed events: parsing, canonical form, round trips, topic checks and decoding of raw bytes."""

from __future__ import annotations

import dataclasses
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import INVALID_EVENT_CODES, EngineError, InvalidEvent
from engine.events import (
    BROWSE_ACTIONS,
    EVENT_TYPES,
    BrowseEvent,
    Event,
    PurchaseEvent,
    PurchaseItem,
    SearchEvent,
    decode_event,
    event_to_dict,
    parse_event,
)

BROWSE: dict[str, Any] = {
    "event_id": "e-1",
    "user_id": "u-1",
    "type": "browse",
    "ts": 1_700_000_000_000,
    "item_id": "i-1",
    "category": "shoes",
    "price": 40,
}
SEARCH: dict[str, Any] = {
    "event_id": "e-2",
    "user_id": "u-1",
    "type": "search",
    "ts": 1_700_000_000_001,
    "query": "red shoes",
}
PURCHASE: dict[str, Any] = {
    "event_id": "e-3",
    "user_id": "u-1",
    "type": "purchase",
    "ts": 1_700_000_000_002,
    "order_id": "o-1",
    "items": [
        {"item_id": "i-1", "category": "shoes", "price": 40, "quantity": 1},
        {"item_id": "i-2", "category": "socks", "price": 4.5, "quantity": 2},
    ],
    "amount": 49.0,
    "offer_id": "spring:e-1",
}


def with_(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**doc, **changes}


def rejected(obj: object, **kwargs: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(obj, **kwargs)
    assert info.value.code in INVALID_EVENT_CODES
    return info.value


# -- parsing ------------------------------------------------------------------------------------


def test_constants() -> None:
    assert EVENT_TYPES == ("browse", "search", "purchase")
    assert BROWSE_ACTIONS == ("view", "cart", "favorite")


def test_parse_browse_applies_defaults_and_stores_numbers_as_float() -> None:
    event = parse_event(BROWSE)
    assert event == BrowseEvent(
        event_id="e-1",
        user_id="u-1",
        ts=1_700_000_000_000,
        item_id="i-1",
        category="shoes",
        price=40.0,
        action="view",
    )
    assert event.type == "browse"
    assert type(event.price) is float
    assert parse_event(with_(BROWSE, action=None)) == event
    assert parse_event(with_(BROWSE, action="favorite")).action == "favorite"  # type: ignore[union-attr]


def test_parse_search_and_purchase() -> None:
    search = parse_event(SEARCH)
    assert search == SearchEvent(
        event_id="e-2", user_id="u-1", ts=1_700_000_000_001, query="red shoes", category=None
    )
    assert search.type == "search"
    purchase = parse_event(PURCHASE)
    assert isinstance(purchase, PurchaseEvent)
    assert purchase.type == "purchase"
    assert purchase.items == (
        PurchaseItem(item_id="i-1", category="shoes", price=40.0, quantity=1),
        PurchaseItem(item_id="i-2", category="socks", price=4.5, quantity=2),
    )
    assert (purchase.amount, purchase.offer_id) == (49.0, "spring:e-1")
    assert parse_event(with_(PURCHASE, offer_id=None)).offer_id is None  # type: ignore[union-attr]


def test_unknown_fields_are_ignored() -> None:
    noisy = with_(BROWSE, schema_version=1, session="s-9", nested={"a": [1, 2]})
    assert parse_event(noisy) == parse_event(BROWSE)


def test_integral_floats_count_as_integers_as_in_json_schema() -> None:
    event = parse_event(with_(BROWSE, ts=1_700_000_000_000.0))
    assert event.ts == 1_700_000_000_000
    assert type(event.ts) is int
    item = with_(PURCHASE["items"][0], quantity=3.0)
    purchase = parse_event(with_(PURCHASE, items=[item]))
    assert type(purchase.items[0].quantity) is int  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (with_(BROWSE, ts=True), "ts"),
        (with_(BROWSE, price=True), "price"),
        (with_(BROWSE, schema_version=True), "schema_version"),
        (with_(PURCHASE, amount=False), "amount"),
        (with_(PURCHASE, items=[with_(PURCHASE["items"][0], quantity=True)]), "items[0].quantity"),
    ],
)
def test_json_booleans_are_not_numbers(doc: dict[str, Any], field: str) -> None:
    error = rejected(doc)
    assert (error.code, error.field) == ("wrong_type", field)
    assert "boolean" in str(error)


def test_error_names_the_field_and_what_was_expected() -> None:
    error = rejected(
        with_(PURCHASE, items=[PURCHASE["items"][0], with_(PURCHASE["items"][1], price=-2)])
    )
    assert (error.code, error.field) == ("out_of_range", "items[1].price")
    assert str(error) == "field 'items[1].price' must be a number from 0 to 1e12, got -2"
    missing = rejected({k: v for k, v in SEARCH.items() if k != "query"})
    assert (missing.code, missing.field) == ("missing_field", "query")
    assert "'query'" in str(missing)


def test_error_messages_do_not_echo_long_user_strings() -> None:
    error = rejected(with_(BROWSE, type="t" * 10_000))
    assert error.code == "unknown_type"
    assert len(str(error)) < 200


def test_non_finite_and_huge_numbers_are_rejected_not_crashing() -> None:
    # Unreachable from JSON text, but parse_event may be handed Python objects directly.
    for bad in (math.nan, math.inf, 10**400):
        assert rejected(with_(BROWSE, price=bad)).code == "out_of_range"
    assert rejected(with_(BROWSE, ts=math.inf)).code == "wrong_type"


# -- topic checks -----------------------------------------------------------------------------


def test_expected_type_accepts_a_match() -> None:
    assert parse_event(SEARCH, expected_type="search") == parse_event(SEARCH)


def test_expected_type_mismatch() -> None:
    error = rejected(SEARCH, expected_type="browse")
    assert (error.code, error.field) == ("type_topic_mismatch", "type")
    assert "events.search" in str(error)  # says where the event belongs


def test_expected_type_must_be_an_event_type() -> None:
    with pytest.raises(ValueError, match="expected_type"):
        parse_event(SEARCH, expected_type="offers")


def test_unknown_type_wins_over_expected_type() -> None:
    assert rejected(with_(BROWSE, type="click"), expected_type="browse").code == "unknown_type"


# -- decoding raw message values -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff\xfe", b'{"event_id": "\xed\xa0\x80"}', b"{", b"{'a': 1}", b"NaN", b"[1,]", None],
    ids=[
        "empty",
        "not-utf8",
        "surrogate",
        "truncated",
        "single-quotes",
        "nan",
        "trailing-comma",
        "tombstone",
    ],
)
def test_decode_event_rejects_bytes_that_are_not_json(raw: bytes | None) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize("raw", [b"[]", b"null", b'"browse"', b"42", b"true"])
def test_decode_event_rejects_json_that_is_not_an_object(raw: bytes) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw)
    assert info.value.code == "not_an_object"


def test_decode_event_accepts_bytes_like_and_str() -> None:
    raw = orjson.dumps(PURCHASE)
    expected = parse_event(PURCHASE)
    for value in (raw, bytearray(raw), memoryview(raw), raw.decode()):
        assert decode_event(value, expected_type="purchase") == expected


def test_decode_event_size_limit() -> None:
    raw = orjson.dumps(BROWSE)
    assert decode_event(raw, max_bytes=len(raw)) == parse_event(BROWSE)
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw, max_bytes=len(raw) - 1)
    assert info.value.code == "too_large"


def test_decode_event_passes_topic_and_field_errors_through() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(orjson.dumps(BROWSE), expected_type="purchase")
    assert info.value.code == "type_topic_mismatch"
    with pytest.raises(InvalidEvent) as info:
        decode_event(orjson.dumps(with_(BROWSE, price="9.99")))
    assert (info.value.code, info.value.field) == ("wrong_type", "price")


# -- round trip ---------------------------------------------------------------------------------

ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=128)  # JSON-safe
money = st.floats(min_value=0, max_value=1e12, allow_nan=False)
epoch_ms = st.integers(0, 2**53 - 1)
common = {"event_id": ids, "user_id": ids, "ts": epoch_ms}
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        BrowseEvent,
        item_id=ids,
        category=ids,
        price=money,
        action=st.sampled_from(BROWSE_ACTIONS),
        **common,
    ),
    st.builds(
        SearchEvent,
        query=st.text(st.characters(codec="utf-8"), max_size=512),
        category=st.none() | ids,
        **common,
    ),
    st.builds(
        PurchaseEvent,
        order_id=ids,
        items=st.lists(
            st.builds(
                PurchaseItem,
                item_id=ids,
                category=ids,
                price=money,
                quantity=st.integers(1, 2**53 - 1),
            ),
            min_size=1,
            max_size=5,
        ).map(tuple),
        amount=money,
        offer_id=st.none() | ids,
        **common,
    ),
)


@settings(max_examples=300)
@given(events)
def test_round_trip_through_the_canonical_dict_and_json(event: Event) -> None:
    canonical = event_to_dict(event)
    assert canonical["schema_version"] == 1
    assert canonical["type"] == event.type
    assert parse_event(canonical) == event
    assert parse_event(canonical, expected_type=event.type) == event
    assert decode_event(orjson.dumps(canonical)) == event


def test_canonical_dict_omits_absent_optionals_and_spells_out_defaults() -> None:
    assert event_to_dict(parse_event(SEARCH)) == {"schema_version": 1, **SEARCH}
    browse = event_to_dict(parse_event(BROWSE))
    assert browse == {"schema_version": 1, **BROWSE, "price": 40.0, "action": "view"}
    assert "offer_id" not in event_to_dict(parse_event(with_(PURCHASE, offer_id=None)))


# -- the types themselves ----------------------------------------------------------------------


def test_events_are_frozen_hashable_and_slotted() -> None:
    event = parse_event(PURCHASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.ts = 0  # type: ignore[misc]
    assert hash(event) == hash(parse_event(PURCHASE))
    assert not hasattr(event, "__dict__")
    assert "type" not in {f.name for f in dataclasses.fields(event)}  # fixed by the class


def test_invalid_event_is_an_engine_error_and_survives_pickling() -> None:
    error = rejected(with_(BROWSE, price=-1))
    assert isinstance(error, EngineError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.field, str(copy)) == (error.code, error.field, str(error))
    assert "out_of_range" in repr(copy)


def test_engine_events_imports_no_io_libraries() -> None:
    code = (
        "import sys, engine.events\n"
        "bad = {'faust', 'aiokafka', 'redis'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
