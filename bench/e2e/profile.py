"""Where the worker's time goes: buckets a py-spy profile (``--format raw``, collapsed stacks).

    .venv/bin/python -m bench.e2e.profile /tmp/worker.txt

Each sample goes to the first bucket whose marker appears in its stack, scanning from the
innermost frame outwards, so a Redis call made by the engine counts as Redis, and the engine's
own Python as engine. Shares are of all samples of all threads (Faust runs its Kafka consumer
in a second thread, so the shares add up across both).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (event loop waiting)", ("EpollSelector.select",)),
    ("JSON encode of outputs", ("orjson",)),
    ("redis client + Lua reply decode", ("redis/", "redis_store.py", "redis_ledger.py")),
    (
        "Kafka produce",
        ("sinks.py", "aiokafka/producer/", "producer.py", "aiokafka.py", "confluent_kafka"),
    ),
    ("decode + validate", ("decode.py", "engine/events.py", "engine/validation.py")),
    ("metrics", ("metrics.py", "prometheus_client")),
    ("model (river)", ("river/", "engine/model/purchase_model.py")),
    (
        "features (engine)",
        ("engine/features/catalogue.py", "engine/features/state.py", "engine/features/store.py"),
    ),
    ("policy + guardrails (engine)", ("engine/policies/", "engine/ledger.py", "engine/campaigns")),
    ("engine pipeline (other)", ("engine/",)),
    (
        "worker glue (streams/worker/batch_worker.py, faust_app.py)",
        ("streams/worker/batch_worker.py", "streams/worker/faust_app.py"),
    ),
    ("Faust stream + Kafka consumer", ("faust/", "mode/", "aiokafka/", "consumer.py")),
)
GENERIC: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging", ("logging/",)),
    ("asyncio", ("asyncio/",)),
)
"""Library frames charged to their caller's bucket; only stacks with no caller of ours land here."""


def bucket_of(stack: str) -> str:
    frames = stack.split(";")
    if "EpollSelector.select" in frames[-1]:
        return BUCKETS[0][0]
    for buckets in (BUCKETS[1:], GENERIC):
        for frame in reversed(frames):
            for name, markers in buckets:
                if any(marker in frame for marker in markers):
                    return name
    return "other"


def summarise(path: Path) -> list[tuple[str, float]]:
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        counts[bucket_of(stack)] += int(n)
        total += int(n)
    return [(name, round(100 * n / total, 1)) for name, n in counts.most_common()]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: python -m bench.e2e.profile PROFILE.txt (py-spy --format raw)")
        return 2
    for name, share in summarise(Path(argv[0])):
        print(f"{share:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
