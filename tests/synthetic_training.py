"""Training examples v1 drawn from a known logistic ground truth (shared by unit and
integration tests of the learner).

P(buy) = sigmoid(-5 + 1.8 log1p(carts_24h) + 0.5 log1p(views_24h) + 0.9 log1p(purchases_30d)
+ 6 discount): a label rate near 0.37 and a Bayes-optimal ROC AUC near 0.84.

Each example carries its decision's final label the way the training topic first says it: a
positive as ``converted``, a negative as ``closed``; the ``naive`` feedback method
(``SYNTHETIC_FEEDBACK``) learns exactly these, once each.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from engine.model.feedback import Feedback, FeedbackMethod

T0_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z."""
SYNTHETIC_FEEDBACK = Feedback(FeedbackMethod.NAIVE)


@dataclass(frozen=True)
class Drawn:
    example: dict[str, object]
    p_true: float


def ground_truth(features: dict[str, float], discount_pct: float) -> float:
    z = (
        -5.0
        + 1.8 * math.log1p(features["cart_count_24h"])
        + 0.5 * math.log1p(features["view_count_24h"])
        + 0.9 * math.log1p(features["purchase_count_30d"])
        + 6.0 * discount_pct / 100.0
    )
    return 1.0 / (1.0 + math.exp(-z))


def training_examples(n: int, *, seed: int, start: int = 0) -> list[Drawn]:
    """``n`` examples with decision ids ``d<start>`` ... (seeded, so reproducible)."""
    rng = random.Random(seed)
    drawn: list[Drawn] = []
    for index in range(start, start + n):
        features = {
            "cart_count_24h": float(rng.choice([0, 0, 0, 1, 1, 2, 3, 5, 8])),
            "view_count_24h": float(rng.randint(0, 40)),
            "purchase_count_30d": float(rng.choice([0, 0, 1, 2, 4])),
            "session_events": float(rng.randint(1, 30)),
        }
        discount = float(rng.choice([0, 5, 10, 15, 20]))
        p = ground_truth(features, discount)
        label = 1 if rng.random() < p else 0
        example: dict[str, object] = {
            "decision_id": f"d{index}",
            "features": features,
            "discount_pct": discount,
            "label": label,
            "labeled_at": T0_MS + index * 1000,
            "kind": "converted" if label else "closed",
        }
        drawn.append(Drawn(example, p))
    return drawn
