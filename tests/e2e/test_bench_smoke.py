"""The end-to-end benchmark keeps working: its smallest mode runs against the real services.

Asserts counts and structure only, never speed (figures depend on the machine and its load).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import REPO, Services
from tests.worker_process import poll_until

QUICK_EVENTS = 20_000


async def test_quick_bench_drains_every_event_and_cleans_up(
    services: Services, tmp_path: Path
) -> None:
    if services.secured:
        # The benchmark measures the plaintext path and takes a bootstrap and a URL, not
        # the security settings (docs/security-transport.md).
        pytest.skip("the benchmark runs against plaintext services only")
    out = tmp_path / "e2e.json"
    run = subprocess.run(
        [
            sys.executable,
            "bench/bench_e2e.py",
            "--quick",
            "--bootstrap",
            services.kafka_bootstrap,
            "--redis-url",
            services.redis_url,
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = orjson.loads(out.read_bytes())

    assert report["mode"] == "quick"
    assert report["machine"]["cores"] >= 1
    assert report["preload"]["events"] == QUICK_EVENTS
    one = report["one_worker"]["runs_detail"]
    assert len(one) == 1 and one[0]["events"] == QUICK_EVENTS
    assert one[0]["events_per_s"] > 0 and report["raw_consume"]["events_per_s"] > 0
    step = report["batch_step_inprocess"]["runs"]
    assert len(step) == 1 and step[0]["events"] == QUICK_EVENTS and step[0]["outputs"] > 0
    two = report["two_workers"]["runs_detail"]
    assert len(two) == 1 and two[0]["workers"] == 2 and two[0]["events"] == QUICK_EVENTS
    memory = report["memory"]
    assert memory["events"] == QUICK_EVENTS and memory["rss_kib_end"] > 0
    # Every active user has one key ("u:{user}": feature record, guards, pending decisions and
    # their label schedules), the pending labels one index per lane ("lq:<lane>"), and no key
    # of an old layout (records "s<version>", guards "g", pending "p", queues "pe" "pq") is left.
    users = report["preload"]["users_active"]
    by_kind = memory["redis"]["by_kind"]
    assert by_kind["u"]["keys"] == users
    assert 1 <= by_kind["lq"]["keys"] <= report["config"]["partitions"]
    old = ("g", "p", "pe", "pq")
    assert not [kind for kind in by_kind if kind in old or kind[1:].isdigit()]
    assert 0 < memory["redis"]["feature_record_bytes_per_user"] < by_kind["u"]["bytes_per_user"]
    assert one[0]["redis_cpu_us_per_event"] > 0
    assert report["one_worker"]["redis_cpu_us_per_event"] == one[0]["redis_cpu_us_per_event"]
    assert set(report["latency"]) == {"200", "1000"}
    for figures in report["latency"].values():
        assert figures["runs"][0]["offers_in_window"] > 0
        assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]

    # Nothing left behind on the shared services.
    client = services.redis()
    try:
        for prefix in report["config"]["redis_prefixes"]:
            assert [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)] == []
    finally:
        await client.aclose()
    prefixes = tuple(report["config"]["topic_prefixes"])
    admin = AIOKafkaAdminClient(
        bootstrap_servers=services.kafka_bootstrap, **services.kafka_options()
    )
    await admin.start()
    try:

        async def gone() -> bool:  # topic deletion reaches the metadata asynchronously
            return not [t for t in await admin.list_topics() if t.startswith(prefixes)]

        assert await poll_until(gone, timeout_s=30), "benchmark topics left behind"
    finally:
        await admin.close()
