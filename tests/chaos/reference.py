"""The chaos suite's own reference: features computed from the raw events with plain Python.

Independent of the engine on purpose: no state operations, no buckets kept, no catalogue code.
Each user's events are walked once and the windows applied as docs/features.md defines them:
trailing windows of event time measured back from the user's latest event (``now``), with the
resolution of their grain (1 h: the 60 minutes ending in now's minute; 24 h: 24 hours ending
in now's hour; 7 d / 30 d: the days ending on now's day, UTC).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
RECENCY_DEFAULT_S = 2_592_000.0
KINDS = ("view", "cart", "favorite", "search", "purchase")
WINDOWS = {"1h": (MINUTE_MS, 60), "24h": (HOUR_MS, 24), "7d": (DAY_MS, 7), "30d": (DAY_MS, 30)}
"""Window -> (grain in ms, buckets of that grain)."""


@dataclass
class _User:
    events: list[tuple[int, str, int, frozenset[str]]] = field(default_factory=list)
    """(ts, kind, amount in cents, categories touched)."""


def _kind(event: Mapping[str, Any]) -> str:
    return str(event["action"]) if event["type"] == "browse" else str(event["type"])


def _categories(event: Mapping[str, Any]) -> frozenset[str]:
    if event["type"] == "purchase":
        return frozenset(str(item["category"]) for item in event["items"])
    category = event.get("category")
    return frozenset([str(category)]) if category else frozenset()


def expected_features(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """user id -> the checked features, as of the user's latest event."""
    users: dict[str, _User] = defaultdict(_User)
    for event in events:
        amount = round(float(event["amount"]) * 100) if event["type"] == "purchase" else 0
        users[str(event["user_id"])].events.append(
            (int(event["ts"]), _kind(event), amount, _categories(event))
        )
    return {user_id: _features(user) for user_id, user in users.items()}


def _within(now: int, ts: int, window: str) -> bool:
    grain, buckets = WINDOWS[window]
    return 0 <= now // grain - ts // grain < buckets


def _features(user: _User) -> dict[str, float]:
    now = max(ts for ts, _, _, _ in user.events)
    features: dict[str, float] = {}
    for window in WINDOWS:
        inside = [e for e in user.events if _within(now, e[0], window)]
        for kind in KINDS:
            features[f"{kind}_count_{window}"] = float(sum(1 for e in inside if e[1] == kind))
        features[f"spend_{window}"] = sum(e[2] for e in inside) / 100
    for kind in KINDS:
        last = max((ts for ts, k, _, _ in user.events if k == kind), default=None)
        features[f"recency_{kind}_s"] = (
            RECENCY_DEFAULT_S if last is None else min((now - last) / 1000.0, RECENCY_DEFAULT_S)
        )
    features["purchase_frequency_30d"] = float(
        len(
            {
                ts // DAY_MS
                for ts, k, _, _ in user.events
                if k == "purchase" and _within(now, ts, "30d")
            }
        )
    )
    features["distinct_categories_7d"] = float(
        len({c for ts, _, _, cs in user.events if _within(now, ts, "7d") for c in cs})
    )
    return features
