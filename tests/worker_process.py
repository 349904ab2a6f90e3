"""The worker as a subprocess, for e2e and reliability tests: start, watch, kill, stop.

``WorkerProcess`` runs ``python -m streams.cli worker`` with ``DEALSTREAM_*`` settings and
appends its output to a log file; ``progress`` parses the JSON "progress" lines the worker logs
every 5 s (its ``WorkerCounters``). Helpers read Redis feature states and clean up what a test
created (Redis keys under its prefix, its topics) on the shared services.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from engine.features.state import State
from streams.adapters.redis_store import RedisFeatureStore
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services, worker_pseudonyms

PROGRESS_INTERVAL_S = 5.0
"""How often the worker logs its counters (``streams/worker/faust_app.py``)."""


def log_entries(log_text: str, msg: str) -> list[dict[str, Any]]:
    """Every JSON log line (streams/operations/logs.py) with this ``msg``, parsed, in order."""
    entries: list[dict[str, Any]] = []
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == msg:
            entries.append(entry)
    return entries


def progress(log_text: str) -> list[dict[str, Any]]:
    """The counters of every "progress" line of a worker log, in order."""
    return [entry["counters"] for entry in log_entries(log_text, "progress")]


def dead_lettered_total(counters: Mapping[str, Any]) -> int:
    return sum(int(n) for n in counters["dead_lettered"].values())


def accounted(counters: Mapping[str, Any]) -> int:
    """applied + redelivered + duplicates + late + forgotten + dead-lettered + held (by the
    aligner, now) + handed back (held, dropped on a revoke): should equal consumed."""
    return (
        int(counters["applied"])
        + int(counters["redelivered"])
        + int(counters["duplicates"])
        + int(counters["late"])
        + int(counters["forgotten"])
        + dead_lettered_total(counters)
        + int(counters["held"])
        + int(counters["handed_back"])
    )


class WorkerProcess:
    """One ``dealstream worker`` subprocess; its output is appended to ``log_path``."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        """Where this run's output begins in the log file."""

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker"],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def run_log_text(self) -> str:
        """The output of the current (or last) run only."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def tail(self, chars: int = 6000) -> str:
        """The end of the log for assertion messages; repeated progress lines are collapsed
        so that they do not push what happened before them out of view."""
        lines = self.log_text().splitlines()
        kept: list[str] = []
        for index, line in enumerate(lines):
            is_progress = '"msg":"progress"' in line
            next_is_progress = index + 1 < len(lines) and '"msg":"progress"' in lines[index + 1]
            if not (is_progress and next_is_progress):
                kept.append(line)
        return "\n--- worker log (tail) ---\n" + "\n".join(kept)[-chars:]

    def last_progress(self) -> dict[str, Any] | None:
        lines = progress(self.run_log_text())
        return lines[-1] if lines else None

    def kill9(self) -> int:
        """SIGKILL: no shutdown, no commit, no flush. Returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"worker ignored SIGTERM for {timeout_s:.0f} s" + self.tail()
            ) from None

    async def wait_progress(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        """The first progress line of this run that satisfies ``predicate``; fails on timeout
        or when the worker exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in progress(self.run_log_text()):
                if predicate(line):
                    return line
            if not self.alive():
                raise AssertionError("worker exited while waiting for progress" + self.tail())
            await asyncio.sleep(0.5)
        last = self.last_progress()
        raise AssertionError(
            f"no matching progress line within {timeout_s:.0f} s (last: {last})" + self.tail()
        )


def worker_env(services: Services, isolation: Isolation, **settings: object) -> dict[str, str]:
    """The worker's environment: the test's isolation plus ``DEALSTREAM_<NAME>`` settings.

    A learner started with the same environment serves no HTTP endpoint unless asked
    (``learner_http_port=...``): tests run side by side and must not fight over its port."""
    env = isolation.env(services)
    env["DEALSTREAM_LEARNER_HTTP_PORT"] = "0"
    env.update({f"DEALSTREAM_{name.upper()}": str(value) for name, value in settings.items()})
    return env


async def read_states(
    services: Services, isolation: Isolation, user_ids: Iterable[str]
) -> dict[str, State]:
    client = services.redis()
    try:
        store = RedisFeatureStore(
            client, prefix=isolation.redis_prefix, pseudonyms=worker_pseudonyms()
        )
        return await store.read_states(list(user_ids))
    finally:
        await client.aclose()


async def poll_until(
    probe: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.2
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await probe():
            return True
        await asyncio.sleep(interval_s)
    return False


async def committed_offsets(services: Services, group: str) -> dict[tuple[str, int], int]:
    """The consumer group's committed offset of every partition it committed."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=services.kafka_bootstrap, **services.kafka_options()
    )
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


async def clean_up(services: Services, isolation: Isolation) -> None:
    """Delete this test's Redis keys and topics (never anything outside its prefixes)."""
    client = services.redis()
    try:
        keys = [k async for k in client.scan_iter(match=f"{isolation.redis_prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()
    admin = AIOKafkaAdminClient(
        bootstrap_servers=services.kafka_bootstrap, **services.kafka_options()
    )
    await admin.start()
    try:
        mine = [
            t
            for t in await admin.list_topics()
            if t.startswith(isolation.topic_prefix) or t.startswith(f"{isolation.group_id}-")
        ]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


async def produce_events(
    services: Services,
    topics: Topics,
    events: Iterable[Mapping[str, Any]],
    *,
    raw: Iterable[tuple[str, bytes, bytes]] = (),
) -> int:
    """Produce event v1 dicts as a shop would (topic by type, key = user id), then any ``raw``
    (topic, key, value) records, e.g. poison pills. Returns the count."""
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka_bootstrap,
        **services.kafka_options(),
        acks="all",
        linger_ms=5,
    )
    await producer.start()
    try:
        pending = []
        for event in events:
            topic = f"{topics.prefix}events.{event['type']}"
            key = str(event["user_id"]).encode()
            pending.append(await producer.send(topic, orjson.dumps(event), key=key))
        for topic, key, value in raw:
            pending.append(await producer.send(topic, value, key=key))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(pending)


async def read_topic(services: Services, topic: str, idle_s: float = 5.0) -> list[dict[str, Any]]:
    """Every JSON value on a topic, read until nothing new arrived for ``idle_s`` seconds."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka_bootstrap,
        **services.kafka_options(),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    values: list[dict[str, Any]] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                values.extend(orjson.loads(r.value) for r in records)
                last = time.monotonic()
    finally:
        await consumer.stop()
    return values
