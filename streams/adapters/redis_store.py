"""The Redis feature store: one Lua call per micro-batch, same contract as the in-memory store.

Keys (``P`` = the configured key prefix, ``V`` = the feature catalogue version):

- ``P f V :{user}``  hash of the user's raw feature state (see ``engine/features/state.py``)
- ``P d V :{user}``  sorted set of the user's recent event ids (dedup within allowed lateness)
- ``P wm``           hash of per-partition offset watermarks ``<topic>:<partition>``

The ``{user}`` part is a Redis Cluster hash tag, so one user's keys share a slot. That does
not make the store cluster-ready: one script call carries a whole micro-batch, so it touches
the keys of many users (and the shared watermark hash), which a cluster refuses unless they
all hash to one slot. As written, this store and the ledger (``ledger.lua``, same pattern)
need a single Redis node (or a primary with replicas); a cluster would need one call per slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis

from engine.features.state import CATALOGUE_VERSION, LONGEST_WINDOW_MS, RETENTION_BUCKETS, State
from engine.features.store import BatchOutcome, StateUpdate, UpdateStatus

TTL_MARGIN_S = 24 * 3600
"""Keys outlive the longest window by a day, so a quiet user's history expires on its own."""


def hash_tag(user_id: str) -> str:
    """The user id as a Redis Cluster hash tag body: braces escaped so the tag is never empty
    or cut short, which would scatter one user's keys over several slots (a step towards a
    cluster, not enough on its own: see the module docstring)."""
    return user_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _decode_state(flat: Sequence[bytes]) -> State:
    return {flat[k].decode(): float(flat[k + 1]) for k in range(0, len(flat), 2)}


class RedisFeatureStore:
    """Feature state in Redis, updated and read back with one script call per batch."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "ds:") -> None:
        self._client = client
        self._prefix = prefix
        source = resources.files("streams.adapters").joinpath("features.lua").read_text()
        self._script = client.register_script(source)
        self.ttl_seconds = LONGEST_WINDOW_MS // 1000 + TTL_MARGIN_S

    def state_key(self, user_id: str) -> str:
        return f"{self._prefix}f{CATALOGUE_VERSION}:{{{hash_tag(user_id)}}}"

    def dedup_key(self, user_id: str) -> str:
        return f"{self._prefix}d{CATALOGUE_VERSION}:{{{hash_tag(user_id)}}}"

    @property
    def watermark_key(self) -> str:
        return f"{self._prefix}wm"

    def user_keys(self, user_id: str) -> list[str]:
        """Every key this store keeps for a user (for ``dealstream forget``)."""
        return [self.state_key(user_id), self.dedup_key(user_id)]

    async def apply_batch(
        self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int
    ) -> BatchOutcome:
        if not updates:
            return BatchOutcome(statuses=[], before={})
        user_index: dict[str, int] = {}
        keys: list[str] = [self.watermark_key]
        rows: list[list[Any]] = []
        for update in updates:
            index = user_index.get(update.user_id)
            if index is None:
                index = user_index[update.user_id] = len(user_index) + 1
                keys.append(self.state_key(update.user_id))
                keys.append(self.dedup_key(update.user_id))
            position = update.position
            ops: list[Any] = []
            for op, field, value in update.ops:
                ops.extend((op, field, int(value)))
            rows.append(
                [
                    index,
                    f"{position.source}:{position.partition}" if position else "",
                    position.offset if position else 0,
                    update.event_id,
                    update.ts,
                    ops,
                    1 if update.on_time else 0,
                ]
            )
        args: list[int | bytes] = [
            allowed_lateness_ms,
            self.ttl_seconds,
            orjson.dumps(rows),
            RETENTION_BUCKETS["m"],
            RETENTION_BUCKETS["h"],
            RETENTION_BUCKETS["d"],
        ]
        reply = await self._script(keys=keys, args=args)
        statuses = [UpdateStatus(int(code)) for code in reply[0]]
        before = {user_id: _decode_state(reply[index]) for user_id, index in user_index.items()}
        return BatchOutcome(statuses=statuses, before=before)

    async def read_states(self, user_ids: Iterable[str]) -> dict[str, State]:
        ids = list(user_ids)
        async with self._client.pipeline(transaction=False) as pipe:
            for user_id in ids:
                pipe.hgetall(self.state_key(user_id))
            replies = await pipe.execute()
        return {
            user_id: {k.decode(): float(v) for k, v in reply.items()}
            for user_id, reply in zip(ids, replies, strict=True)
        }

    async def watermarks(self) -> dict[tuple[str, int], int]:
        raw = await self._client.hgetall(self.watermark_key)
        marks: dict[tuple[str, int], int] = {}
        for field, offset in raw.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            source, _, partition = name.rpartition(":")
            marks[(source, int(partition))] = int(float(offset))
        return marks

    async def forget(self, user_id: str) -> int:
        return int(await self._client.delete(*self.user_keys(user_id)))
