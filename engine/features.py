"""The feature catalogue: rolling per-user features over event-time buckets.

A user's raw state is a flat ``dict[str, float]`` of counters. Every event turns into a short
list of commutative operations on that state (increment a time bucket, keep a max or a min),
so the result does not depend on the order in which events arrive within the allowed lateness,
and the very same operations run in the in-memory store and inside the Redis Lua script.

Field names are compact because Redis stores one hash per user:

``<kind><grain><index>``  a time bucket, e.g. ``vm29384756`` = views in minute 29384756;
                          kind: v view, c cart, f favorite, s search, p purchase,
                          $ spend in integer cents (integers keep sums exact in any order);
                          grain: m minute, h hour, d day.
``l<kind>``               last event time (epoch ms) of that kind; ``lt`` of any kind.
``fs``                    first event time (epoch ms) of the user.
``n<kind>``               lifetime count of that kind (cheap, and handy for audits).

A feature vector is computed from the state *as of* an event-time instant ``now`` (the user's
latest event time), never from the wall clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from engine.events import BrowseEvent, Event, PurchaseEvent, SearchEvent

CATALOGUE_VERSION = 1

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

SESSION_GAP_MINUTES = 30
"""A session ends after this many minutes without any event."""

RECENCY_DEFAULT_S = 30 * 24 * 3600.0
"""Recency reported when the user has no event of that kind (or none within 30 days)."""

ACTIVITY_KINDS: tuple[str, ...] = ("view", "cart", "favorite", "search", "purchase")
KIND_CODE: dict[str, str] = {
    "view": "v",
    "cart": "c",
    "favorite": "f",
    "search": "s",
    "purchase": "p",
}
ACTIVITY_CODES = frozenset(KIND_CODE.values())
SPEND_CODE = "$"
REDEEMED_CODE = "r"
"""Purchases that redeemed an offer (day buckets only)."""
CATEGORY_PREFIX = "k"
"""Category activity per day: field ``k<day>:<category>``."""

Grain = Literal["m", "h", "d"]
GRAIN_MS: dict[str, int] = {"m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}


@dataclass(frozen=True, slots=True)
class Window:
    """A trailing event-time window summed over buckets of one grain."""

    name: str
    grain: Grain
    buckets: int

    @property
    def length_ms(self) -> int:
        return GRAIN_MS[self.grain] * self.buckets


WINDOWS: tuple[Window, ...] = (
    Window("1h", "m", 60),
    Window("24h", "h", 24),
    Window("7d", "d", 7),
    Window("30d", "d", 30),
)

RETENTION_BUCKETS: dict[str, int] = {"m": 120, "h": 26, "d": 31}
"""How many buckets of each grain a user keeps; older ones are trimmed.

Minutes are kept for two hours (the 1h window plus room for sessions and late events)."""

LONGEST_WINDOW_MS = 30 * DAY_MS


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

# Operations on a user's raw state, shared with the Redis Lua script.
OP_INCR = "i"
OP_MAX = "x"
OP_MIN = "n"

Op = tuple[str, str, float]
"""(operation, field, value)."""

State = dict[str, float]


def event_kind(event: Event) -> str:
    """The activity kind of an event: a browse action, ``search`` or ``purchase``."""
    if isinstance(event, BrowseEvent):
        return event.action
    if isinstance(event, SearchEvent):
        return "search"
    return "purchase"


def bucket_field(code: str, grain: str, ts: int) -> str:
    return f"{code}{grain}{ts // GRAIN_MS[grain]}"


def event_categories(event: Event) -> tuple[str, ...]:
    """The categories an event touches (a purchase: each distinct item category once)."""
    if isinstance(event, BrowseEvent):
        return (event.category,)
    if isinstance(event, SearchEvent):
        return (event.category,) if event.category is not None else ()
    return tuple(dict.fromkeys(item.category for item in event.items))


def trigger_category(event: Event) -> str | None:
    """The category ``category_affinity`` is measured against for this event."""
    if isinstance(event, PurchaseEvent):
        return None
    return event.category


def event_ops(event: Event) -> list[Op]:
    """The state operations that apply one event; commutative by construction."""
    code = KIND_CODE[event_kind(event)]
    ts = event.ts
    ops: list[Op] = [(OP_INCR, bucket_field(code, grain, ts), 1.0) for grain in ("m", "h", "d")]
    if isinstance(event, PurchaseEvent):
        cents = float(round(event.amount * 100))
        ops.extend(
            (OP_INCR, bucket_field(SPEND_CODE, grain, ts), cents) for grain in ("m", "h", "d")
        )
        if event.offer_id is not None:
            ops.append((OP_INCR, bucket_field(REDEEMED_CODE, "d", ts), 1.0))
    day = ts // DAY_MS
    ops.extend(
        (OP_INCR, f"{CATEGORY_PREFIX}{day}:{category}", 1.0) for category in event_categories(event)
    )
    ops.append((OP_INCR, f"n{code}", 1.0))
    ops.append((OP_MAX, f"l{code}", float(ts)))
    ops.append((OP_MAX, "lt", float(ts)))
    ops.append((OP_MIN, "fs", float(ts)))
    return ops


def apply_ops(state: State, ops: Iterable[Op]) -> None:
    """Apply operations in place; mirrors ``streams/features.lua`` exactly.

    Every operation value is integral (counts, cents, epoch ms), so sums are exact."""
    for op, field, value in ops:
        current = state.get(field)
        if op == OP_INCR:
            state[field] = (current or 0.0) + value
        elif op == OP_MAX:
            if current is None or value > current:
                state[field] = value
        elif op == OP_MIN:
            if current is None or value < current:
                state[field] = value
        else:  # pragma: no cover - ops are built above
            raise ValueError(f"unknown state operation {op!r}")


def _category_day(field: str) -> int | None:
    if not field.startswith(CATEGORY_PREFIX):
        return None
    day, sep, _ = field[1:].partition(":")
    return int(day) if sep and day.isdigit() else None


def expired_fields(state: Mapping[str, float]) -> list[str]:
    """Bucket fields older than their grain's retention, relative to the user's latest event."""
    latest = state.get("lt")
    if latest is None:
        return []
    cutoffs = {g: int(latest) // GRAIN_MS[g] - RETENTION_BUCKETS[g] for g in GRAIN_MS}
    stale: list[str] = []
    for field in state:
        is_bucket = len(field) > 2 and field[1] in cutoffs and field[2:].isdigit()
        if is_bucket and int(field[2:]) <= cutoffs[field[1]]:
            stale.append(field)
            continue
        day = _category_day(field)
        if day is not None and day <= cutoffs["d"]:
            stale.append(field)
    return stale


def trim(state: State) -> None:
    """Drop expired buckets in place (the Lua script does the same after each update)."""
    for field in expired_fields(state):
        del state[field]


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
        day = _category_day(field)
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
