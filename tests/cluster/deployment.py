"""A dealstream deployment on the local cluster, as processes, and what the cluster tests ask
of Kafka and Redis about it: shared by tests/cluster/test_cluster_e2e.py and tests/chaos/."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from engine.campaigns import Campaign, load_campaigns
from engine.features.state import State
from engine.ledger import LedgerConfig
from streams.adapters.pseudonyms import pseudonyms_from_settings
from streams.adapters.redis_client import redis_from_settings
from streams.adapters.redis_ledger import RedisLedger
from streams.adapters.redis_store import RedisFeatureStore
from streams.settings import Settings, Topics
from tests.cluster.conftest import Cluster
from tests.conftest import REPO
from tests.worker_process import WorkerProcess, log_entries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deployment:
    """Workers and the learner of one deployment on ``cluster``: the cluster's settings plus
    ``env``, the campaigns file written from ``campaigns``, each worker on its own HTTP port."""

    def __init__(
        self,
        cluster: Cluster,
        tmp_path: Path,
        *,
        env: Mapping[str, str],
        workers: int,
        campaigns: str,
    ) -> None:
        campaigns_path = tmp_path / "campaigns.toml"
        campaigns_path.write_text(campaigns)
        self.campaigns: tuple[Campaign, ...] = load_campaigns(campaigns_path)
        self.cluster = cluster
        self.tmp_path = tmp_path
        self.env = {
            **cluster.settings_env(),
            "DEALSTREAM_CAMPAIGNS": str(campaigns_path),
            "DEALSTREAM_LEARNER_HTTP_PORT": "0",
            "DEALSTREAM_STATE": str(tmp_path / "state"),
            **env,
        }
        self.settings = Settings.from_env(self.env)
        self.topics = Topics(self.settings.topic_prefix)
        self.ports = [free_port() for _ in range(workers)]
        self.workers = [
            WorkerProcess({**self.env, "DEALSTREAM_HTTP_PORT": str(port)}, tmp_path / f"w{n}.log")
            for n, port in enumerate(self.ports, 1)
        ]
        self.learner: subprocess.Popen[bytes] | None = None
        self.learner_log = tmp_path / "learner.log"

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self.start_learner()

    def start_learner(self) -> int:
        """Start the learner; returns where its new output begins in the log."""
        offset = self.learner_log.stat().st_size if self.learner_log.exists() else 0
        keys = Path(self.env["DEALSTREAM_CLUSTER_DIR"]) / "keys"
        with self.learner_log.open("ab") as log:
            self.learner = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "learner"],
                env={
                    **os.environ,
                    **self.env,
                    "DEALSTREAM_MODEL_SIGNING_KEY_FILE": str(keys / "model-signing.pem"),
                },
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return offset

    def learner_entries(self, msg: str, since: int = 0) -> list[dict[str, Any]]:
        if not self.learner_log.exists():
            return []
        with self.learner_log.open("rb") as log:
            log.seek(since)
            return log_entries(log.read().decode(errors="replace"), msg)

    def stop(self) -> list[int]:
        """SIGTERM to every process (SIGKILL after 60 s); the workers' exit statuses."""
        if self.learner is not None and self.learner.poll() is None:
            self.learner.send_signal(signal.SIGTERM)
        codes = []
        for worker in self.workers:
            try:
                codes.append(worker.stop())
            except AssertionError:
                codes.append(-9)
        if self.learner is not None:
            try:
                self.learner.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.learner.kill()
                self.learner.wait()
        return codes

    def tails(self) -> str:
        return "".join(worker.tail(3000) for worker in self.workers)

    def redis(self) -> Any:
        return redis_from_settings(self.settings)

    async def stored(
        self, users: Iterable[str], *, campaign: str, days: Iterable[int]
    ) -> tuple[dict[str, State], dict[int, int]]:
        """The users' feature states and ``campaign``'s spend (cents) on each of ``days``, as
        the deployment's Redis holds them."""
        settings = self.settings
        client = self.redis()
        try:
            store = RedisFeatureStore(
                client, prefix=settings.redis_prefix, pseudonyms=pseudonyms_from_settings(settings)
            )
            states = await store.read_states(list(users))
            ledger = RedisLedger(
                client, prefix=settings.redis_prefix, config=LedgerConfig(attribution_window_ms=1)
            )
            spent = {day: await ledger.budget_spent_cents(campaign, day) for day in days}
        finally:
            await client.aclose()
        return states, spent


async def committed_and_lag(
    bootstrap: str, group: str, topics: Topics, partitions: int
) -> tuple[int, int]:
    """(records the group committed on the event topics, records it has not committed yet)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(t, p) for t in topics.events for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
        await admin.close()
    done = {tp: max(meta.offset, 0) for tp, meta in committed.items()}
    total = sum(done.get(tp, 0) for tp in ends)
    return total, sum(end - done.get(tp, 0) for tp, end in ends.items())


async def try_committed_and_lag(
    bootstrap: str, group: str, topics: Topics, partitions: int
) -> tuple[int, int] | None:
    try:
        return await committed_and_lag(bootstrap, group, topics, partitions)
    except Exception:  # a broker or the coordinator not answering yet: ask again
        return None


async def wait_until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Poll ``check`` every 0.5 s until it holds; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def read_records(
    bootstrap: str, topic: str, partitions: int
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` up to its end offsets now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            for batch in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def primary_pid(port: int) -> int:
    """The process id of the Redis node on ``port``."""

    async def read() -> int:
        client = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            return int((await client.info("server"))["process_id"])
        finally:
            await client.aclose()

    return asyncio.run(read())


def role(port: int) -> str:
    """``master``, ``slave`` or ``down``: what the Redis node on ``port`` says it is."""

    async def read() -> str:
        client = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            return str((await client.execute_command("ROLE"))[0])
        except (OSError, aioredis.RedisError):
            return "down"
        finally:
            await client.aclose()

    return asyncio.run(read())
