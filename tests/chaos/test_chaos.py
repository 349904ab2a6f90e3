"""The chaos suite (issue 15) as a test: a replay through the local cluster with every kind of
fault injected on a seeded schedule, checked against references computed in the test.

Short form (``make chaos-short``): 30,000 events, one fault of each kind. ``make chaos`` runs
the same test with ``CHAOS_EVENTS=500000`` and writes ``bench/results/chaos.json``. Settings (env):
``CHAOS_EVENTS``, ``CHAOS_USERS``, ``CHAOS_SEED``, ``CHAOS_REPEATS`` (faults of each kind),
``CHAOS_RATE`` (events/s the producer keeps to at most, 0: as fast as the lag bound allows),
``CHAOS_MAX_LAG``, ``CHAOS_RESULTS`` (where to write the report as JSON).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.chaos import ChaosConfig, run_chaos, schedule, write_json
from tests.cluster.conftest import Cluster

EVENTS = int(os.environ.get("CHAOS_EVENTS", "30000"))
USERS = int(os.environ.get("CHAOS_USERS", str(max(EVENTS // 50, 300))))
SEED = int(os.environ.get("CHAOS_SEED", "15"))
REPEATS = int(os.environ.get("CHAOS_REPEATS", "1"))
RATE = float(os.environ.get("CHAOS_RATE", "250" if EVENTS <= 50_000 else "0"))
MAX_LAG = int(os.environ.get("CHAOS_MAX_LAG", "20000"))

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]


@pytest.mark.timeout(900 + EVENTS // 100)
def test_chaos_replay_exact_through_every_kind_of_fault(cluster: Cluster, tmp_path: Path) -> None:
    config = ChaosConfig(
        events=EVENTS,
        users=USERS,
        seed=SEED,
        faults=tuple(schedule(SEED, REPEATS)),
        rate=RATE,
        max_lag=MAX_LAG,
    )
    report = run_chaos(cluster, tmp_path, config)
    results = os.environ.get("CHAOS_RESULTS")
    write_json(report, Path(results) if results else tmp_path / "chaos.json")
    print(f"\nchaos: {EVENTS:,} events, {USERS:,} users, seed {SEED}\n{report.table()}")

    assert {f.kind for f in report.faults} == {f.kind.value for f in config.faults}
    assert report.final_lag == 0
    assert report.lost == 0, report.to_json()
    assert report.doubled == 0, report.to_json()
    assert report.overspent_cents == 0, report.to_json()
    assert report.users_differing_from_engine == 0, report.to_json()
    assert report.budget_spent_cents == report.budget_granted_cents, report.to_json()
    assert report.training_orphans == 0, report.to_json()
    assert report.windows_due > 0, "no attribution window closed during the run"
    assert report.dead_letters_unique == report.poison, report.to_json()
    assert report.worker_exit_codes == [0] * config.workers, report.worker_exit_codes
