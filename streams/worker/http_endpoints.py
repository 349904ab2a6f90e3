"""The worker's HTTP side: what it knows about itself, and the endpoints that show it.

``WorkerStatus`` follows the partition assignment (the event consumer's rebalance listener,
``streams/worker/consumer.py``), refreshes the broker-side consumer lag, the budgets, the
pending labels, the stop-loss states and the model gauges every few seconds (``refresh``), and
answers readiness. ``install_routes`` serves, on
Faust's web server:

- ``/metrics``      Prometheus exposition of the worker's own registry;
- ``/health``       200 while the event loop turns and the event consumer runs, else 503: a
                    heartbeat ticks every second, and a tick missing or late by more than
                    ``LOOP_STALL_S`` means the loop was wedged;
- ``/ready``        200 or 503, with a JSON body giving each check and why it failed (Kafka
                    not answered for ``KAFKA_STALE_S``, an untrained model a campaign scores
                    with, Redis, partitions, progress);
- ``/status.json``  everything the status page shows;
- ``/``             a self-contained status page (no external assets) refreshing itself.

With ``DEALSTREAM_HTTP_TOKEN`` set, ``/status.json`` answers only requests bearing it
(``Authorization: Bearer <token>``; the page sends what follows ``#token=`` in its address).
``/``, ``/health``, ``/ready`` and ``/metrics`` stay open: the page is static, probes and
scrapers carry no secrets, and none of them shows a user id (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import faust
import redis.asyncio as aioredis
from faust.web import Request, Response, View
from prometheus_client.exposition import choose_encoder
from redis.exceptions import RedisClusterException

from engine.campaigns import Campaign
from engine.ledger import event_day
from engine.model.prequential import PrequentialMetrics
from engine.stop_loss import StopLossStatus
from streams.adapters.model_store import ModelStore
from streams.adapters.redis_client import RedisClient, ping
from streams.operations.http_auth import CHALLENGE, UNAUTHORIZED, bearer_ok
from streams.operations.lag import PartitionLag, total_lag
from streams.operations.metrics import RateWindow
from streams.operations.status_page import STATUS_PAGE_HTML
from streams.settings import Secret
from streams.worker.batch_worker import BatchWorker
from streams.worker.consumer import TopicPartitionKey

log = logging.getLogger("dealstream.worker")

REFRESH_INTERVAL_S = 5.0
"""How often ``refresh`` runs (a Faust timer in ``streams/worker/faust_app.py``)."""
STALL_TIMEOUT_S = 60.0
"""Not ready when assigned partitions have lag but no batch was handled for this long."""
REDIS_PING_TIMEOUT_S = 1.0
LAG_TIMEOUT_S = 15.0
HEARTBEAT_INTERVAL_S = 1.0
LOOP_STALL_S = 10.0
"""``/health`` fails when the heartbeat has not ticked, or last ticked late, by this much."""
KAFKA_STALE_S = 20.0
"""Not ready when Kafka has not answered the lag probe (every ``REFRESH_INTERVAL_S``) for this
long: false within 20 s of Kafka stopping, whatever the probe's own timeout."""


class LagSource(Protocol):
    """Where lag comes from: ``streams.operations.lag.LagProbe`` on the broker, or a test double."""

    async def measure(self, group: str, topics: Sequence[str]) -> list[PartitionLag]: ...

    async def close(self) -> None: ...


class ServiceState(Protocol):
    """What ``/health`` reads of the event consumer (a mode ``Service``)."""

    @property
    def should_stop(self) -> bool: ...

    @property
    def crashed(self) -> bool: ...


class Heartbeat:
    """Ticks on the event loop (a Faust timer); how long the loop went without turning."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.last = monotonic()
        self.last_gap = 0.0

    def beat(self) -> None:
        now = self._monotonic()
        self.last_gap = now - self.last
        self.last = now

    def stalled_s(self) -> float:
        """The longer of the time since the last tick and the gap before it: a loop wedged
        then freed still shows until the next tick."""
        return max(self._monotonic() - self.last, self.last_gap)


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def current_stop_loss(
    cached: Mapping[str, StopLossStatus], shared: Mapping[str, StopLossStatus]
) -> dict[str, StopLossStatus]:
    """Each campaign's stop-loss status to show: this worker's last evaluation (with its
    figures) while the shared state in Redis agrees with it, else the shared state.

    Another worker may have stopped or resumed the campaign since this one last settled a
    batch (an idle worker settles none); the figures of that change are unknown here.
    """
    current: dict[str, StopLossStatus] = {}
    for name, state in shared.items():
        mine = cached.get(name)
        if mine is not None and (mine.stopped, mine.since_ms) == (state.stopped, state.since_ms):
            state = mine
        current[name] = state
    return current


def stop_loss_row(campaign: Campaign, status: StopLossStatus, clock_ms: int) -> dict[str, Any]:
    """One campaign's stop-loss on the status page (money in currency units per decision)."""
    config = campaign.stop_loss
    assert config is not None
    since = status.since_ms
    return {
        "campaign": campaign.name,
        "stopped": status.stopped,
        "since_ms": since,
        "since_age_s": (
            round((clock_ms - since) / 1000, 1) if since is not None and clock_ms else None
        ),
        "decisions": status.decisions,
        "incremental_margin": status.incremental_margin,
        "lower_bound": status.lower_bound,
        "upper_bound": status.upper_bound,
        "window_h": config.window_ms / 3_600_000,
        "min_decisions": config.min_decisions,
        "explore": config.explore,
    }


class WorkerStatus:
    """The worker's view of itself: assignment, lag, budgets, stop-loss, model, readiness."""

    def __init__(
        self,
        worker: BatchWorker,
        *,
        redis: RedisClient,
        group: str,
        redis_prefix: str = "ds:",
        probe: LagSource | None,
        model_store: ModelStore | None = None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        redis_timeout_s: float = REDIS_PING_TIMEOUT_S,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.worker = worker
        self.metrics = worker.metrics
        self.redis = redis
        self.redis_prefix = redis_prefix
        """Where the deployment's keys are: ``/ready`` PINGs the node that serves them."""
        self.group = group
        self.topics: tuple[str, ...] = tuple(worker.topics.events)
        self.probe = probe
        self.model_store = model_store
        """Where the learner's checkpoint (its prequential metrics) is read from."""
        self.model_quality: dict[str, Any] = {}
        self._quality_key: tuple[Any, Any] | None = None
        self.stall_timeout_s = stall_timeout_s
        self.redis_timeout_s = redis_timeout_s
        self._monotonic = monotonic
        self._wall_clock_ms = wall_clock_ms
        self.heartbeat = Heartbeat(monotonic)
        self.consumer: ServiceState | None = None
        """The event consumer, once created; ``/health`` fails when it stopped or crashed."""
        self.started_at = monotonic()
        self.assignment: frozenset[TopicPartitionKey] | None = None
        """None until the first assignment (an empty set then means: explicitly none)."""
        self.assigned_at = self.started_at
        self.rebalances = 0
        self.lag: list[PartitionLag] = []
        self.lag_measured_at: float | None = None
        self.lag_error: str | None = None
        self.budgets: list[dict[str, Any]] = []
        self.stop_loss: dict[str, StopLossStatus] = {}
        """Each stop-loss campaign's status as last refreshed (``current_stop_loss``)."""
        self.pending_labels: int | None = None
        self.rates = RateWindow()
        self._sample_rates()
        self.metrics.declare_campaigns(c.name for c in worker.engine.campaigns)
        self.metrics.declare_stop_loss(
            c.name for c in worker.engine.campaigns if c.stop_loss is not None
        )
        self.observe_model()

    # -- rebalances ----------------------------------------------------------------------------

    def on_assigned(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """The new full assignment (the event consumer's ``on_partitions_assigned``): one
        rebalance."""
        mine = frozenset((t, p) for t, p in partitions if t in self.topics)
        self.assignment = mine
        self.assigned_at = self._monotonic()
        self.rebalances += 1
        self.metrics.observe_assignment(len(mine), rebalance=True)

    def on_revoked(self, partitions: Iterable[TopicPartitionKey]) -> None:
        if self.assignment is None:
            return
        self.assignment = self.assignment - frozenset(partitions)
        self.metrics.observe_assignment(len(self.assignment), rebalance=False)

    def uptime_s(self) -> float:
        return self._monotonic() - self.started_at

    # -- periodic refresh ----------------------------------------------------------------------

    def observe_model(self) -> None:
        model = self.worker.engine.model
        self.metrics.observe_model(model.version, model.examples_learned)

    async def refresh(self) -> None:
        """Lag from the broker, budgets, stop-loss states and pending labels from Redis,
        model gauges, rates. Failures are logged and leave the previous values; nothing here
        raises."""
        self.observe_model()
        self._sample_rates()
        await self.refresh_lag()
        try:
            await asyncio.wait_for(self._refresh_ledger(), self.redis_timeout_s * 5)
            await asyncio.wait_for(self._refresh_model_quality(), self.redis_timeout_s * 5)
        except (TimeoutError, OSError, aioredis.RedisError) as exc:
            log.warning("budget/pending/model refresh skipped: %s", type(exc).__name__)
        await self.readiness()  # keeps the dealstream_ready gauge current between probes

    def _sample_rates(self) -> None:
        counters = self.worker.counters
        self.rates.sample(
            self._monotonic(),
            {
                "consumed": counters.consumed,
                "applied": counters.applied,
                "offers": counters.offers,
                "decisions": counters.decisions,
                "dead_lettered": sum(counters.dead_lettered.values()),
            },
        )

    async def refresh_lag(self) -> None:
        if self.probe is None:
            return
        try:
            rows = await asyncio.wait_for(
                self.probe.measure(self.group, self.topics), LAG_TIMEOUT_S
            )
        except Exception as exc:  # any client failure: keep the last values, say so
            self.lag_error = f"{type(exc).__name__}: {exc}"[:200]
            log.warning("consumer lag refresh failed: %s", self.lag_error)
            return
        self.lag = rows
        self.lag_error = None
        self.lag_measured_at = self._monotonic()
        self.metrics.observe_lag((r.topic, r.partition, r.lag, r.lag_seconds) for r in rows)

    async def _refresh_ledger(self) -> None:
        engine = self.worker.engine
        # the day granted offers count against now (EngineConfig.budget_clock)
        if engine.config.budget_clock == "wall":
            clock_ms = self._wall_clock_ms()
        else:
            clock_ms = engine.clock_ms or self._wall_clock_ms()
        day = event_day(clock_ms)
        budgets = []
        for campaign in engine.campaigns:
            if campaign.daily_budget_cents is None:
                continue
            spent = await engine.ledger.budget_spent_cents(campaign.name, day)
            remaining = max(0, campaign.daily_budget_cents - spent)
            self.metrics.budget_remaining.labels(campaign.name).set(remaining / 100)
            budgets.append(
                {
                    "campaign": campaign.name,
                    "day": day,
                    "daily_budget": campaign.daily_budget_cents / 100,
                    "spent": spent / 100,
                    "remaining": remaining / 100,
                }
            )
        self.budgets = budgets
        self.pending_labels = await engine.ledger.pending_count()
        self.metrics.pending_labels.set(self.pending_labels)
        if any(c.stop_loss is not None for c in engine.campaigns):
            shared = await engine.ledger.stop_loss_status()
            self.stop_loss = current_stop_loss(engine.stop_loss, shared)
            self.metrics.observe_stop_loss(self.stop_loss)

    async def _refresh_model_quality(self) -> None:
        """The prequential metrics the learner published with its latest snapshot."""
        if self.model_store is None:
            return
        checkpoint = await self.model_store.checkpoint()
        state = checkpoint.get("metrics") if checkpoint is not None else None
        if checkpoint is None or not isinstance(state, dict):
            return
        key = (checkpoint.get("version"), state.get("seen"))
        if key == self._quality_key:
            return
        try:
            values = PrequentialMetrics.from_state(state).as_dict()
        except ValueError as exc:
            log.warning("learner checkpoint metrics unreadable: %s", exc)
            return
        self._quality_key = key
        self.model_quality = {"model_version": checkpoint.get("version"), **values}
        self.metrics.observe_model_quality(values)

    # -- readiness -----------------------------------------------------------------------------

    def _partitions_check(self) -> Check:
        if self.assignment is None:
            return Check(False, "waiting for the first partition assignment")
        if not self.assignment:
            return Check(True, "no partitions assigned (more workers than partitions)")
        return Check(True, f"{len(self.assignment)} partition(s) assigned")

    async def _redis_check(self) -> Check:
        started = self._monotonic()
        try:
            await asyncio.wait_for(ping(self.redis, self.redis_prefix), self.redis_timeout_s)
        except TimeoutError:
            return Check(False, f"Redis did not answer PING within {self.redis_timeout_s:g} s")
        except (OSError, aioredis.RedisError, RedisClusterException) as exc:
            return Check(False, f"Redis unreachable ({type(exc).__name__})")
        return Check(True, f"PING answered in {(self._monotonic() - started) * 1000:.1f} ms")

    def _model_check(self) -> Check:
        """An untrained model scores everyone alike: not ready while a campaign's policy uses
        it (``Policy.uses_model``), unless the worker learns inline (it trains itself)."""
        engine = self.worker.engine
        model = engine.model
        scoring = [c.name for c in engine.campaigns if c.policy.uses_model]
        if model.examples_learned == 0 and scoring and not engine.config.learn_inline:
            return Check(
                False,
                f"model {model.version} is untrained and campaign(s) {', '.join(scoring)} "
                "score with it: waiting for the learner's first model "
                "(DEALSTREAM_MODEL_VERIFY_KEY)",
            )
        return Check(True, f"serving {model.version}")

    def _kafka_check(self) -> Check:
        """Kafka answered the lag probe recently (the preflight reached it at start)."""
        if self.probe is None:
            return Check(True, "no lag probe")
        since = self.lag_measured_at if self.lag_measured_at is not None else self.started_at
        age = self._monotonic() - since
        if age > KAFKA_STALE_S:
            why = self.lag_error or "no answer yet"
            return Check(False, f"Kafka not answering for {age:.0f} s ({why})")
        return Check(True, f"answered {age:.0f} s ago")

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: the event loop turns and the event consumer has not stopped."""
        stalled = self.heartbeat.stalled_s()
        checks = {
            "event_loop": Check(
                stalled <= LOOP_STALL_S,
                f"heartbeat {stalled:.1f} s ago (limit {LOOP_STALL_S:g} s)",
            ),
            "consumer": self._consumer_check(),
        }
        ok = all(c.ok for c in checks.values())
        return ok, {
            "status": "ok" if ok else "failing",
            "pid": os.getpid(),
            "uptime_s": round(self.uptime_s(), 1),
            "checks": {name: c.as_dict() for name, c in checks.items()},
        }

    def _consumer_check(self) -> Check:
        consumer = self.consumer
        if consumer is None:
            return Check(True, "not started yet")
        if consumer.crashed:
            return Check(False, "the event consumer crashed")
        if consumer.should_stop:
            return Check(False, "the event consumer stopped")
        return Check(True, "running")

    def assigned_lag(self) -> int | None:
        """Lag on this worker's partitions at the last measurement; None if unknown."""
        if self.lag_measured_at is None or self.assignment is None:
            return None
        return sum(r.lag for r in self.lag if (r.topic, r.partition) in self.assignment)

    def _progress_check(self) -> Check:
        lag = self.assigned_lag()
        if lag is None:
            return Check(True, "lag not measured yet")
        if lag == 0:
            return Check(True, "caught up (no lag on assigned partitions)")
        last = self.metrics.last_batch_at
        since = max(last if last is not None else self.started_at, self.assigned_at)
        idle = self._monotonic() - since
        if idle > self.stall_timeout_s:
            return Check(
                False,
                f"stalled: lag {lag} on assigned partitions and no batch for {idle:.0f} s "
                f"(stall timeout {self.stall_timeout_s:g} s)",
            )
        return Check(True, f"lag {lag} on assigned partitions, last batch {idle:.1f} s ago")

    async def readiness(self) -> dict[str, Any]:
        checks = {
            "partitions": self._partitions_check(),
            "redis": await self._redis_check(),
            "kafka": self._kafka_check(),
            "model": self._model_check(),
            "progress": self._progress_check(),
        }
        ready = all(c.ok for c in checks.values())
        self.metrics.ready.set(1 if ready else 0)
        return {
            "ready": ready,
            "checks": {name: c.as_dict() for name, c in checks.items()},
            "reasons": [f"{name}: {c.detail}" for name, c in checks.items() if not c.ok],
        }

    # -- the status page -----------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        now = self._monotonic()
        model = self.worker.engine.model
        assignment = self.assignment or frozenset()
        partitions = [
            {**row.as_dict(), "assigned_here": (row.topic, row.partition) in assignment}
            for row in self.lag
        ]
        return {
            "group": self.group,
            "pid": os.getpid(),
            "uptime_s": round(self.uptime_s(), 1),
            "readiness": await self.readiness(),
            "assigned_partitions": sorted(f"{t}[{p}]" for t, p in assignment),
            "rebalances": self.rebalances,
            "lag": {
                "total": total_lag(self.lag),
                "measured_s_ago": (
                    round(now - self.lag_measured_at, 1)
                    if self.lag_measured_at is not None
                    else None
                ),
                "error": self.lag_error,
                "partitions": partitions,
            },
            "counters": self.worker.counters.as_dict(),
            "rates": self.rates.rates(),
            "model": {
                "version": model.version,
                "examples": model.examples_learned,
                "age_s": round(self.metrics.model_age_seconds(), 1),
                "published": self.model_quality,
            },
            "budgets": self.budgets,
            "stop_loss": self._stop_loss_rows(),
            "pending_labels": self.pending_labels,
        }

    def _stop_loss_rows(self) -> list[dict[str, Any]]:
        engine = self.worker.engine
        # The engine's own statuses until the first refresh has read the shared ones.
        statuses = {**engine.stop_loss, **self.stop_loss}
        return [
            stop_loss_row(c, statuses[c.name], engine.clock_ms)
            for c in engine.campaigns
            if c.stop_loss is not None and c.name in statuses
        ]


def install_routes(app: faust.App, status: WorkerStatus, token: Secret | None = None) -> None:
    """``/``, ``/metrics``, ``/health``, ``/ready`` and ``/status.json`` on Faust's server;
    with ``token``, ``/status.json`` needs it.

    ``/`` goes first: Faust later mounts its own index at ``/`` (the production index
    blueprint); aiohttp serves the first route that matches, and refuses a second GET on the
    same resource, which it would reuse if ``/`` were the last route added.
    """

    @app.page("/")
    async def index(view: View, request: Request) -> Response:
        return view.html(STATUS_PAGE_HTML)

    @app.page("/metrics")
    async def metrics(view: View, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(status.metrics.registry)
        return view.bytes(body, headers={"Content-Type": content_type})

    @app.page("/health")
    async def health(view: View, request: Request) -> Response:
        ok, body = status.health()
        return view.json(body, status=200 if ok else 503)

    @app.page("/ready")
    async def ready(view: View, request: Request) -> Response:
        body = await status.readiness()
        return view.json(body, status=200 if body["ready"] else 503)

    @app.page("/status.json")
    async def status_json(view: View, request: Request) -> Response:
        if not bearer_ok(request.headers.get("Authorization"), token):
            return view.json(UNAUTHORIZED, status=401, headers=CHALLENGE)
        return view.json(await status.status(), headers={"Cache-Control": "no-store"})
