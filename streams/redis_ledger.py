"""The decision ledger in Redis: one Lua call per micro-batch, same contract as the in-memory one.

Budgets are plain Redis counters checked and incremented inside the script, so any number of
workers share them without ever overspending. See ``streams/ledger.lua`` for the key layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis

from engine.labels import LabelledExample, PendingDecision
from engine.ledger import (
    RATE_LIMITED,
    DecisionOutcome,
    DecisionRequest,
    LedgerOp,
    LedgerResult,
    without_offer,
)
from streams.redis_store import hash_tag

_OUTCOMES: dict[int, DecisionOutcome] = {
    0: RATE_LIMITED,
    1: DecisionOutcome(decided=True, granted=True),
    2: DecisionOutcome(decided=True),
    3: DecisionOutcome(decided=True, denied_by="cooldown"),
    4: DecisionOutcome(decided=True, denied_by="max_offers_per_day"),
    5: DecisionOutcome(decided=True, denied_by="budget"),
}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pending_from_stored(stored: bytes | str) -> PendingDecision:
    """Stored records are 'G' + JSON, or 'N' + JSON when the proposed offer was denied.

    The JSON is ``PendingDecision.to_compact``'s array; an object is a record written by an
    earlier version (``to_record``), still read until its attribution window closes."""
    text = _text(stored)
    body = orjson.loads(text[1:])
    decision = (
        PendingDecision.from_record(body)
        if isinstance(body, dict)
        else PendingDecision.from_compact(body)
    )
    return without_offer(decision) if text[0] == "N" else decision


class RedisLedger:
    def __init__(self, client: aioredis.Redis, *, prefix: str, attribution_window_ms: int) -> None:
        self._client = client
        self._prefix = prefix
        self.attribution_window_ms = attribution_window_ms
        source = resources.files("streams").joinpath("ledger.lua").read_text()
        self._script = client.register_script(source)

    async def settle(self, ops: Sequence[LedgerOp], *, now_ms: int) -> LedgerResult:
        args: list[Any] = [self._prefix, now_ms, self.attribution_window_ms, len(ops)]
        for op in ops:
            if isinstance(op, DecisionRequest):
                decision, limits = op.decision, op.offer
                args.extend(
                    (
                        "D",
                        hash_tag(decision.user_id),
                        decision.campaign,
                        decision.ts,
                        op.decision_interval_ms,
                        1 if limits else 0,
                        limits.cost_cents if limits else 0,
                        limits.cooldown_ms if limits else 0,
                        limits.max_per_day if limits and limits.max_per_day is not None else -1,
                        limits.budget_cents if limits and limits.budget_cents is not None else -1,
                        decision.decision_id,
                        orjson.dumps(decision.to_compact()),
                    )
                )
            else:
                args.extend(("P", hash_tag(op.user_id), op.ts, op.offer_id or ""))
        outcomes_raw, labelled_raw = await self._script(keys=[], args=args)
        outcomes = [None if int(code) < 0 else _OUTCOMES[int(code)] for code in outcomes_raw]
        labelled = [
            LabelledExample(
                _pending_from_stored(labelled_raw[k]),
                int(labelled_raw[k + 1]),
                int(float(labelled_raw[k + 2])),
            )
            for k in range(0, len(labelled_raw), 3)
        ]
        return LedgerResult(outcomes=outcomes, labelled=labelled)

    async def budget_spent_cents(self, campaign: str, day: int) -> int:
        raw = await self._client.get(f"{self._prefix}b:{campaign}:{day}")
        return int(raw) if raw is not None else 0

    async def pending_count(self) -> int:
        return int(await self._client.zcard(f"{self._prefix}pq"))

    async def forget(self, user_id: str) -> int:
        """Delete the user's guard state and pending decisions; returns keys removed."""
        tag = hash_tag(user_id)
        pending_key = f"{self._prefix}p:{{{tag}}}"
        decision_ids = await self._client.hkeys(pending_key)
        if decision_ids:
            members = [f"{_text(d)}\x1f{tag}" for d in decision_ids]
            await self._client.zrem(f"{self._prefix}pq", *members)
        return int(await self._client.delete(f"{self._prefix}g:{{{tag}}}", pending_key))
