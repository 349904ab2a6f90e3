"""Poison pills: bad records go to ``events.dlq`` untouched and explained; the worker carries on.

Good events (simulated) are interleaved with about thirty kinds of bad records on all three
event topics. The worker runs as a subprocess; a separate consumer reads the DLQ. Every bad
record must be there with its original key and bytes, its original headers, and the headers
``dealstream.source.topic/partition/offset`` and ``dealstream.error.class/reason``; every good
event must be counted in Redis exactly once; the worker's counters must balance; and the worker
must survive all of it and exit 0 on SIGTERM.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from engine.analysis.simulation.world import open_loop
from engine.errors import InvalidEvent
from engine.events import parse_event
from engine.features.state import KIND_CODE, event_kind
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import Isolation, Services
from tests.worker_process import (
    WorkerProcess,
    accounted,
    clean_up,
    log_entries,
    read_states,
    worker_env,
)

pytestmark = pytest.mark.e2e

MAX_MESSAGE_BYTES = 10_000
"""The worker's limit in this test; the broker's own default is about 1 MB."""
GOOD_EVENTS = 400
CASE_HEADER = "test.case"
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Message:
    """One record to produce; ``code`` is the DLQ reason expected (``None`` for good events)."""

    name: str
    topic: str
    key: bytes | None
    value: bytes | None
    code: str | None = None
    kind: str | None = None
    """For good events: the activity kind that should be counted for ``key``."""


def _browse(user: str, now_ms: int, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"bad-{user}-{time.monotonic_ns()}",
        "user_id": user,
        "type": "browse",
        "ts": now_ms - 60_000,
        "item_id": "i1",
        "category": "books",
        "price": 12.5,
    }
    event.update(fields)
    return event


def _search(user: str, now_ms: int, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"bad-{user}-{time.monotonic_ns()}",
        "user_id": user,
        "type": "search",
        "ts": now_ms - 60_000,
        "query": "lego",
    }
    event.update(fields)
    return event


def _purchase(user: str, now_ms: int, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"bad-{user}-{time.monotonic_ns()}",
        "user_id": user,
        "type": "purchase",
        "ts": now_ms - 60_000,
        "order_id": "o1",
        "items": [{"item_id": "i1", "category": "books", "price": 10, "quantity": 1}],
        "amount": 10,
    }
    event.update(fields)
    return event


def _without(event: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != name}


def bad_messages(topics: Topics, user: str, now_ms: int) -> list[Message]:
    """Bad records, each with the DLQ reason the contract gives it (``engine/errors.py``)."""
    key = user.encode()
    b, s, p = topics.browse, topics.search, topics.purchase

    def js(obj: object) -> bytes:
        return orjson.dumps(obj)

    padding = "x" * (2 * MAX_MESSAGE_BYTES)
    return [
        Message("truncated JSON", b, key, b'{"event_id": "e", "user_id": ', "invalid_json"),
        Message("not UTF-8", s, key, b"\xff\xfe\x00\x81garbage\xc3\x28", "invalid_json"),
        Message("UTF-8 BOM", b, key, b"\xef\xbb\xbf" + js(_browse(user, now_ms)), "invalid_json"),
        Message("nested 3000 deep", p, key, b"[" * 3000 + b"]" * 3000, "invalid_json"),
        Message("trailing garbage", b, key, js(_browse(user, now_ms)) + b" }", "invalid_json"),
        Message("NaN literal", b, key, b'{"price": NaN}', "invalid_json"),
        Message("tombstone (no value)", b, key, None, "invalid_json"),
        Message("empty value", s, key, b"", "invalid_json"),
        Message("JSON array", b, key, js([_browse(user, now_ms)]), "not_an_object"),
        Message("JSON string", s, key, b'"search"', "not_an_object"),
        Message("JSON null", p, key, b"null", "not_an_object"),
        Message(
            "missing item_id",
            b,
            key,
            js(_without(_browse(user, now_ms), "item_id")),
            "missing_field",
        ),
        Message("missing ts", s, key, js(_without(_search(user, now_ms), "ts")), "missing_field"),
        Message("ts as string", b, key, js(_browse(user, now_ms, ts=str(now_ms))), "wrong_type"),
        Message("price as bool", b, key, js(_browse(user, now_ms, price=True)), "wrong_type"),
        Message(
            "ts with a fraction", s, key, js(_search(user, now_ms, ts=now_ms + 0.5)), "wrong_type"
        ),
        Message(
            "item not an object", p, key, js(_purchase(user, now_ms, items=["i1"])), "wrong_type"
        ),
        Message("negative price", b, key, js(_browse(user, now_ms, price=-1)), "out_of_range"),
        Message("negative ts", s, key, js(_search(user, now_ms, ts=-5)), "out_of_range"),
        Message(
            "ts beyond 2**53",
            b,
            key,
            b'{"event_id":"e","user_id":"' + key + b'",'
            b'"type":"browse","ts":100000000000000000000000,"item_id":"i","category":"c",'
            b'"price":1}',
            "out_of_range",
        ),
        Message("empty items", p, key, js(_purchase(user, now_ms, items=[])), "out_of_range"),
        Message(
            "quantity 0",
            p,
            key,
            js(
                _purchase(
                    user,
                    now_ms,
                    items=[{"item_id": "i", "category": "c", "price": 1, "quantity": 0}],
                )
            ),
            "out_of_range",
        ),
        Message("unknown type", b, key, js(_browse(user, now_ms, type="refund")), "unknown_type"),
        Message(
            "search on events.browse", b, key, js(_search(user, now_ms)), "type_topic_mismatch"
        ),
        Message(
            "browse on events.purchase", p, key, js(_browse(user, now_ms)), "type_topic_mismatch"
        ),
        Message(
            "20 kB value",
            b,
            key,
            js(_browse(user, now_ms, padding=padding)),
            "too_large",
        ),
        Message("no key", b, None, js(_browse(user, now_ms)), "missing_key"),
        Message("empty key", s, b"", js(_search(user, now_ms)), "missing_key"),
        Message(
            "key is another user", b, b"someone-else", js(_browse(user, now_ms)), "key_mismatch"
        ),
        Message(
            "a day in the future",
            s,
            key,
            js(_search(user, now_ms, ts=now_ms + 24 * 3600 * 1000)),
            "clock_skew",
        ),
        Message(
            "event_id of 129 chars",
            b,
            key,
            js(_browse(user, now_ms, event_id="e" * 129)),
            "too_long",
        ),
        Message(
            "query of 513 chars", s, key, js(_search(user, now_ms, query="q" * 513)), "too_long"
        ),
        Message("empty event_id", b, key, js(_browse(user, now_ms, event_id="")), "too_short"),
        Message(
            "action wishlist",
            b,
            key,
            js(_browse(user, now_ms, action="wishlist")),
            "invalid_choice",
        ),
        Message(
            "schema_version 2",
            p,
            key,
            js(_purchase(user, now_ms, schema_version=2)),
            "unsupported_version",
        ),
    ]


def good_messages(topics: Topics, now_ms: int) -> list[Message]:
    """Simulated traffic of the last 20 minutes, plus one duplicate and one late event."""
    events = list(
        open_loop(
            users=25, events=GOOD_EVENTS, seed=11, start_ms=now_ms - 20 * 60_000, mean_gap_ms=2500
        )
    )
    assert max(int(str(e["ts"])) for e in events) < now_ms, "good events must not be in the future"
    messages = []
    for raw in events:
        event = parse_event(raw)
        messages.append(
            Message(
                event.event_id,
                f"{topics.prefix}events.{event.type}",
                event.user_id.encode(),
                orjson.dumps(raw),
                kind=event_kind(event),
            )
        )
    # Same partition, so these arrive in this order: the second copy is a duplicate, and an event
    # two hours older than the user's latest one is late (allowed lateness: 1 h, the default).
    twice = _browse("dup-user", now_ms, event_id="dup-1", ts=now_ms - 120_000)
    messages.append(
        Message("first copy", topics.browse, b"dup-user", orjson.dumps(twice), kind="view")
    )
    messages.append(Message("second copy", topics.browse, b"dup-user", orjson.dumps(twice)))
    recent = _browse("late-user", now_ms, event_id="late-0", ts=now_ms - 60_000)
    old = _browse("late-user", now_ms, event_id="late-1", ts=now_ms - 2 * 3600 * 1000)
    messages.append(
        Message("recent", topics.browse, b"late-user", orjson.dumps(recent), kind="view")
    )
    messages.append(Message("two hours old", topics.browse, b"late-user", orjson.dumps(old)))
    return messages


def interleave(good: list[Message], bad: list[Message]) -> list[Message]:
    """Spread the bad records evenly through the good ones."""
    out: list[Message] = []
    step = max(1, len(good) // (len(bad) + 1))
    bad_left = list(bad)
    for index, message in enumerate(good):
        if index and index % step == 0 and bad_left:
            out.append(bad_left.pop(0))
        out.append(message)
    return out + bad_left


Produced = dict[tuple[str, int, int], Message]


async def produce(services: Services, messages: list[Message]) -> Produced:
    """Send in order (one producer, awaited per record); returns records by position."""
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka_bootstrap,
        **services.kafka_options(),
        acks="all",
        max_request_size=2_000_000,
    )
    await producer.start()
    positions: Produced = {}
    try:
        for message in messages:
            metadata = await producer.send_and_wait(
                message.topic,
                message.value,
                key=message.key,
                headers=[(CASE_HEADER, message.name.encode())],
            )
            positions[(metadata.topic, metadata.partition, metadata.offset)] = message
    finally:
        await producer.stop()
    return positions


async def consume_dlq(
    services: Services, topic: str, expected: int, timeout_s: float
) -> list[ConsumerRecord[bytes, bytes]]:
    """Everything on the DLQ: waits for ``expected`` records, then a little more for extras."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka_bootstrap,
        **services.kafka_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=4_000_000,
        max_partition_fetch_bytes=2_000_000,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
        extra = await consumer.getmany(timeout_ms=1500)
        for partition_records in extra.values():
            records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


def headers_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, bytes]:
    return {name: value for name, value in record.headers}


async def test_poison_pills_go_to_the_dlq_and_good_events_are_applied(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    topics = Topics(isolation.topic_prefix)
    now_ms = int(time.time() * 1000)
    good = good_messages(topics, now_ms)
    bad = bad_messages(topics, "u0000003", now_ms)
    assert len({m.code for m in bad}) >= 10
    messages = interleave(good, bad)
    await ensure_topics(
        services.kafka_bootstrap, topics.all, partitions=4, security=services.kafka_security
    )
    produced = await produce(services, messages)

    worker = WorkerProcess(
        worker_env(
            services,
            isolation,
            http_port=free_port,
            max_message_bytes=MAX_MESSAGE_BYTES,
            batch_max=50,
        ),
        tmp_path / "worker.log",
    )
    worker.start()
    try:
        final = await worker.wait_progress(
            lambda line: line["consumed"] >= len(messages), TIMEOUT_S
        )
        dlq = await consume_dlq(services, topics.dlq, len(bad), TIMEOUT_S)
        expected_counts: dict[str, Counter[str]] = {}
        for message in good:
            if message.kind is not None:
                assert message.key is not None
                user = message.key.decode()
                expected_counts.setdefault(user, Counter())[KIND_CODE[message.kind]] += 1
        states = await read_states(services, isolation, expected_counts)
        assert worker.alive(), "the worker died on bad input" + worker.tail()
        code = worker.stop()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    tail = worker.tail()

    # Every bad record is on the DLQ once, as it was sent, and says where it came from and why.
    by_position: dict[tuple[str, int, int], ConsumerRecord[bytes, bytes]] = {}
    for record in dlq:
        h = headers_of(record)
        position = (
            h["dealstream.source.topic"].decode(),
            int(h["dealstream.source.partition"]),
            int(h["dealstream.source.offset"]),
        )
        assert position not in by_position, f"dead-lettered twice: {position}" + tail
        by_position[position] = record
    expected_bad = {pos: m for pos, m in produced.items() if m.code is not None}
    missing = sorted(m.name for pos, m in expected_bad.items() if pos not in by_position)
    unexpected = [
        (pos, headers_of(r).get(CASE_HEADER))
        for pos, r in by_position.items()
        if pos not in expected_bad
    ]
    assert not missing, f"not on the DLQ: {missing}" + tail
    assert not unexpected, f"good records on the DLQ: {unexpected}" + tail
    reasons: Counter[str] = Counter()
    for position, message in expected_bad.items():
        record = by_position[position]
        h = headers_of(record)
        what = f"{message.name!r}: headers {h}"
        assert h[CASE_HEADER] == message.name.encode(), f"original headers lost, {what}"
        assert h["dealstream.error.class"].decode() == message.code, what
        assert (record.key or b"") == (message.key or b""), what
        # A tombstone comes out as an empty value: the DLQ itself is not compacted.
        assert (record.value or b"") == (message.value or b""), f"bytes changed, {what}"
        reason = h["dealstream.error.reason"].decode("utf-8")
        assert 10 <= len(reason) <= 500 and reason.isprintable(), f"unreadable reason, {what}"
        reasons[message.code or ""] += 1
    print(f"\nDLQ records per reason: {dict(sorted(reasons.items()))}")

    # The good events around them are applied, each once.
    for user, counts in expected_counts.items():
        got = {code: states[user].get(f"n{code}", 0.0) for code in KIND_CODE.values()}
        want = {code: float(counts[code]) for code in KIND_CODE.values()}
        assert got == want, f"user {user}: Redis counts {got}, expected {want}" + tail

    # The worker's books balance, with exactly the buckets this input should land in.
    applied = sum(1 for m in good if m.kind is not None)
    print(f"final progress: {final}")
    assert final["consumed"] == len(messages), final
    assert accounted(final) == final["consumed"], f"counters do not balance: {final}" + tail
    assert final["applied"] == applied, final
    assert (final["redelivered"], final["duplicates"], final["late"]) == (0, 1, 1), final
    assert final["dead_lettered"] == dict(reasons), final
    assert code == 0, f"worker exit status {code} on SIGTERM" + tail

    # The log shows dead letters as JSON lines with where they came from and why, and names
    # no user: user ids are written only when debug logging is asked for.
    log_text = worker.log_text()
    logged = log_entries(log_text, "dead-lettered a record")
    assert logged, "no dead letter logged" + tail
    assert {entry["code"] for entry in logged} <= set(reasons), logged
    assert all({"topic", "partition", "offset", "reason"} <= set(entry) for entry in logged)
    assert any("event_id" in entry for entry in logged), logged
    users = {m.key.decode() for m in messages if m.key}
    named = sorted(u for u in users if f'"{u}"' in log_text)
    assert not named, f"raw user ids in the worker log: {named}"


@pytest.mark.parametrize("amount", [1e17, 1e20, 1e307])
async def test_a_huge_amount_is_dead_lettered_and_does_not_stop_the_worker(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path, amount: float
) -> None:
    topics = Topics(isolation.topic_prefix)
    now_ms = int(time.time() * 1000)
    user = "big-spender"
    events = [
        _purchase(user, now_ms, event_id="p0", ts=now_ms - 3000, amount=5),
        _purchase(user, now_ms, event_id="p1", ts=now_ms - 2000, amount=amount),
        _purchase(user, now_ms, event_id="p2", ts=now_ms - 1000, amount=5),
    ]
    with pytest.raises(InvalidEvent):  # the contract caps money at 1e12
        parse_event(events[1])
    messages = [
        Message(str(e["event_id"]), topics.purchase, user.encode(), orjson.dumps(e)) for e in events
    ]
    await ensure_topics(
        services.kafka_bootstrap, topics.all, partitions=1, security=services.kafka_security
    )
    await produce(services, messages)
    worker = WorkerProcess(
        worker_env(services, isolation, http_port=free_port, batch_max=1),
        tmp_path / "worker.log",
    )
    worker.start()
    try:
        # 30 s: a loaded machine, or the TLS and SCRAM handshakes of `make test-secure`.
        final = await worker.wait_progress(lambda line: line["consumed"] >= len(events), 30)
        state = (await read_states(services, isolation, [user]))[user]
        assert worker.alive(), "the worker died" + worker.tail()
        code = worker.stop()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    assert accounted(final) == final["consumed"] == len(events), final
    # p0 and p2 are applied; p1 is dead-lettered as out of range.
    assert final["dead_lettered"] == {"out_of_range": 1}, final
    assert state.get("np") == 2.0, state
    day_buckets = sum(v for k, v in state.items() if k.startswith("pd"))
    assert day_buckets == state["np"], f"partially applied update: {state}"
    assert code == 0
