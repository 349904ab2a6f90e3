"""The JSON Schema files are valid, and the hand-written event validator cannot drift from them.

``parse_event`` is written by hand for speed; ``schemas/event.v1.json`` is the public contract.
The property test below feeds both the same documents (valid events and mutated ones) and
requires that ``decode_event`` accepts a document exactly when the schema does.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from engine.errors import INVALID_EVENT_CODES, InvalidEvent
from engine.events import decode_event, event_to_dict, parse_event

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA_FILES = ("event.v1.json", "offer.v1.json", "decision.v1.json", "training.v1.json")
MAX_INT = 2**53 - 1


@cache
def load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    return schema


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(name))


def schema_accepts(doc: object) -> bool:
    return bool(validator("event.v1.json").is_valid(doc))


def engine_accepts(raw: bytes) -> tuple[bool, InvalidEvent | None]:
    try:
        decode_event(raw)
    except InvalidEvent as exc:
        return False, exc
    return True, None


# -- the schema files themselves -----------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_file_is_valid_draft_2020_12(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://dealstream.dev/schemas/{name}"
    assert schema["title"] and schema["description"]
    assert schema["additionalProperties"] is True  # unknown fields are ignored, never rejected


# -- documents used by the explicit examples ------------------------------------------------


def browse(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": "e-1",
        "user_id": "u-1",
        "type": "browse",
        "ts": 1_700_000_000_000,
        "item_id": "i-1",
        "category": "shoes",
        "price": 49.9,
        "action": "cart",
    }
    return _apply(doc, changes)


def search(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": "e-2",
        "user_id": "u-1",
        "type": "search",
        "ts": 1_700_000_000_500,
        "query": "running shoes",
    }
    return _apply(doc, changes)


def purchase(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": "e-3",
        "user_id": "u-1",
        "type": "purchase",
        "ts": 1_700_000_001_000,
        "order_id": "o-1",
        "items": [{"item_id": "i-1", "category": "shoes", "price": 49.9, "quantity": 2}],
        "amount": 99.8,
    }
    return _apply(doc, changes)


_DELETE = object()


def _apply(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if value is _DELETE:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def item(**changes: Any) -> dict[str, Any]:
    return _apply({"item_id": "i-2", "category": "socks", "price": 5, "quantity": 1}, changes)


VALID_EXAMPLES: list[dict[str, Any]] = [
    browse(),
    browse(action=_DELETE),
    browse(action=None),
    browse(price=0),
    browse(price=-0.0),
    browse(ts=0),
    browse(ts=MAX_INT),
    browse(ts=1_700_000_000_000.0),  # JSON Schema: an integer is a number with no fraction
    browse(schema_version=1),
    browse(schema_version=None),
    browse(extra={"anything": [1, 2]}, session_id="s"),
    browse(event_id="x" * 128, user_id="é" * 128),
    search(),
    search(query=""),
    search(query="q" * 512),
    search(category="shoes"),
    search(category=None),
    purchase(),
    purchase(offer_id="offer-1"),
    purchase(offer_id=None),
    purchase(items=[item()] * 500),
    purchase(items=[item(quantity=3.0, extra=True)]),
    purchase(amount=0),
]

INVALID_EXAMPLES: list[tuple[object, str, str | None]] = [
    ([], "not_an_object", None),
    ("browse", "not_an_object", None),
    (browse(type=_DELETE), "missing_field", "type"),
    (browse(type="click"), "unknown_type", "type"),
    (browse(type=None), "wrong_type", "type"),
    (browse(event_id=_DELETE), "missing_field", "event_id"),
    (browse(event_id=""), "too_short", "event_id"),
    (browse(user_id="u" * 129), "too_long", "user_id"),
    (browse(user_id=42), "wrong_type", "user_id"),
    (browse(ts=_DELETE), "missing_field", "ts"),
    (browse(ts=True), "wrong_type", "ts"),  # bool is an int in Python, never in JSON
    (browse(ts=-1), "out_of_range", "ts"),
    (browse(ts=MAX_INT + 1), "out_of_range", "ts"),
    (browse(ts=1.5), "wrong_type", "ts"),
    (browse(ts="1700000000000"), "wrong_type", "ts"),
    (browse(schema_version=2), "unsupported_version", "schema_version"),
    (browse(schema_version=True), "wrong_type", "schema_version"),
    (browse(schema_version="1"), "wrong_type", "schema_version"),
    (browse(price=_DELETE), "missing_field", "price"),
    (browse(price=-0.01), "out_of_range", "price"),
    (browse(price=False), "wrong_type", "price"),
    (browse(price="9.99"), "wrong_type", "price"),
    (browse(item_id=None), "wrong_type", "item_id"),
    (browse(category=_DELETE), "missing_field", "category"),
    (browse(action="buy"), "invalid_choice", "action"),
    (browse(action="View"), "invalid_choice", "action"),
    (browse(action=1), "wrong_type", "action"),
    (search(query=_DELETE), "missing_field", "query"),
    (search(query="q" * 513), "too_long", "query"),
    (search(query=None), "wrong_type", "query"),
    (search(category=""), "too_short", "category"),
    (search(category=["shoes"]), "wrong_type", "category"),
    (purchase(order_id=_DELETE), "missing_field", "order_id"),
    (purchase(items=_DELETE), "missing_field", "items"),
    (purchase(items=[]), "out_of_range", "items"),
    (purchase(items=[item()] * 501), "out_of_range", "items"),
    (purchase(items={"0": item()}), "wrong_type", "items"),
    (purchase(items=[item(), "i-3"]), "wrong_type", "items[1]"),
    (purchase(items=[item(quantity=0)]), "out_of_range", "items[0].quantity"),
    (purchase(items=[item(), item(quantity=True)]), "wrong_type", "items[1].quantity"),
    (purchase(items=[item(quantity=1.5)]), "wrong_type", "items[0].quantity"),
    (purchase(items=[item(price=-1)]), "out_of_range", "items[0].price"),
    (purchase(items=[item(category=_DELETE)]), "missing_field", "items[0].category"),
    (purchase(amount=-5), "out_of_range", "amount"),
    (purchase(amount=None), "wrong_type", "amount"),
    (purchase(offer_id=""), "too_short", "offer_id"),
    (purchase(offer_id=7), "wrong_type", "offer_id"),
]


@pytest.mark.parametrize("doc", VALID_EXAMPLES)
def test_valid_examples_pass_both_validators(doc: dict[str, Any]) -> None:
    assert schema_accepts(doc)
    parsed = parse_event(doc)
    assert schema_accepts(event_to_dict(parsed))


@pytest.mark.parametrize(("doc", "code", "field"), INVALID_EXAMPLES)
def test_invalid_examples_fail_both_validators(doc: object, code: str, field: str | None) -> None:
    assert not schema_accepts(doc)
    with pytest.raises(InvalidEvent) as info:
        parse_event(doc)
    assert (info.value.code, info.value.field) == (code, field)
    assert code in INVALID_EVENT_CODES
    if field is not None:
        assert repr(field) in str(info.value)  # the message names the field


# -- the "cannot drift" property -----------------------------------------------------------

# Everything below stays inside what JSON (and orjson) can carry: no NaN or infinity, no lone
# surrogates, integers within 64 bits.
text = st.text(st.characters(codec="utf-8"), max_size=12)
ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=16)
money = st.integers(0, 10**7) | st.floats(0, 1e9, allow_nan=False, allow_infinity=False)
epoch_ms = st.integers(0, MAX_INT) | st.integers(0, 2**40).map(float)
EDGE_VALUES: list[object] = [
    None, True, False, 0, 1, -1, 0.0, -0.0, 0.5, -0.5, 1.0, 1.5, 2.0, -1e-9, 1e300, -1e300,
    MAX_INT, MAX_INT + 1, float(MAX_INT + 1), 2**63 - 1, -(2**63), 2**64 - 1,
    "", "x", "x" * 127, "x" * 128, "x" * 129, "é" * 128, "é" * 129,
    "x" * 511, "x" * 512, "x" * 513, "0", "1", "1.5",
    "view", "cart", "favorite", "buy", "View", "browse", "search", "purchase",
    [], {}, [1], {"a": 1}, [{"item_id": "i", "category": "c", "price": 1, "quantity": 1}],
]  # fmt: skip
edge_values = st.sampled_from(EDGE_VALUES)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
any_value = st.one_of(edge_values, edge_values, edge_values, json_values)  # mostly near misses
NEAR_MISSES: dict[type, list[object]] = {  # by the type of the value being replaced
    str: ["", "x" * 128, "x" * 129, "x" * 512, "x" * 513, "buy", None, 1, True, ["x"]],
    int: [-1, 0, 1.0, 1.5, True, False, MAX_INT, MAX_INT + 1, float(MAX_INT + 1), "1", None],
    float: [-1e-9, -0.0, 0, 0.5, True, False, 1e300, "1.5", None, [1.5]],
}


def replacement(current: object) -> st.SearchStrategy[object]:
    near = NEAR_MISSES.get(type(current))
    return any_value if near is None else st.one_of(st.sampled_from(near), any_value)


EVENT_KEYS = (
    "event_id", "user_id", "type", "ts", "schema_version", "item_id", "category", "price",
    "action", "query", "order_id", "items", "amount", "offer_id", "extra",
)  # fmt: skip
ITEM_KEYS = ("item_id", "category", "price", "quantity", "extra")

common = {"event_id": ids, "user_id": ids, "ts": epoch_ms}
optional_common = {"schema_version": st.sampled_from([1, 1.0, None]), "extra": json_values}
purchase_items = st.fixed_dictionaries(
    {"item_id": ids, "category": ids, "price": money, "quantity": st.integers(1, 1000)}
)
valid_events = st.one_of(
    st.fixed_dictionaries(
        {**common, "type": st.just("browse"), "item_id": ids, "category": ids, "price": money},
        optional={**optional_common, "action": st.sampled_from(["view", "cart", "favorite", None])},
    ),
    st.fixed_dictionaries(
        {**common, "type": st.just("search"), "query": text},
        optional={**optional_common, "category": ids | st.none()},
    ),
    st.fixed_dictionaries(
        {
            **common,
            "type": st.just("purchase"),
            "order_id": ids,
            "items": st.lists(purchase_items, min_size=1, max_size=4),
            "amount": money,
        },
        optional={**optional_common, "offer_id": ids | st.none()},
    ),
)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> object:
    """A valid event, usually with one mutation (a field deleted or replaced, items broken)."""
    doc: Any = copy.deepcopy(draw(base))
    ops = ["delete", "set", "set", "set", "item_delete", "item_set", "item_set", "item_replace"]
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))):
        op = draw(st.sampled_from([*ops, "items_count"]))
        items = doc.get("items")
        if op == "delete" and doc:
            del doc[draw(st.sampled_from(sorted(doc)))]
        elif op == "set":
            present = [st.sampled_from(sorted(doc))] * 3 if doc else []  # doc may be emptied
            key = draw(st.one_of(*present, st.sampled_from(EVENT_KEYS)))
            doc[key] = draw(replacement(doc.get(key)))
        elif op.startswith("item") and isinstance(items, list) and items:
            index = draw(st.integers(0, len(items) - 1))
            target = items[index]
            if op == "items_count":
                size = draw(st.sampled_from([0, 501]))  # 1, 499, 500: the exhaustive test
                doc["items"] = (items * size)[:size]
            elif op == "item_replace":
                items[index] = draw(any_value)
            elif isinstance(target, dict) and op == "item_delete" and target:
                del target[draw(st.sampled_from(sorted(target)))]
            elif isinstance(target, dict) and op == "item_set":
                keys = sorted(target) or ITEM_KEYS  # an item may have been emptied
                key = draw(st.sampled_from(keys) | st.sampled_from(ITEM_KEYS))
                target[key] = draw(replacement(target.get(key)))
    if draw(st.integers(0, 49)) == 0:
        return draw(json_scalars | st.lists(json_scalars, max_size=2))  # not an object at all
    return doc


def _disagreements(docs: list[object]) -> list[str]:
    found = []
    for doc in docs:
        raw = orjson.dumps(doc)
        decoded = orjson.loads(raw)
        by_engine, error = engine_accepts(raw)
        if schema_accepts(decoded) != by_engine:
            found.append(f"{decoded!r:.200}: schema {not by_engine}, engine {by_engine} {error!r}")
    return found


@pytest.mark.parametrize(
    "base",
    [
        browse(),
        browse(action=_DELETE),
        search(),
        search(category="c"),
        purchase(),
        purchase(offer_id="o"),
    ],
    ids=["browse", "browse-no-action", "search", "search-category", "purchase", "purchase-offer"],
)
def test_every_single_field_mutation_agrees_with_json_schema(base: dict[str, Any]) -> None:
    """Exhaustive over (field, edge value): the deterministic half of the "cannot drift" check."""
    docs: list[object] = []
    for key in EVENT_KEYS:
        docs.append(_apply(copy.deepcopy(base), {key: _DELETE}))
        docs.extend(_apply(copy.deepcopy(base), {key: value}) for value in EDGE_VALUES)
    if "items" in base:
        for key in ITEM_KEYS:
            for value in [_DELETE, *EDGE_VALUES]:
                docs.append(_apply(copy.deepcopy(base), {"items": [item(), item(**{key: value})]}))
        docs.extend(_apply(copy.deepcopy(base), {"items": [value]}) for value in EDGE_VALUES)
        docs.extend(
            _apply(copy.deepcopy(base), {"items": [item()] * n}) for n in (1, 499, 500, 501)
        )
    docs.extend(EDGE_VALUES)  # not an object at all
    assert _disagreements(docs) == []


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(valid_events))
def test_hand_written_validator_agrees_with_json_schema(doc: object) -> None:
    raw = orjson.dumps(doc)
    decoded = orjson.loads(raw)  # what a consumer actually sees
    by_schema = schema_accepts(decoded)
    by_engine, error = engine_accepts(raw)
    event("valid" if by_schema else "invalid")
    if by_schema != by_engine:
        reasons = [e.message for e in validator("event.v1.json").iter_errors(decoded)]
        pytest.fail(f"drift on {decoded!r}: schema errors {reasons}, engine error {error!r}")
    if error is not None:
        assert error.code in INVALID_EVENT_CODES


@settings(max_examples=200, deadline=None)
@given(valid_events)
def test_generated_valid_events_are_accepted_and_round_trip(doc: dict[str, Any]) -> None:
    assert schema_accepts(doc)
    parsed = parse_event(doc)
    canonical = event_to_dict(parsed)
    assert schema_accepts(canonical)
    assert parse_event(canonical) == parsed
    assert decode_event(orjson.dumps(canonical)) == parsed


# -- the produced contracts: offer, decision, training example ------------------------------


def offer(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "offer_id": "spring-10:e-1",
        "user_id": "u-1",
        "campaign": "spring",
        "discount_pct": 10,
        "issued_at": 1_700_000_000_000,
        "expires_at": 1_700_086_400_000,
        "trigger_event_id": "e-1",
        "p_purchase": 0.12,
        "model_version": "logreg-42",
        "policy": "epsilon-greedy",
        "propensity": 0.9,
        "explore": False,
        "reasons": [{"feature": "cart_count_24h", "contribution": 0.8}],
        "rules": ["max_discount_pct"],
    }
    return _apply(doc, changes)


def decision(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "decision_id": "d-1",
        "user_id": "u-1",
        "campaign": "spring",
        "ts": 1_700_000_000_000,
        "trigger_event_id": "e-1",
        "features": {"cart_count_24h": 2, "spend_30d": 120.5},
        "discount_pct": 10,
        "propensity": 1.0,
        "p_purchase": 0.12,
        "model_version": "logreg-42",
        "policy": "greedy",
        "holdout": False,
        "offer_id": "spring-10:e-1",
    }
    return _apply(doc, changes)


def training(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "decision_id": "d-1",
        "features": {"cart_count_24h": 2},
        "discount_pct": 10,
        "label": 1,
        "labeled_at": 1_700_000_500_000,
    }
    return _apply(doc, changes)


CONTRACT_EXAMPLES: list[tuple[str, dict[str, Any], bool]] = [
    ("offer.v1.json", offer(), True),
    ("offer.v1.json", offer(reasons=[], rules=[], explore=True, discount_pct=0), True),
    ("offer.v1.json", offer(future_field="ignored"), True),
    ("offer.v1.json", offer(explore=_DELETE), False),
    ("offer.v1.json", offer(schema_version=2), False),
    ("offer.v1.json", offer(discount_pct=100.5), False),
    ("offer.v1.json", offer(propensity=1.5), False),
    ("offer.v1.json", offer(p_purchase=-0.1), False),
    ("offer.v1.json", offer(explore=1), False),
    ("offer.v1.json", offer(issued_at=True), False),
    ("offer.v1.json", offer(reasons=[{"feature": "x"}]), False),
    ("offer.v1.json", offer(rules=[1]), False),
    ("offer.v1.json", offer(offer_id="x" * 129), False),
    ("decision.v1.json", decision(), True),
    ("decision.v1.json", decision(holdout=True, offer_id=None, discount_pct=0), True),
    ("decision.v1.json", decision(reward=1), True),  # a decision-log line for OPE
    ("decision.v1.json", decision(offer_id=_DELETE), False),
    ("decision.v1.json", decision(features={"x": "high"}), False),
    ("decision.v1.json", decision(features={"x": True}), False),
    ("decision.v1.json", decision(holdout="no"), False),
    ("decision.v1.json", decision(ts=-1), False),
    ("training.v1.json", training(), True),
    ("training.v1.json", training(label=0), True),
    ("training.v1.json", training(label=2), False),
    ("training.v1.json", training(label=True), False),
    ("training.v1.json", training(labeled_at=_DELETE), False),
]


@pytest.mark.parametrize(("name", "doc", "valid"), CONTRACT_EXAMPLES)
def test_contract_examples(name: str, doc: dict[str, Any], valid: bool) -> None:
    assert validator(name).is_valid(doc) is valid
