"""The engine's in-memory store as the reference for the features a real run left behind."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from engine.events import parse_event
from engine.features.state import State, event_ops
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
