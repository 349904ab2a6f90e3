"""The worker's HTTP endpoints, on a running worker subprocess with real Kafka and Redis:
``/health`` (503 once the event consumer stopped), ``/ready`` (JSON reasons), ``/metrics``
(names, no user ids in labels), ``/`` and ``/status.json`` (behind a bearer token)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from shutil import which
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.analysis.simulation.world import open_loop
from engine.ledger import event_day
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import Isolation, Services
from tests.model_keys import publish_trained, worker_key_env
from tests.worker_process import WorkerProcess, clean_up, produce_events, worker_env

pytestmark = pytest.mark.e2e

EVENTS = 600
READY_TIMEOUT_S = 90.0
TOKEN = "e2e-http-token-0123456789"
PUBLISHED = "lr-3"
"""The learner's model the worker loads (an untrained one would keep it not ready)."""
CAMPAIGNS = """
[[campaign]]
name = "http-budgeted"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 0
daily_budget = 25.0

[[campaign]]
name = "http-control"
policy = "threshold"
threshold = 0.0
discount_pct = 5
decision_interval_s = 0
holdout = 0.5
stop_loss = { window_h = 24, min_decisions = 100, min_users = 5 }
"""
METRIC_NAMES = (
    "dealstream_events_consumed_total",
    "dealstream_events_applied_total",
    "dealstream_events_skipped_total",
    "dealstream_events_dead_lettered_total",
    "dealstream_batch_size_bucket",
    "dealstream_decision_latency_seconds_bucket",
    "dealstream_redis_call_seconds_bucket",
    "dealstream_gc_pause_seconds_bucket",
    "dealstream_offers_total",
    "dealstream_discount_spend_total",
    "dealstream_budget_remaining",
    "dealstream_holdout_decisions_total",
    "dealstream_decisions_total",
    "dealstream_model_version_info",
    "dealstream_model_examples",
    "dealstream_model_age_seconds",
    "dealstream_rebalances_total",
    "dealstream_assigned_partitions",
    "dealstream_feature_records_held",
    "dealstream_feature_record_bytes_held",
    "dealstream_pending_labels",
    "dealstream_consumer_lag",
    "dealstream_consumer_lag_seconds",
    "dealstream_ready",
    "dealstream_labels_total",
    "dealstream_model_auc",
    "dealstream_model_log_loss",
    "dealstream_model_ece",
    "dealstream_model_label_rate",
    "dealstream_stop_loss_stopped",
    "dealstream_stop_loss_incremental_margin",
    "dealstream_stop_loss_upper_bound",
    "dealstream_stop_loss_lower_bound",
    "dealstream_stop_loss_decisions",
    "dealstream_stop_loss_explore_only_decisions_total",
)


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def get(port: int, path: str, accept: str | None = None, token: str | None = None) -> Reply:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept is not None:
        request.add_header("Accept", accept)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Reply(
                response.status, response.headers["Content-Type"], response.read().decode()
            )
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers["Content-Type"], error.read().decode())


def wait_for(
    port: int,
    path: str,
    accept: Any,
    worker: WorkerProcess,
    timeout_s: float,
    what: str,
    token: str | None = None,
) -> Reply:
    deadline = time.monotonic() + timeout_s
    last: Reply | OSError | None = None
    while time.monotonic() < deadline:
        try:
            last = get(port, path, token=token)
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if accept(last):
                return last
        assert worker.alive(), f"worker exited while waiting for {what}" + worker.tail()
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s (last: {last})" + worker.tail())


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


@pytest.fixture
def running_worker(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> Iterator[tuple[WorkerProcess, list[dict[str, Any]]]]:
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS)
    topics = Topics(isolation.topic_prefix)
    now_ms = int(time.time() * 1000)
    events = list(
        open_loop(users=80, events=EVENTS, seed=5, start_ms=now_ms - 600_000, mean_gap_ms=500)
    )
    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap, topics.all, partitions=2, security=services.kafka_security
        )
    )
    poison = (topics.browse, b"poison", b"{not json")  # one dead letter
    asyncio.run(produce_events(services, topics, events, raw=[poison]))
    assert asyncio.run(publish_trained(services.redis(), isolation.redis_prefix)) == PUBLISHED
    # gc_threshold=0: Python's own collector settings, so that young collections certainly
    # run (and show in dealstream_gc_pause_seconds) while the test looks.
    env = worker_env(
        services,
        isolation,
        http_port=free_port,
        campaigns=campaigns,
        http_token=TOKEN,
        gc_threshold=0,
    )
    worker = WorkerProcess({**env, **worker_key_env()}, tmp_path / "worker.log")
    worker.start()
    try:
        yield worker, events
    finally:
        worker.stop()
        asyncio.run(clean_up(services, isolation))


def test_health_ready_metrics_and_status_page(
    running_worker: tuple[WorkerProcess, list[dict[str, Any]]], free_port: int
) -> None:
    worker, events = running_worker
    port = free_port
    ready = wait_for(port, "/ready", lambda r: r.status == 200, worker, READY_TIMEOUT_S, "ready")
    body = ready.json()
    assert ready.content_type.startswith("application/json")
    assert body["ready"] is True and body["reasons"] == []
    assert set(body["checks"]) == {"partitions", "redis", "kafka", "model", "progress"}
    assert all(check["ok"] and check["detail"] for check in body["checks"].values())
    assert body["checks"]["partitions"]["detail"] == "6 partition(s) assigned"

    health = get(port, "/health")
    assert health.status == 200 and health.json()["status"] == "ok"
    assert {name: c["ok"] for name, c in health.json()["checks"].items()} == {
        "event_loop": True,
        "consumer": True,
    }

    # Every event consumed, and the periodic refresh (lag, budgets) has run since.
    metrics = wait_for(
        port,
        "/metrics",
        lambda r: (
            'dealstream_budget_remaining{campaign="http-budgeted"}' in r.body
            and sum(v for n, _, v in samples(r.body) if n == "dealstream_events_consumed_total")
            == len(events) + 1
        ),
        worker,
        READY_TIMEOUT_S,
        "all events consumed and the gauges refreshed",
    )
    assert metrics.status == 200 and metrics.content_type.startswith("text/plain")
    parsed = samples(metrics.body)
    names = {name for name, _, _ in parsed}
    missing = [name for name in METRIC_NAMES if name not in names]
    assert not missing, missing

    def value(name: str, **labels: str) -> float:
        return sum(v for n, lab, v in parsed if n == name and labels.items() <= lab.items())

    assert value("dealstream_events_dead_lettered_total", reason="invalid_json") == 1
    assert value("dealstream_events_applied_total") == len(events)
    assert value("dealstream_offers_total", campaign="http-budgeted") > 0
    assert value("dealstream_holdout_decisions_total", campaign="http-control") > 0
    days = {event_day(int(event["ts"])) for event in events}  # two if midnight (UTC) fell in
    assert (
        0 < value("dealstream_discount_spend_total", campaign="http-budgeted") <= 25.0 * len(days)
    )
    assert 0 <= value("dealstream_budget_remaining", campaign="http-budgeted") < 25.0
    assert value("dealstream_assigned_partitions") == 6
    # Every user it applied events of is held (far below the bound).
    assert value("dealstream_feature_records_held") == len({str(e["user_id"]) for e in events})
    assert value("dealstream_ready") == 1
    assert value("dealstream_rebalances_total") >= 1
    assert value("dealstream_redis_call_seconds_count", script="features") > 0
    assert value("dealstream_redis_call_seconds_count", script="ledger") > 0
    assert value("dealstream_gc_pause_seconds_count", generation="0") > 0
    assert value("dealstream_model_version_info", version=PUBLISHED) == 1
    # Only the campaign with a stop-loss has its series; its decisions were sampled.
    stop_loss = {lab["campaign"] for n, lab, _ in parsed if n.startswith("dealstream_stop_loss")}
    assert stop_loss == {"http-control"}
    assert value("dealstream_stop_loss_stopped", campaign="http-control") in (0, 1)
    assert value("dealstream_stop_loss_decisions", campaign="http-control") > 0

    user_ids = {str(event["user_id"]) for event in events}
    label_values = {v for _, labels, _ in parsed for v in labels.values()}
    leaked = {v for v in label_values if any(user in v for user in user_ids)}
    assert not leaked, leaked
    assert {lab["campaign"] for n, lab, _ in parsed if "campaign" in lab} == {
        "http-budgeted",
        "http-control",
    }

    openmetrics = get(port, "/metrics", accept="application/openmetrics-text")
    assert openmetrics.content_type.startswith("application/openmetrics-text")
    assert openmetrics.body.rstrip().endswith("# EOF")

    refused = get(port, "/status.json")
    assert refused.status == 401 and TOKEN not in refused.body
    assert get(port, "/status.json", token=TOKEN + "x").status == 401
    status = get(port, "/status.json", token=TOKEN)
    assert status.status == 200
    state = status.json()
    assert state["readiness"]["ready"] is True
    assert len(state["lag"]["partitions"]) == 6
    assert all(p["assigned_here"] for p in state["lag"]["partitions"])
    assert [b["campaign"] for b in state["budgets"]] == ["http-budgeted"]
    (stop_loss_row,) = state["stop_loss"]
    assert stop_loss_row["campaign"] == "http-control" and stop_loss_row["decisions"] > 0
    assert state["model"]["version"] == PUBLISHED
    assert state["counters"]["consumed"] == len(events) + 1

    page = get(port, "/")
    assert page.status == 200 and page.content_type.startswith("text/html")
    for element in ('id="ready"', 'id="partitions"', 'id="budgets"', 'id="model"', 'id="rates"'):
        assert element in page.body
    assert "status.json" in page.body
    assert "http://" not in page.body and "https://" not in page.body


CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := which(name))),
    None,
)


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            *("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
            *("--no-first-run", "--window-size=1280,1000", "--virtual-time-budget=5000"),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_status_page_renders_in_headless_chromium(
    running_worker: tuple[WorkerProcess, list[dict[str, Any]]], free_port: int, tmp_path: Path
) -> None:
    if CHROMIUM is None:
        pytest.skip("no Chromium (apt-get install chromium)")
    worker, events = running_worker
    url = f"http://127.0.0.1:{free_port}/#token={TOKEN}"  # the page sends it as a bearer
    wait_for(
        free_port,
        "/status.json",
        lambda r: (
            r.status == 200
            and r.json()["readiness"]["ready"]
            and r.json()["counters"]["consumed"] == len(events) + 1
            and r.json()["budgets"]
            and r.json()["lag"]["measured_s_ago"] is not None
        ),
        worker,
        READY_TIMEOUT_S,
        "a ready worker with everything consumed and refreshed",
        token=TOKEN,
    )

    dom = chromium("--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<span id="ready" class="badge ok">ready</span>' in html, html[:3000]
    partitions = html.split('<table id="partitions">', 1)[1].split("</table>", 1)[0]
    assert partitions.count("<tr") == 1 + 6  # the header and one row per partition
    for topic in ("events.browse", "events.search", "events.purchase"):
        assert topic in partitions
    budgets = html.split('<table id="budgets">', 1)[1].split("</table>", 1)[0]
    assert "http-budgeted" in budgets and "http-control" not in budgets
    stop_loss = html.split('<table id="stop-loss">', 1)[1].split("</table>", 1)[0]
    assert stop_loss.count("<tr") == 1 + 1 and "http-control" in stop_loss
    assert "active" in stop_loss or "stopped (explore only)" in stop_loss
    assert " / 100<" in stop_loss  # sampled decisions against min_decisions
    assert PUBLISHED in html.split('<dl id="model">', 1)[1].split("</dl>", 1)[0]
    assert "partitions: 6 partition(s) assigned" in html
    assert '<span id="error"></span>' in html  # no fetch error shown

    screenshot = tmp_path / "status_page.png"
    shot = chromium(f"--screenshot={screenshot}", url, cwd=tmp_path)
    assert shot.returncode == 0, shot.stderr[-2000:]
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    print(f"status page screenshot: {screenshot}")


def test_health_fails_once_the_event_consumer_stopped(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    """A real worker whose event consumer stops after its first batch (the fault-test point
    ``stop_consumer``) while the process keeps serving HTTP: ``/health`` says 503 and why."""
    topics = Topics(isolation.topic_prefix)
    now_ms = int(time.time() * 1000)
    events = list(open_loop(users=20, events=50, seed=9, start_ms=now_ms - 60_000))
    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap,
            topics.all,
            partitions=2,
            security=services.kafka_security,
        )
    )
    asyncio.run(produce_events(services, topics, events))
    env = worker_env(services, isolation, http_port=free_port, crash_at="stop_consumer:1")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start()
    try:
        failing = wait_for(
            free_port,
            "/health",
            lambda r: r.status == 503,
            worker,
            READY_TIMEOUT_S,
            "/health 503 after the consumer stopped",
        )
        body = failing.json()
        assert body["status"] == "failing"
        assert body["checks"]["consumer"] == {"ok": False, "detail": "the event consumer stopped"}
        assert body["checks"]["event_loop"]["ok"] is True
        assert worker.alive()
    finally:
        worker.stop()
        asyncio.run(clean_up(services, isolation))
    assert "stopping the event consumer" in worker.log_text()
