"""Prequential ("test, then train") evaluation of the online model, and the learner step.

Every labelled example is first scored by the current model, the score and the label update
the metrics, and only then does the model learn the example. ``PrequentialMetrics`` covers a
sliding window of the last ``window`` examples, so it follows the model as it drifts; the
backtest's ``engine.analysis.backtest.metrics.ModelStats`` covers a whole run. Both compute
each metric with the one implementation here: ``log_loss`` (one example's loss),
``roc_auc`` (exact) and ``CalibrationBins`` (ECE and the calibration table).

Where River has the metric, it was measured against these (River 0.26) and not used, because
it does not give the same numbers:

- ROC AUC: ``metrics.ROCAUC`` is an approximation (a fixed grid of thresholds: 0.49925 for an
  exact 0.49921 on 200,000 random pairs), and ``metrics.RollingROCAUC`` counts tied scores as
  wrongly ranked instead of one half (``[(1.0, 1), (1.0, 0)]`` gives 0.0, not 0.5) and gives
  0.0 instead of no value for a one-class window. Scores tie in practice (the sigmoid's
  cut-offs, users with the same features), so ``roc_auc`` stays exact, as documented.
- Log loss: ``metrics.LogLoss`` clips to the same [1e-15, 1 - 1e-15], but averages with an
  incremental mean (``stats.Mean``), which differs from a sum divided by the count in the last
  bits (1.6e-14 relative on 200,000 pairs); report.json and the learner's figures would move.
- Rolling windows: ``utils.Rolling`` reverts each evicted example from a running aggregate,
  which drifts in the last bits (up to 8.6e-15 relative over a 1,000-example window), and the
  exact AUC and the checkpoint need the window's examples anyway; the window is a ``deque``
  and its metrics are recomputed from it (cached until the next update).

Defined values (``as_dict`` is always JSON-safe, never NaN):

- empty window: every metric is ``None``;
- ``auc`` is ``None`` while the window holds one class only (no positive/negative pair to rank);
- ``log_loss`` clips p to [1e-15, 1 - 1e-15], so it is finite even for p = 0 or 1.

>>> metrics = PrequentialMetrics(window=4)
>>> for p, y in [(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)]:
...     metrics.update(p, y)
>>> metrics.auc, metrics.label_rate, metrics.count
(0.75, 0.5, 4)
>>> metrics.update(0.9, 1)  # evicts (0.1, 0)
>>> metrics.count, metrics.seen, round(metrics.auc, 4)
(4, 5, 0.6667)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from engine.labels import LabelKind
from engine.model.feedback import Feedback, FeedbackMethod, TrainingExample, needs_auxiliary, steps
from engine.model.inputs import input_row
from engine.model.purchase_model import PurchaseModel

ECE_BINS = 10
"""Equal-width calibration bins over [0, 1]; p falls in bin ``min(floor(10 p), 9)``."""
LOG_LOSS_EPS = 1e-15
"""``log_loss`` clips p to [eps, 1 - eps] (River's ``LogLoss`` clips the same)."""


def log_loss(p: float, label: int) -> float:
    """One example's log loss: -log of the probability p gave the label, p clipped.

    Finite even for a confident mistake (p = 0 with label 1 costs -log(1e-15), about 34.5).

    >>> round(log_loss(0.8, 1), 6), round(log_loss(0.8, 0), 6), round(log_loss(0.0, 1), 2)
    (0.223144, 1.609438, 34.54)
    """
    clipped = min(max(p, LOG_LOSS_EPS), 1 - LOG_LOSS_EPS)
    return -math.log(clipped if label else 1 - clipped)


class CalibrationBins:
    """Predictions and labels by ``ECE_BINS`` equal-width bins of p: sums and counts.

    >>> bins = CalibrationBins()
    >>> for p, y in [(0.05, 0), (0.15, 0), (0.15, 1), (0.95, 1)]:
    ...     bins.add(p, y)
    >>> round(bins.ece(), 6), [row["bin"] for row in bins.rows()]
    (0.2, [0, 1, 9])
    """

    __slots__ = ("counts", "p_sums", "y_sums")

    def __init__(self) -> None:
        self.p_sums = [0.0] * ECE_BINS
        self.y_sums = [0] * ECE_BINS
        self.counts = [0] * ECE_BINS

    def add(self, p: float, label: int) -> None:
        index = min(int(p * ECE_BINS), ECE_BINS - 1)
        self.p_sums[index] += p
        self.y_sums[index] += label
        self.counts[index] += 1

    def merge(self, other: CalibrationBins) -> None:
        for index in range(ECE_BINS):
            self.p_sums[index] += other.p_sums[index]
            self.y_sums[index] += other.y_sums[index]
            self.counts[index] += other.counts[index]

    def ece(self) -> float | None:
        """Expected calibration error: sum over bins of (n_bin / n) * |mean p - mean y|."""
        n = sum(self.counts)
        if not n:
            return None
        gaps = (abs(p_sum - y_sum) for p_sum, y_sum in zip(self.p_sums, self.y_sums, strict=True))
        return math.fsum(gaps) / n

    def rows(self) -> list[dict[str, float | int]]:
        """``{bin, p_mean, rate, count}`` for each bin that holds a prediction."""
        return [
            {
                "bin": index,
                "p_mean": self.p_sums[index] / count,
                "rate": self.y_sums[index] / count,
                "count": count,
            }
            for index, count in enumerate(self.counts)
            if count
        ]


class PrequentialMetrics:
    """Log loss, exact ROC AUC, expected calibration error and label rate over a window."""

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.seen = 0
        self._items: deque[tuple[float, int]] = deque(maxlen=window)
        self._cache: dict[str, float | None] = {}

    @property
    def count(self) -> int:
        """Examples in the window (at most ``window``); ``seen`` counts every update."""
        return len(self._items)

    def update(self, p: float, label: int) -> None:
        """Record a prediction made BEFORE the model learned this example, and its label."""
        p = float(p)
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        self._items.append((p, int(label)))
        self.seen += 1
        self._cache.clear()

    def _cached(self, name: str, compute: Callable[[], float | None]) -> float | None:
        if name not in self._cache:
            self._cache[name] = compute() if self._items else None
        return self._cache[name]

    @property
    def log_loss(self) -> float | None:
        """Mean ``log_loss`` over the window, summed exactly (``math.fsum``)."""
        return self._cached(
            "log_loss",
            lambda: math.fsum(log_loss(p, y) for p, y in self._items) / len(self._items),
        )

    @property
    def auc(self) -> float | None:
        """Exact ROC AUC (Mann-Whitney U, tied scores count one half); ``None`` if one class."""
        return self._cached("auc", lambda: roc_auc(self._items))

    @property
    def ece(self) -> float | None:
        """Expected calibration error of the window (``CalibrationBins.ece``)."""

        def compute() -> float | None:
            bins = CalibrationBins()
            for p, y in self._items:
                bins.add(p, y)
            return bins.ece()

        return self._cached("ece", compute)

    @property
    def label_rate(self) -> float | None:
        return self._cached("label_rate", lambda: sum(y for _, y in self._items) / len(self._items))

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "window": self.window,
            "count": self.count,
            "seen": self.seen,
            "log_loss": self.log_loss,
            "auc": self.auc,
            "ece": self.ece,
            "label_rate": self.label_rate,
        }

    def to_state(self) -> dict[str, Any]:
        """A JSON-able copy of the window, to resume the metrics after a restart."""
        return {"window": self.window, "seen": self.seen, "items": [list(i) for i in self._items]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrequentialMetrics:
        """The metrics ``to_state`` saved; ``ValueError`` if ``state`` is malformed."""
        try:
            metrics = cls(int(state["window"]))
            for p, y in state["items"][-metrics.window :]:
                metrics.update(p, y)
            metrics.seen = max(int(state["seen"]), metrics.count)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed prequential metrics state: {exc}") from None
        return metrics


def roc_auc(pairs: Iterable[tuple[float, int]]) -> float | None:
    """Exact ROC AUC of ``(score, label)`` pairs with average ranks for ties, or ``None``.

    Computed on doubled ranks in integers, so the result is the exact fraction
    (pairs ranked right + half the tied pairs) / (positives x negatives), rounded once.

    >>> roc_auc([(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)])
    0.75
    >>> roc_auc([(0.5, 1), (0.5, 0)])
    0.5
    >>> roc_auc([(0.2, 1)]) is None
    True
    """
    ordered = sorted(pairs, key=lambda pair: pair[0])
    positives = sum(1 for _, y in ordered if y)
    negatives = len(ordered) - positives
    if positives == 0 or negatives == 0:
        return None
    doubled_rank_sum = 0  # sum over positives of 2 * (average 1-based rank)
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1][0] == ordered[start][0]:
            end += 1
        tied_positives = sum(1 for _, y in ordered[start : end + 1] if y)
        doubled_rank_sum += tied_positives * (start + 1 + end + 1)
        start = end + 1
    doubled_u = doubled_rank_sum - positives * (positives + 1)
    return doubled_u / (2 * positives * negatives)


class OnlineLearner:
    """A model, its delayed-feedback method and its prequential metrics (the learner step).

    Each training example is first scored by the current model; when it is the first to
    carry its decision's final label (``converted``, or ``closed`` with 0) the score and the
    label update the metrics; only then does the model learn, as ``feedback.method`` says
    (``engine.model.feedback``). Pure (no I/O, no clock): the same examples in the same order give
    the same model and the same metrics, live or in a backtest. Each example's input row is
    built once and handed to the model's ``*_inputs`` methods (the score, the auxiliary
    estimates and every update read the same row).

    >>> learner = OnlineLearner(window=100)
    >>> example = {"decision_id": "d1", "features": {"cart_count_24h": 3.0},
    ...            "discount_pct": 10, "label": 0, "labeled_at": 1_767_312_000_000,
    ...            "kind": "closed", "decided_at": 1_767_225_600_000}
    >>> learner.learn(example)  # the prediction made before learning
    0.5
    >>> learner.metrics.count
    1
    """

    def __init__(
        self,
        model: PurchaseModel | None = None,
        metrics: PrequentialMetrics | None = None,
        *,
        window: int = 1000,
        feedback: Feedback | None = None,
        on_final: Callable[[TrainingExample, float, int], None] | None = None,
    ) -> None:
        self.model = model if model is not None else PurchaseModel()
        self.metrics = metrics if metrics is not None else PrequentialMetrics(window)
        self.feedback = feedback if feedback is not None else Feedback()
        self.on_final = on_final
        """Also told every (example, prediction, final label) (backtests keep them all)."""
        self.last_labeled_at: int | None = None

    @property
    def version(self) -> str:
        return self.model.version

    def learn(self, example: Mapping[str, object] | TrainingExample) -> float:
        """Predict, update the metrics, learn; returns the prediction made before learning.

        Raises ``InvalidEvent`` (and changes nothing) when ``example`` is not a valid
        training example v1.
        """
        parsed = (
            example
            if isinstance(example, TrainingExample)
            else TrainingExample.from_message(example)
        )
        model = self.model
        row = input_row(parsed.features, parsed.discount_pct)  # built once for every step below
        p = model.predict_inputs(row)
        final = parsed.final_label
        if final is not None:
            self.metrics.update(p, final)
            if self.on_final is not None:
                self.on_final(parsed, p, final)
        method, wait = self.feedback.method, self.feedback.elapsed_ms
        late, never = (
            model.auxiliary_inputs(row) if needs_auxiliary(method, parsed, wait) else (0.0, 0.0)
        )
        for step in steps(method, parsed, elapsed_ms=wait, p=p, late=late, never=never):
            model.learn_inputs(row, step.label, step.weight)
        uses_auxiliary = method in (FeedbackMethod.ESDFM, FeedbackMethod.DFM)
        if uses_auxiliary and parsed.kind == LabelKind.CLOSED and parsed.decided_at is not None:
            self._learn_auxiliary(parsed, row, method, wait)
        if self.last_labeled_at is None or parsed.labeled_at > self.last_labeled_at:
            self.last_labeled_at = parsed.labeled_at
        return p

    def _learn_auxiliary(
        self, closed: TrainingExample, row: list[float], method: FeedbackMethod, wait: int
    ) -> None:
        """A closed window teaches when conversions come (see ``engine.model.feedback``);
        ``row`` is its input row."""
        assert closed.decided_at is not None
        converted_at = closed.converted_at
        late = converted_at is not None and converted_at - closed.decided_at > wait
        open_at_wait = converted_at is None or late
        if method is FeedbackMethod.ESDFM:
            never = (converted_at is None) if open_at_wait else None
            self.model.learn_auxiliary_inputs(row, late=late, never=never)
        elif converted_at is not None:
            self.model.learn_auxiliary_inputs(row, late=late, never=None)

    def as_dict(self) -> dict[str, float | int | str | None]:
        """Model version, examples learned and the window's metrics (JSON-safe)."""
        return {
            "model_version": self.model.version,
            "examples_learned": self.model.examples_learned,
            "last_labeled_at": self.last_labeled_at,
            **self.metrics.as_dict(),
        }
