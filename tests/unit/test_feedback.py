"""Delayed-feedback learning (engine/model/feedback.py, engine/model/prequential.py OnlineLearner).

Each method learns from its own label events with its own weights; the prequential metrics
count every decision's final label once, scored before the model learns that label.
"""

from __future__ import annotations

import random

import pytest

from engine.labels import LabelKind
from engine.model.feedback import DECIDED, Feedback, FeedbackMethod, Step, TrainingExample, steps
from engine.model.prequential import OnlineLearner
from engine.model.purchase_model import PurchaseModel

T0 = 1_767_225_600_000
WAIT = 3_600_000
FEATURES = {"cart_count_24h": 2.0, "view_count_1h": 3.0}


def example(
    kind: str, label: int, *, after_ms: int = 0, converted_ms: int | None = None
) -> TrainingExample:
    return TrainingExample(
        decision_id="d1",
        features=FEATURES,
        discount_pct=10.0,
        label=label,
        labeled_at=T0 + after_ms,
        kind=kind,
        decided_at=T0,
        converted_at=None if converted_ms is None else T0 + converted_ms,
    )


def run(method: FeedbackMethod, item: TrainingExample, p: float = 0.2) -> list[Step]:
    return steps(method, item, elapsed_ms=WAIT, p=p, late=0.25, never=0.8)


DECIDED_0 = example(DECIDED, 0)
EARLY = example(str(LabelKind.CONVERTED), 1, after_ms=60_000)
LATE = example(str(LabelKind.CONVERTED), 1, after_ms=2 * WAIT)
WAITED_0 = example(str(LabelKind.ELAPSED), 0, after_ms=WAIT)
WAITED_1 = example(str(LabelKind.ELAPSED), 1, after_ms=WAIT)
CLOSED_0 = example(str(LabelKind.CLOSED), 0, after_ms=24 * WAIT)
CLOSED_1 = example(str(LabelKind.CLOSED), 1, after_ms=24 * WAIT, converted_ms=60_000)


@pytest.mark.parametrize(
    ("method", "item", "expected"),
    [
        # naive: positives at once, negatives when the window closes.
        (FeedbackMethod.NAIVE, EARLY, [Step(1, 1.0)]),
        (FeedbackMethod.NAIVE, CLOSED_0, [Step(0, 1.0)]),
        (FeedbackMethod.NAIVE, CLOSED_1, []),
        (FeedbackMethod.NAIVE, WAITED_0, []),
        # closed: the final label only.
        (FeedbackMethod.CLOSED, EARLY, []),
        (FeedbackMethod.CLOSED, CLOSED_1, [Step(1, 1.0)]),
        (FeedbackMethod.CLOSED, CLOSED_0, [Step(0, 1.0)]),
        # fnw: a fake negative at once, the positive again; weights (1-p)(1+p) and 1+p.
        (FeedbackMethod.FNW, DECIDED_0, [Step(0, 0.8 * 1.2)]),
        (FeedbackMethod.FNW, EARLY, [Step(1, 1.2)]),
        (FeedbackMethod.FNW, LATE, [Step(1, 1.2)]),
        (FeedbackMethod.FNW, CLOSED_0, []),
        # esdfm: the label known after the wait; a late conversion again as a positive.
        (FeedbackMethod.ESDFM, WAITED_1, [Step(1, 1.25)]),
        (FeedbackMethod.ESDFM, WAITED_0, [Step(0, 1.25 * 0.8)]),
        (FeedbackMethod.ESDFM, EARLY, []),
        (FeedbackMethod.ESDFM, LATE, [Step(1, 1.25)]),
        (FeedbackMethod.ESDFM, CLOSED_1, []),
        # dfm: observed once, after the wait; not yet converted is the censored likelihood.
        (FeedbackMethod.DFM, WAITED_1, [Step(1, 1.0)]),
        (FeedbackMethod.DFM, LATE, []),
    ],
)
def test_each_method_learns_its_events_with_its_weights(
    method: FeedbackMethod, item: TrainingExample, expected: list[Step]
) -> None:
    result = run(method, item)
    assert [s.label for s in result] == [s.label for s in expected]
    assert [s.weight for s in result] == pytest.approx([s.weight for s in expected])


def test_dfm_splits_a_censored_example_by_the_posterior_of_a_late_conversion() -> None:
    p, late = 0.2, 0.25
    (positive, negative) = run(FeedbackMethod.DFM, WAITED_0, p=p)
    q = p * late / (1 - p + p * late)
    assert (positive.label, negative.label) == (1, 0)
    assert positive.weight == pytest.approx(q) and negative.weight == pytest.approx(1 - q)
    # The EM step has the gradient of -log(1 - p + p S) in the logit: p - q.
    gradient = positive.weight * (p - 1) + negative.weight * p
    assert gradient == pytest.approx(p * (1 - p) * (1 - late) / (1 - p + p * late))


def test_which_examples_go_to_the_training_topic() -> None:
    for method in FeedbackMethod:
        feedback = Feedback(method)
        assert feedback.wants(str(LabelKind.CONVERTED)) and feedback.wants(str(LabelKind.CLOSED))
        assert feedback.wants(DECIDED) == (method is FeedbackMethod.FNW)
        uses_wait = method in (FeedbackMethod.ESDFM, FeedbackMethod.DFM)
        assert feedback.wants(str(LabelKind.ELAPSED)) == uses_wait
        assert feedback.ledger_elapsed_ms == (WAIT if uses_wait else 0)


def test_final_labels_are_counted_once_before_learning() -> None:
    """A converted decision's final label is its conversion; its closing says nothing new."""
    learner = OnlineLearner(window=10, feedback=Feedback(FeedbackMethod.ESDFM))
    for item in (DECIDED_0, EARLY, WAITED_1, CLOSED_1):
        learner.learn(item)
    assert learner.metrics.seen == 1 and learner.metrics.label_rate == 1.0
    learner.learn(CLOSED_0)
    assert learner.metrics.seen == 2


def test_esdfm_teaches_its_auxiliary_models_from_closed_windows() -> None:
    model = PurchaseModel()
    learner = OnlineLearner(model, feedback=Feedback(FeedbackMethod.ESDFM, WAIT))
    before = model.auxiliary(FEATURES, 10.0)
    rng = random.Random(3)
    for index in range(1500):
        # Every decision converts, always after the wait: f_dp -> 1 and f_rn -> 0.
        converted = 2 * WAIT + rng.randrange(WAIT)
        learner.learn(example(str(LabelKind.CLOSED), 1, after_ms=24 * WAIT, converted_ms=converted))
        del index
    late, never = model.auxiliary(FEATURES, 10.0)
    assert before == (0.5, 0.5)
    assert late > 0.85 and never < 0.15
