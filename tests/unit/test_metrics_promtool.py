"""deploy/prometheus and deploy/grafana: promtool checks and unit tests, and every metric the
rules and dashboards name is one the worker exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest

from streams.operations.metrics import WorkerMetrics
from tests.conftest import REPO

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)
NAME = re.compile(r"\b(dealstream[_:][a-z0-9_:]*)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def rules_text() -> str:
    return (PROMETHEUS_DIR / "rules.yml").read_text()


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs.extend(target["expr"] for target in panel.get("targets", ()))
    return exprs


def exported_names() -> set[str]:
    """Every sample name a worker can expose (counters with ``_total``, histogram parts)."""
    names: set[str] = set()
    for family in WorkerMetrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{part}" for part in ("bucket", "sum", "count"))
        if family.type == "info":
            names.add(f"{family.name}_info")
    return names


def test_every_alert_is_unit_tested_and_explained() -> None:
    text = rules_text()
    alerts = re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE)
    tests = (PROMETHEUS_DIR / "rules_test.yml").read_text()
    tested = set(re.findall(r"^\s*alertname: (\w+)$", tests, re.MULTILINE))
    assert alerts and set(alerts) == tested
    blocks = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    for block in blocks:
        assert re.search(r"severity: (page|warning|info)$", block, re.MULTILINE), block
        assert "summary:" in block and "description:" in block, block


def test_rules_and_dashboards_use_only_metrics_the_worker_exports() -> None:
    text = rules_text()
    records = set(re.findall(r"^\s*- record: (\S+)$", text, re.MULTILINE))
    assert records
    known = exported_names() | records
    used = set(NAME.findall(text)) | {n for expr in dashboard_exprs() for n in NAME.findall(expr)}
    assert not used - known, used - known


def test_dashboards_are_well_formed_and_use_the_provisioned_datasource() -> None:
    datasource = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    match = re.search(r"^\s*uid: (\S+)$", datasource, re.MULTILINE)
    assert match is not None
    uid = match.group(1)
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "dealstream.yml").read_text()
    assert "path: /var/lib/grafana/dashboards/dealstream" in provider
    titles = set()
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        board: dict[str, Any] = json.loads(path.read_text())
        titles.add(board["title"])
        assert board["uid"] and board["panels"], path
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"duplicate panel ids in {path}"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid, (path, panel["title"])
            assert panel["targets"], (path, panel["title"])
            for target in panel["targets"]:
                assert target["expr"].strip(), (path, panel["title"])
    assert titles == {"dealstream: Consumer lag", "dealstream: Offers & model"}


def test_the_scrape_config_points_at_the_worker_and_loads_the_rules() -> None:
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert "job_name: dealstream-worker" in config
    assert "metrics_path: /metrics" in config
    assert 'targets: ["worker:6066"]' in config
    assert re.search(r"^rule_files:\n  - rules.yml$", config, re.MULTILINE)
