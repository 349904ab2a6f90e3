"""Worker metrics: own registry, what each batch adds, money in currency units, no user ids."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.campaigns import Campaign
from engine.features.store import InMemoryFeatureStore
from engine.ledger import InMemoryLedger, event_day
from engine.pipeline import DiscountEngine, EngineConfig
from engine.policies.threshold import ThresholdPolicy
from engine.stop_loss import StopLoss, StopLossStatus
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.operations.metrics import TimedFeatureStore, TimedLedger, WorkerMetrics
from streams.settings import Topics
from streams.worker.batch_worker import BatchWorker
from tests.sinks import ListSink

T0 = 1_767_225_600_000
HOUR = 3_600_000
PREFIX = "m1."


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    """The value of one sample of the registry (0.0 when absent)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def samples(metrics: WorkerMetrics) -> Iterator[tuple[str, dict[str, str], float]]:
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, dict(s.labels), s.value


def browse(event_id: str, user: str, ts: int, price: float = 40.0) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "user_id": user,
        "type": "browse",
        "ts": ts,
        "item_id": "i-1",
        "category": "books",
        "price": price,
        "action": "cart",
    }


def raw(doc: dict[str, Any] | bytes, kind: str, offset: int, key: bytes | None) -> RawRecord:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return RawRecord(f"{PREFIX}events.{kind}", 0, offset, key, value)


def make_worker(
    *campaigns: Campaign, metrics: WorkerMetrics | None = None
) -> tuple[BatchWorker, DiscountEngine]:
    metrics = metrics if metrics is not None else WorkerMetrics()
    campaigns = campaigns or (
        Campaign("spring", ThresholdPolicy(threshold=0.0), decision_interval_ms=0),
    )
    config = EngineConfig(learn_inline=False)  # as live: one ledger call per batch
    ledger = InMemoryLedger(config.ledger_config(campaigns))
    engine = DiscountEngine(
        TimedFeatureStore(InMemoryFeatureStore(), metrics.redis_call.labels("features").observe),
        ledger=TimedLedger(ledger, metrics.redis_call.labels("ledger").observe),
        campaigns=campaigns,
        config=config,
    )
    worker = BatchWorker(
        engine,
        ListSink(),
        topics=Topics(PREFIX),
        limits=DecodeLimits(),
        wall_clock_ms=lambda: T0 + HOUR,
        metrics=metrics,
    )
    return worker, engine


def mixed_batch() -> list[RawRecord]:
    search = {"event_id": "s-1", "user_id": "u-2", "type": "search", "ts": T0, "query": "lamp"}
    return [
        raw(browse("e-1", "u-1", T0), "browse", 0, b"u-1"),  # applied
        raw(search, "search", 0, b"u-2"),  # applied
        raw(b"{oops", "browse", 1, b"u-1"),  # dead letter: invalid_json
        raw(browse("e-9", "u-1", T0), "browse", 2, None),  # dead letter: missing_key
        raw(browse("e-1", "u-1", T0), "browse", 3, b"u-1"),  # duplicate event id
        raw(browse("e-old", "u-1", T0 - 2 * HOUR), "browse", 4, b"u-1"),  # late
    ]


def test_each_worker_has_its_own_registry_and_the_global_one_stays_empty() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    assert first.registry is not second.registry
    first.events_applied.inc(3)
    assert sample(first, "dealstream_events_applied_total") == 3
    assert sample(second, "dealstream_events_applied_total") == 0
    assert REGISTRY.get_sample_value("dealstream_events_applied_total") is None
    given = CollectorRegistry()
    assert WorkerMetrics(given).registry is given


async def test_a_batch_is_counted_by_topic_type_outcome_and_reason() -> None:
    worker, _ = make_worker()
    metrics = worker.metrics
    await worker.handle(mixed_batch())

    consumed = "dealstream_events_consumed_total"
    assert sample(metrics, consumed, topic=f"{PREFIX}events.browse", type="browse") == 5
    assert sample(metrics, consumed, topic=f"{PREFIX}events.search", type="search") == 1
    assert sample(metrics, "dealstream_events_applied_total") == 2
    skipped = "dealstream_events_skipped_total"
    assert sample(metrics, skipped, reason="duplicate") == 1
    assert sample(metrics, skipped, reason="late") == 1
    assert sample(metrics, skipped, reason="redelivered") == 0
    dead = "dealstream_events_dead_lettered_total"
    assert sample(metrics, dead, reason="invalid_json") == 1
    assert sample(metrics, dead, reason="missing_key") == 1
    assert sample(metrics, "dealstream_batch_size_count") == 1
    assert sample(metrics, "dealstream_batch_size_sum") == 6
    assert sample(metrics, "dealstream_decisions_total", campaign="spring") == 2
    assert sample(metrics, "dealstream_offers_total", campaign="spring") == 2
    assert sample(metrics, "dealstream_redis_call_seconds_count", script="features") == 1
    assert sample(metrics, "dealstream_redis_call_seconds_count", script="ledger") == 1
    assert metrics.last_batch_at is not None

    # Every record counted once: the metrics agree with the worker's own counters.
    counters = worker.counters
    total_consumed = sum(value for name, _, value in samples(metrics) if name == consumed)
    assert total_consumed == counters.consumed == 6
    assert counters.balanced()

    await worker.handle(mixed_batch())  # redelivered after a rebalance
    assert sample(metrics, skipped, reason="redelivered") == 4
    assert sample(metrics, "dealstream_events_applied_total") == 2
    assert sample(metrics, "dealstream_offers_total", campaign="spring") == 2


async def test_decision_latency_is_the_age_of_the_trigger_event_when_the_offer_goes_out() -> None:
    worker, _ = make_worker()
    await worker.handle([raw(browse("e-1", "u-1", T0 + HOUR - 1500), "browse", 0, b"u-1")])
    metrics = worker.metrics
    latency = "dealstream_decision_latency_seconds"
    assert sample(metrics, f"{latency}_count") == 1
    assert sample(metrics, f"{latency}_sum") == pytest.approx(1.5)
    assert sample(metrics, f"{latency}_bucket", le="1.0") == 0
    assert sample(metrics, f"{latency}_bucket", le="2.5") == 1


async def test_discount_spend_matches_what_the_ledger_charged_to_the_budget() -> None:
    campaign = Campaign(
        "capped",
        ThresholdPolicy(threshold=0.0, discount_pct=10),
        decision_interval_ms=0,
        daily_budget_cents=5_000,
    )
    worker, engine = make_worker(campaign)
    batch = [
        raw(browse(f"e-{n}", f"u-{n}", T0 + n, price=12.345 + n), "browse", n, f"u-{n}".encode())
        for n in range(60)
    ]
    await worker.handle(batch)
    spent_cents = await engine.ledger.budget_spent_cents("capped", event_day(T0))
    assert 0 < spent_cents <= 5_000
    metrics = worker.metrics
    spend = sample(metrics, "dealstream_discount_spend_total", campaign="capped")
    assert spend == pytest.approx(spent_cents / 100)
    offers = sample(metrics, "dealstream_offers_total", campaign="capped")
    assert offers == worker.counters.offers < 60  # the budget ran out before the last events


async def test_holdout_decisions_are_counted_apart() -> None:
    everyone = Campaign("all-in", ThresholdPolicy(threshold=0.0), decision_interval_ms=0)
    control = Campaign(
        "all-out", ThresholdPolicy(threshold=0.0), decision_interval_ms=0, holdout=1.0
    )
    worker, _ = make_worker(everyone, control)
    batch = [raw(browse(f"e-{n}", f"u-{n}", T0), "browse", n, f"u-{n}".encode()) for n in range(5)]
    await worker.handle(batch)
    metrics = worker.metrics
    assert sample(metrics, "dealstream_holdout_decisions_total", campaign="all-out") == 5
    assert sample(metrics, "dealstream_decisions_total", campaign="all-out") == 5
    assert sample(metrics, "dealstream_offers_total", campaign="all-out") == 0
    assert sample(metrics, "dealstream_holdout_decisions_total", campaign="all-in") == 0
    assert sample(metrics, "dealstream_offers_total", campaign="all-in") == 5


async def test_no_label_carries_a_user_id() -> None:
    worker, _ = make_worker()
    users = [f"user-{n:04d}" for n in range(20)]
    batch = [
        raw(browse(f"e-{n}", user, T0 + n), "browse", n, user.encode())
        for n, user in enumerate(users)
    ]
    await worker.handle(batch)
    worker.metrics.observe_lag([(f"{PREFIX}events.browse", 0, 3, 1.5)])
    worker.metrics.observe_model("lr-7", 7)
    labels = [value for _, labels, _ in samples(worker.metrics) for value in labels.values()]
    assert labels
    assert not [v for v in labels if any(user in v for user in users)]


def test_every_metric_follows_prometheus_naming() -> None:
    metrics = WorkerMetrics()
    metrics.declare_campaigns(["spring"])
    metrics.observe_model("lr-0", 0)
    families = {family.name: family for family in metrics.registry.collect()}
    for name, family in families.items():
        assert name.startswith("dealstream_"), name
        if family.type == "counter":
            assert not name.endswith("_total")  # the client adds it to the sample name
            assert all(s.name in (f"{name}_total", f"{name}_created") for s in family.samples)
        if family.type == "histogram" and name != "dealstream_batch_size":
            assert name.endswith("_seconds"), name
    expected = {
        "dealstream_events_consumed",
        "dealstream_events_applied",
        "dealstream_events_skipped",
        "dealstream_events_dead_lettered",
        "dealstream_batch_size",
        "dealstream_decision_latency_seconds",
        "dealstream_redis_call_seconds",
        "dealstream_gc_pause_seconds",
        "dealstream_offers",
        "dealstream_discount_spend",
        "dealstream_budget_remaining",
        "dealstream_holdout_decisions",
        "dealstream_decisions",
        "dealstream_model_version",
        "dealstream_model_examples",
        "dealstream_model_age_seconds",
        "dealstream_rebalances",
        "dealstream_assigned_partitions",
        "dealstream_feature_records_held",
        "dealstream_feature_record_bytes_held",
        "dealstream_pending_labels",
        "dealstream_consumer_lag",
        "dealstream_consumer_lag_seconds",
    }
    assert expected <= set(families)
    assert sample(metrics, "dealstream_offers_total", campaign="spring") == 0


def test_model_gauges_follow_the_serving_version_and_its_age() -> None:
    now = [100.0]
    metrics = WorkerMetrics(monotonic=lambda: now[0])
    metrics.observe_model("lr-0", 0)
    now[0] = 130.0
    assert sample(metrics, "dealstream_model_age_seconds") == 30.0
    metrics.observe_model("lr-0", 0)  # the same model: age goes on
    assert sample(metrics, "dealstream_model_age_seconds") == 30.0
    metrics.observe_model("lr-500", 500)
    assert sample(metrics, "dealstream_model_age_seconds") == 0.0
    assert sample(metrics, "dealstream_model_examples") == 500
    assert sample(metrics, "dealstream_model_version_info", version="lr-500") == 1
    assert (
        metrics.registry.get_sample_value("dealstream_model_version_info", {"version": "lr-0"})
        is None
    )


def test_lag_series_are_replaced_so_vanished_partitions_disappear() -> None:
    metrics = WorkerMetrics()
    metrics.observe_lag([("t", 0, 5, 2.0), ("t", 1, 0, 0.0)])
    assert sample(metrics, "dealstream_consumer_lag", topic="t", partition="0") == 5
    assert sample(metrics, "dealstream_consumer_lag_seconds", topic="t", partition="0") == 2.0
    metrics.observe_lag([("t", 1, 7, None)])
    assert (
        metrics.registry.get_sample_value(
            "dealstream_consumer_lag", {"topic": "t", "partition": "0"}
        )
        is None
    )
    assert sample(metrics, "dealstream_consumer_lag", topic="t", partition="1") == 7
    # An unknown time lag is left out rather than reported as 0.
    assert (
        metrics.registry.get_sample_value(
            "dealstream_consumer_lag_seconds", {"topic": "t", "partition": "1"}
        )
        is None
    )


def test_rebalances_count_assignments_and_the_gauge_follows_the_partitions() -> None:
    metrics = WorkerMetrics()
    metrics.observe_assignment(4, rebalance=True)
    metrics.observe_assignment(2, rebalance=False)
    metrics.observe_assignment(6, rebalance=True)
    assert sample(metrics, "dealstream_rebalances_total") == 2
    assert sample(metrics, "dealstream_assigned_partitions") == 6


async def test_timed_wrappers_pass_calls_through() -> None:
    observed: list[float] = []
    ledger = TimedLedger(InMemoryLedger(), observed.append)
    store = TimedFeatureStore(InMemoryFeatureStore(), observed.append)
    assert await ledger.pending_count() == 0
    assert await ledger.budget_spent_cents("x", 1) == 0
    assert "nobody" in await store.read_states(["nobody"])
    assert await store.watermarks() == {}
    assert await store.forget("nobody") == 0
    assert observed == []  # only the per-batch script calls are timed
    await ledger.settle([], now_ms=T0)
    await store.apply_batch([], allowed_lateness_ms=0)
    assert len(observed) == 2 and all(d >= 0 for d in observed)


# -- stop-loss ------------------------------------------------------------------------------------


def stop_loss_campaign(explore: float = 0.5) -> Campaign:
    return Campaign(
        "guarded",
        ThresholdPolicy(threshold=0.0, discount_pct=10),
        decision_interval_ms=0,
        holdout=0.2,
        stop_loss=StopLoss(min_decisions=10**9, explore=explore),  # the state stays as set
    )


def hold_stopped(engine: DiscountEngine, name: str, since_ms: int) -> StopLossStatus:
    ledger = engine.ledger
    assert isinstance(ledger, TimedLedger) and isinstance(ledger.inner, InMemoryLedger)
    stopped = StopLossStatus(stopped=True, since_ms=since_ms)
    ledger.inner.stop_loss[name].status = stopped
    engine.stop_loss[name] = stopped
    return stopped


def test_stop_loss_gauges_mirror_the_status_and_unknown_figures_are_nan() -> None:
    metrics = WorkerMetrics()
    metrics.observe_stop_loss(
        {
            "losing": StopLossStatus(True, T0, 480, -1.25, -0.5, -2.0),
            "young": StopLossStatus(decisions=3),
        }
    )
    assert sample(metrics, "dealstream_stop_loss_stopped", campaign="losing") == 1
    assert sample(metrics, "dealstream_stop_loss_decisions", campaign="losing") == 480
    assert sample(metrics, "dealstream_stop_loss_incremental_margin", campaign="losing") == -1.25
    assert sample(metrics, "dealstream_stop_loss_upper_bound", campaign="losing") == -0.5
    assert sample(metrics, "dealstream_stop_loss_lower_bound", campaign="losing") == -2.0
    assert sample(metrics, "dealstream_stop_loss_stopped", campaign="young") == 0
    for name in ("incremental_margin", "upper_bound", "lower_bound"):
        value = sample(metrics, f"dealstream_stop_loss_{name}", campaign="young")
        assert math.isnan(value), name  # unknown, not "breaks even"


def test_stop_loss_gauges_wait_for_a_status_but_the_counters_start_at_zero() -> None:
    metrics = WorkerMetrics()
    metrics.declare_stop_loss(["guarded"])
    labels = {"campaign": "guarded"}
    assert metrics.registry.get_sample_value("dealstream_stop_loss_stopped", labels) is None
    explore_only = "dealstream_stop_loss_explore_only_decisions_total"
    for explored in ("true", "false"):
        value = metrics.registry.get_sample_value(explore_only, {**labels, "explored": explored})
        assert value == 0


async def test_a_batch_sets_the_stop_loss_gauges_and_counts_explore_only_decisions() -> None:
    worker, engine = make_worker(stop_loss_campaign())
    metrics = worker.metrics
    labels = {"campaign": "guarded"}
    await worker.handle([raw(browse("e-0", "u-0", T0), "browse", 0, b"u-0")])
    assert metrics.registry.get_sample_value("dealstream_stop_loss_stopped", labels) == 0
    assert sample(metrics, "dealstream_stop_loss_decisions", campaign="guarded") == 1

    hold_stopped(engine, "guarded", T0)
    batch = [
        raw(browse(f"e-{n}", f"u-{n}", T0 + n), "browse", n, f"u-{n}".encode())
        for n in range(1, 201)
    ]
    result = await worker.handle(batch)
    assert sample(metrics, "dealstream_stop_loss_stopped", campaign="guarded") == 1
    treated = [d for d in result.decisions if not d.holdout]
    explored = [d for d in treated if d.offer_id is not None]
    assert treated and explored and len(explored) < len(treated)
    explore_only = "dealstream_stop_loss_explore_only_decisions_total"
    assert sample(metrics, explore_only, campaign="guarded", explored="true") == len(explored)
    assert sample(metrics, explore_only, campaign="guarded", explored="false") == len(
        treated
    ) - len(explored)
    # Holdout decisions are not made "in explore-only mode": they never get an offer anyway.
    assert sum(v for name, _, v in samples(metrics) if name == explore_only) == len(treated)
