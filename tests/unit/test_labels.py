"""Delayed labels (engine/labels.py): purchases label 1, the passing of event time labels 0."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from engine.features import FEATURE_NAMES
from engine.labels import LabelledExample, PendingDecision, PendingLabels

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
WINDOW = 1_000_000
T0 = 1_767_225_600_000


def training_validator() -> Draft202012Validator:
    schema = json.loads((SCHEMAS / "training.v1.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema)


def decision(
    decision_id: str,
    ts: int,
    *,
    user_id: str = "u1",
    offer_id: str | None = None,
    discount_pct: float = 0.0,
) -> PendingDecision:
    return PendingDecision(
        decision_id=decision_id,
        user_id=user_id,
        campaign="c",
        ts=ts,
        features={"cart_count_24h": 2.0, "spend_30d": 12.5},
        discount_pct=discount_pct,
        propensity=1.0,
        model_version="lr-0",
        offer_id=offer_id,
    )


def labels_with(*decisions: PendingDecision) -> PendingLabels:
    labels = PendingLabels(attribution_window_ms=WINDOW)
    for item in decisions:
        labels.add(item)
    return labels


def ids(examples: list[LabelledExample]) -> list[str]:
    return [e.decision.decision_id for e in examples]


# -- purchases ----------------------------------------------------------------------------------


def test_purchase_labels_the_latest_open_decision_1() -> None:
    labels = labels_with(decision("d1", T0), decision("d3", T0 + 300), decision("d2", T0 + 200))
    example = labels.on_purchase("u1", T0 + 500)
    assert example is not None
    assert (example.decision.decision_id, example.label, example.labeled_at) == ("d3", 1, T0 + 500)
    assert len(labels) == 2


def test_purchase_by_another_user_labels_nothing() -> None:
    labels = labels_with(decision("d1", T0))
    assert labels.on_purchase("u2", T0 + 1) is None
    assert len(labels) == 1


def test_purchase_with_offer_id_labels_that_offers_decision() -> None:
    labels = labels_with(
        decision("d1", T0, offer_id="o-1", discount_pct=10.0),
        decision("d2", T0 + 100, offer_id="o-2", discount_pct=5.0),
    )
    example = labels.on_purchase("u1", T0 + 200, offer_id="o-1")
    assert example is not None
    assert example.decision.decision_id == "d1"
    assert example.label == 1
    assert example.to_message()["discount_pct"] == 10.0


def test_purchase_with_unknown_offer_id_falls_back_to_the_latest_decision() -> None:
    labels = labels_with(decision("d1", T0, offer_id="o-1"), decision("d2", T0 + 100))
    example = labels.on_purchase("u1", T0 + 200, offer_id="o-elsewhere")
    assert example is not None
    assert example.decision.decision_id == "d2"


def test_purchase_outside_the_window_labels_nothing() -> None:
    labels = labels_with(decision("d1", T0))
    assert labels.on_purchase("u1", T0 + WINDOW + 1) is None
    assert labels.on_purchase("u1", T0 - 1) is None  # before the decision
    assert len(labels) == 1
    # The window is inclusive at its end.
    example = labels.on_purchase("u1", T0 + WINDOW)
    assert example is not None and example.decision.decision_id == "d1"


def test_purchase_picks_the_latest_decision_within_the_window() -> None:
    labels = labels_with(decision("old", T0), decision("new", T0 + WINDOW + 10))
    # At this time "new" is in the future, "old" is in the window.
    example = labels.on_purchase("u1", T0 + 5)
    assert example is not None and example.decision.decision_id == "old"


def test_second_purchase_labels_the_next_decision_not_the_same_one() -> None:
    labels = labels_with(decision("d1", T0), decision("d2", T0 + 10))
    first = labels.on_purchase("u1", T0 + 20)
    second = labels.on_purchase("u1", T0 + 30)
    third = labels.on_purchase("u1", T0 + 40)
    assert first is not None and second is not None
    assert [first.decision.decision_id, second.decision.decision_id] == ["d2", "d1"]
    assert third is None
    assert len(labels) == 0


# -- expiry -------------------------------------------------------------------------------------


def test_expire_labels_0_only_decisions_whose_deadline_is_before_now() -> None:
    labels = labels_with(decision("d1", T0), decision("d2", T0 + 100, user_id="u2"))
    assert labels.expire(T0 + WINDOW) == []  # deadline == now: still open
    expired = labels.expire(T0 + WINDOW + 1)
    assert ids(expired) == ["d1"]
    assert expired[0].label == 0
    assert expired[0].labeled_at == T0 + WINDOW
    assert len(labels) == 1
    assert ids(labels.expire(T0 + WINDOW + 101)) == ["d2"]
    assert len(labels) == 0


def test_expire_returns_examples_in_deadline_order() -> None:
    stamps = [T0 + 70, T0 + 10, T0 + 50, T0 + 30, T0 + 90, T0 + 20]
    labels = PendingLabels(attribution_window_ms=WINDOW)
    for index, ts in enumerate(stamps):
        labels.add(decision(f"d{index}", ts, user_id=f"u{index % 3}"))
    expired = labels.expire(T0 + WINDOW + 60)
    assert [e.decision.ts for e in expired] == [T0 + 10, T0 + 20, T0 + 30, T0 + 50]
    assert [e.labeled_at for e in expired] == [ts + WINDOW for ts in sorted(stamps)[:4]]
    assert all(e.label == 0 for e in expired)
    assert len(labels) == 2


def test_purchased_decision_is_not_expired_later() -> None:
    labels = labels_with(decision("d1", T0), decision("d2", T0 + 5))
    bought = labels.on_purchase("u1", T0 + 10)
    assert bought is not None and bought.decision.decision_id == "d2"
    expired = labels.expire(T0 + 10 * WINDOW)
    assert ids(expired) == ["d1"]
    assert labels.expire(T0 + 20 * WINDOW) == []


def test_expired_decision_cannot_be_labelled_by_a_later_purchase() -> None:
    labels = labels_with(decision("d1", T0))
    assert ids(labels.expire(T0 + WINDOW + 1)) == ["d1"]
    assert labels.on_purchase("u1", T0 + WINDOW) is None


# -- nothing is labelled twice (property) -------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["u1", "u2", "u3"]), st.integers(0, 3 * WINDOW)),
        st.tuples(st.just("buy"), st.sampled_from(["u1", "u2", "u3"]), st.integers(0, 3 * WINDOW)),
        st.tuples(st.just("expire"), st.just(""), st.integers(0, 4 * WINDOW)),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(operations)
def test_every_decision_is_labelled_exactly_once(ops: list[tuple[str, str, int]]) -> None:
    labels = PendingLabels(attribution_window_ms=WINDOW)
    added: list[str] = []
    labelled: list[str] = []
    for index, (op, user, ts) in enumerate(ops):
        if op == "add":
            decision_id = f"d{index}"
            labels.add(decision(decision_id, T0 + ts, user_id=user, offer_id=f"o{index}"))
            added.append(decision_id)
        elif op == "buy":
            example = labels.on_purchase(user, T0 + ts, offer_id=f"o{index - 1}")
            if example is not None:
                assert example.label == 1
                assert 0 <= T0 + ts - example.decision.ts <= WINDOW
                labelled.append(example.decision.decision_id)
        else:
            for example in labels.expire(T0 + ts):
                assert example.label == 0
                assert example.labeled_at < T0 + ts
                labelled.append(example.decision.decision_id)
        assert len(labels) == len(added) - len(labelled)
    labelled.extend(ids(labels.expire(T0 + 10 * WINDOW)))
    assert len(labelled) == len(set(labelled)), "a decision was labelled twice"
    assert sorted(labelled) == sorted(added)
    assert len(labels) == 0


# -- the training example message ---------------------------------------------------------------


@pytest.mark.parametrize("label", [0, 1])
def test_to_message_matches_the_training_schema(label: int) -> None:
    labels = labels_with(decision("d-abc", T0, offer_id="o-abc", discount_pct=10.0))
    if label:
        example = labels.on_purchase("u1", T0 + 1)
        assert example is not None
    else:
        (example,) = labels.expire(T0 + WINDOW + 1)
    message = example.to_message()
    errors = [e.message for e in training_validator().iter_errors(message)]
    assert errors == []
    assert message == {
        "decision_id": "d-abc",
        "features": {"cart_count_24h": 2.0, "spend_30d": 12.5},
        "discount_pct": 10.0,
        "label": label,
        "labeled_at": T0 + 1 if label else T0 + WINDOW,
    }


def test_to_message_copies_the_features() -> None:
    example = LabelledExample(decision("d1", T0), 1, T0)
    message = example.to_message()
    features = message["features"]
    assert isinstance(features, dict)
    features["spend_30d"] = -1.0
    assert example.decision.features["spend_30d"] == 12.5


def _pending(features: dict[str, float], offer_id: str | None = "o-1") -> PendingDecision:
    return PendingDecision(
        decision_id="d-1",
        user_id="u-1",
        campaign="spring",
        ts=1_700_000_000_123,
        features=features,
        discount_pct=12.5,
        propensity=0.37,
        model_version="lr-9",
        offer_id=offer_id,
    )


def test_the_compact_record_round_trips_exactly_and_is_much_smaller() -> None:
    values = {name: (i * 0.1 + 1 / 3) for i, name in enumerate(FEATURE_NAMES)}
    for offer_id in ("o-1", None):
        decision = _pending(values, offer_id)
        compact = orjson.loads(orjson.dumps(decision.to_compact()))
        assert PendingDecision.from_compact(compact) == decision
        assert compact[:3] == [decision.ts, "spring", offer_id], "the script reads these"
    full = len(orjson.dumps(_pending(values).to_record()))
    small = len(orjson.dumps(_pending(values).to_compact()))
    assert small < full / 2, (small, full)


def test_features_outside_the_catalogue_order_stay_named() -> None:
    decision = _pending({"b": 1.0, "a": 2.0})
    compact = decision.to_compact()
    assert compact[-1] == {"b": 1.0, "a": 2.0}
    assert PendingDecision.from_compact(compact) == decision


def test_a_record_written_before_features_were_added_reads_the_ones_it_has() -> None:
    values = {name: 1.0 for name in FEATURE_NAMES}
    compact = _pending(values).to_compact()
    compact[-1] = compact[-1][:-2]  # as if the last two features did not exist yet
    restored = PendingDecision.from_compact(compact)
    assert tuple(restored.features) == FEATURE_NAMES[:-2]
