"""Time ``dealstream backtest`` on simulated events, next to River's progressive validation.

1. Simulates ``--events`` events of the open-loop world
   (``engine.analysis.simulation.world.open_loop(users=..., seed=1)``) into a temporary
   JSONL file once (not timed).
2. Runs the backtest exactly as the CLI does (``streams.cli.backtest_files.run_backtest_command``:
   import + decode, the engine per campaign set, decisions.jsonl, report.json, report.html)
   and reports events/s, wall and CPU time, split into the run itself and the reporting tail.
3. Reads the labelled decisions back from decisions.jsonl (the rows the engine's model learned,
   in order, up to ``--river-rows``) and runs River's ``evaluate.progressive_val_score`` with the
   engine's model pipeline (StandardScaler | LogisticRegression, SGD 0.05) on the same feature
   rows (``engine.model.inputs.model_inputs``: selected features + discount), reporting rows/s.

Prints the figures and writes ``bench/results/backtest.json``; it never asserts on them.

    .venv/bin/python bench/bench_backtest.py [--events 1000000] [--users 20000]
        [--campaigns deploy/campaigns/paper.toml] [--river-rows 300000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from river import evaluate, linear_model, metrics, optim, preprocessing

from engine.analysis.simulation.world import open_loop
from engine.model.inputs import model_inputs
from engine.pipeline import EngineConfig
from streams.cli.backtest_files import run_backtest_command
from streams.operations.allocator import fix_mmap_threshold
from streams.operations.garbage_collector import tune_garbage_collector
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "backtest.json"
TARGET_EVENTS_PER_S = 100_000


def simulate(path: Path, events: int, users: int) -> float:
    started = time.perf_counter()
    with path.open("wb") as handle:
        for event in open_loop(users=users, events=events, seed=1):
            handle.write(orjson.dumps(event) + b"\n")
    return time.perf_counter() - started


def labelled_rows(log: Path, limit: int) -> list[tuple[dict[str, float], bool]]:
    rows: list[tuple[dict[str, float], bool]] = []
    with log.open("rb") as handle:
        for line in handle:
            record = orjson.loads(line)
            rows.append(
                (model_inputs(record["features"], record["discount_pct"]), bool(record["reward"]))
            )
            if len(rows) >= limit:
                break
    return rows


def river_progressive(rows: list[tuple[dict[str, float], bool]]) -> dict[str, Any]:
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression(
        optimizer=optim.SGD(0.05)
    )
    metric = metrics.ROCAUC()
    wall, cpu = time.perf_counter(), time.process_time()
    evaluate.progressive_val_score(dataset=iter(rows), model=model, metric=metric)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "rows": len(rows),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "rows_per_s": round(len(rows) / wall, 1) if wall else None,
        "rows_per_cpu_s": round(len(rows) / cpu, 1) if cpu else None,
        "roc_auc": round(float(metric.get()), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--campaigns", type=Path, default=REPO / "deploy/campaigns/paper.toml")
    parser.add_argument("--river-rows", type=int, default=300_000)
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    # the collector and the allocator as `dealstream backtest` sets them
    settings = Settings.from_env()
    tune_garbage_collector(settings.gc_threshold)
    fix_mmap_threshold(settings.malloc_mmap_threshold)

    with tempfile.TemporaryDirectory(prefix="bench-backtest-") as tmp:
        root = Path(tmp)
        events = root / "events.jsonl"
        simulate_s = simulate(events, args.events, args.users)
        print(f"simulated {args.events:,} events for {args.users:,} users in {simulate_s:.1f} s")
        out = root / "out"
        wall, cpu = time.perf_counter(), time.process_time()
        run_backtest_command(
            input_path=events,
            campaign_paths=[args.campaigns],
            out_dir=out,
            seed=0,
            input_format="jsonl",
            config=EngineConfig(),
            batch_size=2000,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        timing = orjson.loads((out / "timing.json").read_bytes())
        report = orjson.loads((out / "report.json").read_bytes())
        log_bytes = (out / "decisions.jsonl").stat().st_size
        rows = labelled_rows(out / "decisions.jsonl", args.river_rows)
    river = river_progressive(rows)

    run_rate = timing["events_per_second"]
    backtest = {
        "events": report["events"],
        "decisions": report["decisions"],
        "labelled_decisions": report["decisions"] - report["pending_decisions"],
        "offers": report["offers"],
        "run_s": timing["elapsed_s"],
        "events_per_s": run_rate,
        "total_wall_s": round(wall, 3),
        "total_cpu_s": round(cpu, 3),
        "events_per_total_cpu_s": round(args.events / cpu, 1) if cpu else None,
        "report_tail_s": round(wall - timing["elapsed_s"], 3),
        "decisions_jsonl_mb": round(log_bytes / 1e6, 1),
        "model_auc": report["model"]["auc"],
        "campaigns": {
            key: {
                k: c[k]
                for k in ("decisions", "offers", "spend", "committed_spend", "uplift", "itt")
            }
            for key, c in report["campaigns"].items()
        },
        "target_events_per_s": TARGET_EVENTS_PER_S,
        "meets_target": run_rate >= TARGET_EVENTS_PER_S,
    }
    print(
        f"backtest: {backtest['events']:,} events, {backtest['decisions']:,} decisions in "
        f"{backtest['run_s']:.1f} s = {run_rate:,.0f} events/s (target {TARGET_EVENTS_PER_S:,}: "
        f"{'met' if backtest['meets_target'] else 'MISSED'}); whole command {wall:.1f} s wall, "
        f"{cpu:.1f} s CPU"
    )
    print(
        f"river progressive_val_score: {river['rows']:,} labelled rows in {river['wall_s']:.1f} s "
        f"= {river['rows_per_s']:,.0f} rows/s (ROC AUC {river['roc_auc']}); the backtest learned "
        f"the same rows inline while computing features and deciding"
    )
    result = {
        "benchmark": "backtest",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "river": metadata.version("river"),
            "orjson": metadata.version("orjson"),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "events": args.events,
            "users": args.users,
            "campaigns": args.campaigns.name,
            "simulator_seed": 1,
            "batch_size": 2000,
            "simulate_s": round(simulate_s, 2),
        },
        "backtest": backtest,
        "river_progressive_val_score": river,
    }
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
