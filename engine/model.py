"""The online purchase model: P(purchase within the attribution window | features, discount).

A River pipeline (standard scaling, then logistic regression) learns one labelled example at a
time. The offered discount is an input, and so are its interactions with a few behavioural
features, so the model can tell who responds to a discount and who would buy anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from river import compose, linear_model, optim, preprocessing

MODEL_FEATURES: tuple[str, ...] = (
    "view_count_1h",
    "view_count_24h",
    "cart_count_1h",
    "cart_count_24h",
    "cart_count_7d",
    "favorite_count_7d",
    "search_count_24h",
    "purchase_count_30d",
    "spend_30d",
    "recency_cart_s",
    "recency_purchase_s",
    "session_events",
    "days_since_first_seen",
)
"""Catalogue features the model reads; counts and amounts enter as log1p."""

DISCOUNT_INTERACTIONS: tuple[str, ...] = ("cart_count_24h", "purchase_count_30d", "session_events")

_LOG_SCALED_PREFIXES = ("view_", "cart_", "favorite_", "search_", "purchase_", "spend_", "recency_")


def model_inputs(features: Mapping[str, float], discount_pct: float) -> dict[str, float]:
    """The model's input row: selected features (log1p where heavy-tailed) plus the discount."""
    row: dict[str, float] = {}
    for name in MODEL_FEATURES:
        value = float(features.get(name, 0.0))
        if name.startswith(_LOG_SCALED_PREFIXES):
            value = math.log1p(max(value, 0.0))
        row[name] = value
    discount = discount_pct / 100.0
    row["discount"] = discount
    for name in DISCOUNT_INTERACTIONS:
        row[f"discount_x_{name}"] = discount * row[name]
    return row


class PurchaseModel:
    """Scaled logistic regression over ``model_inputs``; ``version`` counts examples learned."""

    def __init__(self, *, learning_rate: float = 0.05, l2: float = 0.0) -> None:
        self._scaler = preprocessing.StandardScaler()
        self._classifier = linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate), l2=l2
        )
        self._pipeline = compose.Pipeline(self._scaler, self._classifier)
        self.examples_learned = 0

    @property
    def version(self) -> str:
        return f"lr-{self.examples_learned}"

    def predict(self, features: Mapping[str, float], discount_pct: float) -> float:
        row = model_inputs(features, discount_pct)
        return float(self._pipeline.predict_proba_one(row).get(True, 0.0))

    def learn(self, features: Mapping[str, float], discount_pct: float, label: int) -> None:
        self._pipeline.learn_one(model_inputs(features, discount_pct), bool(label))
        self.examples_learned += 1

    def contributions(
        self, features: Mapping[str, float], discount_pct: float, top: int = 3
    ) -> list[tuple[str, float]]:
        """The largest terms w_i * x_i of the linear score (x after scaling), by magnitude."""
        scaled = self._scaler.transform_one(model_inputs(features, discount_pct))  # type: ignore[no-untyped-call]
        weights = self._classifier.weights
        terms = [(name, float(weights.get(name, 0.0)) * value) for name, value in scaled.items()]
        terms.sort(key=lambda term: (-abs(term[1]), term[0]))
        return [(name, round(value, 6)) for name, value in terms[:top]]
