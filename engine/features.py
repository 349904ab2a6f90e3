"""The feature catalogue: every feature declared once, computed from a user's raw state.

The raw state and the operations that build it live in ``engine/state.py``. A feature vector
is computed from the state *as of* an event-time instant ``now`` (the user's latest event
time), never from the wall clock. Adding a feature is one ``FeatureSpec`` in ``_declare``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from engine.state import (
    ACTIVITY_CODES,
    ACTIVITY_KINDS,
    CATALOGUE_VERSION,
    CATEGORY_PREFIX,
    DAY_MS,
    GRAIN_MS,
    HOUR_MS,
    KIND_CODE,
    LONGEST_WINDOW_MS,
    MINUTE_MS,
    OP_INCR,
    OP_MAX,
    OP_MIN,
    RECENCY_DEFAULT_S,
    REDEEMED_CODE,
    RETENTION_BUCKETS,
    SESSION_GAP_MINUTES,
    SPEND_CODE,
    WINDOWS,
    Op,
    State,
    Window,
    apply_ops,
    bucket_field,
    category_day,
    event_categories,
    event_kind,
    event_ops,
    expired_fields,
    trigger_category,
    trim,
)

__all__ = [
    "ACTIVITY_CODES",
    "ACTIVITY_KINDS",
    "CATALOGUE",
    "CATALOGUE_VERSION",
    "CATEGORY_PREFIX",
    "DAY_MS",
    "FEATURE_NAMES",
    "GRAIN_MS",
    "HOUR_MS",
    "KIND_CODE",
    "LONGEST_WINDOW_MS",
    "MINUTE_MS",
    "OP_INCR",
    "OP_MAX",
    "OP_MIN",
    "RECENCY_DEFAULT_S",
    "REDEEMED_CODE",
    "RETENTION_BUCKETS",
    "SESSION_GAP_MINUTES",
    "SPEND_CODE",
    "WINDOWS",
    "FeatureContext",
    "FeatureSpec",
    "Op",
    "State",
    "Window",
    "apply_ops",
    "bucket_field",
    "build_context",
    "compute_features",
    "event_categories",
    "event_kind",
    "event_ops",
    "expired_fields",
    "trigger_category",
    "trim",
]


@dataclass(slots=True)
class FeatureContext:
    """What feature functions read: one pass over a user's state, as of ``now``."""

    now: int
    state: Mapping[str, float]
    sums: dict[str, float]
    """Bucket sums keyed ``<code>_<window>``, e.g. ``v_1h`` or ``$_30d`` (cents)."""
    session_events: float
    purchase_days_30d: int
    categories_7d: dict[str, float]
    categories_30d: dict[str, float]
    category: str | None
    """The trigger event's category, when it has one."""

    def total(self, code: str, window: str) -> float:
        return self.sums.get(f"{code}_{window}", 0.0)

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


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _count(code: str, window: str) -> FeatureFn:
    return lambda ctx: ctx.total(code, window)


def _spend(window: str) -> FeatureFn:
    return lambda ctx: ctx.total(SPEND_CODE, window) / 100


def _recency(code: str) -> FeatureFn:
    return lambda ctx: ctx.recency_s(code)


def _category_affinity(ctx: FeatureContext) -> float:
    if ctx.category is None:
        return 0.0
    return _ratio(ctx.categories_30d.get(ctx.category, 0.0), sum(ctx.categories_30d.values()))


def _days_since_first_seen(ctx: FeatureContext) -> float:
    first = ctx.state.get("fs")
    return 0.0 if first is None else max(ctx.now - first, 0.0) / DAY_MS


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
        )
    )
    return tuple(specs)


CATALOGUE: tuple[FeatureSpec, ...] = _declare()
FEATURE_NAMES: tuple[str, ...] = tuple(spec.name for spec in CATALOGUE)


def build_context(
    state: Mapping[str, float], now: int, category: str | None = None
) -> FeatureContext:
    """One pass over the user's fields: window sums, session, categories, purchase days."""
    current = {grain: now // ms for grain, ms in GRAIN_MS.items()}
    sums: dict[str, float] = {}
    activity_minutes: dict[int, float] = {}
    categories_7d: dict[str, float] = {}
    categories_30d: dict[str, float] = {}
    purchase_days = 0
    for field, value in state.items():
        day = category_day(field)
        if day is not None:
            age = current["d"] - day
            if 0 <= age < 30:
                name = field[field.index(":") + 1 :]
                categories_30d[name] = categories_30d.get(name, 0.0) + value
                if age < 7:
                    categories_7d[name] = categories_7d.get(name, 0.0) + value
            continue
        if len(field) < 3 or field[1] not in current or not field[2:].isdigit():
            continue
        code, grain, index = field[0], field[1], int(field[2:])
        age = current[grain] - index
        if age < 0:
            continue
        for window in WINDOWS:
            if window.grain == grain and age < window.buckets:
                key = f"{code}_{window.name}"
                sums[key] = sums.get(key, 0.0) + value
        if grain == "m" and code in ACTIVITY_CODES:
            activity_minutes[index] = activity_minutes.get(index, 0.0) + value
        elif grain == "d" and code == "p" and age < 30 and value > 0:
            purchase_days += 1
    return FeatureContext(
        now=now,
        state=state,
        sums=sums,
        session_events=_session_events(activity_minutes, current["m"]),
        purchase_days_30d=purchase_days,
        categories_7d=categories_7d,
        categories_30d=categories_30d,
        category=category,
    )


def _session_events(activity_minutes: Mapping[int, float], minute: int) -> float:
    """Events in the run of minutes ending now with no inactivity gap of 30 minutes or more."""
    total = 0.0
    gap = 0
    for index in range(minute, minute - RETENTION_BUCKETS["m"], -1):
        count = activity_minutes.get(index)
        if count:
            total += count
            gap = 0
        else:
            gap += 1
            if gap >= SESSION_GAP_MINUTES:
                break
    return total


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
    return {spec.name: spec.compute(context) for spec in CATALOGUE}
