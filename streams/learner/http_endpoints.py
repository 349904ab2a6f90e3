"""The learner's own ``/metrics``, ``/health`` and ``/ready`` (it is not a Faust app).

``LearnerMetrics`` owns a private ``CollectorRegistry``; ``Learner`` updates it as it learns
and publishes, and ``serve_learner_http`` exposes it with aiohttp on
``DEALSTREAM_LEARNER_HTTP_PORT`` (default 6067; 0 turns the endpoint off). Metric names start
with ``dealstream_learner_`` so that a dashboard can tell the learner's figures from the
worker's copy of the published model's quality (``dealstream_model_*``). It listens on
``DEALSTREAM_HTTP_BIND`` (127.0.0.1 by default), and with ``DEALSTREAM_HTTP_TOKEN`` set,
``/status.json`` needs ``Authorization: Bearer <token>``, as on the worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    generate_latest,
)

from streams.operations.http_auth import CHALLENGE, UNAUTHORIZED, bearer_ok
from streams.settings import Secret

QUALITY = (
    ("log_loss", "log loss"),
    ("auc", "ROC AUC"),
    ("ece", "expected calibration error"),
    ("label_rate", "positive label rate"),
)


class LearnerMetrics:
    """Every metric of one learner process, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.records = Counter(
            "dealstream_learner_records",
            "Training records read, by result: learned, invalid or duplicate (a copy of an "
            "example read before: skipped, logged).",
            ["result"],
            registry=r,
        )
        for result in ("learned", "invalid", "duplicate"):
            self.records.labels(result=result)
        self.snapshots = Counter(
            "dealstream_learner_snapshots", "Model snapshots published.", registry=r
        )
        self.last_snapshot = Gauge(
            "dealstream_learner_last_snapshot_timestamp_seconds",
            "Unix time of the last published snapshot (0 before the first one).",
            registry=r,
        )
        self.model_version = Info(
            "dealstream_learner_model", "The model version the learner is training.", registry=r
        )
        self.model_examples = Gauge(
            "dealstream_learner_model_examples",
            "Examples the model in training has learned from, over its whole life.",
            registry=r,
        )
        self.quality = {
            name: Gauge(
                f"dealstream_learner_{name}",
                f"Prequential {text} over the learner's metrics window (predict, then learn); "
                "NaN while undefined.",
                registry=r,
            )
            for name, text in QUALITY
        }
        for gauge in self.quality.values():
            gauge.set(math.nan)
        self.pending_lag = Gauge(
            "dealstream_learner_lag",
            "Training records on the topic not yet learned, per partition (log end - position).",
            ["partition"],
            registry=r,
        )
        self.lease_held = Gauge(
            "dealstream_learner_lease_held",
            "1 while this learner holds the single-learner lease (0 while it waits).",
            registry=r,
        )

    def observe_status(self, status: Mapping[str, Any]) -> None:
        """Model version, examples and prequential quality from ``Learner.status()``."""
        version = status.get("model_version")
        if isinstance(version, str):
            self.model_version.info({"version": version})
        examples = status.get("examples_learned")
        if isinstance(examples, int):
            self.model_examples.set(examples)
        for name, gauge in self.quality.items():
            value = status.get(name)
            gauge.set(float(value) if isinstance(value, int | float) else math.nan)

    def observe_snapshot(self, now_s: float) -> None:
        self.snapshots.inc()
        self.last_snapshot.set(now_s)

    def observe_lag(self, lags: Mapping[int, int]) -> None:
        for partition, lag in lags.items():
            self.pending_lag.labels(partition=str(partition)).set(max(lag, 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class LearnerHealth:
    """What ``/ready`` reports: ready once the lease is held and partitions are assigned."""

    started_at: float = field(default_factory=time.time)
    lease_held: bool = False
    assigned: int | None = None
    last_error: str | None = None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {
            "lease": {
                "ok": self.lease_held,
                "detail": "holds the learner lease"
                if self.lease_held
                else "waiting for another learner's lease",
            },
            "partitions": {
                "ok": self.assigned is not None,
                "detail": f"{self.assigned} partition(s) of the training topic"
                if self.assigned is not None
                else "training topic not assigned yet",
            },
        }
        ready = all(check["ok"] for check in checks.values())
        return ready, {"ready": ready, "checks": checks, "last_error": self.last_error}


def learner_routes(
    metrics: LearnerMetrics,
    health: LearnerHealth,
    status: Callable[[], Mapping[str, Any]],
    token: Secret | None = None,
) -> web.Application:
    """The aiohttp application: /metrics, /health, /ready and /status.json (which needs
    ``token`` when there is one)."""

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def get_health(request: web.Request) -> web.Response:
        body = {"alive": True, "uptime_s": round(time.time() - health.started_at, 3)}
        return _json(body, 200)

    async def get_ready(request: web.Request) -> web.Response:
        ready, body = health.readiness()
        return _json(body, 200 if ready else 503)

    async def get_status(request: web.Request) -> web.Response:
        if not bearer_ok(request.headers.get("Authorization"), token):
            return _json(UNAUTHORIZED, 401, CHALLENGE)
        return _json(dict(status()), 200)

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/health", get_health)
    app.router.add_get("/ready", get_ready)
    app.router.add_get("/status.json", get_status)
    return app


def _json(
    body: Mapping[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> web.Response:
    payload = orjson.dumps(body, default=str)
    return web.Response(
        body=payload, status=status, content_type="application/json", headers=headers
    )


async def serve_learner_http(
    app: web.Application, port: int, host: str = "127.0.0.1"
) -> web.AppRunner:
    """Start the endpoint on ``host``:``port``; the caller cleans the runner up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
