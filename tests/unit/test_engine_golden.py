"""Golden runs: the engine's full output for a frozen 20,300-event stream must never change.

The hot path is optimised for speed (features, model, policies, store, ledger); these digests
were recorded from the straightforward implementation before any optimisation, so a speed-up
that changes one feature value, one decision, one offer, one training example or one bit of
the model's learned weights fails here. Each digest is the sha256 of the canonical JSON of
every batch's output (statuses, offers, decisions, training, denials, spend) plus the final
model's weights, intercept and version. Floats are compared exactly (no rounding).

The input (``tests/fixtures/golden_events.jsonl.gz``) is frozen: committed once, never
regenerated. Each line is ``{"event": <event v1>, "position": [source, partition, offset]}``.
It mixes a sparse multi-day population (day windows, retention trims, label expiry) with a
dense burst (sessions, minute windows, decision intervals, cooldowns), and carries duplicates
under a new offset, redeliveries at the old offset, late events, purchases redeeming offers
and three topics over two partitions each, spanning 61 hours. It was written by
``tests/fixtures/make_golden_events.py`` from the i.i.d. traffic generator
(``engine.analysis.simulation.generator.generate``); both were removed when the world's open
loop became the only generator (issue 11). At commit d38a09f, the last with both, the script
still wrote the committed file byte for byte; the recipe is
``git show d38a09f:tests/fixtures/make_golden_events.py``. A new fixture, if ever needed,
means new digests recorded from a trusted engine.

Set ``DEALSTREAM_GOLDEN_DUMP=<dir>`` to write each run's canonical JSON there, to diff a
failing run against a trusted one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tomllib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.campaigns import Campaign, default_campaigns, load_campaigns, parse_campaigns
from engine.events import Event, parse_event
from engine.features.store import InMemoryFeatureStore, Position
from engine.ledger import InMemoryLedger, LedgerOp, LedgerResult
from engine.pipeline import DiscountEngine, EngineConfig, Incoming
from engine.ports import DecisionLedger
from engine.stop_loss import StopLossStatus

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "golden_events.jsonl.gz"

EXTRA_CAMPAIGNS = """
[[campaign]]
name = "late-linear"
policy = "linear"
a = 30
b = -5
max_discount_pct = 25
triggers = ["view", "favorite", "search"]
decision_interval_s = 300
cooldown_s = 1800
max_offers_per_day = 2
daily_budget = 40.0
holdout = 0.2
seed = 3

[[campaign]]
name = "loyal-rules"
policy = "rules"
rules = [
  { feature = "purchase_frequency_30d", op = ">=", value = 1, discount_pct = 15 },
  { feature = "cart_count_24h", op = ">", value = 2, discount_pct = 5 },
]
customers = "returning"
max_discount_pct = 10
decision_interval_s = 60

[[campaign]]
name = "electronics-profit"
policy = "profit"
ladder = [0, 5, 10, 20, 30]
margin = 0.35
epsilon = 0.25
categories = ["electronics", "books", "toys"]
customers = "all"
decision_interval_s = 120
max_offers_per_day = 3
daily_budget = 150.0
default_order_value = 35.0
seed = 9
"""

GOLDEN: dict[str, str] = {
    "default": "a75e81bb32f742d6a09cab604969fd62e8fc58253701ee6690799adb0aaa98a5",
    "demo": "d7834927c60307f76ce50531d20977d9658c9ed5110543b5f2a66aad07c9e625",
    "extra": "0a7bff84cf76984cbd08294546b87c3719b2585fd928339180fc5ca726008585",
    "demo-batched-labels": "50a4321be21770ba9801e5abe6af266394efa436e395345e9b249f8a6644aa11",
}
"""sha256 of each run's canonical output, recorded before the hot path was optimised.

Re-recorded once since, when attribution windows began closing on their lane's own clock
(issue 13; the input's two partitions are two lanes): every decision, offer and final label
stayed the same; closing label events moved to the batch in which their lane's clock passes
them (and the inline learner learns them in that order). The demo run without positions (one
lane) kept its digest."""


@cache
def golden_input() -> tuple[tuple[Event, Position], ...]:
    lines = gzip.decompress(FIXTURE.read_bytes()).splitlines()
    out: list[tuple[Event, Position]] = []
    for line in lines:
        record = orjson.loads(line)
        source, partition, offset = record["position"]
        out.append((parse_event(record["event"]), Position(source, partition, offset)))
    return tuple(out)


def campaigns(name: str) -> tuple[Campaign, ...]:
    if name == "default":
        return default_campaigns()
    if name == "extra":
        return parse_campaigns(tomllib.loads(EXTRA_CAMPAIGNS))
    return load_campaigns(ROOT / "deploy" / "campaigns" / "demo.toml")


class OpaqueLedger:
    """The in-memory ledger's rules behind a ledger that, like the Redis one, knows nothing
    without a round trip: the engine cannot skip rate-limited proposals or idle settles, so its
    generic path runs (every proposal is scored and dropped at ``settle``; every event
    settles)."""

    def __init__(self) -> None:
        self.inner = InMemoryLedger()

    async def settle(
        self, ops: Sequence[LedgerOp], *, now_ms: int, lanes: Mapping[int, int] | None = None
    ) -> LedgerResult:
        return await self.inner.settle(ops, now_ms=now_ms, lanes=lanes)

    def settle_due(self, lane: int, now_ms: int) -> bool:
        del lane, now_ms
        return True

    def rate_limited(self, user_id: str, campaign: str, ts: int, interval_ms: int) -> bool:
        del user_id, campaign, ts, interval_ms
        return False

    async def stop_loss_status(self) -> dict[str, StopLossStatus]:
        return await self.inner.stop_loss_status()

    async def budget_spent_cents(self, campaign: str, day: int) -> int:
        return await self.inner.budget_spent_cents(campaign, day)

    async def pending_count(self) -> int:
        return await self.inner.pending_count()


async def canonical_run(
    name: str,
    *,
    batch: int = 500,
    positions: bool = True,
    learn_inline: bool = True,
    opaque_ledger: bool = False,
) -> bytes:
    ledger: DecisionLedger = OpaqueLedger() if opaque_ledger else InMemoryLedger()
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        ledger=ledger,
        campaigns=campaigns(name),
        config=EngineConfig(learn_inline=learn_inline),
    )
    stream = golden_input()
    batches: list[dict[str, Any]] = []
    for start in range(0, len(stream), batch):
        items = [
            Incoming(event, position if positions else None)
            for event, position in stream[start : start + batch]
        ]
        result = await engine.process(items)
        batches.append(
            {
                "statuses": [int(status) for status in result.statuses],
                "offers": [offer.to_message() for offer in result.offers],
                "decisions": [decision.to_message() for decision in result.decisions],
                "training": [example.to_message() for example in result.training],
                "denied": result.denied,
                "spend_cents": result.spend_cents,
            }
        )
    classifier = engine.model.river_pipelines().purchase.steps["LogisticRegression"]
    final = {
        "clock_ms": engine.clock_ms,
        "version": engine.model.version,
        "weights": {str(k): float(v) for k, v in classifier.weights.items()},
        "intercept": float(classifier.intercept),
        "pending": await engine.ledger.pending_count(),
    }
    return orjson.dumps({"batches": batches, "final": final}, option=orjson.OPT_SORT_KEYS)


RUNS: dict[str, dict[str, Any]] = {
    "default": {"name": "default"},
    "demo": {"name": "demo", "batch": 1000},
    "extra": {"name": "extra", "batch": 333},
    "demo-batched-labels": {"name": "demo", "positions": False, "learn_inline": False},
}
OPAQUE_RUNS: tuple[str, ...] = ("extra", "demo-batched-labels")
"""The same runs through a ledger the engine knows nothing about (the live worker's case):
the generic path must give the very same output as the in-memory shortcuts."""


@pytest.mark.parametrize("run", list(RUNS))
async def test_engine_output_matches_the_golden_digest(run: str) -> None:
    document = await canonical_run(**RUNS[run])
    dump = os.environ.get("DEALSTREAM_GOLDEN_DUMP")
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        (Path(dump) / f"{run}.json").write_bytes(document)
    assert hashlib.sha256(document).hexdigest() == GOLDEN[run]


@pytest.mark.parametrize("run", OPAQUE_RUNS)
async def test_the_generic_ledger_path_gives_the_same_output(run: str) -> None:
    document = await canonical_run(**RUNS[run], opaque_ledger=True)
    assert hashlib.sha256(document).hexdigest() == GOLDEN[run]


async def test_golden_runs_exercise_the_paths_they_guard() -> None:
    """The digests only prove something if the stream reaches every branch that matters."""
    runs = {run: orjson.loads(await canonical_run(**RUNS[run])) for run in ("demo", "extra")}
    statuses = {s for b in runs["demo"]["batches"] for s in b["statuses"]}
    assert statuses == {0, 1, 2, 3}  # applied, redelivered, duplicate, late
    for document in runs.values():
        batches = document["batches"]
        assert sum(len(b["offers"]) for b in batches) > 50
        assert sum(len(b["training"]) for b in batches) > 500
        labels = {t["label"] for b in batches for t in b["training"]}
        assert labels == {0, 1}
    denied = {rule for b in runs["extra"]["batches"] for rule in b["denied"]}
    assert {"budget", "cooldown", "max_offers_per_day"} <= denied
    decisions = [d for b in runs["extra"]["batches"] for d in b["decisions"]]
    assert {d["policy"] for d in decisions} == {"linear", "rules", "profit"}
    assert any(d["holdout"] for d in decisions)
    assert any(d["explore"] for d in decisions)
