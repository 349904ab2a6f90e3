"""The decision ledger in Redis: one Lua call per micro-batch, same contract as the in-memory one.

Budgets are plain Redis counters checked and incremented inside the script, so any number of
workers share them without ever overspending; the stop-loss sums and state live next to them,
so every worker sees the same campaign state. See ``commit_batch.lua`` (next to this module)
for the key layout.

In the worker the call is the batch's whole Redis effect: given the feature store
(``features``) and an outbox, it also writes the feature records the store staged and the
outbox entry of the batch's outputs, atomically (``batch_commit.py``, ``outbox.py``). A call
whose reply is lost is resolved through its outbox entry, never run twice.

Users appear in Redis by their pseudonyms (``pseudonyms.py``): the user keys and
the label indexes' members, so the label events the script returns name pseudonyms too
(training examples carry no user id). A pending record (``PendingDecision.compact_json``)
holds neither its decision id nor its user: the script returns both with each label event.

The ledger remembers the decision times it settled (``rate_limited``), so that the engine does
not compute features and scores for decisions the script would drop: most intent events of a
browsing session fall inside the decision interval of the session's first.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.features.catalogue import StoredFeatures, stored_features
from engine.labels import LabelEvent, LabelKind, PendingDecision
from engine.ledger import (
    RATE_LIMITED,
    DecisionOutcome,
    DecisionRequest,
    LedgerConfig,
    LedgerOp,
    LedgerResult,
    without_offer,
)
from engine.stop_loss import StopLossStatus
from streams.adapters.batch_commit import (
    BatchCommit,
    CommitReply,
    FeatureWrite,
    OutboxWrite,
    ReplyWait,
    StateEpochMoved,
)
from streams.adapters.outbox import Outbox
from streams.adapters.pseudonyms import Pseudonyms
from streams.adapters.redis_client import RedisClient
from streams.adapters.redis_errors import ReplicationShortfall, SlotMoved, retry_on_redis
from streams.adapters.redis_store import (
    RedisFeatureStore,
    from_hash_tag,
    hash_tag,
    state_epoch_key,
    user_key,
)
from streams.adapters.replica_wait import ReplicaWait

log = logging.getLogger("dealstream.worker")

_OUTCOMES: dict[int, DecisionOutcome] = {
    0: RATE_LIMITED,
    1: DecisionOutcome(decided=True, granted=True),
    2: DecisionOutcome(decided=True),
    3: DecisionOutcome(decided=True, denied_by="cooldown"),
    4: DecisionOutcome(decided=True, denied_by="max_offers_per_day"),
    5: DecisionOutcome(decided=True, denied_by="budget"),
}
_NO_OFFER = (0, 0, 0, -1, -1, -1)
"""has_offer, cost_cents, cooldown_ms, max_per_day, budget_cents, day of a decision without an
offer."""
_KINDS: dict[bytes | str, LabelKind] = {
    b"C": LabelKind.CONVERTED,
    b"E": LabelKind.ELAPSED,
    b"X": LabelKind.CLOSED,
    # the same as text, for a client that decodes replies
    "C": LabelKind.CONVERTED,
    "E": LabelKind.ELAPSED,
    "X": LabelKind.CLOSED,
}
_DENIED = ord("N")
DEFAULT_REMEMBERED_USERS = 200_000
"""Default bound of the remembered decision times per campaign (one per user, about 100 bytes
each); the oldest go first, and a forgotten time only means one proposal the script drops."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _pending_lane(stored: bytes | str) -> int | None:
    """The lane of a pending decision as ``commit_batch.lua`` stores it under its decision id
    (its stage 'e' or 'x', its lane's digits, then the record: 'G' or 'N' and the JSON); None
    for a value of another form."""
    raw = _bytes(stored)
    end = 1
    while raw[end : end + 1].isdigit():
        end += 1
    if end == 1 or raw[:1] not in (b"e", b"x") or raw[end : end + 1] not in (b"G", b"N"):
        return None
    return int(raw[1:end])


def _pending_from_stored(
    decision_id: bytes | str,
    user: bytes | str,
    stored: bytes | str,
    converted_at: bytes | str | int,
) -> PendingDecision:
    """Stored records are 'G' + JSON, or 'N' + JSON when the proposed offer was denied; the
    JSON is ``PendingDecision.compact_json``'s array, stored under ``decision_id`` for
    ``user`` (as the script names users: ``hash_tag``). The first conversion is kept beside
    it (an integer reply for the call's own conversions, '' when there is none)."""
    raw = stored.encode() if isinstance(stored, str) else stored
    decision = PendingDecision.from_compact(
        orjson.loads(memoryview(raw)[1:]),
        decision_id=_text(decision_id),
        user_id=from_hash_tag(_text(user)),
        converted_at=None if converted_at in (b"", "") else int(float(converted_at)),
    )
    return without_offer(decision) if raw[0] == _DENIED else decision


def _packed_features(
    ops: Sequence[LedgerOp],
) -> tuple[list[StoredFeatures | None], list[StoredFeatures | None]]:
    """Each decision's features packed (``stored_features``) for its pending record and for
    its draft, once per vector: a decision's record and draft share one, and so do the
    decisions of one event (its campaigns)."""
    by_vector: dict[int, StoredFeatures] = {}  # the vectors are alive while ``ops`` is

    def pack(vector: Mapping[str, float]) -> StoredFeatures:
        stored = by_vector.get(id(vector))
        if stored is None:
            stored = by_vector[id(vector)] = stored_features(vector)
        return stored

    records: list[StoredFeatures | None] = []
    drafts: list[StoredFeatures | None] = []
    for op in ops:
        if isinstance(op, DecisionRequest):
            records.append(pack(op.decision.features))
            drafts.append(None if op.draft is None else pack(op.draft.decision.features))
        else:
            records.append(None)
            drafts.append(None)
    return records, drafts


def _optional_float(value: bytes | str) -> float | None:
    return None if value in (b"", "") else float(_text(value))


def ledger_result(
    outcomes_raw: Sequence[Any], events_raw: Sequence[Any], statuses_raw: Sequence[Any]
) -> LedgerResult:
    """The ledger section's reply (or an outbox entry's copy of it) as a ``LedgerResult``."""
    outcomes = [None if int(code) < 0 else _OUTCOMES[int(code)] for code in outcomes_raw]
    events = [
        LabelEvent(
            _pending_from_stored(*events_raw[k + 1 : k + 5]),
            _KINDS[events_raw[k]],
            int(float(events_raw[k + 5])),
        )
        for k in range(0, len(events_raw), 6)
    ]
    stop_loss: dict[str, StopLossStatus] = {}
    for k in range(0, len(statuses_raw), 7):
        name, stopped, since, decisions, diff, upper, lower = statuses_raw[k : k + 7]
        stop_loss[_text(name)] = StopLossStatus(
            stopped=int(stopped) == 1,
            since_ms=None if since in (b"", "") else int(float(_text(since))),
            decisions=int(decisions),
            incremental_margin=_optional_float(diff),
            upper_bound=_optional_float(upper),
            lower_bound=_optional_float(lower),
        )
    return LedgerResult(outcomes=outcomes, events=events, stop_loss=stop_loss)


class RedisLedger:
    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        config: LedgerConfig,
        features: RedisFeatureStore | None = None,
        outbox: Outbox | None = None,
        retry_deadline_s: float = 120.0,
        pseudonyms: Pseudonyms | None = None,
        replication: ReplicaWait | None = None,
        reply_wait: ReplyWait | None = None,
        remembered_users: int = DEFAULT_REMEMBERED_USERS,
    ) -> None:
        if remembered_users < 1:
            raise ValueError("remembered_users must be at least 1")
        self._client = client
        self._remembered_users = remembered_users
        """Users whose latest decision time is remembered per campaign (``_last_decision``)."""
        self.pseudonyms = pseudonyms if pseudonyms is not None else Pseudonyms.raw()
        self._prefix = prefix
        self.config = config
        self.attribution_window_ms = config.attribution_window_ms
        self._commit = BatchCommit(
            client, prefix=prefix, replication=replication, reply_wait=reply_wait
        )
        """With ``replication``, each call waits for replicas; too few is resolved like a lost
        reply (``_call``), so no output of the batch leaves before it is replicated."""
        self._features = features
        """The store whose staged writes each call carries (it must have ``defer_writes``)."""
        self._outbox = outbox
        """Where each call keeps its batch's outputs (with ``features`` only: an entry is
        matched to Kafka's commits by the partitions the store's write covers)."""
        self._retry_deadline_s = retry_deadline_s
        """How long a call whose reply was lost is retried (0: for ever), as the worker retries
        batches (``DEALSTREAM_REDIS_RETRY_DEADLINE_S``)."""
        self._last_decision: dict[str, dict[str, int]] = {}
        """Per campaign, the latest decision time this ledger settled per user, oldest entries
        first: never later than the script's own (which only grows, whoever decides), so a
        decision it finds inside the interval the script finds inside it too. A time older
        than the campaign's interval before the event-time clock goes (``_forget_passed``):
        only a late event could still fall inside it, and the script drops that one anyway."""
        self._intervals: dict[str, int] = {}
        """Per campaign, the longest decision interval its decisions asked for."""
        self._epoch: bytes | None = None
        """The state epoch the last call returned; a change means ``dealstream forget`` ran."""
        self._head: list[Any] = []
        for name, setting in sorted(config.stop_loss.items()):
            stop = setting.config
            self._head.extend(
                (name, repr(setting.margin), stop.window_ms, stop.min_decisions, stop.min_users)
            )

    def settle_due(self, lane: int, now_ms: int) -> bool:
        """Unknown without a round trip: ``commit_batch.lua`` expires what is due at ``settle``."""
        del lane, now_ms
        return True

    def rate_limited(self, user_id: str, campaign: str, ts: int, interval_ms: int) -> bool:
        """Whether the decision interval certainly has not passed: by the decision times this
        ledger settled itself. ``commit_batch.lua`` checks every decision again, atomically for all
        workers; this only spares the engine proposing what it would drop."""
        times = self._last_decision.get(campaign)
        last = times.get(user_id) if times is not None else None
        return interval_ms > 0 and last is not None and ts - last < interval_ms

    def _remember(
        self, ops: Sequence[LedgerOp], outcomes: Sequence[DecisionOutcome | None]
    ) -> None:
        remembered, intervals = self._last_decision, self._intervals
        for op, outcome in zip(ops, outcomes, strict=True):
            if not isinstance(op, DecisionRequest):
                continue
            decision = op.decision
            if op.decision_interval_ms > intervals.get(decision.campaign, 0):
                intervals[decision.campaign] = op.decision_interval_ms
            if outcome is None or not outcome.decided:
                continue
            times = remembered.get(decision.campaign)
            if times is None:
                times = remembered[decision.campaign] = {}
            user = decision.user_id
            last = times.pop(user, None)
            times[user] = decision.ts if last is None else max(last, decision.ts)
            while len(times) > self._remembered_users:
                del times[next(iter(times))]

    def _forget_passed(self, now_ms: int) -> None:
        """Drop the remembered times whose interval has passed by the event-time clock
        (``now_ms``): from the oldest remembered, up to the first still inside it."""
        for campaign, times in self._last_decision.items():
            horizon = now_ms - self._intervals.get(campaign, 0)
            passed = []
            for user, last in times.items():
                if last >= horizon:
                    break
                passed.append(user)
            for user in passed:
                del times[user]

    async def settle(
        self, ops: Sequence[LedgerOp], *, now_ms: int, lanes: Mapping[int, int] | None = None
    ) -> LedgerResult:
        features = self._features.take_staged() if self._features is not None else None
        packed, packed_drafts = _packed_features(ops)
        outbox = None
        if self._outbox is not None and features is not None:
            drafts = [op.draft if isinstance(op, DecisionRequest) else None for op in ops]
            outbox = self._outbox.write(drafts, features.marks, packed_drafts)
        ledger = self._ledger_args(ops, packed, now_ms, {0: now_ms} if lanes is None else lanes)
        try:
            reply = await self._call(features, ledger, outbox)
        except BaseException as exc:
            if self._features is not None:
                if isinstance(exc, StateEpochMoved):
                    self._features.refused_as_stale()
                else:
                    self._features.failed()
            if outbox is not None and self._outbox is not None:
                # Refused, or the worker stops (RedisBatchFailed): its acknowledgements wait
                # for the next call (deleting an entry twice is harmless).
                self._outbox.failed(outbox)
            raise
        if self._features is not None:
            self._features.written(features)
        if reply.epoch != self._epoch:
            # A user was forgotten (or this is the first call, or the epoch is unknown): what
            # was remembered may name decisions the script no longer knows.
            self._last_decision.clear()
            self._epoch = reply.epoch
        result = ledger_result(reply.outcomes, reply.events, reply.statuses)
        self._remember(ops, result.outcomes)
        self._forget_passed(now_ms)
        return result

    def _ledger_args(
        self,
        ops: Sequence[LedgerOp],
        packed: Sequence[StoredFeatures | None],
        now_ms: int,
        lanes: Mapping[int, int],
    ) -> list[Any]:
        """The script's ledger section: two arguments for the whole batch (``commit_batch.lua``
        says the layout): one argument per field cost redis-py more CPU to encode than the rest
        of the call."""
        config = self.config
        pseudonym = self.pseudonyms.of
        fields: list[Any] = []
        records: list[bytes] = []
        for op, stored in zip(ops, packed, strict=True):
            if isinstance(op, DecisionRequest):
                decision, limits = op.decision, op.offer
                user = pseudonym(decision.user_id)
                record = decision.compact_json(stored)
                records.append(record)
                if limits is None:
                    offer: tuple[int, ...] = _NO_OFFER
                else:
                    offer = (
                        1,
                        limits.cost_cents,
                        limits.cooldown_ms,
                        -1 if limits.max_per_day is None else limits.max_per_day,
                        -1 if limits.budget_cents is None else limits.budget_cents,
                        -1 if limits.day is None else limits.day,
                    )
                has_offer, cost, cooldown, max_per_day, budget, day = offer
                fields.extend(
                    (
                        "D",
                        hash_tag(user),
                        decision.campaign,
                        decision.ts,
                        op.decision_interval_ms,
                        has_offer,
                        cost,
                        cooldown,
                        max_per_day,
                        budget,
                        decision.decision_id,
                        str(decision.arm),
                        day,
                        len(record) + 1,
                        op.lane,
                    )
                )
            else:
                fields.extend(
                    ("P", hash_tag(pseudonym(op.user_id)), op.ts, op.amount_cents, op.gross_cents)
                )
        clocks: list[int] = []
        for lane, clock in lanes.items():
            clocks.extend((lane, clock))
        return [
            now_ms,
            config.attribution_window_ms,
            config.elapsed_ms,
            config.purchase_memory_ms,
            len(lanes),
            *clocks,
            len(config.stop_loss),
            *self._head,
            orjson.dumps(fields),
            # each record as stored when the decision is recorded as proposed: 'G' + JSON
            b"G" + b"G".join(records) if records else b"",
        ]

    async def _call(
        self, features: FeatureWrite | None, ledger: list[Any], outbox: OutboxWrite | None
    ) -> CommitReply:
        """The script call; one whose reply is lost is resolved through its outbox entry, with
        the worker's retry policy (``retry_on_redis``: until ``retry_deadline_s``, then
        ``RedisBatchFailed`` stops the worker, and the restart publishes the entry).

        So is a call that fewer replicas acknowledged than asked (``ReplicationShortfall``:
        it ran, but a failover could lose it) or that met a moved slot (``SlotMoved``: it did
        not run): the entry is read from the slot's primary, and found there it is waited for
        again (a barrier write and ``WAIT`` on the reading connection); absent (never ran, or
        lost with the old primary) the call runs again. Its outputs leave only after that."""
        try:
            return await self._commit(features=features, ledger=ledger, outbox=outbox)
        except (RedisConnectionError, RedisTimeoutError, ReplicationShortfall, SlotMoved) as exc:
            if outbox is None or self._outbox is None:
                raise
            if isinstance(exc, ReplicationShortfall):
                log.warning("batch call not replicated in time (%s); waiting for it again", exc)
            else:
                log.warning("batch call lost its reply (%s); asking Redis whether it landed", exc)
            box = self._outbox

        async def resolve() -> CommitReply:
            entry = await box.read_one(outbox.entry_id)
            if entry is None:
                # It never ran (its entry is written in the same atomic call): run it now.
                return await self._commit(features=features, ledger=ledger, outbox=outbox)
            log.info("batch call %s had landed; its reply is read back", outbox.entry_id)
            # The epoch is unknown: b"" makes the ledger forget what it remembers.
            return CommitReply(entry.outcomes, entry.events, (), b"")

        return await retry_on_redis(resolve, deadline_s=self._retry_deadline_s)

    async def stop_loss_status(self) -> dict[str, StopLossStatus]:
        statuses: dict[str, StopLossStatus] = {}
        for name in sorted(self.config.stop_loss):
            stopped, since, decisions, diff, upper, lower = await self._client.hmget(
                f"{self._prefix}sl:{name}",
                ["state", "since", "decisions", "diff", "upper", "lower"],
            )
            statuses[name] = StopLossStatus(
                stopped=stopped in (b"1", "1"),
                since_ms=None if since in (None, b"", "") else int(float(_text(since))),
                decisions=0 if decisions is None else int(decisions),
                incremental_margin=None if diff is None else _optional_float(diff),
                upper_bound=None if upper is None else _optional_float(upper),
                lower_bound=None if lower is None else _optional_float(lower),
            )
        return statuses

    async def budget_spent_cents(self, campaign: str, day: int) -> int:
        raw = await self._client.get(f"{self._prefix}b:{campaign}:{day}")
        return int(raw) if raw is not None else 0

    async def pending_count(self) -> int:
        """Decisions waiting for a label event, over every lane (``commit_batch.lua``'s ``pn``,
        kept by the script that schedules and closes them)."""
        counts = await self._client.hvals(f"{self._prefix}pn")
        return sum(int(count) for count in counts)

    async def forget(self, user_id: str) -> int:
        """Delete the user's key (guard state, pending decisions, and the feature record they
        share it with), the user's place in the lanes' label indexes and the decisions' count;
        returns keys removed."""
        pseudonym = self.pseudonyms.of(user_id)
        key = user_key(self._prefix, pseudonym)
        # Its pending decisions are the fields without a '|' (commit_batch.lua's layout); one
        # of another form is deleted all the same, and counts nowhere.
        lanes = (
            _pending_lane(value)
            for name, value in (await self._client.hgetall(key)).items()
            if b"|" not in _bytes(name)
        )
        pending = Counter(lane for lane in lanes if lane is not None)
        async with self._client.pipeline(transaction=True) as pipe:
            for lane, count in pending.items():
                pipe.zrem(f"{self._prefix}lq:{lane}", hash_tag(pseudonym))
                pipe.hincrby(f"{self._prefix}pn", lane, -count)
            pipe.delete(key)
            # After the deletion: a worker whose next call sees the new epoch forgets the
            # decision times it remembers, the deleted ones among them.
            pipe.incr(state_epoch_key(self._prefix))
            replies = await pipe.execute()
        return int(replies[-2])
