"""River's ``StandardScaler | LogisticRegression`` learning step, computed by hand on flat lists.

River's ``Pipeline.learn_one`` spends most of its time on machinery (the pipeline's plan and
argument routing, dict rows, a learn-mode ``VectorDict`` per call, the optimizer's dispatch),
not on the few dozen floating-point operations of the step. ``ScaledLogistic`` keeps the
parameters in lists, one slot per input in ``INPUT_NAMES`` order, and does exactly River
0.26.1's arithmetic in River's order (``tests/unit/test_logistic_step.py`` holds it to
``learn_one`` and ``predict_proba_one`` bit for bit, every step):

1. the scaler learns first (the pipeline updates an unsupervised step before transforming):
   per input, ``n += 1``, ``mean += (x - old) / n``,
   ``var += ((x - old) * (x - mean) - var) / n``;
2. then transforms with the updated statistics: ``(x - mean) / var ** 0.5``, 0 where var is 0;
3. the classifier's raw score is the products ``weight * scaled`` summed left to right from
   0.0, plus the intercept; the ``Log`` loss's gradient (with its cut-offs at |z| = 18) times
   the sample weight, clamped to ``clip_gradient``;
4. the intercept steps by ``intercept_lr * gradient``; each weight by ``lr * (scaled *
   gradient + l2 * weight)`` (SGD, weights before the step), and the optimizer counts the step.

River stays the snapshot format: ``write_back`` writes the parameters into the pipeline this
was read from (the same keys, in the order River's own ``learn_one`` would have inserted them),
so a pickled pipeline is the one River would have pickled, and a restored one learns on
identically.
"""

from __future__ import annotations

from collections.abc import Sequence

from dealstream_native import LinearTerms, LogisticStep
from river import compose, linear_model, optim, preprocessing

from engine.model.inputs import INPUT_NAMES
from engine.model.scoring import sigmoid


class UnsupportedPipeline(ValueError):
    """A River pipeline whose learning step ``ScaledLogistic`` does not reproduce."""


def _unsupported(pipeline: compose.Pipeline) -> str | None:
    """Why ``ScaledLogistic`` cannot stand in for ``pipeline``'s ``learn_one``, or None."""
    steps = list(pipeline.steps.values())
    if len(steps) != 2:
        return "not a StandardScaler | LogisticRegression pipeline"
    scaler, classifier = steps
    if type(scaler) is not preprocessing.StandardScaler:
        return "its first step is not a StandardScaler"
    if type(classifier) is not linear_model.LogisticRegression:
        return "its second step is not a LogisticRegression"
    if not scaler.with_std or scaler.window_size is not None:
        return "the scaler is not a running, dividing StandardScaler"
    optimizer = classifier.optimizer
    if type(optimizer) is not optim.SGD or type(optimizer.lr) is not optim.schedulers.Constant:
        return "the optimizer is not SGD with a constant learning rate"
    if type(classifier.intercept_lr) is not optim.schedulers.Constant:
        return "the intercept's learning rate is not constant"
    if type(classifier.loss) is not optim.losses.Log:
        return "the loss is not Log"
    if classifier.l1 != 0:
        return "it has an L1 penalty"
    if type(classifier.initializer) is not optim.initializers.Zeros:
        return "its weights are not initialised to zeros"
    return None


class ScaledLogistic:
    """The parameters of one River pipeline in ``INPUT_NAMES`` order, and its learning step.

    Read from a pipeline once; from then on the pipeline is a mirror that ``write_back``
    updates (the model learns and predicts with this object only). The arithmetic is compiled
    (``dealstream_native.LogisticStep``, ``native/src/logistic.rs``): the same operations in the
    same order as listed above, with the C library's ``pow`` and ``exp`` that CPython calls.
    """

    __slots__ = ("_dirty", "_step", "_terms", "pipeline")

    def __init__(self, pipeline: compose.Pipeline) -> None:
        reason = _unsupported(pipeline)
        if reason is not None:
            raise UnsupportedPipeline(f"cannot learn for this River pipeline: {reason}")
        scaler, classifier = pipeline.steps.values()
        self.pipeline = pipeline
        counts, means, variances = scaler.counts, scaler.means, scaler.vars
        weights = classifier._weights
        # ``.get``: reading a defaultdict by key would insert the key. Counts are kept as
        # floats (exact below 2**53): River divides by the int, which converts it the same way.
        self._step = LogisticStep(
            counts=[float(counts.get(name, 0)) for name in INPUT_NAMES],
            means=[means.get(name, 0.0) for name in INPUT_NAMES],
            variances=[variances.get(name, 0.0) for name in INPUT_NAMES],
            weights=[weights.get(name, 0.0) for name in INPUT_NAMES],
            intercept=classifier.intercept,
            n_iterations=classifier.optimizer.n_iterations,
            lr=classifier.optimizer.lr.learning_rate,
            intercept_lr=classifier.intercept_lr.learning_rate,
            l2=classifier.l2,
            clip=classifier.clip_gradient,
            weight_pos=classifier.loss.weight_pos,
            weight_neg=classifier.loss.weight_neg,
        )
        self._terms: LinearTerms | None = None
        self._dirty = False

    def __reduce__(self) -> tuple[type[ScaledLogistic], tuple[compose.Pipeline]]:
        """Pickled as its River pipeline, brought up to date (what a snapshot stores too)."""
        return (ScaledLogistic, (self.write_back(),))

    @property
    def counts(self) -> list[float]:
        return self._step.counts

    @property
    def means(self) -> list[float]:
        return self._step.means

    @property
    def variances(self) -> list[float]:
        return self._step.variances

    @property
    def weights(self) -> list[float]:
        return self._step.weights

    @property
    def intercept(self) -> float:
        return self._step.intercept

    @property
    def n_iterations(self) -> int:
        return self._step.n_iterations

    def learn(self, x: Sequence[float], y: bool, w: float = 1.0) -> None:
        """River's ``pipeline.learn_one(dict(zip(INPUT_NAMES, x)), y, w=w)``, bit for bit.

        Raises ``ValueError`` (and changes nothing) when ``x`` is not one value per input."""
        self._step.learn(x, y, w)
        self._terms = None
        self._dirty = True

    def terms(self) -> LinearTerms:
        """The parameters as they stand, for ``Scorer`` (a new object after each step)."""
        terms = self._terms
        if terms is None:
            terms = self._terms = self._step.terms()
        return terms

    def predict(self, x: Sequence[float]) -> float:
        """River's ``predict_proba_one(dict(zip(INPUT_NAMES, x)))[True]``, bit for bit."""
        if len(x) != len(INPUT_NAMES):
            raise ValueError(f"an input row has {len(INPUT_NAMES)} values, not {len(x)}")
        terms = self.terms()
        return sigmoid(terms.total(x, 0, 0.0) + terms.intercept)

    def write_back(self) -> compose.Pipeline:
        """The pipeline, its state updated to this object's (River's own, key for key)."""
        if self._dirty:
            pipeline = self.pipeline
            scaler, classifier = pipeline.steps.values()
            counts, means, variances = scaler.counts, scaler.means, scaler.vars
            weights = classifier._weights
            step = self._step
            # After a step every input has a count, as after River's learn_one; assigning in
            # input order keeps existing keys in place and appends new ones in River's order.
            for name, n, mean, var, weight in zip(
                INPUT_NAMES, step.counts, step.means, step.variances, step.weights, strict=True
            ):
                counts[name] = int(n)
                means[name] = mean
                variances[name] = var
                weights[name] = weight
            classifier.intercept = step.intercept
            classifier.optimizer.n_iterations = step.n_iterations
            if pipeline._plan is None:
                pipeline._build_plan()  # River builds it on its first learn_one
            self._dirty = False
        return self.pipeline
