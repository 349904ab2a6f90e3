"""The feature store's records and its in-memory implementation (the port: ``engine.ports``).

A store applies a micro-batch of state updates in one call and reports, for every update,
whether it was applied or skipped (redelivered, duplicate, late). It returns every touched
user's state *before* the batch so the engine can replay the batch and compute the feature
vector as of each event. ``apply_updates`` is the one implementation of these rules, on
records held as bytes (``engine/features/record.py``): the in-memory store runs it on all its
users', the Redis store (``streams/adapters/redis_store.py``) on those of the partitions its
worker owns, which it then writes to Redis.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from engine.features.record import apply_records, decode_state
from engine.features.state import Op, State


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


class StatesBefore(Mapping[str, State]):
    """The batch's users' states before it, each decoded from its record when first read:
    the engine reads only the users it computes features for."""

    __slots__ = ("_records", "_states")

    def __init__(self, records: dict[str, bytes | None]) -> None:
        self._records = records
        self._states: dict[str, State] = {}

    def __getitem__(self, user_id: str) -> State:
        state = self._states.get(user_id)
        if state is None:
            record = self._records[user_id]
            state = self._states[user_id] = decode_state(record) if record is not None else {}
        return state

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def record(self, user_id: str) -> bytes | None:
        """The user's record before the batch, as bytes (None: a new user)."""
        return self._records[user_id]


@dataclass(slots=True)
class BatchOutcome:
    statuses: list[UpdateStatus]
    before: StatesBefore
    """Each touched user's state before the batch (empty for a new user)."""


_STATUSES = tuple(UpdateStatus)
"""The statuses by code, as the compiled step hands them out."""


class AppliedBatch(NamedTuple):
    """What ``apply_updates`` did to the records it was given."""

    outcome: BatchOutcome
    changed: list[str]
    """The users whose record changed, in the order they first changed."""
    bytes_added: int
    """How many bytes the changed records grew by in all (negative: they shrank), so that a
    store can keep the size of what it holds without scanning it."""


def apply_updates(
    records: dict[str, bytes],
    watermarks: dict[tuple[str, int], int],
    updates: Sequence[StateUpdate],
    *,
    allowed_lateness_ms: int,
    forgotten: Container[str] = frozenset(),
) -> AppliedBatch:
    """Apply a micro-batch to ``records`` (user -> record bytes, ``engine/features/record.py``)
    and ``watermarks`` in place: the one implementation of the store's contract, whichever
    store keeps the records (compiled: ``native/src/record.rs``).

    Each update is, by the first rule that holds: ``FORGOTTEN`` (its user has a live
    tombstone in ``forgotten``) unless redelivered; ``REDELIVERED`` (its offset is at or below
    its partition's watermark); ``LATE`` (unless ``on_time``: older than the user's latest
    event minus ``allowed_lateness_ms``); ``DUPLICATE`` (its event id is in the user's dedup
    set); else ``APPLIED``: its operations (``engine.features.state.apply_ops``'s rules) change
    the user's state and its id joins the dedup set. Every update but a redelivered one moves
    its partition's watermark. After the batch each changed user's expired buckets go
    (``RETENTION_BUCKETS``, by the user's latest event) and so do the ids older than the
    latest event minus the lateness.

    Users missing from ``records`` start empty; one that got nothing applied is not added. A
    changed record moves to the end of ``records``, so the dict's order is the order of the
    last writes (the least recently written first: what a bounded store drops first).
    """
    statuses, before, changed, bytes_added = apply_records(
        records,
        watermarks,
        updates,
        allowed_lateness_ms=allowed_lateness_ms,
        forgotten=forgotten,
        statuses=_STATUSES,
    )
    return AppliedBatch(BatchOutcome(statuses, StatesBefore(before)), changed, bytes_added)


class InMemoryFeatureStore:
    """A dict-backed store for backtests and unit tests; same semantics as the Redis store
    (the same records, the same ``apply_updates``)."""

    def __init__(self) -> None:
        self._users: dict[str, bytes] = {}
        self._watermarks: dict[tuple[str, int], int] = {}

    async def apply_batch(
        self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int
    ) -> BatchOutcome:
        return apply_updates(
            self._users, self._watermarks, updates, allowed_lateness_ms=allowed_lateness_ms
        ).outcome

    async def read_states(self, user_ids: Iterable[str]) -> dict[str, State]:
        users = self._users
        return {
            user_id: decode_state(users[user_id]) if user_id in users else {}
            for user_id in user_ids
        }

    async def watermarks(self) -> dict[tuple[str, int], int]:
        return dict(self._watermarks)

    async def forget(self, user_id: str) -> int:
        return 1 if self._users.pop(user_id, None) is not None else 0

    def user_count(self) -> int:
        return len(self._users)
