"""The purchase model's inputs: which catalogue features it reads, and how they enter.

Shared by the model (``engine/model.py``) and its fast scorer (``engine/scoring.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
    "category_affinity",
    "discount_sensitivity",
)
"""Catalogue features the model reads; counts and amounts enter as log1p.

``days_since_first_seen`` stays out: it only grows, so in a live stream it mostly encodes
when a user was first seen rather than how they shop, and its early near-zero variance makes
the scaled input explode."""

DISCOUNT_INTERACTIONS: tuple[str, ...] = ("cart_count_24h", "purchase_count_30d", "session_events")

_LOG_SCALED_PREFIXES = ("view_", "cart_", "favorite_", "search_", "purchase_", "spend_", "recency_")

INPUT_NAMES: tuple[str, ...] = (
    *MODEL_FEATURES,
    "discount",
    *(f"discount_x_{name}" for name in DISCOUNT_INTERACTIONS),
)
"""The model's inputs in ``model_inputs`` order (the order River sums the linear score in)."""
_LOG_SCALED: tuple[bool, ...] = tuple(n.startswith(_LOG_SCALED_PREFIXES) for n in MODEL_FEATURES)
INTERACTION_SLOTS: tuple[int, ...] = tuple(MODEL_FEATURES.index(n) for n in DISCOUNT_INTERACTIONS)
FEATURE_INPUTS: tuple[tuple[str, bool], ...] = tuple(zip(MODEL_FEATURES, _LOG_SCALED, strict=True))
DISCOUNT_SLOT = len(MODEL_FEATURES)
"""Index of ``discount`` in ``INPUT_NAMES``; the interactions follow it."""


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
