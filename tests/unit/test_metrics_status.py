"""Lag arithmetic, the ``dealstream lag`` output, readiness and the status the worker serves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from engine.campaigns import Campaign
from engine.features.store import InMemoryFeatureStore
from engine.ledger import InMemoryLedger, event_day
from engine.model.prequential import PrequentialMetrics
from engine.model.purchase_model import PurchaseModel
from engine.pipeline import DiscountEngine, EngineConfig
from engine.policies.rules import Rule, RulesPolicy
from engine.policies.threshold import ThresholdPolicy
from engine.stop_loss import StopLoss, StopLossStatus
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.operations.lag import PartitionLag, format_lag_table, lag_report, total_lag
from streams.operations.metrics import RateWindow, WorkerMetrics
from streams.operations.status_page import STATUS_PAGE_HTML
from streams.settings import Topics
from streams.worker.batch_worker import BatchWorker
from streams.worker.http_endpoints import (
    KAFKA_STALE_S,
    LOOP_STALL_S,
    WorkerStatus,
    current_stop_loss,
)
from tests.sinks import ListSink

T0 = 1_767_225_600_000
PREFIX = "s1."
BROWSE = f"{PREFIX}events.browse"
SEARCH = f"{PREFIX}events.search"


# -- lag arithmetic ------------------------------------------------------------------------------


def test_lag_counts_from_the_committed_offset() -> None:
    row = PartitionLag(BROWSE, 0, end_offset=120, committed=100, start_offset=0)
    assert (row.position, row.lag) == (100, 20)


def test_a_never_committed_partition_counts_from_its_log_start_not_from_zero() -> None:
    assert PartitionLag(BROWSE, 0, 120, None, start_offset=0).lag == 120
    truncated = PartitionLag(BROWSE, 0, 120, None, start_offset=90)
    assert (truncated.position, truncated.lag) == (90, 30)
    empty = PartitionLag(BROWSE, 0, 500, None, start_offset=500)
    assert empty.lag == 0


def test_a_commit_below_the_log_start_counts_from_the_log_start() -> None:
    """Retention deleted records the group never read: it resumes at the log start."""
    assert PartitionLag(BROWSE, 0, 120, committed=10, start_offset=90).lag == 30


def test_lag_is_never_negative() -> None:
    assert PartitionLag(BROWSE, 0, 100, committed=105).lag == 0


def test_time_lag_is_the_age_of_the_oldest_unprocessed_record() -> None:
    row = PartitionLag(BROWSE, 0, 10, 4, 0, oldest_timestamp_ms=T0, measured_at_ms=T0 + 42_500)
    assert row.lag_seconds == 42.5
    caught_up = PartitionLag(BROWSE, 0, 10, 10, 0, oldest_timestamp_ms=None, measured_at_ms=T0)
    assert caught_up.lag_seconds == 0.0
    unknown = PartitionLag(BROWSE, 0, 10, 4, 0, oldest_timestamp_ms=None, measured_at_ms=T0)
    assert unknown.lag_seconds is None
    future = PartitionLag(BROWSE, 0, 10, 4, 0, oldest_timestamp_ms=T0 + 5000, measured_at_ms=T0)
    assert future.lag_seconds == 0.0


ROWS = [
    PartitionLag(BROWSE, 0, 100, 100, 0, None, T0),
    PartitionLag(BROWSE, 1, 80, None, 20, T0 - 90_000, T0),
    PartitionLag(SEARCH, 0, 7, 3, 0, None, T0),
]


def test_lag_report_is_the_json_document_of_the_cli() -> None:
    report = lag_report("g1", ROWS)
    assert report["group"] == "g1"
    assert report["total_lag"] == total_lag(ROWS) == 0 + 60 + 4
    assert report["max_lag_seconds"] == 90.0
    assert report["partitions"][1] == {
        "topic": BROWSE,
        "partition": 1,
        "start": 20,
        "end": 80,
        "committed": None,
        "lag": 60,
        "lag_seconds": 90.0,
    }
    assert report["partitions"][2]["lag_seconds"] is None
    orjson.dumps(report)  # JSON-safe


def test_lag_table_has_one_line_per_partition_and_a_total() -> None:
    lines = format_lag_table("g1", ROWS).splitlines()
    assert lines[0].split() == ["topic", "partition", "end", "committed", "lag", "seconds"]
    assert lines[1].split() == [BROWSE, "0", "100", "100", "0", "0.0"]
    assert lines[2].split() == [BROWSE, "1", "80", "-", "60", "90.0"]
    assert lines[3].split() == [SEARCH, "0", "7", "3", "4", "?"]
    assert lines[-1] == "group g1: total lag 64 records, oldest 90.0 s"
    assert "no partitions" in format_lag_table("g1", [])


# -- status and readiness ------------------------------------------------------------------------


class FakeRedis:
    def __init__(self) -> None:
        self.down = False

    async def ping(self) -> bool:
        if self.down:
            raise aioredis.ConnectionError("connection refused")
        return True


class FakeProbe:
    def __init__(self) -> None:
        self.rows: list[PartitionLag] = []
        self.fail: Exception | None = None
        self.closed = False

    async def measure(self, group: str, topics: Sequence[str]) -> list[PartitionLag]:
        if self.fail is not None:
            raise self.fail
        return [row for row in self.rows if row.topic in topics]

    async def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_status(
    *campaigns: Campaign,
    stall_timeout_s: float = 60.0,
    trained: bool = True,
    learn_inline: bool = False,
) -> tuple[WorkerStatus, FakeRedis, FakeProbe, Clock, BatchWorker]:
    """A worker's status; by default serving a model trained on one example (``lr-1``), as
    one that loaded the learner's would."""
    clock = Clock()
    metrics = WorkerMetrics(monotonic=clock)
    campaigns = campaigns or (Campaign("spring", ThresholdPolicy(threshold=0.0)),)
    config = EngineConfig(learn_inline=learn_inline)
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        ledger=InMemoryLedger(config.ledger_config(campaigns)),
        campaigns=campaigns,
        config=config,
    )
    if trained:
        model = PurchaseModel()
        model.learn_one({"cart_count_24h": 1.0}, 10.0, 1)
        engine.model = model

    worker = BatchWorker(
        engine,
        ListSink(),
        topics=Topics(PREFIX),
        limits=DecodeLimits(),
        wall_clock_ms=lambda: T0,
        metrics=metrics,
    )
    redis, probe = FakeRedis(), FakeProbe()
    status = WorkerStatus(
        worker,
        redis=redis,  # type: ignore[arg-type]
        group="g1",
        probe=probe,
        stall_timeout_s=stall_timeout_s,
        monotonic=clock,
        wall_clock_ms=lambda: T0,
    )
    return status, redis, probe, clock, worker


async def test_not_ready_until_the_first_assignment_then_ready_even_with_no_partitions() -> None:
    status, *_ = make_status()
    body = await status.readiness()
    assert body["ready"] is False
    assert body["checks"]["partitions"] == {
        "ok": False,
        "detail": "waiting for the first partition assignment",
    }
    assert body["reasons"] == ["partitions: waiting for the first partition assignment"]

    status.on_assigned([])  # more workers than partitions: explicitly none
    body = await status.readiness()
    assert body["ready"] is True, body
    assert "no partitions assigned" in body["checks"]["partitions"]["detail"]
    assert body["reasons"] == []


async def test_assignment_follows_rebalances_and_ignores_other_topics() -> None:
    status, *_ = make_status()
    status.on_assigned([(BROWSE, 0), (BROWSE, 1), (SEARCH, 0), ("other.topic", 0)])
    assert status.assignment == frozenset({(BROWSE, 0), (BROWSE, 1), (SEARCH, 0)})
    status.on_revoked([(BROWSE, 1)])
    status.on_assigned([(BROWSE, 1)])
    metrics = status.metrics
    assert metrics.registry.get_sample_value("dealstream_rebalances_total") == 2
    assert metrics.registry.get_sample_value("dealstream_assigned_partitions") == 1
    assert status.rebalances == 2


async def test_redis_down_makes_the_worker_not_ready_and_says_why() -> None:
    status, redis, *_ = make_status()
    status.on_assigned([(BROWSE, 0)])
    redis.down = True
    body = await status.readiness()
    assert body["ready"] is False
    assert body["checks"]["redis"]["ok"] is False
    assert "ConnectionError" in body["checks"]["redis"]["detail"]
    redis.down = False
    assert (await status.readiness())["ready"] is True


async def test_a_stalled_worker_with_lag_is_not_ready_but_an_idle_caught_up_one_is() -> None:
    status, _, probe, clock, worker = make_status(stall_timeout_s=60)
    status.on_assigned([(BROWSE, 0), (BROWSE, 1)])
    probe.rows = [PartitionLag(BROWSE, 0, 10, 10), PartitionLag(BROWSE, 1, 5, 5)]
    await status.refresh()
    clock.now += 3600  # idle for an hour, but nothing to do
    await status.refresh_lag()  # Kafka answers the probe every few seconds meanwhile
    assert (await status.readiness())["ready"] is True

    probe.rows = [PartitionLag(BROWSE, 0, 30, 10), PartitionLag(BROWSE, 1, 5, 5)]
    await status.refresh()
    body = await status.readiness()
    assert body["ready"] is False
    assert body["reasons"][0].startswith("progress: stalled: lag 20 on assigned partitions")

    record = RawRecord(BROWSE, 0, 10, b"u-1", b"{oops")  # any batch counts as progress
    await worker.handle([record])
    assert (await status.readiness())["ready"] is True
    clock.now += 59
    await status.refresh_lag()
    assert (await status.readiness())["ready"] is True
    clock.now += 2
    await status.refresh_lag()
    assert (await status.readiness())["ready"] is False


async def test_lag_on_partitions_of_other_workers_does_not_make_this_one_not_ready() -> None:
    status, _, probe, clock, _ = make_status()
    status.on_assigned([(BROWSE, 0)])
    probe.rows = [PartitionLag(BROWSE, 0, 10, 10), PartitionLag(BROWSE, 1, 500, 0)]
    await status.refresh()
    clock.now += 3600
    await status.refresh_lag()
    body = await status.readiness()
    assert body["ready"] is True, body
    assert (
        status.metrics.registry.get_sample_value(
            "dealstream_consumer_lag", {"topic": BROWSE, "partition": "1"}
        )
        == 500
    )


async def test_a_failing_lag_measurement_keeps_the_last_values_and_says_so() -> None:
    status, _, probe, _, _ = make_status()
    probe.rows = [PartitionLag(BROWSE, 0, 10, 4)]
    await status.refresh()
    probe.fail = OSError("broker gone")
    await status.refresh()
    assert status.lag_error is not None and "broker gone" in status.lag_error
    assert (
        status.metrics.registry.get_sample_value(
            "dealstream_consumer_lag", {"topic": BROWSE, "partition": "0"}
        )
        == 6
    )
    body = await status.status()
    assert body["lag"]["error"] == status.lag_error
    assert body["lag"]["total"] == 6


async def test_refresh_reports_budgets_pending_labels_and_the_model() -> None:
    campaign = Campaign(
        "capped", ThresholdPolicy(threshold=0.0, discount_pct=10), daily_budget_cents=10_000
    )
    status, _, _, _, worker = make_status(campaign)
    event = {
        "event_id": "e-1",
        "user_id": "u-1",
        "type": "browse",
        "ts": T0,
        "item_id": "i-1",
        "category": "books",
        "price": 40.0,
        "action": "cart",
    }
    await worker.handle([RawRecord(BROWSE, 0, 0, b"u-1", orjson.dumps(event))])
    await status.refresh()
    spent = await worker.engine.ledger.budget_spent_cents("capped", event_day(T0))
    assert spent == 400
    registry = status.metrics.registry
    assert registry.get_sample_value("dealstream_budget_remaining", {"campaign": "capped"}) == 96.0
    assert registry.get_sample_value("dealstream_pending_labels") == 1
    assert registry.get_sample_value("dealstream_model_version_info", {"version": "lr-1"}) == 1
    body = await status.status()
    assert body["budgets"] == [
        {
            "campaign": "capped",
            "day": event_day(T0),
            "daily_budget": 100.0,
            "spent": 4.0,
            "remaining": 96.0,
        }
    ]
    assert body["pending_labels"] == 1
    assert body["model"]["version"] == "lr-1"
    orjson.dumps(body)


async def test_status_json_has_what_the_page_renders() -> None:
    status, _, probe, clock, worker = make_status()
    status.on_assigned([(BROWSE, 0)])
    probe.rows = [PartitionLag(BROWSE, 0, 10, 4, 0, T0 - 3000, T0), PartitionLag(SEARCH, 0, 0, 0)]
    await status.refresh()
    worker.counters.consumed += 50
    clock.now += 5
    await status.refresh()
    body = await status.status()
    for key in ("readiness", "lag", "rates", "model", "budgets", "counters", "rebalances"):
        assert key in body
    assert body["rates"]["consumed"] == 10.0
    first = body["lag"]["partitions"][0]
    assert (first["lag"], first["lag_seconds"], first["assigned_here"]) == (6, 3.0, True)
    assert body["lag"]["partitions"][1]["assigned_here"] is False
    assert body["assigned_partitions"] == [f"{BROWSE}[0]"]


def test_rates_come_from_the_samples_of_the_last_window() -> None:
    window = RateWindow(window_s=60)
    assert window.rates() == {}
    window.sample(0.0, {"consumed": 0})
    window.sample(10.0, {"consumed": 100})
    assert window.rates() == {"consumed": 10.0}
    for t in range(20, 200, 10):
        window.sample(float(t), {"consumed": 100 + (t - 10) * 2})
    assert window.rates() == pytest.approx({"consumed": 2.0})


def test_status_page_is_self_contained_and_inserts_values_as_text() -> None:
    page = STATUS_PAGE_HTML
    for element in (
        'id="ready"',
        'id="partitions"',
        'id="budgets"',
        'id="model"',
        'id="rates"',
        'id="stop-loss"',
    ):
        assert element in page
    assert "status.json" in page and "setTimeout(refresh, 2000)" in page
    assert "http://" not in page and "https://" not in page  # no CDN, no external asset
    assert "innerHTML" not in page


class FakeModelStore:
    def __init__(self, checkpoint: dict[str, Any] | None) -> None:
        self.value = checkpoint
        self.reads = 0

    async def checkpoint(self) -> dict[str, Any] | None:
        self.reads += 1
        return self.value


async def test_the_learners_published_metrics_become_model_quality_gauges() -> None:
    status, *_ = make_status()
    registry = status.metrics.registry
    auc = registry.get_sample_value("dealstream_model_auc")
    assert auc is not None and auc != auc  # NaN until the learner published metrics
    learned = PrequentialMetrics(window=100)
    for p, y in [(0.9, 1), (0.2, 0), (0.7, 1), (0.4, 0), (0.6, 0), (0.8, 1)]:
        learned.update(p, y)
    store = FakeModelStore({"version": "lr-6", "metrics": learned.to_state()})
    status.model_store = store  # type: ignore[assignment]
    await status.refresh()
    assert registry.get_sample_value("dealstream_model_auc") == pytest.approx(learned.auc)
    assert registry.get_sample_value("dealstream_model_log_loss") == pytest.approx(learned.log_loss)
    assert registry.get_sample_value("dealstream_model_label_rate") == pytest.approx(0.5)
    body = await status.status()
    assert body["model"]["published"]["model_version"] == "lr-6"
    assert body["model"]["published"]["auc"] == pytest.approx(learned.auc)

    store.value = {"version": "lr-7", "metrics": {"window": "broken"}}
    await status.refresh()  # a bad checkpoint is logged and ignored
    assert registry.get_sample_value("dealstream_model_auc") == pytest.approx(learned.auc)


async def test_labels_are_counted_by_outcome_and_treatment_and_readiness_is_a_gauge() -> None:
    status, _, _, _, worker = make_status()
    registry = status.metrics.registry
    assert registry.get_sample_value("dealstream_ready") == 0
    status.on_assigned([])
    await status.refresh()
    assert registry.get_sample_value("dealstream_ready") == 1

    event = {
        "event_id": "e-1",
        "user_id": "u-1",
        "type": "browse",
        "ts": T0,
        "item_id": "i-1",
        "category": "books",
        "price": 40.0,
        "action": "cart",
    }
    purchase = {
        "event_id": "p-1",
        "user_id": "u-1",
        "type": "purchase",
        "ts": T0 + 1000,
        "order_id": "o-1",
        "items": [{"item_id": "i-1", "category": "books", "price": 40.0, "quantity": 1}],
        "amount": 40.0,
    }
    await worker.handle(
        [
            RawRecord(BROWSE, 0, 0, b"u-1", orjson.dumps(event)),
            RawRecord(f"{PREFIX}events.purchase", 0, 0, b"u-1", orjson.dumps(purchase)),
        ]
    )
    assert worker.counters.training == 1
    labels = "dealstream_labels_total"
    assert registry.get_sample_value(labels, {"outcome": "converted", "treated": "true"}) == 1
    assert registry.get_sample_value(labels, {"outcome": "not_converted", "treated": "true"}) == 0


def test_the_cli_has_a_lag_command_with_json_and_group() -> None:
    from streams.cli.main import build_parser

    args = build_parser().parse_args(["lag", "--json", "--group", "other"])
    assert (args.command, args.json, args.group) == ("lag", True, "other")
    defaults = build_parser().parse_args(["lag"])
    assert (defaults.json, defaults.group) == (False, None)


# -- stop-loss -----------------------------------------------------------------------------------


def test_the_shared_stop_loss_state_wins_when_this_worker_has_not_seen_the_change() -> None:
    mine = StopLossStatus(False, None, 300, 0.4, 1.1, -0.3)
    assert current_stop_loss({"c": mine}, {"c": StopLossStatus(False, None, 310)}) == {"c": mine}
    # Another worker stopped the campaign since: its figures are unknown here.
    shared = StopLossStatus(True, T0, 320)
    assert current_stop_loss({"c": mine}, {"c": shared}) == {"c": shared}
    assert current_stop_loss({}, {"c": shared}) == {"c": shared}


async def test_refresh_reports_the_stop_loss_in_metrics_and_status() -> None:
    guarded = Campaign(
        "guarded",
        ThresholdPolicy(threshold=0.0, discount_pct=10),
        decision_interval_ms=0,
        holdout=0.2,
        stop_loss=StopLoss(window_ms=12 * 3_600_000, min_decisions=10**9, explore=0.1),
    )
    status, _, _, _, worker = make_status(guarded, Campaign("plain", ThresholdPolicy()))
    registry = status.metrics.registry
    labels = {"campaign": "guarded"}
    assert registry.get_sample_value("dealstream_stop_loss_stopped", labels) is None
    assert (await status.status())["stop_loss"] == []  # nothing read yet

    await status.refresh()
    assert registry.get_sample_value("dealstream_stop_loss_stopped", labels) == 0
    assert registry.get_sample_value("dealstream_stop_loss_stopped", {"campaign": "plain"}) is None

    # Another worker stops the campaign (the shared state changes under this worker).
    ledger = worker.engine.ledger
    assert isinstance(ledger, InMemoryLedger)
    ledger.stop_loss["guarded"].status = StopLossStatus(True, T0 - 3_600_000, 250, -0.8, -0.1, -1.5)
    event = {
        "event_id": "e-1",
        "user_id": "u-1",
        "type": "browse",
        "ts": T0,
        "item_id": "i-1",
        "category": "books",
        "price": 40.0,
        "action": "cart",
    }
    await status.refresh()
    assert registry.get_sample_value("dealstream_stop_loss_stopped", labels) == 1
    await worker.handle([RawRecord(BROWSE, 0, 0, b"u-1", orjson.dumps(event))])
    await status.refresh()
    body = await status.status()
    (row,) = body["stop_loss"]
    assert row["campaign"] == "guarded" and row["stopped"] is True
    assert row["since_ms"] == T0 - 3_600_000 and row["since_age_s"] == 3600.0  # event time
    assert (row["window_h"], row["min_decisions"], row["explore"]) == (12.0, 10**9, 0.1)
    # The batch re-evaluated the sums: one decision, too few users for an interval.
    assert (row["decisions"], row["incremental_margin"], row["upper_bound"]) == (1, None, None)
    margin = registry.get_sample_value("dealstream_stop_loss_incremental_margin", labels)
    assert margin is not None and math.isnan(margin)
    orjson.dumps(body)


# -- health, Kafka and the model in readiness ----------------------------------------------------


async def test_an_untrained_model_a_campaign_scores_with_is_not_ready() -> None:
    status, *_ = make_status(trained=False)
    status.on_assigned([])
    body = await status.readiness()
    assert body["ready"] is False
    assert body["reasons"] == [
        "model: model lr-0 is untrained and campaign(s) spring score with it: waiting for the "
        "learner's first model (DEALSTREAM_MODEL_VERIFY_KEY)"
    ]
    # A campaign that does not score (rules only) needs no model; a worker learning inline
    # trains its own.
    rules = Campaign("rules-only", RulesPolicy(rules=(Rule("cart_count_24h", ">=", 1, 5.0),)))
    for unneeded, inline in (((rules,), False), ((), True)):
        other, *_ = make_status(*unneeded, trained=False, learn_inline=inline)
        other.on_assigned([])
        assert (await other.readiness())["ready"] is True


async def test_kafka_not_answering_makes_the_worker_not_ready_within_the_bound() -> None:
    status, _, probe, clock, _ = make_status()
    status.on_assigned([])
    await status.refresh()
    assert (await status.readiness())["checks"]["kafka"]["ok"] is True
    probe.fail = TimeoutError()
    clock.now += KAFKA_STALE_S  # every refresh since failed: still within the bound
    await status.refresh()
    assert (await status.readiness())["ready"] is True
    clock.now += 1
    body = await status.readiness()
    assert body["ready"] is False
    assert body["reasons"] == [
        f"kafka: Kafka not answering for {KAFKA_STALE_S + 1:.0f} s (TimeoutError: )"
    ]
    probe.fail = None
    await status.refresh()
    assert (await status.readiness())["ready"] is True


async def test_without_any_answer_since_start_kafka_is_stale_after_the_bound() -> None:
    status, _, probe, clock, _ = make_status()
    status.on_assigned([])
    probe.fail = OSError("refused")
    clock.now += KAFKA_STALE_S + 0.5
    await status.refresh()
    assert "Kafka not answering" in (await status.readiness())["reasons"][0]


class FakeConsumer:
    def __init__(self) -> None:
        self.should_stop = False
        self.crashed = False


def test_health_fails_when_the_loop_stalls_or_the_consumer_stops() -> None:
    status, _, _, clock, _ = make_status()
    consumer = FakeConsumer()
    status.consumer = consumer
    assert status.health()[0] is True
    clock.now += LOOP_STALL_S + 1  # no tick: the loop was busy elsewhere
    ok, body = status.health()
    assert ok is False and body["checks"]["event_loop"]["ok"] is False
    status.heartbeat.beat()  # the loop turns again, but the late tick still shows once
    assert status.health()[0] is False
    clock.now += 1
    status.heartbeat.beat()
    assert status.health()[0] is True
    consumer.should_stop = True
    ok, body = status.health()
    assert ok is False and body["checks"]["consumer"] == {
        "ok": False,
        "detail": "the event consumer stopped",
    }
    consumer.should_stop, consumer.crashed = False, True
    assert status.health()[1]["checks"]["consumer"]["detail"] == "the event consumer crashed"
