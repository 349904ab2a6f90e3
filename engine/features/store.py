"""The feature store's records and its in-memory implementation (the port: ``engine.ports``).

A store applies a micro-batch of state updates in one call and reports, for every update,
whether it was applied or skipped (redelivered, duplicate, late). It returns every touched
user's state *before* the batch so the engine can replay the batch and compute the feature
vector as of each event. ``apply_updates`` is the one implementation of these rules: the
in-memory store runs it on its dicts, the Redis store (``streams/adapters/redis_store.py``) on
the records of the partitions its worker owns, which it then writes to Redis.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from hashlib import blake2b
from typing import NamedTuple

from engine.features.state import NEVER, Op, State, apply_ops, expires_at, trim_and_next_expiry


class UpdateStatus(IntEnum):
    APPLIED = 0
    REDELIVERED = 1
    """The source position was at or below the partition's watermark: already applied."""
    DUPLICATE = 2
    """The event id was already applied within the allowed lateness."""
    LATE = 3
    """The event is older than the user's latest event minus the allowed lateness."""
    FORGOTTEN = 4
    """The user was forgotten (``dealstream forget``) and the tombstone still lives: skipped,
    so that the profile is not rebuilt."""


class Position(NamedTuple):
    """Where an event came from: a topic partition offset, or a file line.

    (A named tuple, like ``StateUpdate``: records built for every event are built three times
    faster than a frozen dataclass, and are as immutable.)"""

    source: str
    partition: int
    offset: int


class StateUpdate(NamedTuple):
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


SEEN_KEY_BYTES = 5


def seen_second(ts: int) -> int:
    """The second a dedup set remembers an update by: its event time rounded up.

    Seconds take a byte apiece where milliseconds took four in a stored record. Rounding up
    keeps an id at least as long as its exact time would: an update older than the horizon
    (the latest event minus the lateness) is late whatever the set holds, so pruning by the
    rounded time changes no status."""
    return -(-ts // 1000)


def seen_key(event_id: str) -> bytes:
    """What a user's dedup set remembers of an event id: a 40-bit digest.

    Five bytes instead of the id keep the set small where it is stored (one per active user);
    two of a user's n ids within the allowed lateness share a digest with probability about
    n**2 / 2**41 (5e-9 for 100 ids; the later one would count as a duplicate)."""
    return blake2b(event_id.encode(), digest_size=SEEN_KEY_BYTES).digest()


@dataclass(slots=True)
class UserRecord:
    """One user's feature state and the event ids applied within the allowed lateness."""

    state: State = field(default_factory=dict)
    seen: dict[bytes, int] = field(default_factory=dict)
    """``seen_key(event_id)`` -> event time in whole seconds, rounded up (``seen_second``), of
    every applied update within the lateness."""
    next_expiry: float = NEVER
    """No field expires while the latest event time is below this: ``trim`` is skipped."""
    oldest_seen: float = NEVER
    """The smallest second in ``seen``: pruning is skipped while it is inside the horizon."""

    @classmethod
    def restored(cls, state: State, seen: dict[bytes, int]) -> UserRecord:
        """A record read back from storage, with its derived bounds recomputed."""
        return cls(
            state,
            seen,
            min(map(expires_at, state), default=NEVER),
            min(seen.values(), default=NEVER),
        )


def apply_updates(
    records: MutableMapping[str, UserRecord],
    watermarks: MutableMapping[tuple[str, int], int],
    updates: Sequence[StateUpdate],
    *,
    allowed_lateness_ms: int,
    forgotten: Container[str] = frozenset(),
) -> tuple[BatchOutcome, set[str]]:
    """Apply a micro-batch to ``records`` and ``watermarks`` in place: the one implementation
    of the store's contract, whichever store keeps the records.

    Each update is, by the first rule that holds: ``FORGOTTEN`` (its user has a live
    tombstone in ``forgotten``) unless redelivered; ``REDELIVERED`` (its offset is at or below
    its partition's watermark); ``LATE`` (unless ``on_time``: older than the user's latest
    event minus ``allowed_lateness_ms``); ``DUPLICATE`` (its event id is in the user's dedup
    set); else ``APPLIED``. Every update but a redelivered one moves its partition's watermark.

    Users missing from ``records`` start empty. Returns the outcome and the users whose record
    changed; a user who was created here but got nothing applied is removed again.
    """
    applied, redelivered, late, duplicate = (
        UpdateStatus.APPLIED,
        UpdateStatus.REDELIVERED,
        UpdateStatus.LATE,
        UpdateStatus.DUPLICATE,
    )
    before: dict[str, State] = {}
    statuses: list[UpdateStatus] = []
    status_of = statuses.append
    touched: set[str] = set()
    for update in updates:
        user_id = update.user_id
        if user_id in forgotten:
            status_of(_skip_forgotten(update, watermarks))
            continue
        record = records.get(user_id)
        if record is None:
            record = records[user_id] = UserRecord()
            before.setdefault(user_id, {})
        elif user_id not in before:
            before[user_id] = dict(record.state)
        position = update.position
        if position is not None:
            wm_key = (position.source, position.partition)
            watermark = watermarks.get(wm_key)
            if watermark is not None and position.offset <= watermark:
                status_of(redelivered)
                continue
            watermarks[wm_key] = position.offset
        state = record.state
        if not update.on_time:
            latest = state.get("lt")
            if latest is not None and update.ts < latest - allowed_lateness_ms:
                status_of(late)
                continue
        key = seen_key(update.event_id)
        seen = record.seen
        if key in seen:
            status_of(duplicate)
            continue
        expiry = apply_ops(state, update.ops)
        if expiry < record.next_expiry:
            record.next_expiry = expiry
        second = -(-update.ts // 1000)  # seen_second, inline: it runs for every update
        seen[key] = second
        if second < record.oldest_seen:
            record.oldest_seen = second
        touched.add(user_id)
        status_of(applied)
    for user_id in touched:
        # Trim and prune only when something is due: both are scans of the whole record,
        # and skipping them when nothing would go leaves exactly the same record.
        record = records[user_id]
        latest = record.state.get("lt")
        if latest is not None and int(latest) >= record.next_expiry:
            record.next_expiry = trim_and_next_expiry(record.state)
        horizon = seen_second(int(record.state.get("lt", 0.0)) - allowed_lateness_ms)
        if record.oldest_seen < horizon:
            record.seen = {k: s for k, s in record.seen.items() if s >= horizon}
            record.oldest_seen = min(record.seen.values(), default=NEVER)
    for user_id in before.keys() - touched:
        if not records[user_id].state:
            del records[user_id]
    return BatchOutcome(statuses=statuses, before=before), touched


def _skip_forgotten(
    update: StateUpdate, watermarks: MutableMapping[tuple[str, int], int]
) -> UpdateStatus:
    """A forgotten user's update: redelivered as any other, else forgotten (the watermark moves
    past it, as past a late one)."""
    position = update.position
    if position is None:
        return UpdateStatus.FORGOTTEN
    wm_key = (position.source, position.partition)
    watermark = watermarks.get(wm_key)
    if watermark is not None and position.offset <= watermark:
        return UpdateStatus.REDELIVERED
    watermarks[wm_key] = position.offset
    return UpdateStatus.FORGOTTEN


class InMemoryFeatureStore:
    """A dict-backed store for backtests and unit tests; same semantics as the Redis store."""

    def __init__(self) -> None:
        self._users: dict[str, UserRecord] = {}
        self._watermarks: dict[tuple[str, int], int] = {}

    async def apply_batch(
        self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int
    ) -> BatchOutcome:
        outcome, _ = apply_updates(
            self._users, self._watermarks, updates, allowed_lateness_ms=allowed_lateness_ms
        )
        return outcome

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
