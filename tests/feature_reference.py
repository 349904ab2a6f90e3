"""The engine's in-memory store as the reference for the features a real run left behind."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from engine.events import parse_event
from engine.features.state import GRAIN_MS, RETENTION_BUCKETS, State, event_ops
from engine.features.store import InMemoryFeatureStore, StateUpdate, UpdateStatus


async def reference_states(
    events: Iterable[Mapping[str, Any]], *, allowed_lateness_ms: int
) -> dict[str, State]:
    """The events applied in order, once each, to the engine's in-memory store: every user's
    state, by user id."""
    store = InMemoryFeatureStore()
    updates = []
    users: set[str] = set()
    for raw in events:
        event = parse_event(dict(raw))
        users.add(event.user_id)
        updates.append(StateUpdate(event.user_id, event.event_id, event.ts, event_ops(event)))
    outcome = await store.apply_batch(updates, allowed_lateness_ms=allowed_lateness_ms)
    assert set(outcome.statuses) == {UpdateStatus.APPLIED}
    return await store.read_states(sorted(users))


_BUCKET = re.compile(r"[a-z$]([mhd])([0-9]+)")
_CATEGORY_DAY = re.compile(r"k([0-9]+):.*", re.S)


def expired_fields(state: Mapping[str, float]) -> list[str]:
    """The buckets a store drops after a batch, by the rule as documented (written here from
    the names, not with the engine's parse cache): a bucket of grain g and index i, or a
    category-day of day i (as a day bucket), when ``i <= int(lt) // g_ms - RETENTION[g]``."""
    latest = state.get("lt")
    if latest is None:
        return []
    stale = []
    for name in state:
        bucket = _BUCKET.fullmatch(name)
        category = _CATEGORY_DAY.fullmatch(name)
        if bucket:
            grain, index = bucket.group(1), int(bucket.group(2))
        elif category:
            grain, index = "d", int(category.group(1))
        else:
            continue
        if index <= int(latest) // GRAIN_MS[grain] - RETENTION_BUCKETS[grain]:
            stale.append(name)
    return stale


def trim(state: State) -> None:
    """Drop ``expired_fields`` in place."""
    for name in expired_fields(state):
        del state[name]
