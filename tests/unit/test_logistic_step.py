"""The purchase model's hand-computed learning step against River's ``learn_one``, bit for bit.

``ScaledLogistic`` (``engine.model.logistic``) replaces River's ``Pipeline.learn_one`` and
``predict_proba_one`` for the model's three classifiers; River stays the reference. Every test
here runs River and the hand step side by side over long streams and compares after every
step, with ``==`` plus the sign of zero and the type (no tolerance): the scaler's counts, means
and variances, the weights, the intercept, the optimizer's step count, and the probabilities.
The streams include sample weights (0, tiny, large enough to be clipped), inputs that stay
constant (variance 0) or are first seen late, both labels, and values that push the score past
the loss's (|z| > 18) and the sigmoid's (|z| > 30) cut-offs; ``reached`` checks they did.
"""

from __future__ import annotations

import copy
import math
import pickle
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import compose, linear_model, optim, preprocessing, utils

from engine.errors import ModelSnapshotError
from engine.labels import LabelKind
from engine.model.feedback import (
    Feedback,
    FeedbackMethod,
    TrainingExample,
    needs_auxiliary,
    steps,
)
from engine.model.inputs import INPUT_NAMES, MODEL_FEATURES, input_row, model_inputs
from engine.model.logistic import ScaledLogistic, UnsupportedPipeline
from engine.model.prequential import OnlineLearner
from engine.model.purchase_model import PurchaseModel, _logistic, verify_snapshot
from tests.model_keys import SIGNING_KEY, VERIFY_KEY

INPUTS = len(INPUT_NAMES)


def same(a: object, b: object) -> bool:
    """Equal, of the same type, and with the same sign (``0.0 == -0.0`` is not enough)."""
    if type(a) is not type(b) or a != b:
        return False
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1.0, a) == math.copysign(1.0, b)
    return True


def river_p(reference: compose.Pipeline, row: Sequence[float]) -> float:
    """River's P(True), on a copy: ``predict_proba_one`` may insert keys in the scaler's dicts."""
    scratch = copy.deepcopy(reference)
    return float(scratch.predict_proba_one(dict(zip(INPUT_NAMES, row, strict=True)))[True])


def assert_same_state(fit: ScaledLogistic, reference: compose.Pipeline) -> None:
    """The hand step's lists against River's dicts (a key River lacks reads as River's default)."""
    scaler, classifier = reference.steps.values()
    weights = classifier.weights
    for i, name in enumerate(INPUT_NAMES):
        assert same(fit.counts[i], float(scaler.counts.get(name, 0))), name  # floats, exact
        assert same(fit.means[i], scaler.means.get(name, 0.0)), name
        assert same(fit.variances[i], scaler.vars.get(name, 0.0)), name
        assert same(fit.weights[i], weights.get(name, 0.0)), name
    assert same(fit.intercept, classifier.intercept)
    assert fit.n_iterations == classifier.optimizer.n_iterations


def assert_same_pipeline(
    mirror: compose.Pipeline, reference: compose.Pipeline, *, same_pickle: bool = True
) -> None:
    """A written-back pipeline is River's: the same keys in the same order, the same values,
    the same pickle (unless one of them was unpickled: that alone changes which equal
    strings are one object, hence the pickle's memo references)."""
    (scaler, classifier), (ref_scaler, ref_classifier) = (
        mirror.steps.values(),
        reference.steps.values(),
    )
    for mine, theirs in (
        (scaler.counts, ref_scaler.counts),
        (scaler.means, ref_scaler.means),
        (scaler.vars, ref_scaler.vars),
        (classifier.weights, ref_classifier.weights),
    ):
        assert list(mine) == list(theirs)
        assert all(same(mine[k], theirs[k]) for k in theirs)
    assert same(classifier.intercept, ref_classifier.intercept)
    assert classifier.optimizer.n_iterations == ref_classifier.optimizer.n_iterations
    if same_pickle:
        assert pickle.dumps(mirror, protocol=5) == pickle.dumps(reference, protocol=5)


class Reached:
    """What River's side of a stream went through: clipped gradients, the loss's and the
    sigmoid's cut-offs (recorded by wrapping River's own functions)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: Counter[str] = Counter()
        clamp, sigmoid, gradient = utils.math.clamp, utils.math.sigmoid, optim.losses.Log.gradient

        def clamp_spy(x: float, minimum: float = 0.0, maximum: float = 1.0) -> float:
            self.seen["clipped"] += not minimum <= x <= maximum
            return clamp(x, minimum, maximum)

        def sigmoid_spy(x: float) -> float:
            self.seen["sigmoid cut-off"] += abs(x) > 30
            return sigmoid(x)

        def gradient_spy(loss: optim.losses.Log, y_true: Any, y_pred: Any) -> Any:
            z = y_pred if y_true else -y_pred
            self.seen["loss z > 18"] += z > 18.0
            self.seen["loss z < -18"] += z < -18.0
            return gradient(loss, y_true=y_true, y_pred=y_pred)

        monkeypatch.setattr(utils.math, "clamp", clamp_spy)
        monkeypatch.setattr(utils.math, "sigmoid", sigmoid_spy)
        monkeypatch.setattr(optim.losses.Log, "gradient", gradient_spy)

    def assert_all(self, *names: str) -> None:
        missing = [name for name in names if not self.seen[name]]
        assert not missing, f"the stream never reached {missing} ({dict(self.seen)})"


EXTREMES = (1e6, -1e4, 1e-300, 5e15, -0.0, 1e80, -3e40)
WEIGHTS = (1.0, 1.0, 1.0, 1.0, 0.0, 0.37, 2.5, 1e-9, 3e12)
"""Sample weights; 3e12 is clipped whenever |gradient| > 1/3 (``clip_gradient`` = 1e12)."""


def stream(
    rng: random.Random, steps: int, *, extremes: float
) -> Iterator[tuple[list[float], bool, float]]:
    """(row, label, weight) with constant inputs, inputs first seen late, and extremes."""
    constant = {i: rng.choice((0.0, 3.0, -2.5)) for i in rng.sample(range(INPUTS), 3)}
    late = {i: rng.randrange(steps) for i in rng.sample(range(INPUTS), 5) if i not in constant}
    for step in range(steps):
        row: list[float] = []
        for i in range(INPUTS):
            if i in constant:
                row.append(constant[i])
            elif step < late.get(i, 0) or rng.random() < 0.15:
                row.append(0.0)
            elif rng.random() < extremes:
                row.append(rng.choice(EXTREMES))
            else:
                row.append(rng.gauss(0.0, 1.0) * rng.choice((0.1, 1.0, 10.0)))
        yield row, rng.random() < 0.3, rng.choice(WEIGHTS)


PROBES: tuple[list[float], ...] = (
    [0.0] * INPUTS,
    [1.0] * INPUTS,
    [(-1.0) ** i * 2.0**i for i in range(INPUTS)],
)


def run_side_by_side(
    reference: compose.Pipeline,
    rows: Iterator[tuple[list[float], bool, float]],
    *,
    check_every: int = 1,
) -> ScaledLogistic:
    """Learn ``rows`` with River and with the hand step (on a copy); compare after each step."""
    fit = ScaledLogistic(copy.deepcopy(reference))
    for step, (row, label, weight) in enumerate(rows):
        reference.learn_one(dict(zip(INPUT_NAMES, row, strict=True)), label, w=weight)
        fit.learn(row, label, weight)
        assert_same_state(fit, reference)
        if step % check_every == 0:
            for probe in (row, *PROBES):
                assert same(fit.predict(probe), river_p(reference, probe))
        if step % 97 == 0:
            assert_same_pipeline(fit.write_back(), reference)
    assert_same_pipeline(fit.write_back(), reference)
    return fit


@pytest.mark.parametrize(
    ("learning_rate", "intercept_lr", "l2", "extremes"),
    [
        (0.003, 0.02, 0.0, 0.0),  # the purchase model's settings, ordinary values
        (0.003, 0.02, 0.0, 0.02),
        (0.5, 0.1, 0.0, 0.02),
        (0.05, 0.02, 0.01, 0.02),  # with an L2 penalty
    ],
)
def test_the_hand_step_is_river_learn_one_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
    learning_rate: float,
    intercept_lr: float,
    l2: float,
    extremes: float,
) -> None:
    reached = Reached(monkeypatch)
    rng = random.Random(f"{learning_rate}/{l2}/{extremes}")
    reference = _logistic(learning_rate, intercept_lr, l2)
    fit = run_side_by_side(reference, stream(rng, 1500, extremes=extremes), check_every=5)
    assert fit.n_iterations == 1500
    reached.assert_all("clipped", "loss z > 18", "loss z < -18", "sigmoid cut-off")
    assert any(var == 0.0 for var in fit.variances)  # the constant inputs


def test_inputs_river_has_not_seen_yet_are_learned_as_river_learns_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipeline that learned only some inputs (in another key order) is read, continued with
    every input, and written back with River's key order."""
    rng = random.Random(7)
    reference = _logistic(0.05, 0.02, 0.0)
    some = rng.sample(INPUT_NAMES, 9)
    for _ in range(40):
        reference.learn_one({name: rng.gauss(0.0, 2.0) for name in some}, rng.random() < 0.4)
    assert list(reference.steps["LogisticRegression"].weights) == some
    fit = run_side_by_side(reference, stream(rng, 300, extremes=0.02))
    assert list(fit.write_back().steps["StandardScaler"].counts)[:9] == some


def scores_around_the_cut_offs() -> list[float]:
    """Raw scores on both sides of the loss's (|z| = 18) and the sigmoid's (|z| = 30) cut-offs."""
    scores = [z / 4 for z in range(-160, 161)]
    for edge in (18.0, 30.0):
        for z in (edge, -edge):
            scores += [z, math.nextafter(z, 0.0), math.nextafter(z, math.inf * z)]
    return scores


@pytest.mark.parametrize("label", [False, True])
def test_scores_at_and_around_the_cut_offs_are_learned_as_river_learns_them(label: bool) -> None:
    """The first step of a model whose intercept starts at z (weights 0, so the raw score is
    z; the scaler has seen two rows, so the step moves the weights too): each side of each
    cut-off, for both labels, then a few more steps."""
    rng = random.Random(int(label))
    for z in scores_around_the_cut_offs():
        scaler = preprocessing.StandardScaler()
        for _ in range(2):
            scaler.learn_one({name: rng.gauss(0.0, 1.0) for name in INPUT_NAMES})
        reference = compose.Pipeline(
            scaler,
            linear_model.LogisticRegression(
                optimizer=optim.SGD(0.003), intercept_lr=0.02, intercept_init=z
            ),
        )
        rows = [([rng.gauss(0.0, 1.0) for _ in range(INPUTS)], label, 1.0) for _ in range(3)]
        run_side_by_side(reference, iter(rows))


FLOATS = st.one_of(
    st.floats(-1e100, 1e100, allow_nan=False, allow_infinity=False),
    st.sampled_from((0.0, -0.0, 1.0, 1e-300, 3.0)),
)
ROWS = st.tuples(
    st.lists(FLOATS, min_size=INPUTS, max_size=INPUTS),
    st.booleans(),
    st.one_of(st.sampled_from(WEIGHTS), st.floats(0.0, 1e13, allow_nan=False)),
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(ROWS, min_size=1, max_size=40),
    learning_rate=st.sampled_from((0.003, 0.05, 1.0)),
    l2=st.sampled_from((0.0, 0.001)),
)
def test_any_stream_is_learned_as_river_learns_it(
    rows: list[tuple[list[float], bool, float]], learning_rate: float, l2: float
) -> None:
    run_side_by_side(_logistic(learning_rate, 0.02, l2), iter(rows))


# -- the purchase model: main and auxiliary classifiers, snapshots -------------------------------


def random_features(rng: random.Random, step: int) -> dict[str, float]:
    """Feature vectors with missing features, features that appear late, and huge values."""
    features: dict[str, float] = {}
    for index, name in enumerate(MODEL_FEATURES):
        if step < 20 * index or rng.random() < 0.2:  # the later features appear later
            continue
        value = rng.choice((0.0, 1.0, 3.0, 0.25, 2_592_000.0, 17.5)) * rng.random() * 3
        if rng.random() < 0.01:
            value = rng.choice((1e9, 1e15))
        features[name] = value
    return features


class References:
    """The purchase model's three pipelines, learned by River's ``learn_one`` (the old path)."""

    def __init__(self) -> None:
        self.purchase = _logistic(0.003, 0.02, 0.0)
        self.late = _logistic(0.003, 0.02, 0.0)
        self.never = _logistic(0.003, 0.02, 0.0)

    def all(self) -> tuple[compose.Pipeline, compose.Pipeline, compose.Pipeline]:
        return self.purchase, self.late, self.never


def assert_model_is_river(
    model: PurchaseModel,
    refs: References,
    features: Mapping[str, float],
    discount: float,
    *,
    restored: bool,
) -> None:
    row = input_row(features, discount)
    assert same(model.predict_one(features, discount), river_p(refs.purchase, row))
    assert same(model.predict_inputs(row), river_p(refs.purchase, row))
    late, never = model.auxiliary(features, discount)
    assert same(late, river_p(refs.late, row)) and same(never, river_p(refs.never, row))
    assert (late, never) == model.auxiliary_inputs(row)
    pipelines = model.river_pipelines()
    for mirror, reference in zip(
        (pipelines.purchase, pipelines.late, pipelines.never), refs.all(), strict=True
    ):
        assert_same_pipeline(mirror, reference, same_pickle=not restored)


def test_the_model_and_its_auxiliary_classifiers_learn_as_river_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``PurchaseModel`` against the River pipelines it used to learn with, including a
    snapshot and restore halfway (the restored model goes on learning identically)."""
    reached = Reached(monkeypatch)
    rng = random.Random(20261204)
    model, refs = PurchaseModel(), References()
    for step in range(1200):
        features, discount = random_features(rng, step), rng.choice((0.0, 5.0, 12.5, 20.0))
        row = model_inputs(features, discount)
        if rng.random() < 0.6:
            label, weight = int(rng.random() < 0.3), rng.choice(WEIGHTS)
            model.learn_one(features, discount, label, weight)
            refs.purchase.learn_one(row, bool(label), w=weight)
        else:
            late, never = (rng.choice((True, False, None)) for _ in range(2))
            model.learn_auxiliary(features, discount, late=late, never=never)
            if late is not None:
                refs.late.learn_one(row, late)
            if never is not None:
                refs.never.learn_one(row, never)
        if step % 3 == 0:
            assert_model_is_river(model, refs, features, discount, restored=step > 600)
        if step == 600:
            blob = model.snapshot(SIGNING_KEY, signed_at_ms=1)
            payload = verify_snapshot(blob, VERIFY_KEY).payload
            # The payload River's pipelines would have given, byte for byte (keys interned as
            # the snapshot's literals are, so that pickle's memo treats them alike).
            state = {sys.intern(k): v for k, v in pickle.loads(payload).items()}
            state.update(pipeline=refs.purchase, late=refs.late, never=refs.never)
            assert payload == pickle.dumps(state, protocol=5)
            model = PurchaseModel.restore(blob, VERIFY_KEY)
    assert_model_is_river(model, refs, {}, 10.0, restored=True)
    reached.assert_all("clipped", "loss z > 18", "loss z < -18", "sigmoid cut-off")


def learn_from_features(model: PurchaseModel, feedback: Feedback, ex: TrainingExample) -> float:
    """``OnlineLearner.learn`` as it was, through the model's methods that take features."""
    f, d = ex.features, ex.discount_pct
    p = model.predict_one(f, d)
    method, wait = feedback.method, feedback.elapsed_ms
    late, never = model.auxiliary(f, d) if needs_auxiliary(method, ex, wait) else (0.0, 0.0)
    for step in steps(method, ex, elapsed_ms=wait, p=p, late=late, never=never):
        model.learn_one(f, d, step.label, step.weight)
    if method in (FeedbackMethod.ESDFM, FeedbackMethod.DFM) and ex.kind == LabelKind.CLOSED:
        assert ex.decided_at is not None
        converted = ex.converted_at
        is_late = converted is not None and converted - ex.decided_at > wait
        if method is FeedbackMethod.ESDFM:
            is_never = (converted is None) if (converted is None or is_late) else None
            model.learn_auxiliary(f, d, late=is_late, never=is_never)
        elif converted is not None:
            model.learn_auxiliary(f, d, late=is_late, never=None)
    return p


@pytest.mark.parametrize("method", [FeedbackMethod.DFM, FeedbackMethod.ESDFM, FeedbackMethod.FNW])
def test_the_learner_step_learns_what_the_model_s_feature_methods_learn(
    method: FeedbackMethod,
) -> None:
    """``OnlineLearner`` builds each example's input row once and calls the ``*_inputs``
    methods: the same predictions and the same three pipelines as through the features."""
    feedback = Feedback(method=method, elapsed_ms=3_600_000)
    learner, plain = OnlineLearner(feedback=feedback), PurchaseModel()
    rng = random.Random(str(method))
    kinds = ("decided", "elapsed", "converted", "closed")
    for step in range(600):
        decided = 1_767_225_600_000 + step * 1000
        converted = decided + rng.choice((60_000, 7_200_000)) if rng.random() < 0.4 else None
        kind = rng.choice(kinds)
        label = int(converted is not None) if kind != "decided" else 0
        example = TrainingExample(
            decision_id=f"d{step}",
            features=random_features(rng, step),
            discount_pct=rng.choice((0.0, 10.0)),
            label=1 if kind == "converted" else label,
            labeled_at=decided + 86_400_000,
            kind=kind,
            decided_at=decided,
            converted_at=converted if kind == "closed" else None,
        )
        assert same(learner.learn(example), learn_from_features(plain, feedback, example))
    assert learner.model.version == plain.version != "lr-0"
    mine, theirs = learner.model.river_pipelines(), plain.river_pipelines()
    for a, b in zip(
        (mine.purchase, mine.late, mine.never),
        (theirs.purchase, theirs.late, theirs.never),
        strict=True,
    ):
        assert pickle.dumps(a, protocol=5) == pickle.dumps(b, protocol=5)


# -- what the hand step refuses -----------------------------------------------------------------

UNSUPPORTED: dict[str, Callable[[], compose.Pipeline]] = {
    "Adam": lambda: compose.Pipeline(
        preprocessing.StandardScaler(), linear_model.LogisticRegression(optimizer=optim.Adam())
    ),
    "L1": lambda: compose.Pipeline(
        preprocessing.StandardScaler(), linear_model.LogisticRegression(l1=0.1)
    ),
    "rolling scaler": lambda: compose.Pipeline(
        preprocessing.StandardScaler(window_size=10), linear_model.LogisticRegression()
    ),
    "hinge loss": lambda: compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(loss=optim.losses.Hinge()),
    ),
    "one step": lambda: compose.Pipeline(linear_model.LogisticRegression()),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_a_pipeline_the_hand_step_does_not_reproduce_is_refused(name: str) -> None:
    with pytest.raises(UnsupportedPipeline):
        ScaledLogistic(UNSUPPORTED[name]())


def test_a_snapshot_with_an_unsupported_pipeline_is_refused() -> None:
    model = PurchaseModel()
    model._late = ScaledLogistic(_logistic(0.003, 0.02, 0.0))
    model._late.pipeline = UNSUPPORTED["Adam"]()
    blob = model.snapshot(SIGNING_KEY, signed_at_ms=1)
    # The exact allow-list refuses the optimizer's class before the pipeline is even built.
    with pytest.raises(ModelSnapshotError, match=r"river\.optim\.adam\.Adam is not allowed"):
        PurchaseModel.restore(blob, VERIFY_KEY)


def test_a_row_of_the_wrong_length_changes_nothing() -> None:
    fit = ScaledLogistic(_logistic(0.003, 0.02, 0.0))
    fit.learn([1.0] * INPUTS, True)
    before = (list(fit.counts), list(fit.means), list(fit.weights), fit.intercept)
    for row in ([1.0] * (INPUTS - 1), [1.0] * (INPUTS + 1)):
        with pytest.raises(ValueError, match="input row"):
            fit.learn(row, False)
        with pytest.raises(ValueError, match="input row"):
            fit.predict(row)
    assert (list(fit.counts), list(fit.means), list(fit.weights), fit.intercept) == before
