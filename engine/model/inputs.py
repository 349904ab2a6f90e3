"""The purchase model's inputs: what it reads of a feature vector, and how the discount enters.

Behaviour enters as rates over the history the engine has actually observed (counts over
30 days divided by min(days since first seen, 30), at least one day), not as raw window
counts: a raw 30-day count grows for weeks after a user is first seen (and for everyone after
a deployment starts), so a model learned early over-predicts later. Heavy-tailed values enter
as log1p. The discount enters as the fraction x = d/100 and as x times every behavioural
input, so the model can learn for whom a discount changes the purchase probability (an
S-learner with interactions, ``INTERACTIONS``), not only whether it does on average.

The transform has one implementation, compiled (``InputPlan``, ``native/src/inputs.rs``, with
the discount's inputs in one helper there that ``LinearTerms`` uses too): ``base_inputs`` (the
behavioural inputs), ``input_row`` (the list the model learns from), ``model_inputs`` (the
same row as River's dict) and ``engine.model.scoring.Scorer`` (with which the model predicts
and explains) build on it.
"""

from __future__ import annotations

from collections.abc import Mapping

from dealstream_native import InputPlan

OBSERVED_DAYS_MAX = 30.0
"""Rates are per day over at most the 30-day windows they are counted in."""

_RATE_INPUTS: tuple[tuple[str, str], ...] = (
    ("views_per_day", "view_count_30d"),
    ("carts_per_day", "cart_count_30d"),
    ("favorites_per_day", "favorite_count_30d"),
    ("searches_per_day", "search_count_30d"),
    ("purchases_per_day", "purchase_count_30d"),
    ("spend_per_day", "spend_30d"),
    ("offers_per_day", "offer_count_30d"),
)
"""(input, 30-day feature) pairs that enter as log1p(feature / observed days)."""

_LOG_INPUTS: tuple[str, ...] = (
    "view_count_1h",
    "cart_count_1h",
    "view_count_24h",
    "cart_count_24h",
    "search_count_24h",
    "session_events",
    "recency_cart_s",
    "recency_purchase_s",
    "recency_offer_s",
    "cart_value_1h",
)
"""Features that enter as log1p(max(value, 0))."""

_RATIO_INPUTS: tuple[tuple[str, str, str], ...] = (
    ("purchases_per_cart", "purchase_count_30d", "cart_count_30d"),
    ("redeemed_per_offer", "redeemed_count_30d", "offer_count_30d"),
)
"""(input, numerator, denominator): numerator / max(denominator, 1)."""

_PLAIN_INPUTS: tuple[str, ...] = ("category_affinity", "discount_sensitivity")
"""Shares in [0, 1], as they are."""

_SCALED_INPUTS: tuple[tuple[str, str, float], ...] = (
    ("last_offer_discount", "last_offer_discount_pct", 100.0),
)
"""(input, feature, divisor)."""

BEHAVIOUR_INPUTS: tuple[str, ...] = (
    *(name for name, _ in _RATE_INPUTS),
    *_LOG_INPUTS,
    *(name for name, _, _ in _RATIO_INPUTS),
    *_PLAIN_INPUTS,
    *(name for name, _, _ in _SCALED_INPUTS),
)
"""The inputs that do not depend on the discount, in the model's order."""

MODEL_FEATURES: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            "days_since_first_seen",
            *(feature for _, feature in _RATE_INPUTS),
            *_LOG_INPUTS,
            *(f for _, num, den in _RATIO_INPUTS for f in (num, den)),
            *_PLAIN_INPUTS,
            *(feature for _, feature, _ in _SCALED_INPUTS),
        )
    )
)
"""Catalogue features the model reads (``days_since_first_seen`` only to turn counts into
rates: it is not an input of its own, because it only grows)."""

INTERACTIONS: tuple[str, ...] = (
    "purchases_per_cart",
    "purchases_per_day",
    "cart_count_1h",
    "redeemed_per_offer",
    "last_offer_discount",
)
"""Behavioural inputs the discount interacts with: what should tell for whom it pays (how
likely a cart converts anyway, how often the user buys, the cart in the making, how the user
answered earlier offers). Interactions with every input were measured worse: more noise for
single-pass SGD to average out (``docs/model-quality.md``)."""
DISCOUNT_INPUT = "discount"
INPUT_NAMES: tuple[str, ...] = (
    *BEHAVIOUR_INPUTS,
    DISCOUNT_INPUT,
    *(f"discount_x_{name}" for name in INTERACTIONS),
)
"""The model's inputs in ``model_inputs`` order (the order River sums the linear score in)."""
DISCOUNT_SLOT = len(BEHAVIOUR_INPUTS)
"""Index of ``discount`` in ``INPUT_NAMES``; its interactions follow it."""
_INTERACTION_SLOTS: tuple[int, ...] = tuple(BEHAVIOUR_INPUTS.index(n) for n in INTERACTIONS)


_PLAN = InputPlan(
    days="days_since_first_seen",
    days_max=OBSERVED_DAYS_MAX,
    rates=[feature for _, feature in _RATE_INPUTS],
    logs=list(_LOG_INPUTS),
    ratios=[(numerator, denominator) for _, numerator, denominator in _RATIO_INPUTS],
    plain=list(_PLAIN_INPUTS),
    scaled=[(feature, divisor) for _, feature, divisor in _SCALED_INPUTS],
    interactions=list(_INTERACTION_SLOTS),
)
"""The transform compiled (``native/src/inputs.rs``): built for every decision and every
training example, where the Python spelling took 2-4 µs."""


def base_inputs(features: Mapping[str, float]) -> list[float]:
    """The behavioural inputs (``BEHAVIOUR_INPUTS`` order) of one feature vector: counts over
    30 days as log1p(count / observed days), with observed days min(days since first seen,
    ``OBSERVED_DAYS_MAX``) and at least 1; heavy-tailed values as log1p(max(value, 0));
    ratios over a denominator of at least 1; shares as they are; scaled values divided.
    Each feature read as ``float(features.get(name, 0.0))``."""
    return _PLAN.base(features if isinstance(features, dict) else dict(features))


def interacting_inputs(base: list[float]) -> list[float]:
    """The base inputs the discount interacts with, in ``INTERACTIONS`` order (what the
    discount's inputs multiply by it: ``LinearTerms.discount_total``)."""
    return [base[i] for i in _INTERACTION_SLOTS]


def input_row(features: Mapping[str, float], discount_pct: float) -> list[float]:
    """The model's input row as a list, in ``INPUT_NAMES`` order (what the model learns from):
    ``base_inputs``, then the discount as x = d/100 and x times each of ``INTERACTIONS``, in
    one compiled call."""
    return _PLAN.row(features if isinstance(features, dict) else dict(features), discount_pct)


def model_inputs(features: Mapping[str, float], discount_pct: float) -> dict[str, float]:
    """The model's input row, by input name (``INPUT_NAMES`` order): River's form of it."""
    return dict(zip(INPUT_NAMES, input_row(features, discount_pct), strict=True))
