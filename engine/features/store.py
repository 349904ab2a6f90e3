"""The feature store's records and its in-memory implementation (the port: ``engine.ports``).

A store applies a micro-batch of state updates in one call and reports, for every update,
whether it was applied or skipped (redelivered, duplicate, late). It returns every touched
user's state *before* the batch so the engine can replay the batch and compute the feature
vector as of each event. The Redis store (``streams/adapters/redis_store.py``) implements the same
contract in one Lua call; both are held to the same tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from engine.features.state import NEVER, Op, State, apply_ops, trim_and_next_expiry


class UpdateStatus(IntEnum):
    APPLIED = 0
    REDELIVERED = 1
    """The source position was at or below the partition's watermark: already applied."""
    DUPLICATE = 2
    """The event id was already applied within the allowed lateness."""
    LATE = 3
    """The event is older than the user's latest event minus the allowed lateness."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event came from: a topic partition offset, or a file line."""

    source: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class StateUpdate:
    user_id: str
    event_id: str
    ts: int
    ops: Sequence[Op]
    position: Position | None = None
    on_time: bool = False
    """Never counted as late: the engine's own records (an offer granted a batch ago), whose
    event time can trail a user's later events by more than the allowed lateness."""


@dataclass(slots=True)
class BatchOutcome:
    statuses: list[UpdateStatus]
    before: dict[str, State]
    """Each touched user's state before the batch (empty dict for a new user)."""


def classify(
    update: StateUpdate,
    *,
    watermark: int | None,
    latest_ts: float | None,
    seen_event_ids: dict[str, float],
    allowed_lateness_ms: int,
) -> UpdateStatus:
    """The skip rules, in the order the Lua script checks them."""
    if (
        update.position is not None
        and watermark is not None
        and update.position.offset <= watermark
    ):
        return UpdateStatus.REDELIVERED
    if not update.on_time and latest_ts is not None and update.ts < latest_ts - allowed_lateness_ms:
        return UpdateStatus.LATE
    if update.event_id in seen_event_ids:
        return UpdateStatus.DUPLICATE
    return UpdateStatus.APPLIED


@dataclass(slots=True)
class _UserRecord:
    state: State = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    next_expiry: float = NEVER
    """No field expires while the latest event time is below this: ``trim`` is skipped."""
    oldest_seen: float = NEVER
    """The smallest event time in ``seen``: pruning is skipped while it is inside the horizon."""


class InMemoryFeatureStore:
    """A dict-backed store for backtests and unit tests; same semantics as the Redis store."""

    def __init__(self) -> None:
        self._users: dict[str, _UserRecord] = {}
        self._watermarks: dict[tuple[str, int], int] = {}

    async def apply_batch(
        self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int
    ) -> BatchOutcome:
        before: dict[str, State] = {}
        statuses: list[UpdateStatus] = []
        touched: set[str] = set()
        for update in updates:
            record = self._users.get(update.user_id)
            if update.user_id not in before:
                before[update.user_id] = dict(record.state) if record else {}
            if record is None:
                record = self._users[update.user_id] = _UserRecord()
            wm_key = (
                (update.position.source, update.position.partition) if update.position else None
            )
            status = classify(
                update,
                watermark=self._watermarks.get(wm_key) if wm_key else None,
                latest_ts=record.state.get("lt"),
                seen_event_ids=record.seen,
                allowed_lateness_ms=allowed_lateness_ms,
            )
            if status is not UpdateStatus.REDELIVERED and wm_key is not None:
                assert update.position is not None
                self._watermarks[wm_key] = update.position.offset
            if status is UpdateStatus.APPLIED:
                expiry = apply_ops(record.state, update.ops)
                if expiry < record.next_expiry:
                    record.next_expiry = expiry
                seen_ts = float(update.ts)
                record.seen[update.event_id] = seen_ts
                if seen_ts < record.oldest_seen:
                    record.oldest_seen = seen_ts
                touched.add(update.user_id)
            statuses.append(status)
        for user_id in touched:
            # Trim and prune only when something is due: both are scans of the whole record,
            # and skipping them when nothing would go leaves exactly the same record.
            record = self._users[user_id]
            latest = record.state.get("lt")
            if latest is not None and int(latest) >= record.next_expiry:
                record.next_expiry = trim_and_next_expiry(record.state)
            horizon = record.state.get("lt", 0.0) - allowed_lateness_ms
            if record.oldest_seen < horizon:
                record.seen = {eid: ts for eid, ts in record.seen.items() if ts >= horizon}
                record.oldest_seen = min(record.seen.values(), default=NEVER)
        for user_id in before.keys() - touched:
            if not self._users[user_id].state:
                del self._users[user_id]
        return BatchOutcome(statuses=statuses, before=before)

    async def read_states(self, user_ids: Iterable[str]) -> dict[str, State]:
        return {
            user_id: dict(self._users[user_id].state) if user_id in self._users else {}
            for user_id in user_ids
        }

    async def watermarks(self) -> dict[tuple[str, int], int]:
        return dict(self._watermarks)

    async def forget(self, user_id: str) -> int:
        return 1 if self._users.pop(user_id, None) is not None else 0

    def user_count(self) -> int:
        return len(self._users)
