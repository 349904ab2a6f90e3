"""The local cluster of ``deploy/cluster.sh`` (issue 15), with real clients: three KRaft brokers
that keep an ``acks=all`` idempotent producer delivering through the loss of one, and a Redis
Cluster of three primaries with a replica each that fails over when a primary dies.

What it shows about Redis is also the constraint the application lives with: a script may only
touch keys of one hash slot (``CROSSSLOT`` otherwise), so a user's keys share one hash tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import NotEnoughReplicasError
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError

from streams.adapters.kafka_io import ensure_topics
from streams.settings import Settings, TopicReplication
from tests.cluster.conftest import REDIS_NODES, Cluster

pytestmark = pytest.mark.cluster

MESSAGES = 1200
"""Records produced across a broker kill: half before it, half while it is down."""
SCRIPT = "for _, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1]) end return #KEYS"
"""A multi-key script, like the application's: one call touching several keys."""


async def poll(
    what: str, check: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.2
) -> float:
    """Await ``check()`` until true; the seconds it took."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def partitions(bootstrap: str, topics: Sequence[str]) -> dict[tuple[str, int], list[int]]:
    """(topic, partition) -> the in-sync replicas, leader first; empty on a failed attempt
    (while a broker is down, a request to it fails until the client's metadata moves on)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        described = await admin.describe_topics(list(topics))
    except Exception:
        return {}
    finally:
        await admin.close()
    found: dict[tuple[str, int], list[int]] = {}
    for topic in described:
        for p in topic["partitions"]:
            isr = sorted(p["isr"], key=lambda node: node != p["leader"])
            found[(topic["topic"], p["partition"])] = isr
    return found


async def all_isr(bootstrap: str, topics: Sequence[str], size: int) -> bool:
    found = await partitions(bootstrap, topics)
    return bool(found) and all(len(isr) == size for isr in found.values())


def test_start_again_reuses_what_runs_and_status_says_up(cluster: Cluster) -> None:
    again = cluster.run("start")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "starting broker" not in again.stdout
    assert "creating the Redis Cluster" not in again.stdout
    status = cluster.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("answering") == 3
    assert status.stdout.count("cluster_state:ok") == 6
    # The env file a dealstream process loads: three brokers, replication 3 / min ISR 2.
    settings = Settings.from_env(cluster.settings_env())
    assert settings.kafka_bootstrap == cluster.bootstrap
    assert settings.replication == TopicReplication(3, 2)
    env = cluster.settings_env()
    assert env["DEALSTREAM_REDIS_CLUSTER"] == "1"
    # The fixture's port arithmetic is the script's.
    redis_nodes = [f"127.0.0.1:{cluster.redis_port(j)}" for j in REDIS_NODES]
    assert env["DEALSTREAM_CLUSTER_REDIS_NODES"].split(",") == redis_nodes
    # Workers and learner: what would run, each on its own HTTP port.
    dry = cluster.run("workers", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    ports = [
        word.split("=")[1]
        for word in dry.stdout.split()
        if word.startswith(("DEALSTREAM_HTTP_PORT=", "DEALSTREAM_LEARNER_HTTP_PORT="))
    ]
    assert len(ports) == 4 == len(set(ports))
    assert "DEALSTREAM_MODEL_SIGNING_KEY_FILE" in dry.stdout.splitlines()[-1]  # the learner's


async def test_redis_cluster_slots_crossslot_and_failover(cluster: Cluster) -> None:
    seed = cluster.redis_port(1)
    client = RedisCluster(host="127.0.0.1", port=seed, decode_responses=True)
    plain: list[aioredis.Redis] = []
    try:
        await client.initialize()
        primaries, replicas = client.get_primaries(), client.get_replicas()
        assert len(primaries) == 3 and len(replicas) == 3
        nodes = await cluster_nodes(seed)
        # Each primary has exactly one replica.
        replicated = sorted(n.primary_id for n in nodes.values() if not n.primary)
        assert replicated == sorted(n.id for n in nodes.values() if n.primary)

        # One hash tag, one slot: a script over a user's keys runs as one call.
        user_keys = ["{u42}:features", "{u42}:budget", "{u42}:ledger"]
        assert len({client.keyslot(k) for k in user_keys}) == 1
        assert await client.eval(SCRIPT, len(user_keys), *user_keys, "v") == 3
        # Two users' keys in different slots: the server refuses the script.
        across = ["{u1}:features", "{u2}:features"]
        assert client.keyslot(across[0]) != client.keyslot(across[1])
        owner = client.get_node_from_key(across[0])
        direct = aioredis.Redis(host="127.0.0.1", port=owner.port)
        plain.append(direct)
        with pytest.raises(ClusterCrossSlotError):  # the server's CROSSSLOT error
            await direct.eval(SCRIPT, 2, *across, "v")

        # Writes replicated (WAIT 1) before the primary is SIGKILLed survive its failover.
        tag = "{failover}"
        primary = client.get_node_from_key(f"{tag}:0")
        [replica] = [n for n in nodes.values() if n.primary_id == nodes[primary.port].id]
        on_primary = aioredis.Redis(
            host="127.0.0.1", port=primary.port, single_connection_client=True
        )
        plain.append(on_primary)
        async with on_primary.pipeline(transaction=False) as pipe:
            for i in range(200):
                pipe.set(f"{tag}:{i}", str(i))
            await pipe.execute()
        assert await on_primary.execute_command("WAIT", 1, 5000) >= 1
        pid = int((await on_primary.info("server"))["process_id"])
        os.kill(pid, signal.SIGKILL)

        promoted = aioredis.Redis(host="127.0.0.1", port=replica.port, decode_responses=True)
        plain.append(promoted)

        async def replica_is_primary() -> bool:
            return (await promoted.execute_command("ROLE"))[0] == "master"

        took = await poll("replica promoted", replica_is_primary, 60)
        print(f"\nRedis: replica {replica.port} promoted {took:.1f} s after SIGKILL")
        after = RedisCluster(host="127.0.0.1", port=replica.port, decode_responses=True)
        try:
            values = await after.mget_nonatomic([f"{tag}:{i}" for i in range(200)])
            assert values == [str(i) for i in range(200)]
        finally:
            await after.aclose()

        # Restarted, the old primary rejoins as the replica of the promoted one.
        await asyncio.to_thread(cluster.start)
        old = aioredis.Redis(
            host="127.0.0.1",
            port=primary.port,
            decode_responses=True,
            single_connection_client=True,
        )
        plain.append(old)

        async def rejoined_as_replica() -> bool:
            info = await old.info("replication")
            return (
                info.get("role") == "slave"
                and int(info.get("master_port", 0)) == replica.port
                and info.get("master_link_status") == "up"
            )

        await poll("old primary replicating", rejoined_as_replica, 60)
        # It holds the data again (a replica answers reads after READONLY).
        await old.execute_command("READONLY")
        assert await old.get(f"{tag}:199") == "199"
    finally:
        for c in plain:
            await c.aclose()
        await client.aclose()


@dataclass(frozen=True)
class Node:
    """A line of ``CLUSTER NODES``."""

    id: str
    port: int
    primary: bool
    primary_id: str
    """The id of the node it replicates ("-" for a primary)."""


async def cluster_nodes(port: int) -> dict[int, Node]:
    """``CLUSTER NODES`` as the node on ``port`` sees them, by port."""
    client = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        # redis-py parses the reply: "host:port" -> node_id, flags, master_id, ...
        parsed = await client.execute_command("CLUSTER NODES")
    finally:
        await client.aclose()
    nodes = {}
    for address, node in parsed.items():
        node_port = int(address.rsplit(":", 1)[1])
        primary = "master" in node["flags"].split(",")
        nodes[node_port] = Node(node["node_id"], node_port, primary, node["master_id"])
    return nodes


async def test_kafka_rf3_idempotent_producer_through_a_broker_kill(cluster: Cluster) -> None:
    bootstrap = cluster.bootstrap
    topic, guarded = "cluster.kill", "cluster.min-isr-3"
    await ensure_topics(bootstrap, [topic], partitions=3, replication=TopicReplication.of(3))
    # A topic that needs all three replicas in sync: one broker down is already too few.
    await ensure_topics(bootstrap, [guarded], partitions=1, replication=TopicReplication.of(3, 3))
    await poll("3 in-sync replicas", lambda: all_isr(bootstrap, [topic, guarded], 3), 30)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        configs = {entry[0]: entry[1] for entry in described.resources[0][4]}
    finally:
        await admin.close()
    assert configs["min.insync.replicas"] == "2"

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=2
    )
    plain = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, request_timeout_ms=3000
    )
    await producer.start()
    await plain.start()
    try:

        async def produce(numbers: range) -> None:
            for start in range(numbers.start, numbers.stop, 20):
                futures = [
                    await producer.send(topic, key=f"user{i % 12}".encode(), value=str(i).encode())
                    for i in range(start, min(start + 20, numbers.stop))
                ]
                await asyncio.gather(*futures)  # every one acknowledged, none failed

        await produce(range(MESSAGES // 2))
        victim = (await partitions(bootstrap, [topic]))[(topic, 0)][0]  # partition 0's leader
        os.kill(cluster.broker_pid(victim), signal.SIGKILL)
        killed_at = time.monotonic()
        await produce(range(MESSAGES // 2, MESSAGES))
        print(f"\nKafka: {MESSAGES // 2} records acknowledged after the SIGKILL of broker {victim}")
        await poll("ISR down to 2", lambda: all_isr(bootstrap, [topic, guarded], 2), 60)
        print(f"Kafka: ISR down to 2 {time.monotonic() - killed_at:.1f} s after the kill")

        # Below min.insync.replicas the broker refuses acks=all writes. A plain producer gets
        # the error once its request times out; the idempotent one never gives up a batch
        # (aiokafka retries it until it is written) and acknowledges nothing meanwhile.
        with pytest.raises(NotEnoughReplicasError):
            await plain.send_and_wait(guarded, b"refused")
        held = await producer.send(guarded, b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(held), 3)

        restarted_at = time.monotonic()
        await asyncio.to_thread(cluster.start)  # restarts the killed broker only
        await poll("ISR back to 3", lambda: all_isr(bootstrap, [topic, guarded], 3), 90)
        rejoined = time.monotonic() - restarted_at
        print(f"Kafka: broker {victim} restarted and back in every ISR within {rejoined:.1f} s")
        await held  # written once the three replicas are in sync again
    finally:
        # Bounded: an idempotent producer flushes on stop, and a batch the cluster cannot take
        # (a failed restart) would hold it for ever.
        for client in (producer, plain):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.stop(), 30)

    records = await read_all(bootstrap, topic, 3, MESSAGES)
    values = [int(v) for values in records.values() for v in values]
    assert sorted(values) == list(range(MESSAGES))  # every record exactly once
    for numbers in records.values():
        assert [int(v) for v in numbers] == sorted(int(v) for v in numbers)  # in order
    assert await read_all(bootstrap, guarded, 1, 1) == {0: [b"held"]}


async def read_all(
    bootstrap: str, topic: str, partition_count: int, expected: int
) -> dict[int, list[bytes]]:
    """Every record of ``topic`` from the start: partition -> values, in offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partition_count)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        end = await consumer.end_offsets(assigned)
        records: dict[int, list[bytes]] = {p: [] for p in range(partition_count)}
        deadline = time.monotonic() + 60
        while sum(len(v) for v in records.values()) < sum(end.values()):
            assert time.monotonic() < deadline, "not every record read within 60 s"
            batches = await consumer.getmany(timeout_ms=1000)
            for tp, batch in batches.items():
                records[tp.partition].extend(r.value or b"" for r in batch)
        assert sum(len(v) for v in records.values()) == expected
        return records
    finally:
        await consumer.stop()
