"""The feature catalogue: every feature declared once, computed from a user's raw state.

The raw state and the operations that build it live in ``engine/features/state.py``. A feature
vector is computed from the state *as of* an event-time instant ``now`` (the user's latest event
time), never from the wall clock. Adding a feature is one ``FeatureSpec`` in ``_declare``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dealstream_native import pack_features, unpack_features

from engine.features.record import state_context
from engine.features.state import (
    ACTIVITY_KINDS,
    CART_VALUE_CODE,
    DAY_MS,
    KIND_CODE,
    LAST_OFFER_FIELD,
    LONGEST_WINDOW_MS,
    OFFER_CODE,
    OFFER_TIME_SCALE,
    RECENCY_DEFAULT_S,
    REDEEMED_CODE,
    SESSION_GAP_MINUTES,
    SPEND_CODE,
    WINDOWS,
)

__all__ = [
    "CATALOGUE",
    "FEATURE_NAMES",
    "FeatureContext",
    "FeatureSpec",
    "StoredFeatures",
    "build_context",
    "compute_features",
    "features_from_stored",
    "stored_features",
]


WINDOW_INDEX: dict[str, int] = {window.name: i for i, window in enumerate(WINDOWS)}
_NO_SUMS: tuple[float, ...] = (0.0,) * len(WINDOWS)


@dataclass(slots=True)
class FeatureContext:
    """What feature functions read: one pass over a user's state, as of ``now``."""

    now: int
    state: Mapping[str, float]
    sums: dict[str, list[float]]
    """Bucket sums per code (``v``, ``$`` in cents, ...), one per window in ``WINDOWS`` order."""
    session_events: float
    purchase_days_30d: int
    categories_7d: dict[str, float]
    categories_30d: dict[str, float]
    category: str | None
    """The trigger event's category, when it has one."""

    def total(self, code: str, window: str) -> float:
        return self.sums.get(code, _NO_SUMS)[WINDOW_INDEX[window]]

    def recency_s(self, code: str) -> float:
        last = self.state.get(f"l{code}")
        if last is None:
            return RECENCY_DEFAULT_S
        return min(max(self.now - last, 0.0) / 1000.0, RECENCY_DEFAULT_S)


FeatureFn = Callable[[FeatureContext], float]


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One declared feature: its name, what it reads, and how it is computed."""

    name: str
    kinds: tuple[str, ...]
    window: str | None
    aggregation: str
    description: str
    compute: FeatureFn
    bucket_sum: tuple[str, int] | None = None
    """``(code, window index)`` when the value is exactly that window's bucket sum, which
    ``compute_features`` then reads without calling ``compute`` (same value, less time)."""


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _count(code: str, window: str) -> FeatureFn:
    index = WINDOW_INDEX[window]
    return lambda ctx: ctx.sums.get(code, _NO_SUMS)[index]


def _spend(window: str) -> FeatureFn:
    index = WINDOW_INDEX[window]
    return lambda ctx: ctx.sums.get(SPEND_CODE, _NO_SUMS)[index] / 100


def _recency(code: str) -> FeatureFn:
    field = f"l{code}"

    def recency(ctx: FeatureContext) -> float:
        last = ctx.state.get(field)
        if last is None:
            return RECENCY_DEFAULT_S
        # min(max(age, 0.0) / 1000.0, cap), spelled without the calls (identical results).
        age = ctx.now - last
        seconds = (0.0 if age < 0.0 else age) / 1000.0
        return RECENCY_DEFAULT_S if seconds > RECENCY_DEFAULT_S else seconds

    return recency


def _category_affinity(ctx: FeatureContext) -> float:
    if ctx.category is None:
        return 0.0
    return _ratio(ctx.categories_30d.get(ctx.category, 0.0), sum(ctx.categories_30d.values()))


def _days_since_first_seen(ctx: FeatureContext) -> float:
    first = ctx.state.get("fs")
    return 0.0 if first is None else max(ctx.now - first, 0.0) / DAY_MS


def _last_offer(ctx: FeatureContext) -> tuple[float, float] | None:
    """(issued_at, discount_pct) of the latest offer the user received, if any."""
    packed = ctx.state.get(LAST_OFFER_FIELD)
    if packed is None:
        return None
    issued_at, tenths = divmod(int(packed), OFFER_TIME_SCALE)
    return float(issued_at), tenths / 10.0


def _recency_offer(ctx: FeatureContext) -> float:
    last = _last_offer(ctx)
    if last is None:
        return RECENCY_DEFAULT_S
    seconds = max(ctx.now - last[0], 0.0) / 1000.0
    return min(seconds, RECENCY_DEFAULT_S)


def _last_offer_discount(ctx: FeatureContext) -> float:
    last = _last_offer(ctx)
    if last is None or ctx.now - last[0] > LONGEST_WINDOW_MS:
        return 0.0
    return last[1]


def _unredeemed(ctx: FeatureContext) -> float:
    return max(ctx.total(OFFER_CODE, "30d") - ctx.total(REDEEMED_CODE, "30d"), 0.0)


def _declare() -> tuple[FeatureSpec, ...]:
    specs: list[FeatureSpec] = []
    for kind in ACTIVITY_KINDS:
        code = KIND_CODE[kind]
        for window in WINDOWS:
            specs.append(
                FeatureSpec(
                    f"{kind}_count_{window.name}",
                    (kind,),
                    window.name,
                    "count",
                    f"number of {kind} events in the trailing {window.name}",
                    _count(code, window.name),
                    (code, WINDOW_INDEX[window.name]),
                )
            )
    for window in WINDOWS:
        specs.append(
            FeatureSpec(
                f"spend_{window.name}",
                ("purchase",),
                window.name,
                "sum",
                f"purchase amount in the trailing {window.name}",
                _spend(window.name),
            )
        )
    for kind in ACTIVITY_KINDS:
        specs.append(
            FeatureSpec(
                f"recency_{kind}_s",
                (kind,),
                None,
                "recency",
                f"seconds since the last {kind} event ({RECENCY_DEFAULT_S:.0f} when none)",
                _recency(KIND_CODE[kind]),
            )
        )
    specs.extend(
        (
            FeatureSpec(
                "purchase_frequency_30d",
                ("purchase",),
                "30d",
                "distinct days",
                "days with at least one purchase in the trailing 30 days",
                lambda ctx: float(ctx.purchase_days_30d),
            ),
            FeatureSpec(
                "avg_order_value_30d",
                ("purchase",),
                "30d",
                "mean",
                "spend_30d / purchase_count_30d (0 without purchases)",
                lambda ctx: _ratio(ctx.total(SPEND_CODE, "30d") / 100, ctx.total("p", "30d")),
            ),
            FeatureSpec(
                "distinct_categories_7d",
                ("view", "cart", "favorite", "search", "purchase"),
                "7d",
                "distinct",
                "distinct categories the user touched in the trailing 7 days",
                lambda ctx: float(sum(1 for v in ctx.categories_7d.values() if v > 0)),
            ),
            FeatureSpec(
                "category_affinity",
                ("view", "cart", "favorite", "search", "purchase"),
                "30d",
                "share",
                "share of the user's 30-day category activity in the trigger event's category",
                _category_affinity,
            ),
            FeatureSpec(
                "session_events",
                ACTIVITY_KINDS,
                None,
                "session",
                f"events in the current session ({SESSION_GAP_MINUTES}-minute inactivity gap)",
                lambda ctx: ctx.session_events,
            ),
            FeatureSpec(
                "discount_sensitivity",
                ("purchase",),
                "30d",
                "share",
                "share of the trailing 30 days' purchases that redeemed an offer",
                lambda ctx: _ratio(ctx.total(REDEEMED_CODE, "30d"), ctx.total("p", "30d")),
            ),
            FeatureSpec(
                "days_since_first_seen",
                ACTIVITY_KINDS,
                None,
                "age",
                "days between the user's first event and now",
                _days_since_first_seen,
            ),
            # The user's response history; offers are recorded in the state by the engine.
            FeatureSpec(
                "offer_count_30d",
                ("offer",),
                "30d",
                "count",
                "offers the user received in the trailing 30 days (all campaigns)",
                _count(OFFER_CODE, "30d"),
                (OFFER_CODE, WINDOW_INDEX["30d"]),
            ),
            FeatureSpec(
                "redeemed_count_30d",
                ("purchase",),
                "30d",
                "count",
                "purchases in the trailing 30 days that redeemed an offer",
                _count(REDEEMED_CODE, "30d"),
                (REDEEMED_CODE, WINDOW_INDEX["30d"]),
            ),
            FeatureSpec(
                "offers_unredeemed_30d",
                ("offer", "purchase"),
                "30d",
                "difference",
                "offers received in the trailing 30 days that no purchase redeemed (yet)",
                lambda ctx: max(
                    ctx.total(OFFER_CODE, "30d") - ctx.total(REDEEMED_CODE, "30d"), 0.0
                ),
            ),
            FeatureSpec(
                "last_offer_discount_pct",
                ("offer",),
                "30d",
                "latest",
                "discount of the latest offer received within 30 days (0 when none)",
                _last_offer_discount,
            ),
            FeatureSpec(
                "recency_offer_s",
                ("offer",),
                None,
                "recency",
                f"seconds since the latest offer received ({RECENCY_DEFAULT_S:.0f} when none)",
                _recency_offer,
            ),
            FeatureSpec(
                "cart_value_1h",
                ("cart",),
                "1h",
                "sum",
                "price of the items put in the cart in the trailing hour (the order in the making)",
                lambda ctx: ctx.total(CART_VALUE_CODE, "1h") / 100,
            ),
        )
    )
    return tuple(specs)


CATALOGUE: tuple[FeatureSpec, ...] = _declare()
FEATURE_NAMES: tuple[str, ...] = tuple(spec.name for spec in CATALOGUE)

StoredFeatures = str | dict[str, float]
"""A feature vector as the Redis ledger and the outbox keep it (``stored_features``)."""


def stored_features(features: Mapping[str, float]) -> StoredFeatures:
    """A vector as short text: its values in catalogue order, packed (``pack_features``,
    ``native/src/values.rs``: a third to a half of their JSON); a vector whose names are not
    the catalogue's stays a mapping."""
    vector = features if isinstance(features, dict) else dict(features)
    packed = pack_features(vector, FEATURE_NAMES)
    return packed if packed is not None else dict(vector)


def features_from_stored(stored: StoredFeatures) -> dict[str, float]:
    """The vector ``stored_features`` kept. Text written before features were added to the
    catalogue's end gives the ones it has."""
    if isinstance(stored, dict):
        return {str(name): float(value) for name, value in stored.items()}
    return unpack_features(stored, FEATURE_NAMES)


_PLAN: tuple[tuple[str, FeatureFn, str, int], ...] = tuple(
    (spec.name, spec.compute, *(spec.bucket_sum or ("", -1))) for spec in CATALOGUE
)


def build_context(
    state: Mapping[str, float], now: int, category: str | None = None
) -> FeatureContext:
    """One pass over the user's fields as of event time ``now``: window sums, the session,
    categories, purchase days (``engine.features.record.state_context``, compiled: this runs
    for every trigger event over every field of the user's state). Bucket values are
    integral, so the sums are exact whatever the order of the fields."""
    if not isinstance(state, dict):
        state = dict(state)
    sums, session_events, purchase_days, categories_7d, categories_30d = state_context(state, now)
    return FeatureContext(
        now=now,
        state=state,
        sums=sums,
        session_events=session_events,
        purchase_days_30d=purchase_days,
        categories_7d=categories_7d,
        categories_30d=categories_30d,
        category=category,
    )


def compute_features(
    state: Mapping[str, float], now: int | None = None, category: str | None = None
) -> dict[str, float]:
    """The feature vector of a user as of event time ``now`` (default: the user's latest event).

    ``category`` is the trigger event's category (for ``category_affinity``). Missing history
    gives the documented defaults (0, or ``RECENCY_DEFAULT_S`` for recency), never NaN. Keys
    always come in catalogue order.
    """
    if now is None:
        now = int(state.get("lt", 0.0))
    context = build_context(state, now, category)
    sums = context.sums
    features: dict[str, float] = {}
    for name, compute, code, index in _PLAN:
        if index < 0:
            features[name] = compute(context)
        else:
            totals = sums.get(code)
            features[name] = totals[index] if totals is not None else 0.0
    return features
