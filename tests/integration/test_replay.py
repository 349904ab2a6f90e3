"""``dealstream replay`` against real Kafka: the Taobao excerpt, resume, Ctrl-C, a topic range.

Each test replays into its own topic prefix, consumes the event topics back with a plain
aiokafka consumer and compares with what the importer yields: the same events, the same
order per user (within each topic: one key, one partition), record timestamp = event time,
and the ``dealstream.replay.source`` header. (tests/integration/test_taobao_replay.py pushes
the same excerpt through the worker and checks the feature counts; this file checks the
records themselves.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from engine.analysis.simulation.world import open_loop
from engine.importers.jsonl import import_jsonl
from engine.importers.taobao import import_taobao
from streams.cli.main import main
from streams.replay.checkpoint import default_checkpoint_path, load_checkpoint
from streams.replay.republish import SOURCE_HEADER
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services
from tests.worker_process import clean_up

pytestmark = pytest.mark.integration

TAOBAO = REPO.parent / "shared" / "data" / "taobao-userbehavior-excerpt.csv.gz"


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: dict[str, Any]
    timestamp: int
    timestamp_type: int
    headers: dict[str, bytes]


async def consume(services: Services, topics: Iterable[str], expected: int) -> list[Record]:
    """Every record of ``topics``; waits for ``expected`` of them, then 2 s more for extras."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=services.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=10_000,
    )
    await consumer.start()
    out: list[Record] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < (2.0 if len(out) >= expected else 15.0):
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(
                    Record(
                        r.topic,
                        r.partition,
                        r.offset,
                        r.key,
                        orjson.loads(r.value),
                        r.timestamp,
                        r.timestamp_type,
                        {k: bytes(v) for k, v in r.headers},
                    )
                    for r in records
                )
                if records:
                    last = time.monotonic()
    finally:
        await consumer.stop()
    return out


def per_user_topic(sequence: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str], list[str]]:
    """(user, topic) -> event ids in order."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for user, topic, event_id in sequence:
        out[(user, topic)].append(event_id)
    return dict(out)


def assert_same_events_in_order(
    records: list[Record], events: list[dict[str, Any]], topics: Topics
) -> None:
    """The records are exactly ``events`` (no loss, no duplicate), each user's order kept."""
    ids = [r.value["event_id"] for r in records]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated records"
    by_id = {e["event_id"]: e for e in events}
    assert set(ids) == set(by_id), (len(ids), len(by_id))
    for record in records:
        event = by_id[record.value["event_id"]]
        assert record.value == event
        assert record.topic == f"{topics.prefix}events.{event['type']}"
        assert record.key == event["user_id"].encode()
        assert record.timestamp == event["ts"] and record.timestamp_type == 0  # CreateTime
        assert SOURCE_HEADER in record.headers
    partitions: dict[tuple[str, str], set[int]] = defaultdict(set)
    for r in records:
        partitions[(r.value["user_id"], r.topic)].add(r.partition)
    assert all(len(p) == 1 for p in partitions.values()), "a user's records share a partition"
    consumed = sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
    got = per_user_topic((r.value["user_id"], r.topic, r.value["event_id"]) for r in consumed)
    want = per_user_topic(
        (e["user_id"], f"{topics.prefix}events.{e['type']}", e["event_id"]) for e in events
    )
    assert got == want, "per-user order differs"


def replay_env(monkeypatch: pytest.MonkeyPatch, services: Services, isolation: Isolation) -> None:
    """The test's DEALSTREAM_* settings for in-process ``main()`` calls; the log handlers that
    ``main()`` installs (on pytest's captured stderr) are removed after the test."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    for name in list(os.environ):
        if name.startswith("DEALSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in isolation.env(services).items():
        monkeypatch.setenv(name, value)


def simulated_file(path: Path, count: int, seed: int = 11) -> list[dict[str, Any]]:
    events = [dict(e) for e in open_loop(users=200, events=count, seed=seed)]
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return list(import_jsonl(path))


def test_taobao_excerpt_replayed_and_consumed_back_is_the_same_events_in_order(
    services: Services,
    isolation: Isolation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not TAOBAO.exists():
        pytest.skip(f"the Taobao excerpt is absent ({TAOBAO}); see ../shared/data/README.md")
    numbered = list(import_taobao(TAOBAO).numbered())
    events = [event for _, event in numbered]
    line_of = {event["event_id"]: line for line, event in numbered}
    replay_env(monkeypatch, services, isolation)
    topics = Topics(isolation.topic_prefix)
    checkpoint = tmp_path / "taobao.checkpoint.json"
    try:
        started = time.monotonic()
        code = main(
            ["replay", "--in", str(TAOBAO), "--speed", "max", "--checkpoint", str(checkpoint)]
        )
        took = time.monotonic() - started
        err = capsys.readouterr().err
        assert code == 0, err
        records = asyncio.run(consume(services, topics.events, len(events)))
    finally:
        asyncio.run(clean_up(services, isolation))
    print(
        f"\nreplay of the Taobao excerpt: {len(events)} events in {took:.1f} s "
        f"({len(events) / took:,.0f} events/s, CLI start included)\n{err}"
    )
    assert f"read 96,169, sent {len(events):,}, merged 0, rejected 1 (ts_out_of_range 1)" in err
    assert_same_events_in_order(records, events, topics)
    for record in records:
        where = f"{TAOBAO.name}:{line_of[record.value['event_id']]}"
        assert record.headers[SOURCE_HEADER] == where.encode()
    saved = load_checkpoint(checkpoint)
    assert saved is not None and saved.complete and saved.sent == len(events)


async def _wait_for_checkpoint(path: Path, minimum: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        saved = load_checkpoint(path) if path.exists() else None
        if saved is not None and saved.sent >= minimum:
            return saved.sent
        await asyncio.sleep(0.1)
    raise AssertionError(f"no checkpoint with {minimum} events within {timeout_s} s")


def test_stopped_replay_resumes_and_every_event_arrives_once(
    services: Services,
    isolation: Isolation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = simulated_file(tmp_path / "sim.jsonl", 6000)
    replay_env(monkeypatch, services, isolation)
    monkeypatch.setenv("DEALSTREAM_STATE", str(tmp_path / "state"))
    topics = Topics(isolation.topic_prefix)
    args = ["replay", "--in", str(tmp_path / "sim.jsonl")]
    try:
        assert main([*args, "--stop-after", "2500"]) == 130
        first = capsys.readouterr().err
        saved = load_checkpoint(default_checkpoint_path(tmp_path / "state", tmp_path / "sim.jsonl"))
        assert saved is not None and saved.sent == 2500 and not saved.complete
        assert "run the same command again to resume" in first
        assert main(args) == 0
        second = capsys.readouterr().err
        assert "resuming after sim.jsonl:2500 (2,500 events already sent" in second
        assert "sent 3,500" in second and "skipped 2,500 (before_resume 2,500)" in second
        assert main(args) == 0 and "nothing to do" in capsys.readouterr().err
        records = asyncio.run(consume(services, topics.events, len(events)))
    finally:
        asyncio.run(clean_up(services, isolation))
    assert {r.topic for r in records} == set(topics.events), "all three topics are used"
    assert_same_events_in_order(records, events, topics)


def test_sigint_stops_a_paced_replay_with_a_checkpoint_and_the_rerun_completes_it(
    services: Services, isolation: Isolation, tmp_path: Path
) -> None:
    path = tmp_path / "sim.jsonl"
    events = simulated_file(path, 5000)
    span_s = (events[-1]["ts"] - events[0]["ts"]) / 1000
    speed = span_s / 30  # the whole file would take 30 s: plenty of time to interrupt it
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALSTREAM_")}
    env.update(isolation.env(services))
    env["DEALSTREAM_STATE"] = str(tmp_path / "state")
    command = [sys.executable, "-m", "streams.cli", "replay", "--in", str(path)]
    checkpoint = default_checkpoint_path(tmp_path / "state", path)
    topics = Topics(isolation.topic_prefix)
    try:
        process = subprocess.Popen(
            [*command, "--speed", f"{speed:.3f}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            before = asyncio.run(_wait_for_checkpoint(checkpoint, 100, 60))
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 130, err
        assert "interrupted" in err and "run the same command again to resume" in err
        assert "Traceback" not in err
        saved = load_checkpoint(checkpoint)
        assert saved is not None and before <= saved.sent < len(events), (before, saved)
        interrupted_at = saved.sent
        rerun = subprocess.run(
            [*command, "--speed", "max"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert rerun.returncode == 0, rerun.stderr
        assert f"({interrupted_at:,} events already sent" in rerun.stderr
        records = asyncio.run(consume(services, topics.events, len(events)))
    finally:
        asyncio.run(clean_up(services, isolation))
    # Ctrl-C flushes before writing the checkpoint: not one event is sent twice
    assert_same_events_in_order(records, events, topics)


def test_a_topic_range_is_replayed_into_the_event_topics(
    services: Services,
    isolation: Isolation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = simulated_file(tmp_path / "sim.jsonl", 300)
    archive = f"{isolation.topic_prefix}archive"
    topics = Topics(isolation.topic_prefix)

    async def fill() -> None:
        from streams.adapters.kafka_io import ensure_topics

        await ensure_topics(services.kafka_bootstrap, [archive], partitions=2)
        producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for event in events[:150]:
                await producer.send(archive, orjson.dumps(event), key=event["user_id"].encode())
            await producer.send_and_wait(archive, b"not json", key=b"x", partition=0)
            for event in events[150:]:
                await producer.send(archive, orjson.dumps(event), key=event["user_id"].encode())
            await producer.flush()
        finally:
            await producer.stop()

    replay_env(monkeypatch, services, isolation)
    checkpoint = tmp_path / "archive.checkpoint.json"
    args = ["replay", "--source-topic", archive, "--checkpoint", str(checkpoint)]
    try:
        asyncio.run(fill())
        assert main(args) == 0
        err = capsys.readouterr().err
        records = asyncio.run(consume(services, topics.events, len(events)))
        assert main(args) == 0 and "nothing to do" in capsys.readouterr().err
    finally:
        asyncio.run(clean_up(services, isolation))
    assert "read 301, sent 300, merged 0, rejected 1 (invalid_json 1)" in err, err
    ids = {r.value["event_id"] for r in records}
    assert ids == {e["event_id"] for e in events} and len(records) == len(events)
    for record in records:
        assert record.timestamp == record.value["ts"]
        source = record.headers[SOURCE_HEADER].decode()
        assert source.startswith(f"{archive}/") and ":" in source
    # one user's records were in one archive partition, so their order survives
    consumed = sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
    got = per_user_topic((r.value["user_id"], r.topic, r.value["event_id"]) for r in consumed)
    want = per_user_topic(
        (e["user_id"], f"{topics.prefix}events.{e['type']}", e["event_id"]) for e in events
    )
    assert got == want
    saved = load_checkpoint(checkpoint)
    assert saved is not None and saved.complete and saved.identity["topic"] == archive
