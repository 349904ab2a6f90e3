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

from collections.abc import Iterable, Mapping
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
SPEND_CODE = "$"

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


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One declared feature: how it is named and what it aggregates."""

    name: str
    kinds: tuple[str, ...]
    window: str | None
    aggregation: str
    description: str


def _declare() -> tuple[FeatureSpec, ...]:
    specs: list[FeatureSpec] = []
    for kind in ACTIVITY_KINDS:
        for window in WINDOWS:
            specs.append(
                FeatureSpec(
                    f"{kind}_count_{window.name}",
                    (kind,),
                    window.name,
                    "count",
                    f"number of {kind} events in the trailing {window.name}",
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
            )
        )
    specs.append(
        FeatureSpec(
            "session_events",
            ACTIVITY_KINDS,
            None,
            "session",
            f"events in the current session ({SESSION_GAP_MINUTES}-minute inactivity gap)",
        )
    )
    specs.append(
        FeatureSpec(
            "days_since_first_seen",
            ACTIVITY_KINDS,
            None,
            "age",
            "days between the user's first event and now",
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
    return stale


def trim(state: State) -> None:
    """Drop expired buckets in place (the Lua script does the same after each update)."""
    for field in expired_fields(state):
        del state[field]


def _bucket_sums(state: Mapping[str, float], now: int) -> tuple[dict[str, float], float]:
    """Sums per ``<code>_<window>`` plus the current session's event count, in one pass.

    One pass over the user's fields is cheaper than probing every bucket of every window.
    """
    current = {grain: now // ms for grain, ms in GRAIN_MS.items()}
    sums: dict[str, float] = {}
    activity_minutes: dict[int, float] = {}
    for field, value in state.items():
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
        if grain == "m" and code != SPEND_CODE:
            activity_minutes[index] = activity_minutes.get(index, 0.0) + value
    return sums, _session_events(activity_minutes, current["m"])


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


def compute_features(state: Mapping[str, float], now: int | None = None) -> dict[str, float]:
    """The feature vector of a user as of event time ``now`` (default: the user's latest event).

    Missing history gives the documented defaults (0, or ``RECENCY_DEFAULT_S`` for recency),
    never NaN. Keys always come in catalogue order.
    """
    if now is None:
        now = int(state.get("lt", 0.0))
    sums, session_events = _bucket_sums(state, now)
    vector: dict[str, float] = {}
    for kind in ACTIVITY_KINDS:
        code = KIND_CODE[kind]
        for window in WINDOWS:
            vector[f"{kind}_count_{window.name}"] = sums.get(f"{code}_{window.name}", 0.0)
    for window in WINDOWS:
        vector[f"spend_{window.name}"] = sums.get(f"{SPEND_CODE}_{window.name}", 0.0) / 100
    for kind in ACTIVITY_KINDS:
        last = state.get(f"l{KIND_CODE[kind]}")
        if last is None:
            vector[f"recency_{kind}_s"] = RECENCY_DEFAULT_S
        else:
            vector[f"recency_{kind}_s"] = min(max(now - last, 0.0) / 1000.0, RECENCY_DEFAULT_S)
    vector["session_events"] = session_events
    first = state.get("fs")
    vector["days_since_first_seen"] = 0.0 if first is None else max(now - first, 0.0) / DAY_MS
    return vector
