"""``WAIT`` for Redis replicas after a batch's call, before its Kafka offsets can be committed.

Redis replicates asynchronously: a write its primary acknowledged is lost if the primary dies
before a replica has it and that replica is promoted. The worker commits a batch's Kafka
offsets once its one Redis call returned, so such a loss would lose the batch's features and
ledger effect for good (Kafka would not deliver its events again). With
``DEALSTREAM_REDIS_WAIT_REPLICAS`` = n > 0 (1 by default in a Redis Cluster) every batch call
is followed by ``WAIT n timeout``; fewer acknowledgements are a ``ReplicationShortfall``,
which the ledger handles like a lost reply (``RedisLedger._call``): it reads the call's outbox
entry again and waits again, and nothing of the batch is published or committed meanwhile.

``WAIT`` counts the replicas that acknowledged the writes *of its own connection*, so it is
sent on the connection that wrote, in the same pipeline (``run``). When the write was
another connection's (a lost reply, resolved later), a write of this connection placed after
it (``INCR <prefix>rb``, the barrier) stands for it: Redis replicates one ordered stream, so a
replica that has the barrier has the batch. The entry is read on that same connection, from
the node that then serves the slot: an entry the failover lost reads as absent there, and the
call runs again.

In a Redis Cluster the pipeline goes to the primary of the deployment's slot as the client's
map says. A pipeline does not re-read the map by itself after a connection error (a single
command does), so this does it before the next attempt; a ``MOVED`` answer (the slot has a new
primary: nothing ran) is raised as ``SlotMoved``, which can heal.

What it does not give: Redis stays eventually consistent. A primary that keeps running cut off
from the others may acknowledge writes its promoted replica never sees; ``WAIT`` makes such a
write wait (its replica is gone) instead of being committed, and the worker then resolves it
on the new primary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster

from streams.adapters.redis_client import RedisClient, deployment_node
from streams.adapters.redis_errors import ReplicationShortfall, SlotMoved

Command = Sequence[Any]


class ReplicaWait:
    """Runs commands and then ``WAIT`` on one connection to the deployment's primary."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        replicas: int,
        timeout_ms: int,
        on_shortfall: Callable[[], None] | None = None,
    ) -> None:
        if replicas < 1 or timeout_ms < 1:
            raise ValueError("replicas and timeout_ms must be at least 1 (WAIT 0 never returns)")
        self._client = client
        self._prefix = prefix
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.barrier_key = f"{prefix}rb"
        """A counter incremented before a ``WAIT`` that must cover another connection's write."""
        self._on_shortfall = on_shortfall
        self._reread_map = False

    async def run(self, *commands: Command) -> tuple[list[Any], int]:
        """``commands`` then ``WAIT``, in order on one connection; their replies and how many
        replicas acknowledged everything the connection wrote. Raises the first error reply."""
        wait = ("WAIT", self.replicas, self.timeout_ms)
        client = self._client
        if not isinstance(client, RedisCluster):
            async with client.pipeline(transaction=False) as pipe:
                for command in (*commands, wait):
                    pipe.execute_command(*command)
                replies = await pipe.execute()
            return list(replies[:-1]), int(replies[-1])
        if self._reread_map:
            await client.nodes_manager.initialize()
            self._reread_map = False
        node = await deployment_node(client, self._prefix)
        cluster_pipe = client.pipeline()
        for command in (*commands, wait):
            cluster_pipe.execute_command(*command, target_nodes=node)
        try:
            replies = await cluster_pipe.execute(allow_redirections=False)
        except rx.AskError as exc:  # MOVED too (a subclass)
            self._reread_map = True
            raise SlotMoved(
                f"the deployment's slot moved from {node.name} ({exc}): a failover or resharding"
            ) from exc
        except (rx.ConnectionError, rx.TimeoutError, OSError, rx.ClusterDownError):
            self._reread_map = True
            raise
        return list(replies[:-1]), int(replies[-1])

    def check(self, acked: int, what: str) -> None:
        """Raise ``ReplicationShortfall`` (counted and logged) unless ``acked`` suffices."""
        if acked >= self.replicas:
            return
        if self._on_shortfall is not None:
            self._on_shortfall()
        raise ReplicationShortfall(acked, self.replicas, what)

    async def landed(self, key: str, field: str) -> bytes | str | None:
        """``HGET key field`` from the primary, and when it is there, replicated: the barrier
        and ``WAIT`` after it on the same connection (``ReplicationShortfall`` when fewer
        replicas acknowledged). None: absent on the primary that serves the slot now."""
        (value, _), acked = await self.run(("HGET", key, field), ("INCR", self.barrier_key))
        if value is not None:
            self.check(acked, f"the write of {field}")
        return value  # type: ignore[no-any-return]
