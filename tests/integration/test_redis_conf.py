"""The shipped ``deploy/redis/redis.conf`` keeps a user's hash (``u:{user}``: pending decisions,
guards, feature record) in one listpack.

A pending decision's record is a few hundred bytes; with Redis's default 64-byte limit every
user's hash of them becomes a hash table, an allocation per field. Two private servers, one
started from the shipped file and one with Redis's defaults, store the same decisions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engine.features.catalogue import FEATURE_NAMES
from engine.features.state import HOUR_MS, MINUTE_MS
from engine.labels import PendingDecision
from engine.ledger import DecisionRequest, LedgerConfig
from streams.adapters.pseudonyms import Pseudonyms
from streams.adapters.redis_ledger import RedisLedger
from tests.conftest import REPO
from tests.private_redis import REDIS_SERVER, PrivateRedis

T0 = 1_767_225_600_000 + 22 * HOUR_MS
PREFIX = "conf:"


def decisions(user: str, count: int) -> list[DecisionRequest]:
    """Decisions as the engine records them: the whole feature vector, fractions included."""
    features = {name: round(1.0 / (k + 3), 12) + k for k, name in enumerate(FEATURE_NAMES)}
    return [
        DecisionRequest(
            PendingDecision(
                decision_id=f"d-{user}-{k:022d}",
                user_id=user,
                campaign="alpha",
                ts=T0 + k * MINUTE_MS,
                features=features,
                discount_pct=10.0,
                propensity=0.25,
                model_version="lr-0123456789",
                offer_id=None,
            ),
            0,
            None,
        )
        for k in range(count)
    ]


async def pending_hash(url: str) -> tuple[str, int]:
    """The encoding and ``MEMORY USAGE`` of one user's hash of four pending decisions (and the
    campaign's last decision time)."""
    client = aioredis.Redis.from_url(url)
    try:
        ledger = RedisLedger(
            client,
            prefix=PREFIX,
            config=LedgerConfig(attribution_window_ms=24 * HOUR_MS),
            pseudonyms=Pseudonyms(b"conf-test-pseudonym-key-0123456789"),
        )
        result = await ledger.settle(decisions("shopper-1", 4), now_ms=T0)
        assert all(outcome is not None and outcome.decided for outcome in result.outcomes)
        [key] = [key async for key in client.scan_iter(match=f"{PREFIX}u:*")]
        assert await client.hlen(key) == 4 + 1
        encoding = await client.object("encoding", key)
        usage = await client.memory_usage(key, samples=0)
        return (encoding.decode() if isinstance(encoding, bytes) else str(encoding)), int(usage)
    finally:
        await client.aclose()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
async def test_the_shipped_conf_stores_pending_decisions_in_a_listpack(tmp_path: Path) -> None:
    shipped = PrivateRedis(tmp_path / "shipped", conf=REPO / "deploy" / "redis" / "redis.conf")
    default = PrivateRedis(tmp_path / "default")
    try:
        shipped.start()
        default.start()
        shipped_encoding, shipped_bytes = await pending_hash(shipped.url)
        default_encoding, default_bytes = await pending_hash(default.url)
    finally:
        for server in (shipped, default):
            if server.process is not None:
                server.kill9()
    assert (shipped_encoding, default_encoding) == ("listpack", "hashtable")
    assert shipped_bytes < default_bytes
