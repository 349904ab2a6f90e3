"""Prequential metrics (exact AUC, ECE, log loss over a sliding window) and the online learner."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidEvent
from engine.model.feedback import TrainingExample
from engine.model.prequential import OnlineLearner, PrequentialMetrics, roc_auc
from engine.model.purchase_model import PurchaseModel
from tests.synthetic_training import SYNTHETIC_FEEDBACK, T0_MS, training_examples

Pairs = Sequence[tuple[float, int]]


def brute_auc(pairs: Pairs) -> float | None:
    """Every positive/negative pair: 1 when ranked right, 1/2 when tied (doubled, in ints)."""
    positives = [p for p, y in pairs if y]
    negatives = [p for p, y in pairs if not y]
    if not positives or not negatives:
        return None
    doubled = sum(2 if a > b else 1 if a == b else 0 for a in positives for b in negatives)
    return doubled / (2 * len(positives) * len(negatives))


def brute_ece(pairs: Pairs, bins: int = 10) -> float:
    total = 0.0
    for b in range(bins):
        in_bin = [(p, y) for p, y in pairs if min(int(p * bins), bins - 1) == b]
        if in_bin:
            mean_p = sum(p for p, _ in in_bin) / len(in_bin)
            mean_y = sum(y for _, y in in_bin) / len(in_bin)
            total += len(in_bin) / len(pairs) * abs(mean_p - mean_y)
    return total


def brute_log_loss(pairs: Pairs) -> float:
    eps = 1e-15
    losses = [
        -math.log(min(max(p, eps), 1 - eps)) if y else -math.log(1 - min(max(p, eps), 1 - eps))
        for p, y in pairs
    ]
    return sum(losses) / len(losses)


# Scores from a coarse grid make ties common; free floats make them rare. Both are exercised.
scores = st.one_of(
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0]),
    st.floats(0.0, 1.0, allow_nan=False),
)
pairs_strategy = st.lists(st.tuples(scores, st.integers(0, 1)), min_size=0, max_size=60)


# -- AUC ------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(pairs=pairs_strategy)
def test_auc_is_exactly_the_pairwise_fraction(pairs: list[tuple[float, int]]) -> None:
    assert roc_auc(pairs) == brute_auc(pairs)
    metrics = PrequentialMetrics(window=100)
    for p, y in pairs:
        metrics.update(p, y)
    assert metrics.auc == brute_auc(pairs)


def test_auc_hand_examples() -> None:
    assert roc_auc([(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)]) == 0.75
    assert roc_auc([(0.9, 1), (0.1, 0)]) == 1.0
    assert roc_auc([(0.1, 1), (0.9, 0)]) == 0.0
    assert roc_auc([(0.3, 1), (0.3, 0), (0.3, 1)]) == 0.5  # all tied


def test_one_class_windows_have_no_auc_and_stay_json_safe() -> None:
    metrics = PrequentialMetrics(window=5)
    for p in (0.1, 0.6, 0.9):
        metrics.update(p, 0)
    assert metrics.auc is None
    assert metrics.label_rate == 0.0
    assert metrics.log_loss is not None and math.isfinite(metrics.log_loss)
    assert metrics.ece is not None
    text = json.dumps(metrics.as_dict(), allow_nan=False)
    assert json.loads(text)["auc"] is None


def test_an_empty_window_has_no_metrics() -> None:
    metrics = PrequentialMetrics(window=3)
    assert metrics.as_dict() == {
        "window": 3,
        "count": 0,
        "seen": 0,
        "log_loss": None,
        "auc": None,
        "ece": None,
        "label_rate": None,
    }
    json.dumps(metrics.as_dict(), allow_nan=False)


# -- ECE, log loss --------------------------------------------------------------------------------


def test_ece_hand_example() -> None:
    # bin 0: p .05 y 0 -> |.05 - 0| ; bin 1: p .15+.15 = .30, y 1 -> |.30 - 1| ; bin 9: .95 vs 1
    # ECE = (.05 + .70 + .05) / 4 = 0.2
    metrics = PrequentialMetrics(window=10)
    for p, y in [(0.05, 0), (0.15, 0), (0.15, 1), (0.95, 1)]:
        metrics.update(p, y)
    assert metrics.ece == pytest.approx(0.2, abs=1e-12)


def test_ece_bins_include_both_ends() -> None:
    metrics = PrequentialMetrics(window=10)
    metrics.update(1.0, 1)  # last bin, perfectly calibrated
    metrics.update(0.0, 0)  # first bin, perfectly calibrated
    assert metrics.ece == 0.0


def test_log_loss_is_finite_for_confident_mistakes() -> None:
    metrics = PrequentialMetrics(window=10)
    metrics.update(0.0, 1)
    metrics.update(1.0, 0)
    assert metrics.log_loss is not None and 34.0 < metrics.log_loss < 35.0  # -log(~1e-15)
    metrics = PrequentialMetrics(window=10)
    metrics.update(0.5, 1)
    assert metrics.log_loss == pytest.approx(math.log(2))


# -- the sliding window ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(scores, st.integers(0, 1)), max_size=50), window=st.integers(1, 12))
def test_metrics_cover_exactly_the_last_window_examples(
    pairs: list[tuple[float, int]], window: int
) -> None:
    metrics = PrequentialMetrics(window=window)
    for index, (p, y) in enumerate(pairs):
        metrics.update(p, y)
        last = pairs[max(0, index + 1 - window) : index + 1]
        assert metrics.count == len(last)
        assert metrics.seen == index + 1
        assert metrics.auc == brute_auc(last)
        assert metrics.label_rate == pytest.approx(sum(y for _, y in last) / len(last))
        assert metrics.ece == pytest.approx(brute_ece(last), abs=1e-12)
        assert metrics.log_loss == pytest.approx(brute_log_loss(last), rel=1e-12)
        json.dumps(metrics.as_dict(), allow_nan=False)


def test_eviction_drops_the_oldest_example() -> None:
    metrics = PrequentialMetrics(window=2)
    metrics.update(0.9, 0)  # a bad ranking...
    metrics.update(0.1, 1)
    assert metrics.auc == 0.0
    metrics.update(0.8, 1)  # ...evicted: window is (0.1, 1), (0.8, 1)
    assert metrics.auc is None and metrics.label_rate == 1.0
    metrics.update(0.2, 0)  # window (0.8, 1), (0.2, 0)
    assert metrics.auc == 1.0


def test_state_round_trip_resumes_the_window() -> None:
    metrics = PrequentialMetrics(window=4)
    for p, y in [(0.2, 0), (0.7, 1), (0.4, 1), (0.9, 0), (0.3, 0)]:
        metrics.update(p, y)
    state = json.loads(json.dumps(metrics.to_state()))
    resumed = PrequentialMetrics.from_state(state)
    assert resumed.as_dict() == metrics.as_dict()
    metrics.update(0.6, 1)
    resumed.update(0.6, 1)
    assert resumed.as_dict() == metrics.as_dict()
    with pytest.raises(ValueError, match="malformed"):
        PrequentialMetrics.from_state({"window": 3, "items": [[2.0, 1]], "seen": 1})


@pytest.mark.parametrize(("p", "label"), [(-0.1, 1), (1.1, 0), (math.nan, 1), (0.5, 2), (0.5, -1)])
def test_bad_updates_are_refused(p: float, label: int) -> None:
    metrics = PrequentialMetrics(window=3)
    with pytest.raises(ValueError):
        metrics.update(p, label)
    assert metrics.count == 0 and metrics.seen == 0


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrequentialMetrics(window=0)


# -- the online learner ---------------------------------------------------------------------------


def example(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "decision_id": "d1",
        "features": {"cart_count_24h": 2, "view_count_24h": 5.5},
        "discount_pct": 10,
        "label": 1,
        "labeled_at": T0_MS,
    }
    base.update(overrides)
    return base


CLOSED = SYNTHETIC_FEEDBACK


def test_the_learner_predicts_before_it_learns() -> None:
    learner = OnlineLearner(window=10, feedback=CLOSED)
    reference = PurchaseModel()
    for drawn in training_examples(30, seed=2):
        ex = drawn.example
        expected = reference.predict_one(ex["features"], ex["discount_pct"])  # type: ignore[arg-type]
        assert learner.learn(ex) == expected
        reference.learn_one(ex["features"], ex["discount_pct"], ex["label"])  # type: ignore[arg-type]
    assert learner.model.version == reference.version == "lr-30"
    assert learner.metrics.seen == 30 and learner.metrics.count == 10
    assert learner.last_labeled_at == T0_MS + 29_000


def test_the_learner_is_deterministic() -> None:
    a, b = OnlineLearner(window=200, feedback=CLOSED), OnlineLearner(window=200, feedback=CLOSED)
    for drawn in training_examples(500, seed=4):
        assert a.learn(drawn.example) == b.learn(dict(drawn.example))
    assert a.as_dict() == b.as_dict()


def test_an_invalid_example_changes_nothing() -> None:
    learner = OnlineLearner(window=10)
    learner.learn(example())
    before = learner.as_dict()
    with pytest.raises(InvalidEvent) as info:
        learner.learn(example(label=2))
    assert info.value.code == "invalid_choice"
    assert learner.as_dict() == before


def test_learning_the_ground_truth_reaches_a_good_auc() -> None:
    """The pure counterpart of the integration test: 3,000 examples, window of 1,000."""
    learner = OnlineLearner(window=1000, feedback=CLOSED)
    drawn = training_examples(3000, seed=7)
    for item in drawn:
        learner.learn(item.example)
    auc = learner.metrics.auc
    bayes = roc_auc([(d.p_true, int(d.example["label"])) for d in drawn[-1000:]])  # type: ignore[call-overload]
    print(f"prequential AUC {auc:.4f} (ground-truth scores on the same window: {bayes:.4f})")
    assert auc is not None and auc > 0.75
    assert learner.metrics.ece is not None and learner.metrics.ece < 0.1
    json.dumps(learner.as_dict(), allow_nan=False)


@pytest.mark.parametrize(
    ("message", "code", "field"),
    [
        ([1, 2], "not_an_object", None),
        ({k: v for k, v in example().items() if k != "label"}, "missing_field", "label"),
        (example(decision_id=7), "wrong_type", "decision_id"),
        (example(decision_id=""), "too_short", "decision_id"),
        (example(decision_id="x" * 129), "too_long", "decision_id"),
        (example(features=[1]), "wrong_type", "features"),
        (example(features={"a": "1"}), "wrong_type", "features.a"),
        (example(features={"a": True}), "wrong_type", "features.a"),
        (example(features={"a": math.inf}), "wrong_type", "features.a"),
        (example(discount_pct="10"), "wrong_type", "discount_pct"),
        (example(discount_pct=120), "out_of_range", "discount_pct"),
        (example(label=True), "invalid_choice", "label"),
        (example(label=0.5), "invalid_choice", "label"),
        (example(labeled_at=1.5), "wrong_type", "labeled_at"),
        (example(labeled_at=-1), "out_of_range", "labeled_at"),
    ],
)
def test_invalid_training_examples_are_named(message: object, code: str, field: str | None) -> None:
    with pytest.raises(InvalidEvent) as info:
        TrainingExample.from_message(message)
    assert (info.value.code, info.value.field) == (code, field)


def test_a_valid_example_parses_and_extra_fields_are_ignored() -> None:
    parsed = TrainingExample.from_message(example(schema_version=1, extra="ignored"))
    assert parsed == TrainingExample(
        decision_id="d1",
        features={"cart_count_24h": 2.0, "view_count_24h": 5.5},
        discount_pct=10.0,
        label=1,
        labeled_at=T0_MS,
        kind="closed",
    )
