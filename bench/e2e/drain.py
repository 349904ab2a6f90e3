"""Drain runs: worker processes empty preloaded topics; throughput, RSS and Redis memory.

A run starts the worker(s) on the preloaded topics with a fresh consumer group and a fresh
Redis key prefix (so every run starts from empty state), polls the workers' ``/metrics``
counters, and derives:

- ``events_per_s``: preloaded events / (time of the last consumed record - time the first was
  counted), the figure the issue asks for;
- ``steady_events_per_s``: the rate between 10 % and 90 % consumed, which leaves out start-up
  and the group rebalance when two workers join (used for the scaling ratio);
- the worker's RSS after a warm-up and at the end, its CPU seconds, and Redis bytes per user;
- ``redis_cpu_us_per_event``: the Redis server's main-thread CPU (``INFO cpu``
  ``used_cpu_user_main_thread`` + ``used_cpu_sys_main_thread``) from the warm-up to the end,
  divided by the records counted in between, and ``redis_command_us_per_event`` the busiest
  commands' execution time (``INFO commandstats``: wall clock inside the server, so time the
  server thread was preempted on a busy machine counts) over the same window, with their
  calls per record in ``redis_command_calls_per_event`` (commands a script runs count as
  calls of their own, besides the script's ``evalsha``). The server is
  shared: its other clients' work over the drain (other engineers, other benchmarks) counts
  too, so these are upper bounds.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.e2e.common import Names, Worker, crossing, load_average, median, wait_consumed
from streams.adapters.redis_store import RECORD_FIELD

RSS_WARMUP_EVENTS = 10_000
RSS_MARKS = (10_000, 100_000, 250_000, 500_000, 750_000, 1_000_000, 2_000_000)
"""Consumed counts at which the first worker's RSS is recorded: growth that levels off is a
cache filling up to its bound, growth that keeps going is a leak."""
MEMORY_SAMPLE_KEYS = 2_000


@dataclass(frozen=True, slots=True)
class DrainConfig:
    bootstrap: str
    redis_url: str
    events: int
    users_active: int
    log_dir: Path
    worker_env: dict[str, str]
    stall_timeout_s: float = 120.0
    profile: Path | None = None
    """Where to write a py-spy profile (collapsed stacks) of the first worker, after warm-up."""
    profile_s: int = 20


async def _used_memory(client: aioredis.Redis) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


@dataclass(frozen=True, slots=True)
class RedisMark:
    """The Redis server's counters when ``counted`` records were consumed."""

    counted: int
    cpu_s: float
    """CPU seconds of the server's main thread (commands, scripts, network I/O)."""
    commands: dict[str, tuple[int, int]]
    """``INFO commandstats``: calls and microseconds of execution per command."""

    @classmethod
    async def read(cls, client: aioredis.Redis, counted: int) -> RedisMark:
        cpu = await client.info("cpu")
        stats = await client.info("commandstats")
        return cls(
            counted,
            float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"]),
            {
                name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for name, v in stats.items()
            },
        )

    def per_event(self, end: RedisMark) -> dict[str, Any]:
        """Main-thread CPU and the busiest commands' execution time per record counted."""
        events = max(end.counted - self.counted, 1)
        usec = {
            name: usec - self.commands.get(name, (0, 0))[1]
            for name, (calls, usec) in end.commands.items()
            if calls > self.commands.get(name, (0, 0))[0]
        }
        busiest = sorted(usec.items(), key=lambda kv: -kv[1])[:6]
        return {
            "redis_cpu_us_per_event": round(1e6 * (end.cpu_s - self.cpu_s) / events, 2),
            "redis_command_us_per_event": {name: round(us / events, 2) for name, us in busiest},
            "redis_command_calls_per_event": {
                name: round(
                    (end.commands[name][0] - self.commands.get(name, (0, 0))[0]) / events, 4
                )
                for name, _ in busiest
            },
        }


def _key_kind(key: bytes, prefix: str) -> str:
    return key.decode(errors="replace")[len(prefix) :].split(":", 1)[0] or "?"


async def _usage_without_record(
    client: aioredis.Redis, prefix: str, keys: list[bytes]
) -> list[int]:
    """``MEMORY USAGE`` of each user key without its feature record: a copy of the key with
    the record's field deleted (0 when the record was all it held)."""
    scratch = f"{prefix}bench-scratch"
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.copy(key, scratch, replace=True)
            pipe.hdel(scratch, RECORD_FIELD)
            pipe.memory_usage(scratch, samples=0)
            pipe.delete(scratch)
        replies = await pipe.execute()
    return [int(usage or 0) for usage in replies[2::4]]


async def redis_bytes(client: aioredis.Redis, prefix: str, users: int) -> dict[str, Any]:
    """Bytes per active user under ``prefix``, by key kind (the name after the prefix up to its
    first colon: ``u`` the user keys, ``lq`` the label indexes, ``b`` budgets, ...):
    ``MEMORY USAGE`` of every key of a kind, or of a random sample of ``MEMORY_SAMPLE_KEYS``
    scaled to the kind's key count. Every kind is measured: a kind of a few large keys (the
    label indexes) counts as much as its bytes. ``feature_record_bytes_per_user``: the feature
    record's share of the user keys (``MEMORY USAGE`` of each sampled key minus that of a copy
    without the record's field), the issue's "feature state + dedup"."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=5000)]
    by_kind_keys: dict[str, list[bytes]] = {}
    for key in keys:
        by_kind_keys.setdefault(_key_kind(key, prefix), []).append(key)
    rng = random.Random(7)
    by_kind: dict[str, dict[str, float]] = {}
    record_bytes = 0.0
    for kind, kind_keys in sorted(by_kind_keys.items()):
        sample = rng.sample(kind_keys, min(MEMORY_SAMPLE_KEYS, len(kind_keys)))
        async with client.pipeline(transaction=False) as pipe:
            for key in sample:
                pipe.memory_usage(key, samples=0)
            usages = [int(usage or 0) for usage in await pipe.execute()]
        average = sum(usages) / len(usages)
        by_kind[kind] = {
            "keys": len(kind_keys),
            "avg_bytes": round(average, 1),
            "bytes_per_user": round(average * len(kind_keys) / max(users, 1), 1),
        }
        if kind == "u":
            without = await _usage_without_record(client, prefix, sample)
            record_bytes = (sum(usages) - sum(without)) / len(sample) * len(kind_keys)
            record_bytes /= max(users, 1)
    total = sum(k["bytes_per_user"] for k in by_kind.values())
    return {
        "keys": len(keys),
        "bytes_per_user": round(total, 1),
        "feature_record_bytes_per_user": round(record_bytes, 1),
        "by_kind": by_kind,
    }


async def drain_run(
    config: DrainConfig, names: Names, *, target: int, timed: int, workers: int = 1
) -> dict[str, Any]:
    """One run with ``workers`` worker processes in one consumer group, until ``target``
    records are consumed; throughput is timed over the first ``timed`` records (so that runs
    of different lengths compare). Redis bytes per user are measured only when ``target`` is
    every preloaded event (then every active user has state)."""
    client = aioredis.Redis.from_url(config.redis_url)
    procs = [
        Worker(
            names,
            bootstrap=config.bootstrap,
            redis_url=config.redis_url,
            log_dir=config.log_dir,
            extra=config.worker_env,
        )
        for _ in range(workers)
    ]
    load_start = load_average()
    used_before = await _used_memory(client)
    try:
        for proc in procs:
            proc.start()
        rss_start: list[int] = []
        cpu_start: list[float] = []
        gc_start: list[dict[str, dict[str, float]] | None] = []
        redis_start: list[RedisMark] = []
        spy: list[subprocess.Popen[bytes]] = []

        series: dict[str, int] = {}

        async def on_sample(total: int) -> None:
            for mark in RSS_MARKS:
                if str(mark) not in series and total >= mark:
                    series[str(mark)] = procs[0].rss_kib()
            if not rss_start and total >= RSS_WARMUP_EVENTS:
                rss_start.extend(p.rss_kib() for p in procs)
                cpu_start.extend(p.cpu_seconds() for p in procs)
                gc_start.append(await procs[0].gc_pauses())
                redis_start.append(await RedisMark.read(client, total))
                if config.profile is not None:
                    spy.append(start_py_spy(procs[0].pid, config.profile, config.profile_s))

        samples = await wait_consumed(
            procs, target, timeout_s=config.stall_timeout_s, on_sample=on_sample
        )
        consumed = samples[-1][1]
        redis_end = await RedisMark.read(client, consumed)
        for profiler in spy:
            await asyncio.to_thread(profiler.wait)
        rss_end = [p.rss_kib() for p in procs]
        gc_end = await procs[0].gc_pauses()
        cpu_end = [p.cpu_seconds() for p in procs]
        load_end = load_average()
        first = next(t for t, n in samples if n > 0)
        last = crossing(samples, timed)
        t10 = crossing(samples, 0.1 * timed)
        t90 = crossing(samples, 0.9 * timed)
        result: dict[str, Any] = {
            "workers": workers,
            "events": consumed,
            "timed_events": timed,
            "drain_s": round(last - first, 2),
            "events_per_s": round(timed / (last - first)),
            "steady_events_per_s": round(0.8 * timed / (t90 - t10)),
            "load_average": [load_start, load_end],
        }
        if rss_start:
            result["rss_kib_after_warmup"] = rss_start
            result["rss_kib_end"] = rss_end
            result["rss_kib_first_worker_by_events"] = series
            result["rss_growth_pct"] = [
                round(100 * (end - start) / start, 2)
                for start, end in zip(rss_start, rss_end, strict=True)
            ]
            busy = sum(cpu_end) - sum(cpu_start)
            result["worker_cpu_us_per_event"] = round(
                1e6 * busy / max(consumed - RSS_WARMUP_EVENTS, 1), 1
            )
            result.update(redis_start[0].per_event(redis_end))
            if gc_start[0] is not None and gc_end is not None:
                result["gc_pauses_first_worker"] = gc_pause_delta(
                    gc_start[0], gc_end, consumed - RSS_WARMUP_EVENTS
                )
        if target < config.events:
            return result
        used_after = await _used_memory(client)
        result["redis"] = {
            "used_memory_delta_per_user": round(
                (used_after - used_before) / config.users_active, 1
            ),
            **await redis_bytes(client, names.redis_prefix, config.users_active),
        }
        return result
    finally:
        for proc in procs:
            await proc.stop()
        await client.aclose()


def gc_pause_delta(
    start: dict[str, dict[str, float]], end: dict[str, dict[str, float]], events: int
) -> dict[str, dict[str, float]]:
    """Per generation, between two scrapes: collections, pauses of 25 ms or more, the mean
    pause and the collector's time per event."""
    delta: dict[str, dict[str, float]] = {}
    for generation, counts in sorted(end.items()):
        before = start.get(generation, {})
        count = counts.get("count", 0.0) - before.get("count", 0.0)
        seconds = counts.get("sum", 0.0) - before.get("sum", 0.0)
        delta[generation] = {
            "collections": count,
            "over_25ms": counts.get("over_25ms", 0.0) - before.get("over_25ms", 0.0),
            "mean_ms": round(1000 * seconds / count, 2) if count else 0.0,
            "us_per_event": round(1e6 * seconds / max(events, 1), 2),
        }
    return delta


def start_py_spy(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    """Sample the worker with py-spy (collapsed stacks, idle frames left out)."""
    exe = Path(sys.executable).with_name("py-spy")
    command = [str(exe), "record", "--pid", str(pid), "--duration", str(seconds)]
    command += ["--format", "raw", "--output", str(out), "--rate", "200"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def run_names(base: Names, tag: str) -> Names:
    """The preloaded topics with a fresh group and Redis prefix for one run."""
    return Names(base.topic_prefix, f"{base.redis_prefix}{tag}:", f"{base.group_id}-{tag}")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of every figure the table shows."""

    def med(key: str) -> float:
        return median(r[key] for r in runs)

    out: dict[str, Any] = {
        "events_per_s": med("events_per_s"),
        "steady_events_per_s": med("steady_events_per_s"),
        "drain_s": med("drain_s"),
        "runs": len(runs),
        "load_average": [r["load_average"] for r in runs],
    }
    for key in ("worker_cpu_us_per_event", "redis_cpu_us_per_event"):
        if all(key in r for r in runs):
            out[key] = med(key)
    return out


RSS_TARGET_FROM_EVENTS = 100_000
"""Issue 12's memory target: RSS growth from this many events to the end of the drain."""


def memory_summary(run: dict[str, Any]) -> dict[str, Any]:
    """RSS and Redis figures of the run that consumed every preloaded event."""
    series = run.get("rss_kib_first_worker_by_events", {})
    end = run["rss_kib_end"][0]
    start = series.get(str(RSS_TARGET_FROM_EVENTS))
    return {
        "events": run["events"],
        "rss_kib_after_warmup": run["rss_kib_after_warmup"][0],
        "rss_kib_end": end,
        "rss_growth_pct": run["rss_growth_pct"][0],
        "rss_growth_from_100k_pct": round(100 * (end - start) / start, 2) if start else None,
        "rss_kib_by_events": series,
        "load_average": run["load_average"],
        "redis": run["redis"],
    }
