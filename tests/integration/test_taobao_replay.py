"""Real data end to end: the Taobao excerpt through Kafka and the worker into Redis.

The excerpt (96,169 rows of 2017 user behaviour, ``../shared/data``) is turned into event v1
by ``engine.importers.taobao.import_taobao``, produced with a plain aiokafka producer
(key = user_id, topic by type) and consumed by the worker subprocess. Every user's lifetime
counts per kind in Redis must equal a reference counted here straight from the CSV,
independently of the importer.
"""

from __future__ import annotations

import csv
import gzip
import time
from collections import Counter
from pathlib import Path

import pytest

from engine.importers.taobao import import_taobao
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services
from tests.worker_process import (
    WorkerProcess,
    clean_up,
    produce_events,
    read_states,
    worker_env,
)

pytestmark = pytest.mark.integration

TAOBAO = REPO.parent / "shared" / "data" / "taobao-userbehavior-excerpt.csv.gz"
BEHAVIOR_CODE = {"pv": "v", "cart": "c", "fav": "f", "buy": "p"}
"""Taobao behaviour -> the feature state's kind code (``n<code>`` is the lifetime count)."""
DATA_PERIOD_S = (1_511_539_200, 1_512_316_800)
"""The period the data set documents, 2017-11-25 to 2017-12-03 China time (UTC+8), as
[start, end) in epoch seconds. Rows outside it are errors in the data (the excerpt has one,
at 15 s after the epoch); the importer rejects them (``ts_out_of_range``) and so does this
reference."""
# The events are from 2017, but lateness is measured against each user's latest event time,
# not the wall clock, so history replays fine. What a replay does need is a lateness larger
# than the skew between topics: the worker reads browse and purchase partitions at their own
# pace, so a purchase can be applied after browse events of the same user that happened
# (in event time) much later. Thirty days covers any skew within this two-hour excerpt.
ALLOWED_LATENESS_S = 30 * 86_400
# This test is about feature state. With the default campaign the worker would also publish
# ~70,000 decisions (a feature vector each) and spend much of its time on them; a campaign
# triggered by favourites only keeps the outputs small and the test quicker.
QUIET_CAMPAIGNS = """
[[campaign]]
name = "replay-favorites"
policy = "threshold"
threshold = 0.5
discount_pct = 10
triggers = ["favorite"]
"""


def reference_counts(path: Path) -> tuple[dict[str, Counter[str]], int]:
    """Rows per user and behaviour, straight from the CSV; also how many rows were left out.

    A row counts once per distinct (user, item, behaviour, second): the importer's event id is
    built from those fields, so rows that share them would be one event, deduplicated by the
    worker (the excerpt happens to have no such rows).
    """
    counts: dict[str, Counter[str]] = {}
    seen: set[tuple[str, str, str, str]] = set()
    left_out = 0
    with gzip.open(path, "rt", encoding="utf-8", newline="") as lines:
        for row in csv.reader(lines):
            user, item, _category, behavior, seconds = row
            in_period = seconds.isdigit() and DATA_PERIOD_S[0] <= int(seconds) < DATA_PERIOD_S[1]
            if behavior not in BEHAVIOR_CODE or not in_period:
                left_out += 1
                continue
            event_key = (user, item, behavior, seconds)
            if event_key in seen:
                continue
            seen.add(event_key)
            counts.setdefault(f"tb-{user}", Counter())[BEHAVIOR_CODE[behavior]] += 1
    return counts, left_out


async def test_taobao_excerpt_replayed_through_kafka_gives_the_csv_counts_per_user(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    if not TAOBAO.exists():
        pytest.skip(f"the Taobao excerpt is absent ({TAOBAO}); see ../shared/data/README.md")
    want, left_out = reference_counts(TAOBAO)
    run = import_taobao(TAOBAO)
    events = list(run)
    total = sum(sum(c.values()) for c in want.values())
    assert run.stats.balanced and run.stats.rejected == left_out, run.stats.summary()
    assert len(events) == total, run.stats.summary()

    topics = Topics(isolation.topic_prefix)
    await ensure_topics(services.kafka_bootstrap, topics.all, partitions=4)
    started = time.monotonic()
    await produce_events(services, topics, events)
    produced_s = time.monotonic() - started

    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(QUIET_CAMPAIGNS)
    worker = WorkerProcess(
        worker_env(
            services,
            isolation,
            http_port=free_port,
            allowed_lateness_s=ALLOWED_LATENESS_S,
            campaigns=campaigns,
        ),
        tmp_path / "worker.log",
    )
    worker.start()
    try:
        final = await worker.wait_progress(lambda line: line["consumed"] >= total, 100)
        processed_s = time.monotonic() - started - produced_s
        states = await read_states(services, isolation, want)
        alive = worker.alive()
        code = worker.stop()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    tail = worker.tail()
    print(
        f"\ntaobao replay: {total} events of {len(want)} users ({left_out} rows left out), "
        f"produced in {produced_s:.1f} s, worker done within {processed_s:.1f} s "
        f"(progress is logged every 5 s); {run.stats.summary()}\nfinal progress: {final}"
    )

    assert alive and code == 0, f"worker alive={alive}, exit status {code}" + tail
    assert final["consumed"] == final["applied"] == total, final
    assert (final["redelivered"], final["duplicates"], final["late"]) == (0, 0, 0), final
    assert final["dead_lettered"] == {}, final
    wrong = []
    for user, counts in want.items():
        got = {code: states[user].get(f"n{code}", 0.0) for code in BEHAVIOR_CODE.values()}
        expected = {code: float(counts[code]) for code in BEHAVIOR_CODE.values()}
        if got != expected:
            wrong.append(f"{user}: Redis {got}, CSV {expected}")
    assert not wrong, f"{len(wrong)} of {len(want)} users differ: {wrong[:5]}" + tail
    assert sum(s.get("ns", 0.0) for s in states.values()) == 0, "Taobao has no searches"
