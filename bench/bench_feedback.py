"""Compare the delayed-feedback methods on the closed-loop simulator, seed by seed.

For each method (``engine.model.feedback``) and seed, runs ``dealstream backtest --simulate`` in
process (``engine.analysis.simulation.closed_loop.run_closed_loop``: every campaign of the file
against its own
world, its oracle and the no-offer world) and records, per campaign: the model's prequential
and as-served AUC and ECE, the realised and expected incremental margin, the oracle's, and
the stop-loss state at the end. Prints one table and writes ``bench/results/feedback.json``;
it asserts nothing (``docs/model-quality.md`` quotes the figures).

    .venv/bin/python bench/bench_feedback.py [--seeds 1,2,3,4,5] [--size 2000:200000]
        [--methods naive,closed,fnw,esdfm,dfm] [--campaigns deploy/campaigns/paper.toml]
        [--world deploy/worlds/FILE.toml] [--jobs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import orjson

from engine.analysis.simulation.closed_loop import ClosedLoopConfig, run_closed_loop
from engine.analysis.simulation.params import WorldParams, load_world_file
from engine.campaigns import load_campaigns
from engine.model.feedback import Feedback, FeedbackMethod

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "feedback.json"


def run_one(job: tuple[str, int, str, int, int, str | None]) -> list[dict[str, Any]]:
    method, seed, campaigns_path, users, events, world_path = job
    world = load_world_file(Path(world_path)).params if world_path else WorldParams()
    config = ClosedLoopConfig(
        users=users,
        events=events,
        seed=seed,
        world=world,
        feedback=Feedback(FeedbackMethod(method)),
    )
    started = time.perf_counter()
    run = run_closed_loop(load_campaigns(Path(campaigns_path)), config)
    rows: list[dict[str, Any]] = []
    policies = {row["campaign"]: row for row in run.simulation["policies"]}  # type: ignore[attr-defined]
    baseline = run.simulation["baseline"]["margin"]  # type: ignore[index]
    for name, backtest in run.backtests.items():
        group = backtest.groups[0]
        prequential, served = group.model.summary(), group.served.summary()
        status = group.engine.stop_loss.get(name)
        row = policies[name]
        rows.append(
            {
                "method": method,
                "seed": seed,
                "campaign": name,
                "baseline_margin": baseline,
                "incremental_margin": row["incremental_margin"],
                "expected_incremental_margin": row["expected_incremental_margin"],
                "oracle_incremental_margin": row["oracle_incremental_margin"],
                "offers": row["offers"],
                "prequential_auc": prequential["auc"],
                "prequential_ece": prequential["ece"],
                "served_auc": served["auc"],
                "served_ece": served["ece"],
                "labels": served["n_labels"],
                "stopped": None if status is None else status.stopped,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--methods", default=",".join(m.value for m in FeedbackMethod))
    parser.add_argument("--size", default="2000:200000")
    parser.add_argument("--campaigns", default=str(REPO / "deploy/campaigns/paper.toml"))
    parser.add_argument("--world", default=None, help="a [world] TOML file (deploy/worlds)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    users, events = (int(part) for part in args.size.split(":"))
    jobs = [
        (method, int(seed), args.campaigns, users, events, args.world)
        for method in args.methods.split(",")
        for seed in args.seeds.split(",")
    ]
    rows: list[dict[str, Any]] = []
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for result in pool.imap(run_one, jobs):
            for row in result:
                rows.append(row)
                print(
                    f"{row['method']:7} seed {row['seed']} {row['campaign']:10} "
                    f"margin {row['incremental_margin']:+10.2f} (oracle "
                    f"{row['oracle_incremental_margin']:+9.2f}) offers {row['offers']:6} "
                    f"prequential AUC {row['prequential_auc']:.3f} ECE {row['prequential_ece']:.3f}"
                    f" | served AUC {row['served_auc']:.3f} ECE {row['served_ece']:.3f}"
                    f" | stopped {row['stopped']}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "size": args.size,
        "campaigns": Path(args.campaigns).name,
        "world": args.world,
        "rows": rows,
    }
    args.out.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
