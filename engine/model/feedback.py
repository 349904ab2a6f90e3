"""Learning under delayed labels: which label events a learner sees, and how it weighs them.

A decision's label is known for sure only when its attribution window closes (24 h by
default), but a purchase says "1" at once. A learner that takes positives at once and
negatives a window later ("naive") sees a stream richer in positives than the truth and
over-predicts as served. The methods below fix that in different ways; the one a deployment
uses is ``Feedback.method`` (worker and learner must agree: both read it from the settings):

- ``closed``: learn every decision once, when its window closes. Unbiased, one window late.
- ``fnw``: fake negative weighted (Ktena et al., RecSys 2019). Every decision is learned as
  a negative at once and again as a positive when it converts; weights ``(1 - p)(1 + p)`` on
  negatives and ``1 + p`` on positives (p: the model's own current estimate) undo the bias.
- ``esdfm``: elapsed-time sampling (Yang et al., AAAI 2021). Each decision waits
  ``elapsed_ms``; then it is learned with the label known by then, and a purchase after that
  adds it again as a positive. Weights ``1 + f_dp`` on positives and ``(1 + f_dp) f_rn`` on
  negatives, with two auxiliary models learned from closed windows: f_dp(x) = P(converts
  after the wait), f_rn(x) = P(never converts | not converted by the wait).
- ``dfm``: delayed feedback model (Chapelle, KDD 2014), observed once at ``elapsed_ms``: a
  decision converted by then is a positive; one that is not is the censored likelihood
  ``1 - p + p S`` with S = P(conversion comes later | it comes, x), learned by an auxiliary
  model from closed windows; its gradient is that of a positive with weight q = pS / (1 - p +
  pS) plus a negative with weight 1 - q (an EM step).
- ``naive``: the biased stream, kept for comparisons.

``docs/model-quality.md`` compares them on the closed-loop simulator; the default is the one
that served the best-calibrated probabilities there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from engine.errors import InvalidEvent
from engine.labels import LabelKind


class FeedbackMethod(StrEnum):
    NAIVE = "naive"
    CLOSED = "closed"
    FNW = "fnw"
    ESDFM = "esdfm"
    DFM = "dfm"


DECIDED = "decided"
"""Training example kind of a decision as it is made (label 0): the ``fnw`` fake negative."""
EXAMPLE_KINDS: tuple[str, ...] = (DECIDED, *(str(kind) for kind in LabelKind))


@dataclass(frozen=True, slots=True)
class Feedback:
    method: FeedbackMethod = FeedbackMethod.DFM
    elapsed_ms: int = 3600 * 1000
    """The wait of ``esdfm`` and ``dfm`` (ignored by the others)."""

    @property
    def ledger_elapsed_ms(self) -> int:
        """What the ledger must schedule: ``elapsed`` events only for the methods that use them."""
        return self.elapsed_ms if self.method in (FeedbackMethod.ESDFM, FeedbackMethod.DFM) else 0

    def wants(self, kind: str) -> bool:
        """Whether a training example of this kind goes to the training topic.

        ``converted`` and ``closed`` always do: they carry each decision's final label, which
        the learner's prequential metrics and the auxiliary models need."""
        if kind == DECIDED:
            return self.method is FeedbackMethod.FNW
        if kind == LabelKind.ELAPSED:
            return self.ledger_elapsed_ms > 0
        return True


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """A training example v1 (``schemas/training.v1.json``), validated."""

    decision_id: str
    features: Mapping[str, float]
    discount_pct: float
    label: int
    labeled_at: int
    kind: str = str(LabelKind.CLOSED)
    """``decided``, ``converted``, ``elapsed`` or ``closed`` (the final label)."""
    decided_at: int | None = None
    """Event time of the decision (needed by ``esdfm`` / ``dfm`` to tell late conversions)."""
    converted_at: int | None = None
    """Event time of the first purchase in the window, if any (on ``closed`` examples)."""

    @property
    def final_label(self) -> int | None:
        """The decision's final label if this example carries it first, else None."""
        if self.kind == LabelKind.CONVERTED:
            return 1
        if self.kind == LabelKind.CLOSED and self.label == 0:
            return 0
        return None

    def converted_late(self, elapsed_ms: int) -> bool:
        """Whether this conversion came after the ``elapsed_ms`` wait."""
        return self.decided_at is not None and self.labeled_at - self.decided_at > elapsed_ms

    def to_message(self) -> dict[str, object]:
        message: dict[str, object] = {
            "decision_id": self.decision_id,
            "features": dict(self.features),
            "discount_pct": self.discount_pct,
            "label": self.label,
            "labeled_at": self.labeled_at,
            "kind": self.kind,
        }
        if self.decided_at is not None:
            message["decided_at"] = self.decided_at
        if self.converted_at is not None:
            message["converted_at"] = self.converted_at
        return message

    @classmethod
    def from_message(cls, message: object) -> TrainingExample:
        """Validate a decoded training message; ``InvalidEvent`` (with a code) when unusable."""
        if not isinstance(message, Mapping):
            raise InvalidEvent("not_an_object", "a training example must be a JSON object")
        for name in ("decision_id", "features", "discount_pct", "label", "labeled_at"):
            if name not in message:
                raise InvalidEvent("missing_field", f"field {name!r} is required", field=name)
        decision_id = message["decision_id"]
        if not isinstance(decision_id, str):
            raise InvalidEvent("wrong_type", "decision_id must be a string", field="decision_id")
        if not decision_id:
            raise InvalidEvent("too_short", "decision_id must not be empty", field="decision_id")
        if len(decision_id) > 128:
            raise InvalidEvent(
                "too_long", "decision_id must be at most 128 characters", "decision_id"
            )
        features = message["features"]
        if not isinstance(features, Mapping):
            raise InvalidEvent("wrong_type", "features must be an object", field="features")
        for name, value in features.items():
            if not isinstance(name, str) or not _number(value):
                raise InvalidEvent(
                    "wrong_type", f"feature {name!r} must be a finite number", f"features.{name}"
                )
        discount = message["discount_pct"]
        if not _number(discount):
            raise InvalidEvent("wrong_type", "discount_pct must be a number", field="discount_pct")
        if not 0 <= discount <= 100:
            raise InvalidEvent("out_of_range", "discount_pct must be within 0-100", "discount_pct")
        label = message["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise InvalidEvent("invalid_choice", "label must be 0 or 1", field="label")
        labeled_at = _timestamp(message, "labeled_at")
        kind = message.get("kind", str(LabelKind.CLOSED))
        if kind not in EXAMPLE_KINDS:
            raise InvalidEvent(
                "invalid_choice", f"kind must be one of {list(EXAMPLE_KINDS)}", field="kind"
            )
        decided_at = _timestamp(message, "decided_at") if "decided_at" in message else None
        converted_at = (
            _timestamp(message, "converted_at") if message.get("converted_at") is not None else None
        )
        return cls(
            decision_id=decision_id,
            features={name: float(value) for name, value in features.items()},
            discount_pct=float(discount),
            label=int(label),
            labeled_at=labeled_at,
            kind=str(kind),
            decided_at=decided_at,
            converted_at=converted_at,
        )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _timestamp(message: Mapping[str, object], name: str) -> int:
    value = message[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidEvent("wrong_type", f"{name} must be an integer", field=name)
    if value < 0:
        raise InvalidEvent("out_of_range", f"{name} must not be negative", field=name)
    return value


@dataclass(frozen=True, slots=True)
class Step:
    """One weighted update of the purchase model: learn ``label`` with sample weight ``weight``."""

    label: int
    weight: float


def needs_auxiliary(method: FeedbackMethod, example: TrainingExample, elapsed_ms: int) -> bool:
    """Whether ``steps`` reads the auxiliary models' estimates for this example."""
    if method is FeedbackMethod.ESDFM:
        return example.kind == LabelKind.ELAPSED or (
            example.kind == LabelKind.CONVERTED and example.converted_late(elapsed_ms)
        )
    if method is FeedbackMethod.DFM:
        return example.kind == LabelKind.ELAPSED and example.label == 0
    return False


def steps(
    method: FeedbackMethod,
    example: TrainingExample,
    *,
    elapsed_ms: int,
    p: float,
    late: float,
    never: float,
) -> list[Step]:
    """The purchase model's updates for one example under ``method``.

    ``p``: the model's current estimate for the example; ``late`` = f_dp (``esdfm``) or S
    (``dfm``) and ``never`` = f_rn, from the auxiliary models (unused by other methods)."""
    kind = example.kind
    if method is FeedbackMethod.NAIVE:
        if kind == LabelKind.CONVERTED or (kind == LabelKind.CLOSED and example.label == 0):
            return [Step(example.label, 1.0)]
    elif method is FeedbackMethod.CLOSED:
        if kind == LabelKind.CLOSED:
            return [Step(example.label, 1.0)]
    elif method is FeedbackMethod.FNW:
        if kind == DECIDED:
            return [Step(0, (1.0 - p) * (1.0 + p))]
        if kind == LabelKind.CONVERTED:
            return [Step(1, 1.0 + p)]
    elif method is FeedbackMethod.ESDFM:
        if kind == LabelKind.ELAPSED:
            if example.label:
                return [Step(1, 1.0 + late)]
            return [Step(0, (1.0 + late) * never)]
        if kind == LabelKind.CONVERTED and example.converted_late(elapsed_ms):
            return [Step(1, 1.0 + late)]
    elif method is FeedbackMethod.DFM and kind == LabelKind.ELAPSED:
        if example.label:
            return [Step(1, 1.0)]
        denominator = 1.0 - p + p * late
        q = p * late / denominator if denominator > 0 else 0.0
        return [Step(1, q), Step(0, 1.0 - q)]
    return []
