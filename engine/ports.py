"""The ports: what the engine and the processes around it need from the outside world.

Four interfaces, all here, all called the same way (``await``):

- ``FeatureStore``: per-user feature state, one call per micro-batch
  (``engine.features.store.InMemoryFeatureStore``,
  ``streams.adapters.redis_store.RedisFeatureStore``, which holds the records of its worker's
  partitions and writes them to Redis);
- ``DecisionLedger``: guardrails, pending decisions and their labels, one call per micro-batch
  (``engine.ledger.InMemoryLedger``, ``streams.adapters.redis_ledger.RedisLedger``);
- ``RecordSink``: where output records go (``streams.adapters.sinks``: the worker's Faust
  producer, a plain producer, the replay's batching producer);
- ``RecordSource``: a resumable input of events for ``dealstream replay``
  (``streams.replay.sources``: a file or a topic range).

The in-memory implementations never suspend: their ``async`` methods return without awaiting
anything, so a backtest runs its whole loop as one coroutine under ``asyncio.run`` and
awaiting them costs about as much as a call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.features.state import State
from engine.features.store import BatchOutcome, StateUpdate
from engine.ledger import LedgerOp, LedgerResult
from engine.stop_loss import StopLossStatus


class FeatureStore(Protocol):
    """Where per-user feature state lives; one call per micro-batch.

    ``apply_batch`` reports, for every update, whether it was applied or skipped (redelivered,
    duplicate, late), and returns every touched user's state *before* the batch so the engine
    can replay the batch and compute the feature vector as of each event.
    """

    async def apply_batch(
        self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int
    ) -> BatchOutcome: ...

    async def read_states(self, user_ids: Iterable[str]) -> dict[str, State]: ...

    async def watermarks(self) -> dict[tuple[str, int], int]: ...

    async def forget(self, user_id: str) -> int:
        """Delete everything stored about a user; returns how many keys were removed."""
        ...


class DecisionLedger(Protocol):
    """Rate limits, stateful guardrails and pending labels; ``settle`` once per micro-batch
    (or per event, when the engine learns inline)."""

    async def settle(
        self, ops: Sequence[LedgerOp], *, now_ms: int, lanes: Mapping[int, int] | None = None
    ) -> LedgerResult:
        """Settle ``ops`` in order, then expire the pending labels due before each lane's
        clock (``lanes``: lane -> event time; None: one lane, 0, at ``now_ms``). ``now_ms``,
        the latest event time seen on any lane, is the stop-loss's clock."""
        ...

    def settle_due(self, lane: int, now_ms: int) -> bool:
        """Whether a ``settle`` without operations, with ``lane`` at ``now_ms``, may change
        anything: emit label events, or move a stop-loss status (which follows event time).

        An engine that learns inline settles after every event, a live engine after every
        batch; either skips a call that has nothing to decide when this says nothing is due. A
        remote
        ledger answers ``True``: it sees every batch (``RedisLedger`` commits the batch's
        feature records and outbox entry with it)."""
        ...

    def rate_limited(self, user_id: str, campaign: str, ts: int, interval_ms: int) -> bool:
        """Whether this ledger already knows, without any I/O, that a decision at ``ts``
        falls inside the user's decision interval (and would be dropped at ``settle``).

        Lets the engine skip features and scoring for such decisions; a remote ledger that
        decides in its own store answers ``False`` and drops them at ``settle``."""
        ...

    async def stop_loss_status(self) -> dict[str, StopLossStatus]:
        """Each stop-loss campaign's status as last settled (what a restarted worker starts
        from, before its first call)."""
        ...

    async def budget_spent_cents(self, campaign: str, day: int) -> int: ...

    async def pending_count(self) -> int: ...


class RecordSink(Protocol):
    """Where output records go: a Kafka producer in production, a list in tests.

    ``send`` may return before the record is delivered; ``flush`` returns once every record
    sent so far is delivered (and raises if one cannot be)."""

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None: ...

    async def flush(self) -> None: ...

    async def delivery(self) -> Awaitable[object]:
        """``flush`` in two steps: hands over every record sent so far and returns what completes
        once they are delivered (and raises if one cannot be). Records sent after the call are
        no part of it: the worker's event consumer handles its next batch meanwhile."""
        ...


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One record of a ``RecordSource``: an event to send, or (``event is None``) a reject.

    ``where`` is ``"<source name>:<line or offset>"``; ``mark`` is the checkpoint counter this
    item completes (``("events", n)`` or ``("<partition>", next_offset)``); ``skip`` is set
    when the source already knows the item is done (before the resume point).
    """

    event: dict[str, Any] | None
    where: str
    mark: tuple[str, int]
    skip: str | None = None
    reason: str | None = None


class RecordSource(Protocol):
    """A resumable, countable input of events (a file, or a range of a topic)."""

    name: str

    def items(self, resume: Mapping[str, int]) -> AsyncIterator[SourceItem]:
        """The items from the resume point on (``resume``: checkpoint counters by mark)."""
        ...

    def fraction(self) -> float | None:
        """How far through the source the last item was (0..1), if the source knows."""
        ...

    def counts(self) -> tuple[int, int, Counter[str]]: ...

    def identity(self) -> dict[str, Any]:
        """What identifies this input in a checkpoint (a resume of another input is refused)."""
        ...

    def reject_samples(self) -> list[str]: ...

    def close(self) -> None: ...
