"""Delayed labels (engine/labels.py): a purchase within the window converts every open
decision of the user; windows elapse and close in event time; nothing is labelled twice."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import orjson
import pytest
from dealstream_native import pack_features, unpack_features
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from engine.features.catalogue import FEATURE_NAMES
from engine.labels import (
    Arm,
    LabelEvent,
    LabelKind,
    PendingDecision,
    PendingLabels,
    PurchaseSeen,
)
from engine.model.feedback import TrainingExample

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
    campaign: str = "c",
    offer_id: str | None = None,
    discount_pct: float = 0.0,
) -> PendingDecision:
    return PendingDecision(
        decision_id=decision_id,
        user_id=user_id,
        campaign=campaign,
        ts=ts,
        features={"cart_count_24h": 2.0, "spend_30d": 12.5},
        discount_pct=discount_pct,
        propensity=1.0,
        model_version="lr-0",
        offer_id=offer_id,
    )


def labels_with(*decisions: PendingDecision, elapsed_ms: int = 0) -> PendingLabels:
    labels = PendingLabels(attribution_window_ms=WINDOW, elapsed_ms=elapsed_ms)
    for item in decisions:
        labels.add(item)
    return labels


def ids(events: list[LabelEvent]) -> list[str]:
    return [e.decision.decision_id for e in events]


# -- purchases ----------------------------------------------------------------------------------


def test_a_purchase_converts_every_open_decision_of_the_user_in_its_window() -> None:
    labels = labels_with(
        decision("d1", T0, campaign="a"),
        decision("d3", T0 + 300, campaign="a", offer_id="o-3", discount_pct=10.0),
        decision("d2", T0 + 200, campaign="b"),
        decision("other", T0 + 100, user_id="u2"),
    )
    events = labels.on_purchase("u1", PurchaseSeen(T0 + 500))
    assert [(e.decision.decision_id, e.kind, e.label, e.ts) for e in events] == [
        ("d1", LabelKind.CONVERTED, 1, T0 + 500),
        ("d2", LabelKind.CONVERTED, 1, T0 + 500),
        ("d3", LabelKind.CONVERTED, 1, T0 + 500),
    ]
    assert all(e.decision.converted_at == T0 + 500 for e in events)
    assert len(labels) == 4, "converted decisions stay open until their window closes"


def test_an_offer_does_not_claim_the_purchase_for_its_own_decision() -> None:
    """The label is the same with and without an offer: what a discount changes is whether
    the user buys, not which decision is credited."""
    labels = labels_with(
        decision("offered", T0, offer_id="o-1", discount_pct=20.0),
        decision("plain", T0 + 100),
    )
    assert ids(labels.on_purchase("u1", PurchaseSeen(T0 + 200))) == ["offered", "plain"]


def test_a_purchase_outside_the_window_converts_nothing() -> None:
    labels = labels_with(decision("d1", T0))
    assert labels.on_purchase("u1", PurchaseSeen(T0 + WINDOW + 1)) == []
    assert labels.on_purchase("u1", PurchaseSeen(T0 - 1)) == []  # before the decision
    assert labels.on_purchase("u2", PurchaseSeen(T0 + 1)) == []  # another user
    # The window is inclusive at its end.
    assert ids(labels.on_purchase("u1", PurchaseSeen(T0 + WINDOW))) == ["d1"]


def test_only_the_first_purchase_converts() -> None:
    labels = labels_with(decision("d1", T0), decision("d2", T0 + 10))
    assert ids(labels.on_purchase("u1", PurchaseSeen(T0 + 20))) == ["d1", "d2"]
    assert labels.on_purchase("u1", PurchaseSeen(T0 + 30)) == []
    (closed,) = labels.expire({0: T0 + WINDOW + 1})
    assert closed.decision.converted_at == T0 + 20 and closed.label == 1


# -- elapsed and closed -------------------------------------------------------------------------


def test_windows_close_after_their_end_with_the_final_label() -> None:
    labels = labels_with(decision("d1", T0), decision("d2", T0 + 100, user_id="u2"))
    labels.on_purchase("u2", PurchaseSeen(T0 + 150))
    assert labels.expire({0: T0 + WINDOW}) == []  # deadline == now: still open
    (first,) = labels.expire({0: T0 + WINDOW + 1})
    assert (first.decision.decision_id, first.kind, first.label, first.ts) == (
        "d1",
        LabelKind.CLOSED,
        0,
        T0 + WINDOW,
    )
    assert len(labels) == 1
    (second,) = labels.expire({0: T0 + WINDOW + 101})
    assert (second.decision.decision_id, second.label) == ("d2", 1)
    assert len(labels) == 0


def test_elapsed_events_say_what_was_known_after_the_wait() -> None:
    wait = WINDOW // 4
    labels = labels_with(decision("early", T0), decision("late", T0 + 1), elapsed_ms=wait)
    labels.on_purchase("u1", PurchaseSeen(T0 + 10))  # converts both, within the wait
    labels.add(decision("never", T0 + 2, user_id="u2"))
    labels.add(decision("after", T0 + 3, user_id="u3"))
    elapsed = labels.expire({0: T0 + wait + 10})
    assert [(e.decision.decision_id, e.kind, e.label, e.final) for e in elapsed] == [
        ("early", LabelKind.ELAPSED, 1, True),
        ("late", LabelKind.ELAPSED, 1, True),
        ("never", LabelKind.ELAPSED, 0, False),
        ("after", LabelKind.ELAPSED, 0, False),
    ]
    (converted,) = labels.on_purchase("u3", PurchaseSeen(T0 + wait + 100))
    assert converted.kind is LabelKind.CONVERTED and converted.decision.decision_id == "after"
    closed = labels.expire({0: T0 + 2 * WINDOW})
    assert [(e.decision.decision_id, e.label) for e in closed] == [
        ("early", 1),
        ("late", 1),
        ("never", 0),
        ("after", 1),
    ]


def test_events_come_in_event_time_order_elapsed_before_closed_on_a_tie() -> None:
    wait = WINDOW // 2
    stamps = [T0 + 70, T0 + 10, T0 + 50, T0 + 30, T0 + WINDOW // 2 + 10]
    labels = PendingLabels(attribution_window_ms=WINDOW, elapsed_ms=wait)
    for index, ts in enumerate(stamps):
        labels.add(decision(f"d{index}", ts, user_id=f"u{index % 3}"))
    events = labels.expire({0: T0 + 10 * WINDOW})
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    tie = [e for e in events if e.ts == T0 + WINDOW + 10]
    assert [e.kind for e in tie] == [LabelKind.ELAPSED, LabelKind.CLOSED]


def test_the_wait_must_be_inside_the_window() -> None:
    with pytest.raises(ValueError, match="elapsed_ms"):
        PendingLabels(attribution_window_ms=WINDOW, elapsed_ms=WINDOW)
    with pytest.raises(ValueError, match="elapsed_ms"):
        PendingLabels(attribution_window_ms=WINDOW, elapsed_ms=-1)


# -- every decision is closed exactly once (property) -------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["u1", "u2", "u3"]), st.integers(0, 3 * WINDOW)),
        st.tuples(st.just("buy"), st.sampled_from(["u1", "u2", "u3"]), st.integers(0, 3 * WINDOW)),
        st.tuples(st.just("expire"), st.just(""), st.integers(0, 4 * WINDOW)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.sampled_from([0, WINDOW // 3]), st.sampled_from([0, WINDOW // 2]))
def test_every_decision_closes_once_with_the_truth(
    ops: list[tuple[str, str, int]], elapsed_ms: int, memory_ms: int
) -> None:
    labels = PendingLabels(
        attribution_window_ms=WINDOW, elapsed_ms=elapsed_ms, purchase_memory_ms=memory_ms
    )
    added: dict[str, tuple[int, PendingDecision]] = {}
    purchases: list[tuple[int, str, int]] = []
    closed: dict[str, tuple[int, LabelEvent]] = {}
    converted: list[str] = []
    for index, (op, user, ts) in enumerate(ops):
        if op == "add":
            item = decision(f"d{index}", T0 + ts, user_id=user)
            conversion = labels.add(item)
            if conversion is not None:
                converted.append(item.decision_id)
            added[item.decision_id] = (index, item)
        elif op == "buy":
            purchases.append((index, user, T0 + ts))
            for event in labels.on_purchase(user, PurchaseSeen(T0 + ts)):
                assert event.label == 1 and 0 <= T0 + ts - event.decision.ts <= WINDOW
                converted.append(event.decision.decision_id)
        else:
            for event in labels.expire({0: T0 + ts}):
                assert event.ts < T0 + ts
                if event.kind is LabelKind.CLOSED:
                    assert event.decision.decision_id not in closed, "closed twice"
                    closed[event.decision.decision_id] = (index, event)
    for event in labels.expire({0: T0 + 10 * WINDOW}):
        if event.kind is LabelKind.CLOSED:
            closed[event.decision.decision_id] = (len(ops), event)
    assert len(converted) == len(set(converted)), "a decision converted twice"
    assert sorted(closed) == sorted(added), "every decision closes exactly once"
    assert len(labels) == 0
    for decision_id, (closed_at, event) in closed.items():
        added_at, item = added[decision_id]
        # The user's purchases read before the decision, still remembered: the first at or
        # after it converts it when it is recorded, if within its window.
        before = [t for at, user, t in purchases if at < added_at and user == item.user_id]
        remembered = sorted(t for t in before if t >= max(before, default=0) - memory_ms)
        later = [t for t in remembered if t >= item.ts]
        hits = later[:1] if later and later[0] - item.ts <= WINDOW else []
        # Otherwise, the first purchase read while it was open and within its window.
        hits += [
            t
            for at, user, t in purchases
            if added_at < at < closed_at and user == item.user_id and 0 <= t - item.ts <= WINDOW
        ]
        assert event.label == (1 if hits else 0)
        assert event.decision.converted_at == (hits[0] if hits else None)


def test_a_purchase_read_before_the_decision_it_follows_converts_it_when_recorded() -> None:
    labels = PendingLabels(attribution_window_ms=WINDOW, purchase_memory_ms=5_000)
    assert labels.on_purchase("u1", PurchaseSeen(T0 + 300, 1_000, 1_200)) == []
    conversion = labels.add(decision("d1", T0 + 100))
    assert conversion is not None
    assert conversion.purchase == PurchaseSeen(T0 + 300, 1_000, 1_200)
    assert conversion.event.kind is LabelKind.CONVERTED and conversion.event.ts == T0 + 300
    assert conversion.event.decision.converted_at == T0 + 300
    (closed,) = labels.expire({0: T0 + 100 + WINDOW + 1})
    assert closed.label == 1 and closed.decision.converted_at == T0 + 300


def test_a_remembered_purchase_converts_only_decisions_it_follows_within_their_window() -> None:
    labels = PendingLabels(attribution_window_ms=WINDOW, purchase_memory_ms=2 * WINDOW)
    labels.on_purchase("u1", PurchaseSeen(T0 + WINDOW + 500))
    labels.on_purchase("u1", PurchaseSeen(T0 + 50))
    assert labels.add(decision("after", T0 + WINDOW + 501)) is None  # bought before it
    assert labels.add(decision("other user", T0, user_id="u2")) is None
    early = labels.add(decision("early", T0 + 10))
    assert early is not None and early.purchase.ts == T0 + 50  # the first one after it
    late = labels.add(decision("late", T0 + 600))
    assert late is not None and late.purchase.ts == T0 + WINDOW + 500  # within the window
    assert labels.add(decision("too early", T0 - WINDOW)) is None  # T0 + 50 is past its window


def test_purchases_are_remembered_for_the_memory_behind_the_users_latest() -> None:
    labels = PendingLabels(attribution_window_ms=WINDOW, purchase_memory_ms=1_000)
    labels.on_purchase("u1", PurchaseSeen(T0))
    labels.on_purchase("u1", PurchaseSeen(T0 + 999))
    assert labels.add(decision("kept", T0 - 5)) is not None
    labels.on_purchase("u1", PurchaseSeen(T0 + 1_001))  # T0 is now older than the memory
    conversion = labels.add(decision("forgotten", T0 - 5))
    assert conversion is not None and conversion.purchase.ts == T0 + 999


def test_each_lane_closes_windows_by_its_own_clock() -> None:
    labels = PendingLabels(attribution_window_ms=WINDOW)
    labels.add(decision("a", T0, user_id="a"), lane=0)
    labels.add(decision("b", T0 + 5, user_id="b"), lane=1)
    assert not labels.due(0, T0 + WINDOW)
    assert labels.due(1, T0 + 10 * WINDOW)
    # lane 1 read far ahead closes its own decision only
    (closed,) = labels.expire({1: T0 + 10 * WINDOW, 0: T0 + 1})
    assert closed.decision.decision_id == "b"
    assert ids(labels.on_purchase("a", PurchaseSeen(T0 + 7))) == ["a"]
    # closed across lanes in event-time order, whatever order the lanes come in
    labels.add(decision("c", T0 + 2, user_id="c"), lane=1)
    events = labels.expire({1: T0 + 10 * WINDOW, 0: T0 + 10 * WINDOW})
    assert [(e.decision.decision_id, e.label) for e in events] == [("a", 1), ("c", 0)]


# -- the training example message ---------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LabelKind))
def test_training_examples_of_label_events_match_the_schema(kind: LabelKind) -> None:
    item = PendingDecision(
        "d-abc",
        "u1",
        "c",
        T0,
        {"cart_count_24h": 2.0},
        10.0,
        1.0,
        "lr-0",
        "o-abc",
        converted_at=T0 + 5 if kind is not LabelKind.ELAPSED else None,
    )
    event = LabelEvent(item, kind, T0 + 5 if kind is LabelKind.CONVERTED else T0 + WINDOW)
    example = TrainingExample(
        decision_id=item.decision_id,
        features=item.features,
        discount_pct=item.discount_pct,
        label=event.label,
        labeled_at=event.ts,
        kind=str(event.kind),
        decided_at=item.ts,
        converted_at=item.converted_at,
    )
    message = example.to_message()
    errors = [e.message for e in training_validator().iter_errors(message)]
    assert errors == []
    assert TrainingExample.from_message(orjson.loads(orjson.dumps(message))) == example


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
        arm=Arm.TREATED,
    )


def _restored(compact: list[object], item: PendingDecision) -> PendingDecision:
    return PendingDecision.from_compact(compact, decision_id=item.decision_id, user_id=item.user_id)


def test_the_compact_record_round_trips_exactly() -> None:
    values = {name: (i * 0.1 + 1 / 3) for i, name in enumerate(FEATURE_NAMES)}
    for offer_id in ("o-1", "o-other", None):
        item = _pending(values, offer_id)
        for compact in (
            orjson.loads(orjson.dumps(item.to_compact())),
            orjson.loads(item.compact_json()),
        ):
            assert _restored(compact, item) == item
            assert compact[:3] == [item.ts, "spring", "T"], "the script reads these"
            assert compact[3] == (1 if offer_id == "o-1" else offer_id), "implied by d-1"
            assert item.decision_id not in orjson.dumps(compact).decode()
            assert item.user_id not in orjson.dumps(compact).decode()


def test_the_stored_record_packs_the_features_into_under_half_of_their_json() -> None:
    # a vector as the simulator's shoppers make them: counts, zeros, a repeated cap, fractions
    typical = [1.0] * 4 + [0.0] * 21 + [2_592_000.0] * 4 + [0.0, 0.0, 1.0, 1.0, 2.0, 0.0]
    typical += [6.261574074074074e-6, 1.0, 0.0, 1.0, 15.0, 0.541, 21.14]
    item = _pending(dict(zip(FEATURE_NAMES, typical, strict=True)))
    stored = item.compact_json()
    packed = orjson.loads(stored)[7]
    assert isinstance(packed, str) and orjson.dumps(packed) == b'"' + packed.encode() + b'"'
    assert len(packed) * 2 < len(orjson.dumps(typical).replace(b".0,", b","))
    restored = _restored(orjson.loads(stored), item)
    assert restored == item
    assert all(type(v) is float for v in restored.features.values())


def _bits(values: list[float]) -> list[bytes]:
    return [struct.pack("<d", value) for value in values]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-(2**60), 2**60).map(float),
            st.sampled_from([0.0, -0.0, 1.0, 2_592_000.0, 2.0**53, -(2.0**53), 0.1 + 0.2]),
        ),
        max_size=80,
    )
)
def test_packed_values_come_back_bit_for_bit(values: list[float]) -> None:
    names = tuple(f"f{i}" for i in range(len(values)))
    packed = pack_features(dict(zip(names, values, strict=True)), names)
    assert packed is not None
    unpacked = unpack_features(packed, names)
    assert tuple(unpacked) == names
    assert _bits(list(unpacked.values())) == _bits(values)


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**53) + 1, 2**53 - 1), st.integers(0, 22))
def test_a_decimal_reads_back_as_its_text_parses(mantissa: int, digits: int) -> None:
    # the decoder divides by a power of ten where it used to parse the decimal's text
    value = float(f"{mantissa}e-{digits}")
    names = ("x", "y")
    packed = pack_features({"x": value, "y": value / 3}, names)
    assert packed is not None
    assert _bits(list(unpack_features(packed, names).values())) == _bits([value, value / 3])


def test_a_vector_by_other_names_or_in_another_order_is_not_packed() -> None:
    assert pack_features({"a": 1.0, "b": 2.0}, ("b", "a")) is None
    assert pack_features({"a": 1.0}, ("a", "b")) is None
    assert pack_features({"a": 1.0, "b": 2.0}, ("a", "b")) is not None
    with pytest.raises(TypeError):
        pack_features({"a": "one"}, ("a",))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("A", "not base64url"),  # six bits are not a byte
        ("AB", "not base64url"),  # leftover bits set
        ("ab+/", "not base64url"),  # standard base64, not url-safe
        ("_w", "IndexError"),  # a varint that never ends
        ("Aw", "unknown run kind"),
        ("_____wc", "OverflowError"),  # a run longer than any catalogue
    ],
)
def test_unpacking_text_that_was_not_packed_says_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        unpack_features(text, FEATURE_NAMES)


def test_a_negative_zero_feature_keeps_its_sign() -> None:
    values = {name: (-0.0 if i == 3 else 1.0) for i, name in enumerate(FEATURE_NAMES)}
    item = _pending(values)
    restored = _restored(orjson.loads(item.compact_json()), item)
    value = restored.features[FEATURE_NAMES[3]]
    assert value == 0.0 and math.copysign(1.0, value) < 0


def test_features_outside_the_catalogue_order_stay_named() -> None:
    item = _pending({"b": 1.0, "a": 2.0})
    compact = item.to_compact()
    assert compact[7] == {"b": 1.0, "a": 2.0}
    assert _restored(compact, item) == item
    assert _restored(orjson.loads(item.compact_json()), item) == item


def test_a_record_written_before_features_were_added_reads_the_ones_it_has() -> None:
    values = {name: 1.0 for name in FEATURE_NAMES}
    item = _pending(values)
    compact = item.to_compact()
    # as if the last two features did not exist yet
    older = FEATURE_NAMES[:-2]
    compact[7] = pack_features(dict.fromkeys(older, 1.0), older)
    restored = _restored(compact, item)
    assert tuple(restored.features) == FEATURE_NAMES[:-2]
