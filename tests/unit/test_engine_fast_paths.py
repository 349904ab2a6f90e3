"""The hot path's shortcuts against the plain computations they replace.

``test_engine_golden.py`` proves whole runs unchanged; these tests pin each shortcut on its
own, on inputs the golden stream may not reach: the model's hand-computed score and terms
(``Scorer``, which ``predict`` and ``contributions`` use) against River's ``predict_proba_one``
and ``StandardScaler`` (bit for bit, any model state), the session scan, the parse
cache, and the store's skipped trims and prunes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.features import state as state_module
from engine.features.catalogue import build_context, compute_features
from engine.features.record import decode_record, seen_key, seen_second
from engine.features.state import (
    MINUTE_MS,
    RETENTION_BUCKETS,
    SESSION_GAP_MINUTES,
    Op,
    apply_ops,
)
from engine.features.store import InMemoryFeatureStore, StateUpdate
from engine.model import inputs
from engine.model.inputs import (
    BEHAVIOUR_INPUTS,
    INPUT_NAMES,
    INTERACTIONS,
    MODEL_FEATURES,
    input_row,
    model_inputs,
)
from engine.model.purchase_model import PurchaseModel
from engine.model.scoring import top_terms
from tests.feature_reference import expired_fields, trim

T0 = 1_767_225_600_000


def random_features(rng: random.Random) -> dict[str, float]:
    choices = (0.0, 1.0, 3.0, 0.25, 2_592_000.0, 17.5)
    features = {name: rng.choice(choices) * rng.random() * 3 for name in MODEL_FEATURES}
    if rng.random() < 0.3:
        del features[rng.choice(MODEL_FEATURES)]
    return features


def bits(value: float) -> tuple[float, float]:
    return value, math.copysign(1.0, value)


def river_predict(model: PurchaseModel, features: Mapping[str, float], discount: float) -> float:
    """The reference: River's pipeline on the model's input dict."""
    row = model_inputs(features, discount)
    return float(model.river_pipelines().purchase.predict_proba_one(row).get(True, 0.0))


def river_contributions(
    model: PurchaseModel, features: Mapping[str, float], discount: float, top: int = 3
) -> list[tuple[str, float]]:
    """The reference: River's scaler, then weight x scaled input, by magnitude then name."""
    scaler, classifier = model.river_pipelines().purchase.steps.values()
    scaled = scaler.transform_one(model_inputs(features, discount))
    weights = classifier.weights
    terms = [(name, float(weights.get(name, 0.0)) * value) for name, value in scaled.items()]
    terms.sort(key=lambda term: (-abs(term[1]), term[0]))
    return [(name, round(value, 6)) for name, value in terms[:top]]


def test_scorer_is_river_bit_for_bit() -> None:
    rng = random.Random(20261129)
    checked = 0
    for learning_rate in (0.05, 0.5, 3.0):  # 3.0 drives scores into the sigmoid's cut-offs
        model = PurchaseModel(learning_rate=learning_rate)
        for step in range(250):
            if step % 10 == 0:
                features = random_features(rng)
                scorer = model.scorer(features)
                for discount in (0.0, 5.0, 10.0, 12.5, 20.0, 100.0):
                    expected_p = bits(river_predict(model, features, discount))
                    assert bits(scorer(discount)) == expected_p
                    assert bits(model.predict_one(features, discount)) == expected_p
                    expected = river_contributions(model, features, discount)
                    assert scorer.contributions(discount) == expected
                    assert model.contributions(features, discount) == expected
                    top = 1 + step % 7
                    expected = river_contributions(model, features, discount, top)
                    assert scorer.contributions(discount, top) == expected
                    checked += 1
            model.learn_one(random_features(rng), rng.choice((0.0, 5.0, 20.0)), rng.random() < 0.3)
    assert checked == 450


def test_top_terms_rank_and_round_as_python_does() -> None:
    """The compiled ranking against Python's sort and ``round``: equal magnitudes (ranked by
    name), signed zeros, and decimal ties at the 6th place (k/128), which round half to even."""
    rng = random.Random(20261206)
    for _ in range(3_000):
        products = [
            rng.choice((rng.gauss(0, 1), rng.randint(-9, 9) / 128, 0.0, -0.0, rng.gauss(0, 1e-7)))
            for _ in INPUT_NAMES
        ]
        top = rng.randint(0, len(INPUT_NAMES) + 2)
        terms = sorted(zip(INPUT_NAMES, products, strict=True), key=lambda t: (-abs(t[1]), t[0]))
        expected = [(name, round(value, 6)) for name, value in terms[:top]]
        got = top_terms(products, top)
        assert got == expected
        assert [repr(value) for _, value in got] == [repr(value) for _, value in expected]
    with pytest.raises(ValueError, match="terms for"):
        top_terms([1.0], 3)


def test_a_scorer_follows_the_model_as_it_learns() -> None:
    model = PurchaseModel()
    features = {"cart_count_24h": 2.0, "session_events": 4.0}
    scorer = model.scorer(features)
    before = scorer(10.0)
    model.learn_one(features, 10.0, 1)
    assert scorer(10.0) == model.predict_one(features, 10.0) != before


def test_a_model_that_overrides_predict_is_asked_itself() -> None:
    class Constant(PurchaseModel):
        def predict_one(self, features: Mapping[str, float], discount_pct: float) -> float:
            return 0.25 + discount_pct / 1000

    scorer = Constant().scorer({})
    assert scorer(0.0) == 0.25 and scorer(50.0) == 0.3


def reference_base_inputs(features: Mapping[str, float]) -> list[float]:
    """The plain transform (``engine.model.inputs``' docstring), one input at a time."""

    def log1p_of_max_0(value: float) -> float:
        return math.log1p(max(value, 0.0))

    days = float(features.get("days_since_first_seen", 0.0))
    days = 1.0 if not days > 1.0 else min(days, 30.0)
    values: list[float] = []
    for name in BEHAVIOUR_INPUTS:
        if name.endswith("_per_day"):
            counted = dict(inputs._RATE_INPUTS)[name]
            values.append(log1p_of_max_0(float(features.get(counted, 0.0)) / days))
        elif name in inputs._LOG_INPUTS:
            values.append(log1p_of_max_0(float(features.get(name, 0.0))))
        elif name == "purchases_per_cart":
            bought = float(features.get("purchase_count_30d", 0.0))
            values.append(bought / max(float(features.get("cart_count_30d", 0.0)), 1.0))
        elif name == "redeemed_per_offer":
            redeemed = float(features.get("redeemed_count_30d", 0.0))
            values.append(redeemed / max(float(features.get("offer_count_30d", 0.0)), 1.0))
        elif name == "last_offer_discount":
            values.append(float(features.get("last_offer_discount_pct", 0.0)) / 100.0)
        else:
            values.append(float(features.get(name, 0.0)))
    return values


def same_bits(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or bits(a) == bits(b)


ODD_VALUES = (0.0, -0.0, -3.0, 0.5, 1.0, 7, 2**60, True, 1e308, math.inf, -math.inf, math.nan)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(MODEL_FEATURES),
        st.one_of(st.sampled_from(ODD_VALUES), st.floats(), st.integers(-(2**70), 2**70)),
    ),
    st.one_of(st.sampled_from((0.0, 5.0, 12.5, 100.0)), st.floats(0.0, 100.0)),
)
def test_the_input_row_is_the_plain_transform(features: dict[str, float], discount: float) -> None:
    """``base_inputs`` / ``input_row`` (spelled for speed) against the transform written out,
    bit for bit, on odd values too (negative zero, NaN, infinities, huge ints, bools)."""
    expected = reference_base_inputs(features)
    x = discount / 100.0
    expected += [x, *(x * expected[BEHAVIOUR_INPUTS.index(name)] for name in INTERACTIONS)]
    row = input_row(features, discount)
    assert len(row) == len(INPUT_NAMES) == len(expected)
    assert all(same_bits(a, b) for a, b in zip(row, expected, strict=True)), (row, expected)
    assert list(model_inputs(features, discount)) == list(INPUT_NAMES)


def reference_session_events(activity_minutes: Mapping[int, float], minute: int) -> float:
    """The original minute-by-minute scan."""
    total = 0.0
    gap = 0
    for index in range(minute, minute - RETENTION_BUCKETS["m"], -1):
        count = activity_minutes.get(index)
        if count:
            total += count
            gap = 0
        else:
            gap += 1
            if gap >= SESSION_GAP_MINUTES:
                break
    return total


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.integers(min_value=-200, max_value=5),
        st.sampled_from([0.0, 1.0, 2.0, 7.0]),
        max_size=40,
    )
)
def test_session_from_active_minutes_equals_the_minute_scan(offsets: dict[int, float]) -> None:
    minute = 29_000_000
    activity = {minute + offset: count for offset, count in offsets.items() if offset <= 0}
    # as view and search buckets of those minutes (a session counts every activity kind)
    state = {f"vm{minute + offset}": count for offset, count in offsets.items()}
    state.update({f"sm{minute + offset}": 1.0 for offset in list(offsets)[::3]})
    for offset in list(offsets)[::3]:
        if offset <= 0:
            activity[minute + offset] = activity[minute + offset] + 1.0
    context = build_context(state, minute * MINUTE_MS + 59_999)
    assert context.session_events == reference_session_events(activity, minute)


def test_features_do_not_depend_on_the_parse_cache() -> None:
    state = {
        f"vm{T0 // MINUTE_MS}": 2.0,
        f"ch{T0 // 3_600_000}": 1.0,
        f"k{T0 // 86_400_000}:books": 3.0,
        f"$d{T0 // 86_400_000}": 1250.0,
        f"pd{T0 // 86_400_000}": 1.0,
        "lv": float(T0),
        "lt": float(T0),
        "fs": float(T0 - 3_600_000),
        "nv": 2.0,
    }
    warm = compute_features(state, category="books")
    state_module.PARSED.clear()
    assert compute_features(state, category="books") == warm


def user_ops(rng: random.Random, ts: int) -> list[Op]:
    minute, hour, day = ts // MINUTE_MS, ts // 3_600_000, ts // 86_400_000
    code = rng.choice("vcfsp")
    return [
        ("i", f"{code}m{minute}", 1.0),
        ("i", f"{code}h{hour}", 1.0),
        ("i", f"{code}d{day}", 1.0),
        ("i", f"k{day}:{rng.choice(['books', 'toys'])}", 1.0),
        ("x", f"l{code}", float(ts)),
        ("x", "lt", float(ts)),
        ("n", "fs", float(ts)),
    ]


async def test_store_skipping_trims_and_prunes_keeps_exactly_what_trimming_always_keeps() -> None:
    """Against a reference that trims and prunes every touched user after every batch."""
    rng = random.Random(7)
    store = InMemoryFeatureStore()
    lateness = 3_600_000
    reference: dict[str, dict[str, float]] = {}
    seen: dict[str, dict[bytes, int]] = {}
    ts = T0
    for batch_no in range(300):
        updates = []
        for n in range(20):
            ts += rng.choice((1_000, 20_000, 600_000, 5_400_000))
            late = ts - rng.choice((0, 0, 0, 1_800_000, 7_200_000))
            user = f"u{rng.randrange(6)}"
            updates.append(StateUpdate(user, f"e{batch_no}-{n}", late, user_ops(rng, late)))
        outcome = await store.apply_batch(updates, allowed_lateness_ms=lateness)
        touched = set()
        for update, status in zip(updates, outcome.statuses, strict=True):
            if status == 0:
                apply_ops(reference.setdefault(update.user_id, {}), update.ops)
                seen.setdefault(update.user_id, {})[seen_key(update.event_id)] = seen_second(
                    update.ts
                )
                touched.add(update.user_id)
        for user in touched:
            trim(reference[user])
            horizon = seen_second(int(reference[user]["lt"]) - lateness)
            seen[user] = {e: t for e, t in seen[user].items() if t >= horizon}
        states = await store.read_states(reference)
        assert states == reference
        assert all(list(states[u]) == list(reference[u]) for u in reference)  # field order too
        assert {u: decode_record(store._users[u]).seen for u in seen} == seen
    assert any(expired_fields(s) == [] and len(s) > 10 for s in reference.values())
