"""The walking skeleton end to end: producer -> worker subprocess -> offers + Redis state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from jsonschema import Draft202012Validator

from engine.analysis.simulation.world import open_loop
from engine.campaigns import load_campaigns
from engine.decisions import in_holdout
from engine.events import parse_event
from engine.features.state import KIND_CODE, event_kind
from engine.features.store import InMemoryFeatureStore
from engine.pipeline import DiscountEngine, Incoming
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_store import RedisFeatureStore
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services, worker_pseudonyms
from tests.worker_process import produce_events

pytestmark = pytest.mark.e2e

EVENTS = 1000
CAMPAIGNS = """
[[campaign]]
name = "e2e-everyone"
policy = "threshold"
threshold = 0.0
discount_pct = 15
decision_interval_s = 0

[[campaign]]
name = "e2e-holdout"
policy = "threshold"
threshold = 0.0
discount_pct = 5
decision_interval_s = 0
holdout = 0.3
"""


def schema(name: str) -> Draft202012Validator:
    document = json.loads((REPO / "schemas" / name).read_text())
    return Draft202012Validator(document)


async def consume_all(
    services: Services, topic: str, expected: int, timeout_s: float
) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka_bootstrap,
        **services.kafka_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    messages: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                messages.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return messages


async def expected_outputs(
    events: list[dict[str, object]], campaigns_path: Path
) -> tuple[set[str], int]:
    """The offer ids and the number of decisions the same engine code gives in memory."""
    engine = DiscountEngine(InMemoryFeatureStore(), campaigns=load_campaigns(campaigns_path))
    result = await engine.process([Incoming(parse_event(e)) for e in events])
    return {offer.offer_id for offer in result.offers}, len(result.decisions)


def test_worker_turns_events_into_valid_offers_and_redis_counts(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    campaigns_path = tmp_path / "campaigns.toml"
    campaigns_path.write_text(CAMPAIGNS)
    topics = Topics(isolation.topic_prefix)
    start_ms = int(time.time() * 1000) - 3600 * 1000
    events = list(open_loop(users=60, events=EVENTS, seed=7, start_ms=start_ms, mean_gap_ms=3000))
    want_offers, want_decisions = asyncio.run(expected_outputs(events, campaigns_path))
    assert want_offers, "the campaign should offer something to this traffic"

    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap, topics.all, partitions=4, security=services.kafka_security
        )
    )
    asyncio.run(produce_events(services, topics, events))

    env = {
        **os.environ,
        **isolation.env(services),
        "DEALSTREAM_HTTP_PORT": str(free_port),
        "DEALSTREAM_CAMPAIGNS": str(campaigns_path),
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=log, stderr=log
        )
        try:
            offers = asyncio.run(consume_all(services, topics.offers, len(want_offers), 120))
            decisions = asyncio.run(consume_all(services, topics.decisions, want_decisions, 60))
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = worker.wait()
    log_text = log_path.read_text(errors="replace")
    assert {o["offer_id"] for o in offers} == want_offers, log_text[-3000:]
    assert code == 0, log_text[-3000:]

    assert len(decisions) == want_decisions
    offer_schema = schema("offer.v1.json")
    for offer in offers:
        offer_schema.validate(offer)
        assert offer["discount_pct"] == {"e2e-everyone": 15, "e2e-holdout": 5}[offer["campaign"]]
    decision_schema = schema("decision.v1.json")
    for decision in decisions:
        decision_schema.validate(decision)

    (_, holdout_campaign) = load_campaigns(campaigns_path)
    held_out = {
        str(e["user_id"]) for e in events if in_holdout(holdout_campaign, str(e["user_id"]))
    }
    # decisions name users by pseudonym, offers by the raw id (docs/privacy.md)
    pseudonym = worker_pseudonyms().of
    held_out_pseudonyms = {pseudonym(user) for user in held_out}
    assert held_out, "with 60 users and a 30 % holdout some users are held out"
    holdout_decisions = [d for d in decisions if d["campaign"] == "e2e-holdout"]
    for decision in holdout_decisions:
        assert decision["holdout"] is (decision["user_id"] in held_out_pseudonyms)
        if decision["holdout"]:
            assert decision["offer_id"] is None and decision["discount_pct"] == 0
    assert not [o for o in offers if o["campaign"] == "e2e-holdout" and o["user_id"] in held_out], (
        "holdout users must never receive offers"
    )
    assert any(d["holdout"] for d in holdout_decisions), "holdout decisions are still logged"

    expected_counts: dict[str, Counter[str]] = {}
    for raw in events:
        event = parse_event(raw)
        expected_counts.setdefault(event.user_id, Counter())[KIND_CODE[event_kind(event)]] += 1

    async def read_counts() -> dict[str, dict[str, float]]:
        client = services.redis()
        try:
            store = RedisFeatureStore(
                client, prefix=isolation.redis_prefix, pseudonyms=worker_pseudonyms()
            )
            return await store.read_states(list(expected_counts))
        finally:
            keys = [k async for k in client.scan_iter(match=f"{isolation.redis_prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    states = asyncio.run(read_counts())
    for user_id, counts in expected_counts.items():
        for code in KIND_CODE.values():
            assert states[user_id].get(f"n{code}", 0.0) == counts[code], (user_id, code)
