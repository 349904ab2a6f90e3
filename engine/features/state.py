"""Raw per-user feature state: its layout, the operations events apply, and retention.

A user's raw state is a flat ``dict[str, float]`` of counters. Every event turns into a short
list of commutative operations on that state (increment a time bucket, keep a max or a min),
so the result does not depend on the order in which events arrive within the allowed lateness,
and the very same operations run in every store (``engine.features.store.apply_updates``).

Field names (the Redis store keeps them relative to ``lt``, ``engine/features/record.py``):

``<kind><grain><index>``  a time bucket, e.g. ``vm29384756`` = views in minute 29384756;
                          kind: v view, c cart, f favorite, s search, p purchase,
                          $ spend in integer cents (integers keep sums exact in any order),
                          r purchases that redeemed an offer (days only),
                          o offers the user received (days only),
                          w value of the items put in the cart, in cents (minutes only);
                          grain: m minute, h hour, d day.
``k<day>:<category>``     category activity per day.
``l<kind>``               last event time (epoch ms) of that kind; ``lt`` of any kind.
``fs``                    first event time (epoch ms) of the user.
``n<kind>``               lifetime count of that kind (cheap, and handy for audits).
``od``                    the latest offer received: issued_at * 1000 + discount in tenths of
                          a percent (one max keeps "the latest offer's discount" commutative).
"""

from __future__ import annotations

from collections.abc import Iterable
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
OFFER_CODE = "o"
"""Offers the user received (day buckets only)."""
CART_VALUE_CODE = "w"
"""Value of the items the user put in the cart, in cents (minute buckets only)."""
LAST_OFFER_FIELD = "od"
OFFER_TIME_SCALE = 1000
"""``od`` = issued_at * OFFER_TIME_SCALE + round(discount_pct * 10): exact in a double for
event times up to year 2255, and its max is the latest offer (ties: the larger discount)."""
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

CATEGORY_WINDOW_DAYS = (7, 30)
"""The days of category activity a feature vector reads (``distinct_categories_7d``, and
``category_affinity`` over 30)."""
PURCHASE_DAYS_WINDOW = 30
"""The days over which ``purchase_frequency_30d`` counts days with a purchase."""

RETENTION_BUCKETS: dict[str, int] = {"m": 120, "h": 26, "d": 31}
"""How many buckets of each grain a user keeps, counted back from the bucket of the user's
latest event; older ones are dropped after each batch that changes the user
(``ParsedField``'s ``expires_at``).

Minutes are kept for two hours (the 1h window plus room for sessions and late events)."""

LONGEST_WINDOW_MS = 30 * DAY_MS


# Operations on a user's raw state, shared with the Redis Lua script.
OP_INCR = "i"
OP_MAX = "x"
OP_MIN = "n"

Op = tuple[str, str, float]
"""(operation, field, value)."""

State = dict[str, float]

NEVER = float("inf")
"""``expires_at`` of a field that never expires."""


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


_BUCKET_OPS: dict[tuple[str, int], tuple[Op, Op, Op]] = {}
"""The increments of an event's minute, hour and day buckets, memoised per kind and minute:
operations are immutable tuples, so every event of a kind in that minute shares them."""
_CATEGORY_OPS: dict[tuple[int, str], Op] = {}
"""``k<day>:<category>`` increments, memoised per day and category."""
_OPS_MEMO_MAX = 50_000


def _bucket_ops(code: str, ts: int) -> tuple[Op, Op, Op]:
    key = (code, ts // MINUTE_MS)
    ops = _BUCKET_OPS.get(key)
    if ops is None:
        if len(_BUCKET_OPS) >= _OPS_MEMO_MAX:
            _BUCKET_OPS.clear()
        ops = _BUCKET_OPS[key] = (
            (OP_INCR, bucket_field(code, "m", ts), 1.0),
            (OP_INCR, bucket_field(code, "h", ts), 1.0),
            (OP_INCR, bucket_field(code, "d", ts), 1.0),
        )
    return ops


def _category_op(ts: int, category: str) -> Op:
    key = (ts // DAY_MS, category)
    op = _CATEGORY_OPS.get(key)
    if op is None:
        if len(_CATEGORY_OPS) >= _OPS_MEMO_MAX:
            _CATEGORY_OPS.clear()
        op = _CATEGORY_OPS[key] = (OP_INCR, f"{CATEGORY_PREFIX}{key[0]}:{category}", 1.0)
    return op


_COUNT_OP: dict[str, Op] = {code: (OP_INCR, f"n{code}", 1.0) for code in KIND_CODE.values()}
_LAST_FIELD: dict[str, str] = {code: f"l{code}" for code in KIND_CODE.values()}


def event_ops(event: Event) -> list[Op]:
    """The state operations that apply one event; commutative by construction.

    (Their order is the order in which a new user's record lists its fields, so it stays
    put: minute, hour and day, the kind's extras, categories, then count and times.)"""
    ts = event.ts
    if isinstance(event, BrowseEvent):
        code = KIND_CODE[event.action]
        ops = list(_bucket_ops(code, ts))
        if code == "c":
            cart_cents = float(round(event.price * 100))
            ops.append((OP_INCR, bucket_field(CART_VALUE_CODE, "m", ts), cart_cents))
        ops.append(_category_op(ts, event.category))
    elif isinstance(event, SearchEvent):
        code = "s"
        ops = list(_bucket_ops(code, ts))
        if event.category is not None:
            ops.append(_category_op(ts, event.category))
    else:
        code = "p"
        ops = list(_bucket_ops(code, ts))
        cents = float(round(event.amount * 100))
        ops.extend((OP_INCR, field, cents) for _, field, _ in _bucket_ops(SPEND_CODE, ts))
        if event.offer_id is not None:
            ops.append((OP_INCR, bucket_field(REDEEMED_CODE, "d", ts), 1.0))
        ops.extend(_category_op(ts, category) for category in event_categories(event))
    when = float(ts)
    ops.append(_COUNT_OP[code])
    ops.append((OP_MAX, _LAST_FIELD[code], when))
    ops.append((OP_MAX, "lt", when))
    ops.append((OP_MIN, "fs", when))
    return ops


def offer_ops(issued_at: int, discount_pct: float) -> list[Op]:
    """The state operations that record an offer the user received (commutative, like events')."""
    return [
        (OP_INCR, bucket_field(OFFER_CODE, "d", issued_at), 1.0),
        (
            OP_MAX,
            LAST_OFFER_FIELD,
            float(issued_at * OFFER_TIME_SCALE + round(discount_pct * 10)),
        ),
    ]


def apply_ops(state: State, ops: Iterable[Op]) -> None:
    """Apply operations in place: the engine's replay of a batch on a user's state dict (the
    stores apply the same rules to their records: ``native/src/record.rs``).

    Every operation value is integral (counts, cents, epoch ms), so sums are exact."""
    get = state.get
    for op, field, value in ops:
        current = get(field)
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


def category_day(field: str) -> int | None:
    if not field.startswith(CATEGORY_PREFIX):
        return None
    day, sep, _ = field[1:].partition(":")
    return int(day) if sep and day.isdigit() else None


GRAIN_SLOT: dict[str, int] = {"m": 0, "h": 1, "d": 2}
"""Position of each grain in the ``(minute, hour, day)`` tuples the hot path indexes."""
CATEGORY_SLOT = 3

ParsedField = tuple[int, int, str, float]
"""``(slot, index, code, expires_at)`` of a bucket (slot 0-2 by grain),
``(CATEGORY_SLOT, day, category, expires_at)`` of a category field, ``SCALAR`` otherwise.

``expires_at`` is the smallest latest-event time ``lt`` at which a store drops the field:
``(index + retention) * grain_ms``, that is when ``index <= lt // grain_ms - retention``
(``RETENTION_BUCKETS``; a category-day keeps as long as a day bucket). Fields that are not
buckets never expire."""
SCALAR: ParsedField = (-1, 0, "", NEVER)
"""``lt``, ``fs``, ``l<kind>``, ``n<kind>``: no bucket, no category."""

PARSED: dict[str, ParsedField] = {}
"""The parse cache behind ``parsed_field``; hot loops read it first and call on a miss."""
_PARSED_MAX = 200_000
"""Bound of the parse cache: bucket indices move with time, so old names are dropped by
clearing the whole cache now and then (it refills in one pass over the active users)."""


_SLOT_MS: tuple[int, ...] = (MINUTE_MS, HOUR_MS, DAY_MS, DAY_MS)
_SLOT_RETENTION: tuple[int, ...] = (
    RETENTION_BUCKETS["m"],
    RETENTION_BUCKETS["h"],
    RETENTION_BUCKETS["d"],
    RETENTION_BUCKETS["d"],
)


def _expiry(slot: int, index: int) -> float:
    return float((index + _SLOT_RETENTION[slot]) * _SLOT_MS[slot])


def parsed_field(field: str) -> ParsedField:
    """What a state field is, parsed once per distinct name (a cache shared by all users).

    Feature vectors and trims scan every field of a user's state for every event; parsing
    the names with ``int()`` each time was most of their cost.
    """
    parsed = PARSED.get(field)
    if parsed is not None:
        return parsed
    day = category_day(field)
    if day is not None:
        parsed = (CATEGORY_SLOT, day, field[field.index(":") + 1 :], _expiry(CATEGORY_SLOT, day))
    elif len(field) > 2 and field[1] in GRAIN_SLOT and field[2:].isascii() and field[2:].isdigit():
        slot, index = GRAIN_SLOT[field[1]], int(field[2:])
        parsed = (slot, index, field[0], _expiry(slot, index))
    else:
        parsed = SCALAR
    if len(PARSED) >= _PARSED_MAX:
        PARSED.clear()
    PARSED[field] = parsed
    return parsed
