"""The engine's Offer and Decision records: their messages are the offer v1 / decision v1
contracts (``schemas/``), byte for byte what the topics carried when results were dicts, and
they read back from those messages unchanged."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tomllib
from functools import cache
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator

from engine.analysis.simulation.world import open_loop
from engine.campaigns import parse_campaigns
from engine.decisions import Decision, Offer
from engine.errors import InvalidEvent
from engine.events import parse_event
from engine.features.store import InMemoryFeatureStore
from engine.pipeline import BatchResult, DiscountEngine, EngineConfig, Incoming
from tests.records import T0, denied_decision, sample_decision, sample_offer

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

OFFER_KEYS = [
    "schema_version",
    "offer_id",
    "user_id",
    "campaign",
    "discount_pct",
    "issued_at",
    "expires_at",
    "trigger_event_id",
    "p_purchase",
    "model_version",
    "policy",
    "propensity",
    "explore",
    "reasons",
    "rules",
]
DECISION_KEYS = [
    "schema_version",
    "decision_id",
    "user_id",
    "campaign",
    "ts",
    "trigger_event_id",
    "features",
    "discount_pct",
    "propensity",
    "p_purchase",
    "model_version",
    "policy",
    "holdout",
    "offer_id",
    "explore",
    "rules",
    "proposed_discount_pct",
    "proposed_propensity",
    "offer_propensity",
    "uplift_score",
]
"""The keys, in the order the engine has always written them."""

CAMPAIGNS = """
[[campaign]]
name = "explore"
policy = "profit"
epsilon = 0.5
holdout = 0.2
decision_interval_s = 60
max_offers_per_day = 2
offer_ttl_s = 600
"""


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / name).read_text(encoding="utf-8")))


def schema_errors(name: str, doc: object) -> list[str]:
    return [error.message for error in validator(name).iter_errors(doc)]


def unpublished(decision: Decision) -> Decision:
    """What a decision read back from its message knows: no order value, no cost."""
    return dataclasses.replace(decision, order_value=None, cost_cents=None)


@cache
def engine_results() -> tuple[BatchResult, ...]:
    """An exploring campaign with a holdout and a daily offer cap over simulated traffic:
    offers, holdout decisions and denied ones."""
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=parse_campaigns(tomllib.loads(CAMPAIGNS)),
        config=EngineConfig(attribution_window_ms=5 * 60 * 1000),
    )
    events = [
        parse_event(orjson.loads(orjson.dumps(doc)))
        for doc in open_loop(users=30, events=1500, seed=5, mean_gap_ms=2000)
    ]
    return tuple(
        asyncio.run(engine.process([Incoming(event) for event in events[start : start + 250]]))
        for start in range(0, len(events), 250)
    )


def engine_offers() -> list[Offer]:
    return [offer for result in engine_results() for offer in result.offers]


def engine_decisions() -> list[Decision]:
    return [decision for result in engine_results() for decision in result.decisions]


# -- to_message: the contract, in the engine's key order ----------------------------------------


def test_offer_message_has_the_contract_keys_in_order_and_validates() -> None:
    message = sample_offer().to_message()
    assert list(message) == OFFER_KEYS
    assert message["reasons"] == [
        {"feature": "cart_count_24h", "contribution": 0.81},
        {"feature": "discount", "contribution": -0.2},
    ]
    assert message["rules"] == ["p_purchase>0.3"]
    assert schema_errors("offer.v1.json", message) == []


@pytest.mark.parametrize("decision", [sample_decision(), denied_decision()])
def test_decision_message_has_the_contract_keys_in_order_and_validates(decision: Decision) -> None:
    message = decision.to_message()
    assert list(message) == DECISION_KEYS  # order_value, cost_cents, denied_by: not published
    assert schema_errors("decision.v1.json", message) == []


def test_the_engines_records_give_valid_messages() -> None:
    offers, decisions = engine_offers(), engine_decisions()
    assert offers and any(d.holdout for d in decisions)
    assert any(d.denied_by is not None for d in decisions)
    for offer in offers:
        assert schema_errors("offer.v1.json", offer.to_message()) == []
    for decision in decisions:
        assert schema_errors("decision.v1.json", decision.to_message()) == []


# -- from_message: messages read back unchanged -------------------------------------------------


def test_an_offer_round_trips_through_its_message() -> None:
    offer = sample_offer()
    read = Offer.from_message(orjson.loads(orjson.dumps(offer.to_message())))
    assert read == offer


@pytest.mark.parametrize("decision", [sample_decision(), denied_decision()])
def test_a_decision_round_trips_through_its_message_but_for_the_unpublished(
    decision: Decision,
) -> None:
    read = Decision.from_message(orjson.loads(orjson.dumps(decision.to_message())))
    assert read == unpublished(decision)
    assert read.denied_by == decision.denied_by  # from its "denied:<guardrail>" rule
    assert read.to_message() == decision.to_message()


def test_the_engines_records_round_trip_byte_for_byte() -> None:
    for offer in engine_offers():
        raw = orjson.dumps(offer.to_message())
        read = Offer.from_message(orjson.loads(raw))
        assert read == offer
        assert orjson.dumps(read.to_message()) == raw
    for decision in engine_decisions():
        raw = orjson.dumps(decision.to_message())
        read = Decision.from_message(orjson.loads(raw))
        assert read == unpublished(decision)
        assert orjson.dumps(read.to_message()) == raw


def test_whole_numbers_are_published_as_written() -> None:
    """An integer discount (a policy built in code) stays an integer after a round trip."""
    offer = sample_offer(discount_pct=10)
    raw = orjson.dumps(offer.to_message())
    assert b'"discount_pct":10,' in raw
    assert orjson.dumps(Offer.from_message(orjson.loads(raw)).to_message()) == raw


def test_granted_and_denied_decisions_carry_value_cost_and_guardrail() -> None:
    decisions = engine_decisions()
    granted = [d for d in decisions if d.offer_id is not None]
    denied = [d for d in decisions if d.denied_by is not None]
    assert granted and denied
    for decision in granted:
        assert decision.cost_cents is not None and decision.cost_cents > 0
        assert decision.order_value is not None and decision.order_value > 0
        assert decision.denied_by is None
    for decision in denied:
        assert decision.cost_cents == 0 and decision.offer_id is None
        assert f"denied:{decision.denied_by}" in decision.rules
    spent = sum(d.cost_cents or 0 for d in granted)
    assert spent == sum(sum(r.spend_cents.values()) for r in engine_results())


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"offer_id": None}, "wrong_type", "offer_id"),
        ({"issued_at": 1.5}, "wrong_type", "issued_at"),
        ({"explore": 1}, "wrong_type", "explore"),
        ({"discount_pct": True}, "wrong_type", "discount_pct"),
        ({"rules": "p_purchase>0.3"}, "wrong_type", "rules"),
        ({"reasons": [{"feature": "x"}]}, "missing_field", "contribution"),
        ({"schema_version": 2}, "unsupported_version", "schema_version"),
    ],
)
def test_a_bad_offer_message_says_which_field(
    change: dict[str, object], code: str, field: str
) -> None:
    with pytest.raises(InvalidEvent) as raised:
        Offer.from_message({**sample_offer().to_message(), **change})
    assert (raised.value.code, raised.value.field) == (code, field)


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"holdout": "no"}, "wrong_type", "holdout"),
        ({"features": {"x": "high"}}, "wrong_type", "features.x"),
        ({"ts": T0 * 1.0}, "wrong_type", "ts"),
        ({"schema_version": 2}, "unsupported_version", "schema_version"),
    ],
)
def test_a_bad_decision_message_says_which_field(
    change: dict[str, object], code: str, field: str
) -> None:
    with pytest.raises(InvalidEvent) as raised:
        Decision.from_message({**sample_decision().to_message(), **change})
    assert (raised.value.code, raised.value.field) == (code, field)


def test_a_decision_message_needs_every_field_the_engine_writes() -> None:
    message = sample_decision().to_message()
    del message["offer_id"]
    with pytest.raises(InvalidEvent, match="offer_id") as raised:
        Decision.from_message(message)
    assert raised.value.code == "missing_field"
    with pytest.raises(InvalidEvent) as not_object:
        Decision.from_message(["not", "an", "object"])
    assert not_object.value.code == "not_an_object"
