"""One Redis call per micro-batch (``commit_batch.lua``): feature records, ledger, outbox entry.

The script has three sections, each optional: the feature store's records and partition
watermarks (``RedisFeatureStore``), the decision ledger's operations (``RedisLedger``) and the
outbox entry that keeps the batch's outputs until Kafka has them (``outbox.py``). The worker
sends all three in one call, so a batch's effect on Redis is all or nothing: a crash can never
leave features applied without the ledger, or the ledger charged without the outputs kept.
This module builds the call's arguments and reads its refusals; the sections' contents belong
to the modules named.

With a ``ReplicaWait`` (``DEALSTREAM_REDIS_WAIT_REPLICAS`` > 0, the default in a Redis
Cluster) the call is followed by ``WAIT`` on its connection, and a call that too few replicas
acknowledged raises ``ReplicationShortfall`` after it ran (``replica_wait.py``).

Every key the script touches starts with the prefix, the ones it builds itself included, so
in a Redis Cluster they all hash to the slot of the prefix's hash tag and the call runs on
that slot's primary (routed by its first key).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis import exceptions as rx

from streams.adapters.redis_client import RedisClient
from streams.adapters.replica_wait import ReplicaWait
from streams.errors import StreamsError


class PartitionFenced(StreamsError):
    """Another store claimed a partition this one was writing: this one must stop."""


STALE_RETRIES = 5
"""Attempts at a batch while ``dealstream forget`` keeps moving the state epoch."""


class StateEpochMoved(StreamsError):
    """Feature state was rewritten behind this writer (``dealstream forget``): it drops what it
    holds and the batch runs again. Nothing of the refused call was written."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class FeatureWrite:
    """The feature section: changed users' records and the batch's partition watermarks."""

    token: str
    """The writer's owner token: the script refuses partitions someone else claimed since."""
    epoch: str
    """The state epoch the records were read at: the script refuses the batch if it moved."""
    ttl_ms: int
    """The user keys' time to live when it is set (``refresh``)."""
    field: str
    """The record's field in a user's hash (``<p>u:{user}``, ``commit_batch.lua``)."""
    marks: Sequence[tuple[str, int]]
    """(``<topic>:<partition>``, watermark) of every partition of the batch."""
    users: Sequence[str]
    keys: Sequence[str]
    records: Sequence[bytes]
    """Encoded records, in the order of ``keys`` (and ``users``)."""
    refresh: bytes
    """One byte per key, ``1``: set the key's time to live (``0``: it was set recently)."""


@dataclass(frozen=True, slots=True)
class OutboxWrite:
    """The outbox section: this batch's entry and the entries Kafka has since committed."""

    entry_id: str
    coverage: bytes
    drafts: bytes
    acked: Sequence[str]


@dataclass(frozen=True, slots=True)
class CommitReply:
    """What an accepted call returns: the ledger's raw reply (empty without a ledger section)."""

    outcomes: Sequence[Any]
    events: Sequence[Any]
    statuses: Sequence[Any]
    epoch: bytes


class ReplyWait:
    """Open while a batch call waits for Redis's reply.

    The worker's one thread has nothing else to do then (the batch's next step needs the
    reply), so work that may run at any time waits for this to open: the next batch's
    decoding (``BatchWorker.decode_ahead``) fills the wait instead of delaying a batch.
    """

    def __init__(self) -> None:
        self._open = asyncio.Event()

    async def opened(self) -> None:
        """Return once a call is waiting (at once if one is)."""
        await self._open.wait()

    def is_open(self) -> bool:
        return self._open.is_set()

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()


class BatchCommit:
    """``commit_batch.lua`` registered on one client, called with any of its sections."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        replication: ReplicaWait | None = None,
        reply_wait: ReplyWait | None = None,
    ) -> None:
        source = resources.files("streams.adapters").joinpath("commit_batch.lua").read_text()
        self._client = client
        self._script = client.register_script(source)
        self.prefix = prefix
        self._fixed_keys = [f"{prefix}own", f"{prefix}wm", f"{prefix}se"]
        self.replication = replication
        self.reply_wait = reply_wait
        """Opened for the time each call waits (None: nobody waits for it)."""

    async def __call__(
        self,
        *,
        features: FeatureWrite | None = None,
        ledger: Sequence[Any] | None = None,
        outbox: OutboxWrite | None = None,
    ) -> CommitReply:
        """Run the call; raises ``StateEpochMoved`` or ``PartitionFenced`` when the script
        refused it (nothing was written), ``redis.ResponseError`` for a malformed ledger batch
        (nothing written either). ``ledger``: the section's arguments from ``now_ms`` on."""
        keys = list(self._fixed_keys)
        args: list[Any] = [self.prefix]
        if features is None:
            args.append("")
        else:
            keys.extend(features.keys)
            args.extend(
                (
                    features.token,
                    features.epoch,
                    features.ttl_ms,
                    features.field,
                    features.refresh,
                    len(features.marks),
                )
            )
            for field, offset in features.marks:
                args.append(field)
                args.append(offset)
            args.extend(features.records)
        if ledger is None:
            args.append("")
        else:
            args.extend(ledger)
        if outbox is None:
            args.append("")
        else:
            args.extend((outbox.entry_id, outbox.coverage, outbox.drafts, len(outbox.acked)))
            args.extend(outbox.acked)
        acked = 0
        if self.reply_wait is not None:
            self.reply_wait.open()
        try:
            if self.replication is None:
                reply = await self._script(keys=keys, args=args)
            else:
                reply, acked = await self._run_and_wait(self.replication, keys, args)
        finally:
            if self.reply_wait is not None:
                self.reply_wait.close()
        verdict = _text(reply[0])
        if verdict == "stale":
            raise StateEpochMoved(
                f"feature state epoch moved to {_text(reply[1])} (`dealstream forget` ran): "
                "the batch runs again on records read afresh"
            )
        if verdict == "fenced":
            raise PartitionFenced(
                f"partition {_text(reply[1])} is now written by another worker (owner token "
                f"{_text(reply[2]) or 'none'}); this worker lost it without a rebalance "
                "callback (session timeout?) and stops rather than overwrite its records"
            )
        if self.replication is not None:
            what = f"batch call {outbox.entry_id}" if outbox is not None else "a batch call"
            self.replication.check(acked, what)
        epoch = reply[4]
        return CommitReply(
            outcomes=reply[1],
            events=reply[2],
            statuses=reply[3],
            epoch=epoch.encode() if isinstance(epoch, str) else epoch,
        )

    async def _run_and_wait(
        self, replication: ReplicaWait, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, int]:
        """The script by its SHA, then ``WAIT``, on one connection; loaded first when the
        server does not know it (``NOSCRIPT``: nothing ran)."""
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        try:
            (reply,), acked = await replication.run(command)
        except rx.NoScriptError:
            await self._client.script_load(self._script.script)
            (reply,), acked = await replication.run(command)
        return reply, acked
