"""Time the simulated world open loop: event v1 dicts per second, pure Python.

The closed-loop simulator (docs/simulator.md) promises at least 200,000 events/s from the
world itself, so a closed loop is bounded by the engine, not by the traffic. Prints CPU-time
rates (the dev box is shared; wall time would measure the neighbours) for a few population
sizes and writes ``bench/results/world.json``. It never asserts on the figures.

    .venv/bin/python bench/bench_world.py [--events 300000] [--users 1000,2000,10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.analysis.simulation.world import World  # noqa: E402


def world_rate(users: int, events: int) -> tuple[float, float]:
    """(setup CPU seconds, events per CPU second) for one world."""
    started = time.process_time()
    world = World(users=users, seed=1)
    ready = time.process_time()
    for _ in world.events(events):
        pass
    return ready - started, events / (time.process_time() - ready)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--users", default="1000,2000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for users in (int(u) for u in args.users.split(",")):
        runs = [world_rate(users, args.events) for _ in range(args.repeat)]
        setup = min(r[0] for r in runs)
        rate = max(r[1] for r in runs)
        rows.append({"source": "world", "users": users, "setup_s": setup, "events_per_s": rate})
        print(f"world     users={users:>6}  setup {setup:6.3f} s  {rate:>10,.0f} events/s (CPU)")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    document = {"events": args.events, "load_average": os.getloadavg(), "rows": rows}
    (results / "world.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
