"""Print one table of every benchmark's figures from ``bench/results/*.json`` (``make bench``).

    .venv/bin/python bench/report.py [--results DIR] [--markdown]

Known benchmarks (e2e, features, validation) get their headline rows with the issue's
targets; any other result file gets a row per throughput-like number it holds, so a new
benchmark shows up without editing this file. Each row carries the load average recorded with
the figure: the machine is shared, read the figures with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

RESULTS = Path(__file__).resolve().parent / "results"
Row = tuple[str, str, str, str]
"""figure, value, target, load average."""


def _num(value: Any, unit: str = "", digits: int = 0) -> str:
    if not isinstance(value, int | float):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def _load(value: Any) -> str:
    if isinstance(value, list):
        flat = [v for v in value if isinstance(v, int | float)] or [
            x for v in value if isinstance(v, list) for x in v if isinstance(x, int | float)
        ]
        return f"{min(flat):.1f}-{max(flat):.1f}" if flat else "n/a"
    return _num(value, digits=1)


def e2e_rows(r: dict[str, Any]) -> Iterator[Row]:
    start_load = r.get("machine", {}).get("load_average_at_start", [None])[0]
    one = r.get("one_worker", {})
    raw = r.get("raw_consume", {})
    yield (
        f"e2e: one worker, events/s (median, runs: {one.get('runs', '?')})",
        _num(one.get("events_per_s")),
        ">= 20,000",
        _load(one.get("load_average")),
    )
    yield (
        "e2e: raw aiokafka consume + decode, events/s",
        _num(raw.get("events_per_s")),
        "",
        _load([x.get("load_average") for x in raw.get("runs", [])]),
    )
    yield ("e2e: one worker / raw consume", _num(one.get("ratio_to_raw_consume"), digits=3), "", "")
    yield (
        "e2e: worker CPU per event",
        _num(one.get("worker_cpu_us_per_event"), " us", 1),
        "",
        "",
    )
    yield (
        "e2e: Redis CPU per event (INFO cpu main thread, shared server)",
        _num(one.get("redis_cpu_us_per_event"), " us", 1),
        "<= 10 us",
        "",
    )
    step = r.get("batch_step_inprocess")
    if step:
        yield (
            "e2e: batch step in-process (no Faust/Kafka), CPU per event",
            _num(step.get("cpu_us_per_event"), " us", 1),
            "",
            _load([x.get("load_average") for x in step.get("runs", [])]),
        )
    two = r.get("two_workers")
    if two:
        yield (
            "e2e: two workers, 4 partitions, events/s (steady 10-90 %)",
            _num(two.get("steady_events_per_s")),
            "",
            _load(two.get("load_average")),
        )
        yield (
            "e2e: scaling two / one worker (steady)",
            _num(two.get("scaling_ratio_steady"), "x", 2),
            ">= 1.8x",
            "",
        )
    for rate, lat in r.get("latency", {}).items():
        target = "p99 <= 25 ms" if rate == "5000" else ""
        yield (
            f"e2e: decision latency at {int(rate):,}/s p50 / p95 / p99",
            " / ".join(_num(lat.get(k), digits=0) for k in ("p50_ms", "p95_ms", "p99_ms")) + " ms",
            target,
            _load([x.get("load_average") for x in lat.get("runs", [])]),
        )
    memory = r.get("memory", {})
    if memory:
        yield (
            f"e2e: worker RSS growth, 100k -> {memory.get('events', 0):,} events",
            _num(memory.get("rss_growth_from_100k_pct"), " %", 2)
            + f" ({_num(memory.get('rss_kib_end', 0) / 1024, ' MiB', 0)})",
            "<= 5 %",
            _load(memory.get("load_average")),
        )
        yield (
            f"e2e: worker RSS growth, 10k -> {memory.get('events', 0):,} events",
            _num(memory.get("rss_growth_pct"), " %", 2),
            "",
            "",
        )
        redis = memory.get("redis", {})
        yield (
            "e2e: Redis bytes per active user (MEMORY USAGE, all keys)",
            _num(redis.get("bytes_per_user"), " B", 0),
            "<= 1,000 B",
            "",
        )
        if redis.get("feature_record_bytes_per_user") is not None:
            yield (
                "e2e: Redis bytes per active user (feature record field)",
                _num(redis["feature_record_bytes_per_user"], " B", 0),
                "<= 300 B",
                "",
            )
    yield ("e2e: load average at start", _num(start_load, digits=2), "", "")


def features_rows(r: dict[str, Any]) -> Iterator[Row]:
    load = r.get("machine", {}).get("load_average_1m") or r.get("machine", {}).get("loadavg")
    for name, figures in r.get("throughput", {}).items():
        cpu = figures.get("us_per_event", {}).get("client_cpu")
        yield (
            f"features: {name}, events/s (CPU per event)",
            f"{_num(figures.get('events_per_s'))} ({_num(cpu, ' us', 1)})",
            "",
            _load(load),
        )
    server = r.get("server", {})
    where = server.get("redis_server", "?")
    for name, label in (("warm", "warm load"), ("cold", "cold load (fresh stores)")):
        if name in server:
            yield (
                f"features: Redis CPU per event, {label}, {where} server",
                _num(server[name].get("server_main_thread_cpu_us_per_event"), " us", 2),
                "<= 10 us" if name == "warm" else "",
                "",
            )
    records = r.get("records", {})
    if records:
        yield (
            "features: Redis bytes per user (record keys, MEMORY USAGE)",
            _num(records.get("bytes_per_user_memory_usage"), " B", 0),
            "<= 300 B",
            "",
        )
        blob = records.get("blob_bytes", {})
        yield (
            "features: record blob bytes mean / p95 / max",
            " / ".join(_num(blob.get(k)) for k in ("mean", "p95", "max")) + " B",
            "",
            "",
        )
        yield (
            "features: encode_record / decode_record CPU per record",
            f"{_num(records.get('encode_us_per_record'), digits=1)}"
            f" / {_num(records.get('decode_us_per_record'), ' us', 1)}",
            "",
            "",
        )


def validation_rows(r: dict[str, Any]) -> Iterator[Row]:
    load = r.get("machine", {}).get("load_average_1m")
    yield (
        "validation: decode_event, events/s",
        _num(r.get("events_per_second_decode_event")),
        "",
        _load(load),
    )


def generic_rows(name: str, r: dict[str, Any]) -> Iterator[Row]:
    """Every number under a key that reads like a rate, at most ten."""
    found = 0

    def walk(node: Any, path: str) -> Iterator[Row]:
        nonlocal found
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, int | float) and path.rsplit(".", 1)[-1].endswith(
            ("per_s", "per_second", "_us", "_ms")
        ):
            found += 1
            if found <= 10:
                yield (f"{name}: {path}", _num(node, digits=2), "", "")

    yield from walk(r, "")


KNOWN: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "e2e": e2e_rows,
    "features": features_rows,
    "validation": validation_rows,
}


def rows(results: Path) -> list[Row]:
    out: list[Row] = []
    for path in sorted(results.glob("*.json")):
        try:
            report = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            out.append((f"{path.name}: unreadable ({type(exc).__name__})", "", "", ""))
            continue
        if not isinstance(report, dict):
            continue
        name = str(report.get("benchmark", path.stem))
        maker = KNOWN.get(name)
        out.extend(maker(report) if maker else generic_rows(name, report))
    return out


def render(table: Sequence[Row], markdown: bool) -> str:
    header: Row = ("figure", "value", "target", "load avg")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in table]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for docs)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"no results directory {args.results}: run `make bench` first", file=sys.stderr)
        return 2
    table = rows(args.results)
    if not table:
        print(f"no results in {args.results}: run `make bench` first", file=sys.stderr)
        return 2
    print(render(table, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
