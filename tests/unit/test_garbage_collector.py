"""The collector settings every ``dealstream`` command runs with (DEALSTREAM_GC_THRESHOLD)."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from streams.cli import main as cli_main
from streams.errors import ConfigError
from streams.operations.garbage_collector import CollectorPauses, tune_garbage_collector
from streams.operations.metrics import WorkerMetrics
from streams.settings import Settings


@pytest.fixture
def collector() -> Iterator[None]:
    """Give the test process its collector back as it was."""
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)


def test_tuning_raises_the_young_threshold_only(collector: None) -> None:
    _, middle, old = gc.get_threshold()
    tune_garbage_collector(12_345)
    assert gc.get_threshold() == (12_345, middle, old)


def test_zero_leaves_the_collector_as_python_set_it(collector: None) -> None:
    before = gc.get_threshold()
    tune_garbage_collector(0)
    assert gc.get_threshold() == before


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        tune_garbage_collector(-1)


def test_the_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).gc_threshold == 50_000
    assert Settings.from_env({"DEALSTREAM_GC_THRESHOLD": "0"}).gc_threshold == 0
    assert Settings.from_env({"DEALSTREAM_GC_THRESHOLD": "2000"}).gc_threshold == 2000
    with pytest.raises(ConfigError, match="GC_THRESHOLD"):
        Settings.from_env({"DEALSTREAM_GC_THRESHOLD": "-5"})
    with pytest.raises(ConfigError, match="GC_THRESHOLD"):
        Settings.from_env({"DEALSTREAM_GC_THRESHOLD": "lots"})


def test_every_command_runs_with_the_configured_collector(
    collector: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def handler(settings: Settings, args: argparse.Namespace) -> int:
        seen["threshold"] = gc.get_threshold()[0]
        return 0

    def parser() -> argparse.ArgumentParser:
        root = argparse.ArgumentParser()
        root.set_defaults(handler=handler)
        return root

    monkeypatch.setattr(cli_main, "build_parser", parser)
    # main also sets up the root logger: leave this test process's logging as pytest set it
    monkeypatch.setattr(cli_main, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("DEALSTREAM_GC_THRESHOLD", "23456")
    assert cli_main.main([]) == 0
    assert seen["threshold"] == 23_456


def test_every_collection_is_timed_by_generation_until_uninstalled() -> None:
    ticks = iter(range(100))
    seen: list[tuple[int, float]] = []
    pauses = CollectorPauses(lambda g, s: seen.append((g, s)), clock=lambda: float(next(ticks)))
    pauses.install()
    pauses.install()  # once only
    gc.disable()  # only the collections asked for below
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.enable()
        pauses.uninstall()
    assert seen == [(0, 1.0), (2, 1.0)]  # each call: start at tick n, stop at n + 1
    gc.collect()
    assert len(seen) == 2


def test_the_worker_metric_counts_a_full_collection() -> None:
    metrics = WorkerMetrics()
    pause = metrics.gc_pause
    pauses = CollectorPauses(lambda g, s: pause.labels(str(g)).observe(s))
    before = metrics.registry.get_sample_value(
        "dealstream_gc_pause_seconds_count", {"generation": "2"}
    )
    pauses.install()
    gc.disable()
    try:
        gc.collect()
    finally:
        gc.enable()
        pauses.uninstall()
    after = metrics.registry.get_sample_value(
        "dealstream_gc_pause_seconds_count", {"generation": "2"}
    )
    assert (before, after) == (0.0, 1.0)
    assert (
        metrics.registry.get_sample_value("dealstream_gc_pause_seconds_sum", {"generation": "2"})
        > 0
    )
