"""Debian's Prometheus scrapes a live worker with deploy/prometheus's config and rules, and every
PromQL expression of the rules and the Grafana dashboards returns series.

Alert expressions are evaluated twice: as written (they must parse and run), and "opened", with
each threshold comparison made always-true (``> 300`` becomes ``>= -Inf``), which must return
series: every metric they combine exists, with labels that match across ``and`` / ``/``.
Dashboards' ``$__rate_interval`` is replaced by ``30s``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.analysis.simulation.world import open_loop
from engine.model.prequential import PrequentialMetrics
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.model_store import ModelStore
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services
from tests.worker_process import WorkerProcess, clean_up, produce_events, worker_env

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
DEPLOY = REPO / "deploy"
EVENTS = 400
TIMEOUT_S = 120.0
CAMPAIGNS = """
[[campaign]]
name = "prom-budgeted"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 0
daily_budget = 30.0
holdout = 0.2
stop_loss = { window_h = 24, min_decisions = 200 }
"""
COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)(?![\w.])")


def opened(expr: str) -> str:
    """The expression with every comparison against a number made true for any value."""

    def always(match: re.Match[str]) -> str:
        return " <= +Inf" if match.group(1).startswith("<") else " >= -Inf"

    return COMPARISON.sub(always, expr)


def test_opened_turns_thresholds_into_always_true_filters() -> None:
    assert opened("x > 300") == "x >= -Inf"
    assert opened("a / clamp_min(b, 1e-9) > 0.01") == "a / clamp_min(b, 1e-9) >= -Inf"
    assert opened("max(x) <= 0") == "max(x) <= +Inf"
    assert opened("up == 0") == "up >= -Inf"
    assert opened("x < max(y) - 0.05") == "x < max(y) - 0.05"


def expressions() -> dict[str, str]:
    """Every PromQL expression of deploy/: name -> expression to evaluate."""
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    found: dict[str, str] = {}
    for match in re.finditer(
        r"- (record|alert): (\S+)\n(?:\s+#.*\n)*\s+expr: (>-\n((?:\s{10}.*\n)+)|(.*)\n)", rules
    ):
        kind, name = match.group(1), match.group(2)
        expr = " ".join((match.group(4) or match.group(5)).split())
        if kind == "record":
            found[f"record {name}"] = expr
            found[f"record {name} (stored)"] = name
        else:
            found[f"alert {name} (as written)"] = expr
            found[f"alert {name} (opened)"] = opened(expr)
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", ()):
                expr = target["expr"].replace("$__rate_interval", "30s")
                found[f"{path.stem}: {panel['title']} [{target['refId']}]"] = expr
    return found


def test_expressions_cover_every_rule_and_panel() -> None:
    found = expressions()
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    assert sum(1 for k in found if k.startswith("alert ")) == 2 * rules.count("- alert: ")
    assert sum(1 for k in found if k.startswith("record ")) == 2 * rules.count("- record: ")
    assert sum(1 for k in found if ": " in k and not k.startswith(("alert", "record"))) > 20


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
    return body


def scraped(port: int) -> bool:
    """Prometheus answers and has scraped its target at least once."""
    try:
        return bool(query(port, "up").get("data", {}).get("result"))
    except OSError:  # not listening yet
        return False


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.port = unused_port()
        config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
        config = config.replace('["worker:6066"]', f'["{target}"]')
        config = re.sub(r"(scrape|evaluation)_interval: \d+s", r"\1_interval: 1s", config)
        assert target in config and "15s" not in config
        workdir.mkdir()
        (workdir / "prometheus.yml").write_text(config)
        shutil.copy(DEPLOY / "prometheus" / "rules.yml", workdir / "rules.yml")
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.workdir = workdir

    def tail(self) -> str:
        text = (self.workdir / "prometheus.log").read_text(errors="replace")
        return "\n--- prometheus log ---\n" + text[-3000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def publish_learner_checkpoint(services: Services, isolation: Isolation) -> None:
    """What the learner writes with each snapshot: here only its prequential metrics matter."""
    metrics = PrequentialMetrics(window=100)
    for p, y in [(0.9, 1), (0.3, 0), (0.8, 1), (0.4, 0), (0.6, 1), (0.2, 0), (0.7, 0)]:
        metrics.update(p, y)
    client = services.redis()
    try:
        store = ModelStore(client, prefix=isolation.redis_prefix)
        checkpoint = {"version": "lr-7", "offsets": {}, "metrics": metrics.to_state()}
        await client.set(store.checkpoint_key, orjson.dumps(checkpoint))
    finally:
        await client.aclose()


@pytest.fixture
def live_worker(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> Iterator[tuple[WorkerProcess, int]]:
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS)
    topics = Topics(isolation.topic_prefix)
    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap, topics.all, partitions=2, security=services.kafka_security
        )
    )
    asyncio.run(publish_learner_checkpoint(services, isolation))
    worker = WorkerProcess(
        worker_env(services, isolation, http_port=free_port, campaigns=campaigns),
        tmp_path / "worker.log",
    )
    worker.start()
    try:
        yield worker, free_port
    finally:
        worker.stop()
        asyncio.run(clean_up(services, isolation))


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus (apt-get install prometheus)")
def test_prometheus_evaluates_every_rule_and_dashboard_expression_against_a_live_worker(
    live_worker: tuple[WorkerProcess, int],
    services: Services,
    isolation: Isolation,
    tmp_path: Path,
) -> None:
    worker, port = live_worker
    now_ms = int(time.time() * 1000)
    events = list(
        open_loop(users=60, events=EVENTS, seed=3, start_ms=now_ms - 600_000, mean_gap_ms=500)
    )
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not scraped(prometheus.port):
            assert time.monotonic() < deadline, "Prometheus never scraped" + prometheus.tail()
            assert prometheus.process.poll() is None, "Prometheus exited" + prometheus.tail()
            time.sleep(0.5)
        topics = Topics(isolation.topic_prefix)
        poison = (topics.search, b"poison", b"[]")  # one dead letter
        asyncio.run(produce_events(services, topics, events, raw=[poison]))

        def consumed() -> float:
            result = query(prometheus.port, "sum(dealstream_events_consumed_total)")
            samples = result.get("data", {}).get("result", [])
            return float(samples[0]["value"][1]) if samples else 0.0

        while consumed() < len(events) + 1:
            assert time.monotonic() < deadline, "the worker did not consume it all" + worker.tail()
            assert worker.alive(), "the worker died" + worker.tail()
            time.sleep(0.5)

        pending = expressions()
        failures: dict[str, Any] = {}
        while pending and time.monotonic() < deadline:
            failures = {}
            for name, expr in pending.items():
                body = query(prometheus.port, expr)
                if body.get("status") != "success":
                    failures[name] = (expr, body.get("error"))
                elif "(as written)" not in name and not body["data"]["result"]:
                    failures[name] = (expr, "no series")
            pending = {name: pending[name] for name in failures}
            if pending:
                time.sleep(1.0)
        assert not failures, json.dumps(failures, indent=2) + prometheus.tail()

        up = query(prometheus.port, 'up{job="dealstream-worker"}')["data"]["result"]
        assert [float(s["value"][1]) for s in up] == [1.0]
        auc = query(prometheus.port, "dealstream_model_auc")["data"]["result"]
        assert float(auc[0]["value"][1]) > 0.5
    finally:
        prometheus.stop()
