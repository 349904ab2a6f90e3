"""Time event validation: ``decode_event`` (orjson + checks) and ``parse_event`` (checks only).

Generates a realistic, seeded mix of browse / search / purchase events, times each path over
several interleaved rounds (best reported; GC on, inputs frozen), prints microseconds per
event and writes ``bench/results/validation.json``. A figure, never an assertion.

    .venv/bin/python bench/bench_validation.py [--events 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from engine.events import decode_event, parse_event

RESULTS = Path(__file__).resolve().parent / "results" / "validation.json"
CATEGORIES = [f"cat-{i:03d}" for i in range(300)]
WORDS = ["red", "shoes", "running", "sale", "winter", "jacket", "kids", "usb", "cable", "lamp"]
T0 = 1_700_000_000_000


def make_events(n: int, seed: int) -> list[dict[str, Any]]:
    """~70% browse (view/cart/favorite 80/15/5), 20% search, 10% purchase of 1-5 lines."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    ts = T0
    for i in range(n):
        ts += rng.randint(0, 50)
        common = {
            "event_id": f"evt-{seed}-{i:09d}",
            "user_id": f"user-{rng.randint(1, 50_000):06d}",
            "ts": ts,
        }
        roll = rng.random()
        if roll < 0.70:
            action = rng.choices(["view", "cart", "favorite"], [80, 15, 5])[0]
            event: dict[str, Any] = {
                **common,
                "type": "browse",
                "item_id": f"item-{rng.randint(1, 200_000)}",
                "category": rng.choice(CATEGORIES),
                "price": round(rng.uniform(1, 300), 2),
                "action": action,
            }
        elif roll < 0.90:
            event = {
                **common,
                "type": "search",
                "query": " ".join(rng.choices(WORDS, k=rng.randint(1, 4))),
            }
            if rng.random() < 0.3:
                event["category"] = rng.choice(CATEGORIES)
        else:
            items: list[dict[str, Any]] = [
                {
                    "item_id": f"item-{rng.randint(1, 200_000)}",
                    "category": rng.choice(CATEGORIES),
                    "price": round(rng.uniform(1, 300), 2),
                    "quantity": rng.randint(1, 3),
                }
                for _ in range(rng.randint(1, 5))
            ]
            event = {
                **common,
                "type": "purchase",
                "order_id": f"order-{i}",
                "items": items,
                "amount": round(sum(it["price"] * it["quantity"] for it in items), 2),
            }
            if rng.random() < 0.2:
                event["offer_id"] = f"spring:evt-{seed}-{rng.randint(0, i):09d}"
        events.append(event)
    return events


def time_cases(
    cases: dict[str, tuple[Callable[[Any], object], Sequence[Any]]], rounds: int
) -> dict[str, dict[str, float]]:
    """Best wall-clock and CPU time per input, in microseconds, for each case.

    Rounds are interleaved across cases so that a burst of load from other processes does not
    land on one case only; the CPU figure (process time) excludes time spent preempted.
    """
    best = {name: {"wall": float("inf"), "cpu": float("inf")} for name in cases}
    for _ in range(rounds):
        for name, (fn, inputs) in cases.items():
            wall0, cpu0 = time.perf_counter_ns(), time.process_time_ns()
            for value in inputs:
                fn(value)
            wall, cpu = time.perf_counter_ns() - wall0, time.process_time_ns() - cpu0
            best[name]["wall"] = min(best[name]["wall"], wall / len(inputs) / 1000)
            best[name]["cpu"] = min(best[name]["cpu"], cpu / len(inputs) / 1000)
    return best


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "orjson": orjson.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    events = make_events(args.events, args.seed)
    raws = [orjson.dumps(event) for event in events]
    by_type = {t: [e for e in events if e["type"] == t] for t in ("browse", "search", "purchase")}
    mix = {t: len(v) for t, v in by_type.items()}
    avg_bytes = sum(map(len, raws)) / len(raws)
    # GC stays on for what the code under test allocates, but the million input objects built
    # above are frozen so that collections do not rescan them (a worker holds no such list).
    gc.collect()
    gc.freeze()

    cases: dict[str, tuple[Callable[[Any], object], Sequence[Any]]] = {
        "decode_event": (decode_event, raws),
        "parse_event": (parse_event, events),
        "orjson_loads": (orjson.loads, raws),
        **{f"parse_event[{t}]": (parse_event, v) for t, v in by_type.items()},
    }
    results = time_cases(cases, args.rounds)

    print(f"{len(events):,} events {mix}, {avg_bytes:.0f} bytes on average, best of {args.rounds}")
    print(f"  {'us/event':<28} {'wall':>6} {'cpu':>6}")
    for name, best in results.items():
        print(f"  {name:<28} {best['wall']:6.2f} {best['cpu']:6.2f}")
    throughput = 1e6 / results["decode_event"]["wall"]
    print(f"  => one core decodes and validates ~{throughput:,.0f} events/s")

    report = {
        "benchmark": "validation",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "events": len(events),
        "mix": mix,
        "avg_bytes": round(avg_bytes, 1),
        "rounds": args.rounds,
        "seed": args.seed,
        "us_per_event": {
            k: {t: round(v, 3) for t, v in best.items()} for k, best in results.items()
        },
        "events_per_second_decode_event": round(throughput),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
