"""Prometheus metrics of one worker, in a registry of its own.

``WorkerMetrics`` owns a ``CollectorRegistry`` (never the library's global one) and every metric
the worker exports; the composition root (``streams/worker/faust_app.py``) builds one per worker
and passes it to ``BatchWorker`` and to the web endpoints. Nothing is created at import time.

Naming follows Prometheus conventions: counters end in ``_total``, durations are ``_seconds``
histograms, money is in currency units (not cents). Labels never carry user ids: only topic,
partition, event type, skip/dead-letter reason codes, campaign names, script names and the model
version.

Stop-loss gauges (``observe_stop_loss``) mirror each stop-loss campaign's ``StopLossStatus``;
its figures are NaN while unknown (too few users in an arm), as the model quality gauges:
a missing series would hide the campaign, 0 would read as "breaks even".

``TimedFeatureStore`` and ``TimedLedger`` wrap the engine's store and ledger so that the duration
of their one-Redis-call-per-batch methods lands in ``dealstream_redis_call_seconds``, without the
engine knowing about metrics.
"""

from __future__ import annotations

import math
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from engine.features.state import State
from engine.features.store import BatchOutcome, StateUpdate, UpdateStatus
from engine.ledger import LedgerOp, LedgerResult
from engine.pipeline import BatchResult
from engine.ports import DecisionLedger, FeatureStore
from engine.stop_loss import EXPLORE_ONLY, EXPLORED, StopLossStatus
from streams.adapters.decode import DeadLetter, RawRecord

# fmt: off
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)
DECISION_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 6 * 3600.0, 86_400.0,
)
"""Up to a day: replayed events can be that old when their offers go out."""
REDIS_CALL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# fmt: on

SKIP_REASONS = {
    UpdateStatus.REDELIVERED: "redelivered",
    UpdateStatus.DUPLICATE: "duplicate",
    UpdateStatus.LATE: "late",
    UpdateStatus.FORGOTTEN: "forgotten",
}

UNKNOWN_TYPE = "unknown"
RATE_WINDOW_S = 60.0


class WorkerMetrics:
    """Every metric of one worker process, registered in ``self.registry``."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._monotonic = monotonic
        r = self.registry
        self.events_consumed = Counter(
            "dealstream_events_consumed",
            "Records consumed from the event topics, by topic and the event type it carries.",
            ["topic", "type"],
            registry=r,
        )
        self.events_applied = Counter(
            "dealstream_events_applied",
            "Events applied to the feature store (counted once, whatever the redeliveries).",
            registry=r,
        )
        self.events_skipped = Counter(
            "dealstream_events_skipped",
            "Valid events not applied: redelivered (at or below the partition watermark), "
            "duplicate (event id already applied), late (beyond the allowed lateness) or "
            "forgotten (the user's `dealstream forget` tombstone lives).",
            ["reason"],
            registry=r,
        )
        for reason in SKIP_REASONS.values():  # a fixed set: every series exists from the start
            self.events_skipped.labels(reason)
        self.events_dead_lettered = Counter(
            "dealstream_events_dead_lettered",
            "Records sent to the dead-letter topic, by error code.",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "dealstream_batch_size",
            "Records per micro-batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.decision_latency = Histogram(
            "dealstream_decision_latency_seconds",
            "Event time of the trigger event to the offer handed to the producer (wall clock). "
            "Replays of old events show their age here: read it for live traffic only.",
            buckets=DECISION_LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_call = Histogram(
            "dealstream_redis_call_seconds",
            "Duration of the one Redis script call per micro-batch, by script.",
            ["script"],
            buckets=REDIS_CALL_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "dealstream_gc_pause_seconds",
            "Collections of Python's cyclic garbage collector in this worker, by generation "
            "(0 young, 2 full), and how long each paused the worker: a pause adds to the "
            "latency of every decision in flight.",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=r,
        )
        for generation in ("0", "1", "2"):
            self.gc_pause.labels(generation)
        self.redis_replication_shortfalls = Counter(
            "dealstream_redis_replication_shortfalls",
            "Batch calls that fewer Redis replicas acknowledged than "
            "DEALSTREAM_REDIS_WAIT_REPLICAS "
            "within DEALSTREAM_REDIS_WAIT_TIMEOUT_S (the batch is retried, never committed).",
            registry=r,
        )
        self.offers = Counter(
            "dealstream_offers", "Offers produced, by campaign.", ["campaign"], registry=r
        )
        self.discount_spend = Counter(
            "dealstream_discount_spend",
            "Discount granted in offers (currency units, as charged to the daily budget).",
            ["campaign"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "dealstream_budget_remaining",
            "Daily budget left for the current event-time day (currency units), campaigns with a "
            "budget only; shared by all workers.",
            ["campaign"],
            registry=r,
        )
        self.decisions = Counter(
            "dealstream_decisions",
            "Decisions made (offer or not, holdout included), by campaign.",
            ["campaign"],
            registry=r,
        )
        self.holdout_decisions = Counter(
            "dealstream_holdout_decisions",
            "Decisions for holdout (control group) users, by campaign.",
            ["campaign"],
            registry=r,
        )
        self.stop_loss_stopped = Gauge(
            "dealstream_stop_loss_stopped",
            "1 while the campaign's stop-loss holds it to exploration only, else 0 (shared by "
            "all workers; as of this worker's last batch or refresh).",
            ["campaign"],
            registry=r,
        )
        self.stop_loss_figures = {
            name: Gauge(
                f"dealstream_stop_loss_{name}",
                f"{text} of the campaign's incremental margin per decision against its holdout "
                "(currency units per sampled decision, over the stop-loss window); NaN while "
                "unknown (too few users in an arm).",
                ["campaign"],
                registry=r,
            )
            for name, text in (
                ("incremental_margin", "Estimate"),
                ("upper_bound", "95 % upper bound"),
                ("lower_bound", "95 % lower bound"),
            )
        }
        self.stop_loss_decisions = Gauge(
            "dealstream_stop_loss_decisions",
            "Sampled decisions (treated proposals and holdout would-be offers) in the campaign's "
            "stop-loss window.",
            ["campaign"],
            registry=r,
        )
        self.explore_only_decisions = Counter(
            "dealstream_stop_loss_explore_only_decisions",
            "Non-holdout decisions made while the campaign was stopped; explored=true when the "
            "draw let the policy's offer through.",
            ["campaign", "explored"],
            registry=r,
        )
        self.model_version = Info(
            "dealstream_model_version", "The model version this worker scores with.", registry=r
        )
        self.model_examples = Gauge(
            "dealstream_model_examples",
            "Training examples the serving model has learned from.",
            registry=r,
        )
        self.model_age = Gauge(
            "dealstream_model_age_seconds",
            "Seconds since this worker started serving its current model version.",
            registry=r,
        )
        self.model_quality = {
            name: Gauge(
                f"dealstream_model_{name}",
                f"Prequential {text} of the latest model the learner published, over its "
                "metrics window (from the learner's checkpoint); NaN while undefined.",
                registry=r,
            )
            for name, text in (
                ("log_loss", "log loss"),
                ("auc", "ROC AUC"),
                ("ece", "expected calibration error"),
                ("label_rate", "positive label rate"),
            )
        }
        for gauge in self.model_quality.values():
            gauge.set(math.nan)
        self.labels = Counter(
            "dealstream_labels",
            "Decisions labelled (training examples emitted): outcome converted or not, treated "
            "when the decision carried a discount.",
            ["outcome", "treated"],
            registry=r,
        )
        for outcome in ("converted", "not_converted"):
            for treated in ("true", "false"):
                self.labels.labels(outcome, treated)
        self.ready = Gauge(
            "dealstream_ready",
            "1 when the worker's readiness checks pass (as /ready), else 0; updated every few s.",
            registry=r,
        )
        self.rebalances = Counter(
            "dealstream_rebalances",
            "Partition assignments this worker received (one per completed rebalance).",
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "dealstream_assigned_partitions",
            "Event-topic partitions currently assigned to this worker.",
            registry=r,
        )
        self.feature_records_held = Gauge(
            "dealstream_feature_records_held",
            "Users whose feature records this worker holds in memory (its own partitions' users; "
            "bounded by DEALSTREAM_STATE_CACHE_USERS).",
            registry=r,
        )
        self.feature_record_bytes_held = Gauge(
            "dealstream_feature_record_bytes_held",
            "Bytes of the feature records this worker holds, encoded as Redis keeps them (decoded "
            "only while a batch applies).",
            registry=r,
        )
        self.events_held = Gauge(
            "dealstream_events_held",
            "Events consumed and held back until every lagging topic of their partition has "
            "caught up with their event time (docs/delivery.md); bounded by pausing.",
            registry=r,
        )
        self.pending_labels = Gauge(
            "dealstream_pending_labels",
            "Decisions waiting for a label (purchase or window expiry), all campaigns; shared.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "dealstream_consumer_lag",
            "Records not yet committed by the consumer group (log end - committed offset), from "
            "the broker; every worker reports every partition of the group.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "dealstream_consumer_lag_seconds",
            "Age of the oldest unprocessed record (its Kafka timestamp); 0 when lag is 0.",
            ["topic", "partition"],
            registry=r,
        )
        self._model_key: tuple[str, int] | None = None
        self._model_since = self._monotonic()
        self.model_age.set_function(self.model_age_seconds)
        self.last_batch_at: float | None = None
        """Monotonic time of the last micro-batch handled (for readiness: stall detection)."""

    def record_batch(
        self,
        records: Sequence[RawRecord],
        result: BatchResult,
        dead: Sequence[DeadLetter],
        *,
        type_of: Callable[[str], str | None],
        now_ms: int,
        spend_cents: Mapping[str, int],
    ) -> None:
        """Count one micro-batch: its records, their outcome, and what came out of it.

        ``type_of`` names the event type a topic carries; ``spend_cents`` is the discount each
        campaign granted in this batch's offers.
        """
        self.batch_size.observe(len(records))
        for topic, n in Tally(record.topic for record in records).items():
            self.events_consumed.labels(topic, type_of(topic) or UNKNOWN_TYPE).inc(n)
        statuses = Tally(result.statuses)
        applied = statuses.pop(UpdateStatus.APPLIED, 0)
        if applied:
            self.events_applied.inc(applied)
        for status, n in statuses.items():
            self.events_skipped.labels(SKIP_REASONS[status]).inc(n)
        for code, n in Tally(letter.code for letter in dead).items():
            self.events_dead_lettered.labels(code).inc(n)
        for offer in result.offers:
            self.offers.labels(offer.campaign).inc()
            self.decision_latency.observe(max(0.0, (now_ms - offer.issued_at) / 1000))
        for campaign, cents in spend_cents.items():
            if cents:
                self.discount_spend.labels(campaign).inc(cents / 100)
        for example in result.training:
            outcome = "converted" if example.label == 1 else "not_converted"
            treated = "true" if example.discount_pct > 0 else "false"
            self.labels.labels(outcome, treated).inc()
        for decision in result.decisions:
            campaign = decision.campaign
            self.decisions.labels(campaign).inc()
            if decision.holdout:
                self.holdout_decisions.labels(campaign).inc()
            if EXPLORE_ONLY in decision.rules:
                explored = "true" if EXPLORED in decision.rules else "false"
                self.explore_only_decisions.labels(campaign, explored).inc()
        self.observe_stop_loss(result.stop_loss)
        self.last_batch_at = self._monotonic()

    def declare_campaigns(self, campaigns: Iterable[str]) -> None:
        """Create the per-campaign series at zero, so that rates exist before the first offer."""
        for name in campaigns:
            for counter in (self.offers, self.discount_spend, self.decisions):
                counter.labels(name)
            self.holdout_decisions.labels(name)

    def declare_stop_loss(self, campaigns: Iterable[str]) -> None:
        """Create the explore-only counters of stop-loss campaigns at zero. The gauges wait
        for the first status read: a guessed 0 would say "active" for a stopped campaign."""
        for name in campaigns:
            for explored in ("true", "false"):
                self.explore_only_decisions.labels(name, explored)

    def observe_stop_loss(self, statuses: Mapping[str, StopLossStatus]) -> None:
        """Set the stop-loss gauges of each campaign from its status."""
        for campaign, status in statuses.items():
            self.stop_loss_stopped.labels(campaign).set(1 if status.stopped else 0)
            self.stop_loss_decisions.labels(campaign).set(status.decisions)
            for name, value in (
                ("incremental_margin", status.incremental_margin),
                ("upper_bound", status.upper_bound),
                ("lower_bound", status.lower_bound),
            ):
                self.stop_loss_figures[name].labels(campaign).set(
                    math.nan if value is None else value
                )

    def observe_model(self, version: str, examples: int) -> None:
        if self._model_key == (version, examples):
            return
        self._model_key = (version, examples)
        self.model_version.info({"version": version})
        self.model_examples.set(examples)
        self._model_since = self._monotonic()

    def observe_model_quality(self, values: Mapping[str, float | int | None]) -> None:
        """Set the prequential gauges from the learner's metrics; undefined ones (no labels
        yet, one class only) are NaN: 0 would read as a terrible model."""
        for name, gauge in self.model_quality.items():
            value = values.get(name)
            gauge.set(math.nan if value is None else float(value))

    def model_age_seconds(self) -> float:
        return self._monotonic() - self._model_since

    def observe_assignment(self, partitions: int, *, rebalance: bool) -> None:
        if rebalance:
            self.rebalances.inc()
        self.assigned_partitions.set(partitions)

    def observe_lag(self, rows: Iterable[tuple[str, int, int, float | None]]) -> None:
        """Replace the lag series with ``(topic, partition, lag, lag_seconds)`` rows; series of
        partitions that are gone disappear. Runs without awaiting, so a scrape never sees a
        half-updated set."""
        self.consumer_lag.clear()
        self.consumer_lag_seconds.clear()
        for topic, partition, lag, seconds in rows:
            self.consumer_lag.labels(topic, str(partition)).set(lag)
            if seconds is not None:
                self.consumer_lag_seconds.labels(topic, str(partition)).set(seconds)


class RateWindow:
    """Per-second rates of some counters over the last ``window_s`` seconds of samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def sample(self, now: float, values: dict[str, int]) -> None:
        self._samples.append((now, dict(values)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rates(self) -> dict[str, float]:
        if len(self._samples) < 2:
            return {}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return {}
        return {name: round((last[name] - first.get(name, 0)) / (t1 - t0), 3) for name in last}


class TimedFeatureStore:
    """A feature store whose ``apply_batch`` calls are timed into a histogram."""

    def __init__(self, inner: FeatureStore, observe: Callable[[float], None]) -> None:
        self.inner = inner
        self._observe = observe

    async def apply_batch(
        self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int
    ) -> BatchOutcome:
        started = time.perf_counter()
        try:
            return await self.inner.apply_batch(updates, allowed_lateness_ms=allowed_lateness_ms)
        finally:
            self._observe(time.perf_counter() - started)

    async def read_states(self, user_ids: Iterable[str]) -> dict[str, State]:
        return await self.inner.read_states(user_ids)

    async def watermarks(self) -> dict[tuple[str, int], int]:
        return await self.inner.watermarks()

    async def forget(self, user_id: str) -> int:
        return await self.inner.forget(user_id)


class TimedLedger:
    """A decision ledger whose ``settle`` calls are timed into a histogram."""

    def __init__(self, inner: DecisionLedger, observe: Callable[[float], None]) -> None:
        self.inner = inner
        self._observe = observe

    async def settle(
        self, ops: Sequence[LedgerOp], *, now_ms: int, lanes: Mapping[int, int] | None = None
    ) -> LedgerResult:
        started = time.perf_counter()
        try:
            return await self.inner.settle(ops, now_ms=now_ms, lanes=lanes)
        finally:
            self._observe(time.perf_counter() - started)

    def settle_due(self, lane: int, now_ms: int) -> bool:
        return self.inner.settle_due(lane, now_ms)

    def rate_limited(self, user_id: str, campaign: str, ts: int, interval_ms: int) -> bool:
        return self.inner.rate_limited(user_id, campaign, ts, interval_ms)

    async def stop_loss_status(self) -> dict[str, StopLossStatus]:
        return await self.inner.stop_loss_status()

    async def budget_spent_cents(self, campaign: str, day: int) -> int:
        return await self.inner.budget_spent_cents(campaign, day)

    async def pending_count(self) -> int:
        return await self.inner.pending_count()
