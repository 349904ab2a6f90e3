"""Time the feature path against real Redis: partition-owned records, one script call per batch.

What ``DiscountEngine.process`` does before scoring, single process: build ``StateUpdate``s with
``event_ops``, call ``RedisFeatureStore.apply_batch`` (records held in memory, applied with the
engine's ``apply_updates``, every touched user's record written with the batch's watermark in
one ``commit_batch.lua`` call), and replay the batch on the returned ``before`` states with
``apply_ops`` + ``compute_features``. The same passes run on ``InMemoryFeatureStore`` (the
difference is what Redis costs), and a *cold* pass gives every ``--cold-every`` batches a fresh
store that holds nothing, so it reads its users' records from Redis: what a worker pays after a
rebalance. Then, on a private ``redis-server``, it loads the whole data set warm and cold
(Redis main-thread CPU per event from ``INFO cpu``: no other client counts there), measures
the records left (``MEMORY USAGE`` per key, blob bytes, fields and event ids per record,
``encode_record`` / ``decode_record`` CPU per record), and profiles one pass with cProfile.
Prints figures and writes ``bench/results/features.json``; it never asserts on them.

    .venv/bin/python bench/bench_features.py [--users 50000] [--events 300000] [--batch 500]

Needs a Redis (``--redis-url``, default ``redis://127.0.0.1:6379/0``). Every key it writes
there carries its own prefix (``bench:<pid>:feat:...``) and is deleted at the end; it never
flushes. The private server (no persistence, a free port) is stopped at the end; without a
``redis-server`` on PATH, or with ``--memory-redis shared``, those figures come from the
shared one, where other clients' work counts in them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import hashlib
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis
import redis.asyncio as aioredis

# `python bench/x.py` puts bench/ on the path, not the repository that holds the bench package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.private_redis import private_redis
from engine.analysis.simulation.world import DEFAULT_MEAN_GAP_MS, open_loop
from engine.events import Event, PurchaseEvent, parse_event
from engine.features.catalogue import compute_features
from engine.features.record import UserRecord, decode_record, encode_record
from engine.features.state import apply_ops, event_ops, trigger_category
from engine.features.store import InMemoryFeatureStore, Position, StateUpdate, UpdateStatus
from engine.pipeline import EngineConfig
from engine.ports import FeatureStore
from streams.adapters.redis_store import RECORD_FIELD, RedisFeatureStore

RESULTS = Path(__file__).resolve().parent / "results" / "features.json"
TARGET_EVENTS_PER_S = 40_000
TARGET_BYTES_PER_USER = 300
TARGET_REDIS_CPU_US = 10.0
SOURCE = "bench"
PRODUCTION_PREFIX = "ds:"
"""``streams.settings`` default; used on the private server only (key names count in bytes)."""
CHUNK = 2_000
"""Keys per MGET / pipeline when reading every record back."""
INTERESTING = (
    "apply_batch",
    "_apply_once",
    "_load_missing",
    "_claim",
    "_evict",
    "apply_updates",
    "classify",
    "seen_key",
    "encode_record",
    "decode_record",
    "_field_code",
    "user_key",
    "hash_tag",
    "pack_command",
    "execute_command",
    "event_ops",
    "apply_ops",
    "apply_records",
    "decode_state",
    "state_context",
    "compute_features",
    "select",
    "poll",
)
T = TypeVar("T")


# -- data ------------------------------------------------------------------------------------


Batch = Sequence[tuple[Event, Position]]


def make_batches(events: Sequence[Event], size: int) -> list[list[tuple[Event, Position]]]:
    """One partition: every batch carries the same watermark field (as a worker of one)."""
    positioned = [(event, Position(SOURCE, 0, offset)) for offset, event in enumerate(events)]
    return [positioned[i : i + size] for i in range(0, len(positioned), size)]


def record_lookups(batches: Sequence[Batch], every: int) -> tuple[int, int]:
    """(users a store reads from Redis, of whom Redis holds a record) over a pass whose store
    is replaced every ``every`` batches: a store reads each user it does not hold, and a user
    has a record once an earlier batch carried them (every event applied, as the statuses
    printed with the pass show)."""
    known: set[str] = set()
    held: set[str] = set()
    lookups = found = 0
    for index, batch in enumerate(batches):
        if index % every == 0:
            held = set()
        users = {event.user_id for event, _ in batch}
        new = users - held
        lookups += len(new)
        found += len(new & known)
        held |= users
        known |= users
    return lookups, found


# -- one pass --------------------------------------------------------------------------------


@dataclass(slots=True)
class PassResult:
    events: int
    wall_s: float
    build_s: float
    """``event_ops`` + ``StateUpdate`` construction."""
    apply_s: float
    """``apply_batch`` as the caller sees it (reads of missing records, ``apply_updates``,
    encoding, the script call)."""
    features_s: float
    """Replay: ``apply_ops`` on the before state + ``compute_features`` per applied event
    (purchases get no vector, as in ``process``)."""
    vectors: int
    statuses: dict[str, int]
    stores: int
    """Stores the pass used (more than one: a cold pass)."""
    cpu_s: float = 0.0
    """This process's CPU time over the pass (less sensitive to a busy machine than wall)."""
    server_cpu_s: float | None = None
    """Redis main-thread CPU over the pass (``INFO cpu``; on the shared server other clients'
    work counts too)."""
    server: dict[str, dict[str, int]] = field(default_factory=dict)
    """Redis ``INFO commandstats`` deltas over the pass (calls, usec: wall time inside the
    server, so preemption on a busy machine counts; main-thread CPU is the firmer figure)."""

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s


async def run_pass(
    stores: Sequence[FeatureStore],
    batches: Sequence[Batch],
    *,
    features: bool,
    lateness_ms: int,
) -> PassResult:
    """Exactly the feature part of ``DiscountEngine.process`` for every batch, batch ``i``
    applied by ``stores[i]`` (built beforehand: constructing stores is not timed)."""
    clock = time.perf_counter
    build_s = apply_s = features_s = 0.0
    vectors = 0
    statuses: Counter[UpdateStatus] = Counter()
    applied = UpdateStatus.APPLIED
    cpu_start = time.process_time()
    start = clock()
    for store, batch in zip(stores, batches, strict=True):
        t0 = clock()
        updates = [
            StateUpdate(
                user_id=event.user_id,
                event_id=event.event_id,
                ts=event.ts,
                ops=event_ops(event),
                position=position,
            )
            for event, position in batch
        ]
        t1 = clock()
        outcome = await store.apply_batch(updates, allowed_lateness_ms=lateness_ms)
        t2 = clock()
        statuses.update(outcome.statuses)
        if features:
            states = outcome.before
            for (event, _), update, status in zip(batch, updates, outcome.statuses, strict=True):
                if status is not applied:
                    continue
                state = states[event.user_id]
                apply_ops(state, update.ops)
                if not isinstance(event, PurchaseEvent):  # as in process: no vector for these
                    compute_features(state, category=trigger_category(event))
                    vectors += 1
            features_s += clock() - t2
        build_s += t1 - t0
        apply_s += t2 - t1
    wall_s = clock() - start
    cpu_s = time.process_time() - cpu_start
    return PassResult(
        events=sum(len(batch) for batch in batches),
        wall_s=wall_s,
        build_s=build_s,
        apply_s=apply_s,
        features_s=features_s,
        vectors=vectors,
        statuses={status.name.lower(): n for status, n in sorted(statuses.items())},
        stores=len({id(store) for store in stores}),
        cpu_s=cpu_s,
    )


# -- redis helpers ---------------------------------------------------------------------------


async def commandstats(client: aioredis.Redis) -> dict[str, dict[str, int]]:
    raw = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
        for name, v in raw.items()
    }


def stats_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    delta = {}
    for name, now in after.items():
        then = before.get(name, {"calls": 0, "usec": 0})
        calls = now["calls"] - then["calls"]
        if calls > 0:
            delta[name] = {"calls": calls, "usec": now["usec"] - then["usec"]}
    return dict(sorted(delta.items(), key=lambda kv: -kv[1]["usec"]))


async def delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    """DEL (synchronous, so INFO memory sees it) every key under ``prefix``."""
    deleted = 0
    chunk: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}*", count=2000):
        chunk.append(key)
        if len(chunk) >= 1000:
            deleted += await client.delete(*chunk)
            chunk = []
    if chunk:
        deleted += await client.delete(*chunk)
    return deleted


async def server_cpu(client: aioredis.Redis) -> float:
    """CPU seconds of the server's main thread (commands, scripts, network I/O)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


class Prefixes:
    """A fresh key prefix per pass under one base, so every pass starts from an empty store."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._next = 0

    def take(self) -> str:
        self._next += 1
        return f"{self.base}{self._next}:"


def schedule(client: aioredis.Redis, prefix: str, batches: int, every: int) -> list[FeatureStore]:
    """One store per batch: the same one throughout (``every`` >= ``batches``), or a fresh
    ``RedisFeatureStore`` every ``every`` batches."""
    stores: list[FeatureStore] = []
    for index in range(batches):
        if index % every == 0:
            store = RedisFeatureStore(client, prefix=prefix)
        stores.append(store)
    return stores


async def redis_pass(
    client: aioredis.Redis,
    prefix: str,
    batches: Sequence[Batch],
    *,
    every: int,
    features: bool,
    lateness_ms: int,
    profiler: cProfile.Profile | None = None,
    keep: bool = False,
) -> PassResult:
    """A pass on ``client`` under ``prefix`` (its keys deleted after unless ``keep``)."""
    stores = schedule(client, prefix, len(batches), every)
    stats_before, cpu_before = await commandstats(client), await server_cpu(client)
    if profiler is not None:
        profiler.enable()
    try:
        result = await run_pass(stores, batches, features=features, lateness_ms=lateness_ms)
    finally:
        if profiler is not None:
            profiler.disable()
    result.server_cpu_s = await server_cpu(client) - cpu_before
    result.server = stats_delta(stats_before, await commandstats(client))
    if not keep:
        await delete_prefix(client, prefix)
    return result


# -- the records Redis holds -----------------------------------------------------------------


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean and nearest-rank p50 / p95 / max."""
    ordered = sorted(values)
    n = len(ordered)
    return {
        "mean": round(statistics.fmean(ordered), 2),
        "p50": ordered[max(0, -(-n * 50 // 100) - 1)],
        "p95": ordered[max(0, -(-n * 95 // 100) - 1)],
        "max": ordered[-1],
    }


def cpu_us_per_item(work: Callable[[T], object], items: Sequence[T], repeats: int = 3) -> float:
    """Median over ``repeats`` of this process's CPU time per call of ``work``."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            work(item)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e6 / len(items)


def python_bytes_per_record(blobs: Sequence[bytes]) -> float:
    """Python heap per decoded record (``tracemalloc``): what a worker holds per cached user,
    besides the store's own entries for it (the user id, two dict slots, a float)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        held = [decode_record(blob) for blob in blobs]
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return grown / len(held)


async def record_figures(
    client: aioredis.Redis, store: RedisFeatureStore, users: Sequence[str]
) -> dict[str, Any]:
    """Every active user's record as Redis holds it: key bytes, blob bytes, contents, and the
    CPU cost of encoding and decoding it."""
    keys = [store.user_key(user) for user in users]
    blobs: list[bytes] = []
    usages: list[int] = []
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i : i + CHUNK]
        async with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hget(key, RECORD_FIELD)
            for key in chunk:
                pipe.memory_usage(key, samples=0)
            replies = await pipe.execute()
        blobs.extend(blob for blob in replies[: len(chunk)] if blob is not None)
        usages.extend(int(usage) for usage in replies[len(chunk) :] if usage is not None)
    records: list[UserRecord] = [decode_record(blob) for blob in blobs]
    encode_us = cpu_us_per_item(encode_record, records)
    decode_us = cpu_us_per_item(decode_record, blobs)
    identical = sum(
        encode_record(record) == blob for record, blob in zip(records, blobs, strict=True)
    )
    return {
        "active_users": len(users),
        "records_found": len(blobs),
        "key_memory_usage_bytes": distribution(usages),
        "bytes_per_user_memory_usage": sum(usages) / len(users),
        "key_name_chars": round(statistics.fmean(len(key) for key in keys), 1),
        "blob_bytes": distribution([len(blob) for blob in blobs]),
        "fields_per_record": distribution([len(record.state) for record in records]),
        "event_ids_per_record": distribution([len(record.seen) for record in records]),
        "encode_us_per_record": encode_us,
        "decode_us_per_record": decode_us,
        "reencoded_identical": identical,
        "python_bytes_per_decoded_record": python_bytes_per_record(blobs),
    }


def load_figures(result: PassResult, lookups: tuple[int, int]) -> dict[str, Any]:
    """A pass's per-event figures on the server it ran on."""
    events = result.events

    def per_event(command: str) -> float:
        return result.server.get(command, {}).get("usec", 0) / events

    return {
        "events_per_s": result.events_per_s,
        "client_cpu_us_per_event": result.cpu_s * 1e6 / events,
        "server_main_thread_cpu_us_per_event": (result.server_cpu_s or 0.0) * 1e6 / events,
        "evalsha_us_per_event": per_event("evalsha"),
        "mget_us_per_event": per_event("mget"),
        "records_read_per_event": lookups[0] / events,
        "records_found_per_event": lookups[1] / events,
        "stores": result.stores,
        "statuses": result.statuses,
        "commandstats": result.server,
    }


async def private_passes(
    client: aioredis.Redis,
    prefix: str,
    batches: Sequence[Batch],
    users: Sequence[str],
    *,
    runs: int,
    cold_every: int,
    lateness_ms: int,
) -> dict[str, Any]:
    """Warm and cold loads of every event on the memory server (``runs`` times each, medians);
    the records left by the first warm load are measured before they are deleted."""
    warm: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    whole = len(batches)
    for run in range(runs):
        await asyncio.sleep(0.2)
        before = await used_memory(client)
        result = await redis_pass(
            client,
            prefix,
            batches,
            every=whole,
            features=False,
            lateness_ms=lateness_ms,
            keep=True,
        )
        warm.append(load_figures(result, record_lookups(batches, whole)))
        if run == 0:
            after = await used_memory(client)
            memory = await record_figures(client, RedisFeatureStore(client, prefix=prefix), users)
            before_delete = await used_memory(client)
            await delete_prefix(client, prefix)
            await asyncio.sleep(0.2)
            freed = before_delete - await used_memory(client)
            memory["bytes_per_user_info"] = (after - before) / len(users)
            memory["bytes_per_user_info_freed"] = freed / len(users)
            memory["key_prefix"] = prefix
        else:
            await delete_prefix(client, prefix)
        result = await redis_pass(
            client, prefix, batches, every=cold_every, features=False, lateness_ms=lateness_ms
        )
        cold.append(load_figures(result, record_lookups(batches, cold_every)))
    return {"warm": median_figures(warm), "cold": median_figures(cold), "memory": memory}


def median_figures(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the numeric figures of several ``load_figures``; the rest of the first."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float):
            out[key] = statistics.median(run[key] for run in runs)
    out["runs_server_main_thread_cpu_us_per_event"] = [
        round(run["server_main_thread_cpu_us_per_event"], 2) for run in runs
    ]
    return out


# -- profile ---------------------------------------------------------------------------------


def profile_tables(profiler: cProfile.Profile, top: int) -> tuple[str, list[dict[str, Any]]]:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    text = out.getvalue()
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_, calls, tottime, cumtime, _) in raw.items():
        if name in INTERESTING or name.startswith("<lambda>"):
            rows.append(
                {
                    "function": f"{Path(filename).name}:{line}({name})",
                    "calls": calls,
                    "tottime_s": round(tottime, 4),
                    "cumtime_s": round(cumtime, 4),
                }
            )
    rows.sort(key=lambda row: -row["tottime_s"])
    return text, rows[:25]


# -- main ------------------------------------------------------------------------------------


def median_of(results: Sequence[PassResult], lookups: tuple[int, int]) -> dict[str, Any]:
    def med(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results))

    rates = [r.events_per_s for r in results]
    events = results[0].events
    summary: dict[str, Any] = {
        "events_per_s": round(statistics.median(rates)),
        "runs_events_per_s": [round(rate) for rate in rates],
        "us_per_event": {
            "total": round(med("wall_s") / events * 1e6, 2),
            "build_updates": round(med("build_s") / events * 1e6, 2),
            "apply_batch": round(med("apply_s") / events * 1e6, 2),
            "feature_vectors": round(med("features_s") / events * 1e6, 2),
            "client_cpu": round(med("cpu_s") / events * 1e6, 2),
        },
        "runs_client_cpu_us_per_event": [round(r.cpu_s / events * 1e6, 2) for r in results],
        "statuses": results[0].statuses,
        "vectors": results[0].vectors,
        "stores": results[0].stores,
    }
    servers = [r for r in results if r.server_cpu_s is not None]
    if servers:
        us = summary["us_per_event"]
        us["redis_server_cpu_shared"] = round(
            statistics.median(r.server_cpu_s or 0.0 for r in servers) / events * 1e6, 2
        )
        for command in ("evalsha", "mget"):
            calls = [r.server.get(command, {}).get("usec", 0) for r in servers]
            us[f"redis_{command}_shared"] = round(statistics.median(calls) / events, 2)
        summary["records_read_per_event"] = round(lookups[0] / events, 3)
        summary["records_found_per_event"] = round(lookups[1] / events, 3)
        summary["server_commandstats_run1"] = servers[0].server
    return summary


def machine_info(info_server: dict[str, Any]) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis_server": info_server.get("redis_version"),
        "redis_py": redis.__version__,
        "hiredis": _version("hiredis"),
        "orjson": orjson.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def code_info() -> dict[str, Any]:
    """Which product code was measured: commit, uncommitted product files, the script's SHA1."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.rstrip("\n")

    dirty = git("status", "--porcelain", "--", "engine", "streams")
    script = resources.files("streams.adapters").joinpath("commit_batch.lua").read_text()
    return {
        "git_head": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_product_files": [line[3:] for line in dirty.splitlines()],
        "commit_batch_lua_sha1": hashlib.sha1(script.encode()).hexdigest(),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


async def parity_check(
    client: aioredis.Redis,
    prefixes: Prefixes,
    batches: Sequence[Batch],
    lateness_ms: int,
) -> bool:
    """A warm and a cold (fresh store every batch) Redis store give the in-memory store's
    statuses and feature vectors, and Redis then holds the same states (first batches,
    untimed)."""
    warm, cold = prefixes.take(), prefixes.take()
    memory = InMemoryFeatureStore()
    schedules: list[Sequence[FeatureStore]] = [
        schedule(client, warm, len(batches), len(batches)),
        schedule(client, cold, len(batches), 1),
        [memory] * len(batches),
    ]
    outputs: list[list[tuple[UpdateStatus, dict[str, float] | None]]] = []
    for stores in schedules:
        out: list[tuple[UpdateStatus, dict[str, float] | None]] = []
        for store, batch in zip(stores, batches, strict=True):
            updates = [StateUpdate(e.user_id, e.event_id, e.ts, event_ops(e), p) for e, p in batch]
            outcome = await store.apply_batch(updates, allowed_lateness_ms=lateness_ms)
            for (event, _), update, status in zip(batch, updates, outcome.statuses, strict=True):
                vector = None
                if status is UpdateStatus.APPLIED:
                    state = outcome.before[event.user_id]
                    apply_ops(state, update.ops)
                    vector = compute_features(state, category=trigger_category(event))
                out.append((status, vector))
        outputs.append(out)
    users = sorted({event.user_id for batch in batches for event, _ in batch})
    expected = await memory.read_states(users)
    held = [
        await RedisFeatureStore(client, prefix=prefix).read_states(users) for prefix in (warm, cold)
    ]
    await delete_prefix(client, warm)
    await delete_prefix(client, cold)
    return outputs[0] == outputs[2] and outputs[1] == outputs[2] and held == [expected] * 2


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    lateness_ms = EngineConfig().allowed_lateness_ms
    t0 = time.perf_counter()
    events = [
        parse_event(raw)
        for raw in open_loop(
            users=args.users, events=args.events, seed=args.seed, mean_gap_ms=args.mean_gap_ms
        )
    ]
    generate_s = time.perf_counter() - t0
    batches = make_batches(events, args.batch)
    whole = len(batches)
    users = sorted({event.user_id for event in events})
    span_h = (events[-1].ts - events[0].ts) / 3_600_000 if events else 0.0
    mix = Counter(type(event).__name__ for event in events)
    print(
        f"{len(events):,} events of {len(users):,} active users ({args.users:,} simulated),"
        f" {span_h:.1f} h of event time, {dict(mix)}; generated + parsed in {generate_s:.1f} s"
    )

    client = aioredis.Redis.from_url(args.redis_url)
    prefixes = Prefixes(f"{args.prefix}{os.getpid()}:feat:")
    exits = contextlib.ExitStack()
    memory_client = client
    memory_prefix = prefixes.take()
    memory_server = "shared"
    lookups = {
        "warm": record_lookups(batches, whole),
        "cold": record_lookups(batches, args.cold_every),
    }
    try:
        info_server = await client.info("server")
        private_version = None
        if args.memory_redis == "private":
            url = exits.enter_context(private_redis(["--save", "", "--appendonly", "no"]))
            if url is None:
                print("no redis-server on PATH: measuring memory on the shared Redis")
            else:
                memory_client = aioredis.Redis.from_url(url)
                memory_prefix = PRODUCTION_PREFIX  # key names count in the bytes per user
                memory_server = "private"
                private_version = (await memory_client.info("server")).get("redis_version")
        load_start = os.getloadavg()[0]
        parity = await parity_check(client, prefixes, batches[:20], lateness_ms)
        print(
            "parity: warm and cold Redis stores give the in-memory statuses, vectors and"
            f" states on 20 batches: {parity}"
        )

        runs: dict[str, list[PassResult]] = {}
        plan: list[tuple[str, bool, int]] = [
            ("redis_apply", False, whole),
            ("redis_features", True, whole),
            ("redis_cold_apply", False, args.cold_every),
        ]
        if not args.no_in_memory:
            plan += [("memory_apply", False, whole), ("memory_features", True, whole)]
        for run in range(args.runs):
            for name, features, every in plan:
                result: PassResult
                if name.startswith("redis"):
                    result = await redis_pass(
                        client,
                        prefixes.take(),
                        batches,
                        every=every,
                        features=features,
                        lateness_ms=lateness_ms,
                    )
                else:
                    result = await run_pass(
                        [InMemoryFeatureStore()] * whole,
                        batches,
                        features=features,
                        lateness_ms=lateness_ms,
                    )
                runs.setdefault(name, []).append(result)
                print(
                    f"  run {run + 1}/{args.runs} {name:<17} {result.events_per_s:>9,.0f} ev/s"
                    f" {result.cpu_s * 1e6 / result.events:6.1f} us CPU/event"
                    f" (build {result.build_s:.2f} s, apply {result.apply_s:.2f} s,"
                    f" features {result.features_s:.2f} s) {result.statuses}"
                )
        throughput = {
            name: median_of(results, lookups["cold" if "cold" in name else "warm"])
            for name, results in runs.items()
        }

        print(f"warm and cold loads on the {memory_server} redis-server ...")
        server = await private_passes(
            memory_client,
            memory_prefix,
            batches,
            users,
            runs=args.runs,
            cold_every=args.cold_every,
            lateness_ms=lateness_ms,
        )
        server["redis_server"] = memory_server
        server["redis_version"] = private_version or info_server.get("redis_version")

        print("profiling one Redis pass with feature vectors ...")
        profiler = cProfile.Profile()
        profiled = await redis_pass(
            client,
            prefixes.take(),
            batches,
            every=whole,
            features=True,
            lateness_ms=lateness_ms,
            profiler=profiler,
        )
        profile_text, profile_rows = profile_tables(profiler, args.top)
        load_end = os.getloadavg()[0]
    finally:
        leftovers = await delete_prefix(client, prefixes.base)
        await client.aclose()
        if memory_client is not client:
            await memory_client.aclose()
        exits.close()
    if leftovers:
        print(f"deleted {leftovers} leftover keys")

    memory = server.pop("memory")
    warm = server["warm"]
    report = {
        "benchmark": "features",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "users_simulated": args.users,
            "events": len(events),
            "active_users": len(users),
            "event_time_span_h": round(span_h, 2),
            "event_mix": dict(mix),
            "batch": args.batch,
            "batches": whole,
            "cold_every": args.cold_every,
            "runs": args.runs,
            "seed": args.seed,
            "mean_gap_ms": args.mean_gap_ms,
            "allowed_lateness_ms": lateness_ms,
            "generate_and_parse_s": round(generate_s, 2),
        },
        "parity_redis_vs_memory": parity,
        "throughput": throughput,
        "server": _rounded(server),
        "records": _rounded(memory),
        "profile": {
            "pass": "redis_features, under cProfile",
            "events_per_s_profiled": round(profiled.events_per_s),
            "wall_s": round(profiled.wall_s, 3),
            "top_cumulative": profile_text.strip().splitlines(),
            "selected_functions": profile_rows,
        },
        "targets": {
            "events_per_s_feature_path": TARGET_EVENTS_PER_S,
            "bytes_per_active_user": TARGET_BYTES_PER_USER,
            "redis_cpu_us_per_event": TARGET_REDIS_CPU_US,
            "feature_path_met": throughput["redis_features"]["events_per_s"] >= TARGET_EVENTS_PER_S,
            "bytes_met": memory["bytes_per_user_memory_usage"] <= TARGET_BYTES_PER_USER,
            "redis_cpu_met": warm["server_main_thread_cpu_us_per_event"] <= TARGET_REDIS_CPU_US,
        },
        "code": code_info(),
        "machine": {
            **machine_info(info_server),
            "load_average_1m_start": round(load_start, 2),
            "load_average_1m_end": round(load_end, 2),
        },
    }
    print_report(report, profile_text)
    return report


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _dist(figures: dict[str, float], unit: str = "") -> str:
    return (
        f"mean {figures['mean']:.1f}{unit}, p50 {figures['p50']:.0f}, p95 {figures['p95']:.0f},"
        f" max {figures['max']:.0f}"
    )


def print_report(report: dict[str, Any], profile_text: str) -> None:
    print()
    print("feature-path functions by self time (cProfile):")
    for row in report["profile"]["selected_functions"][:15]:
        print(
            f"  {row['tottime_s']:8.3f} s self {row['cumtime_s']:8.3f} s cum"
            f" {row['calls']:>10,}  {row['function']}"
        )
    print()
    print(profile_text.strip())
    print()
    cfg = report["config"]
    print(
        f"feature path: {cfg['events']:,} events, batches of {cfg['batch']},"
        f" median of {cfg['runs']} runs, us/event by phase (cpu: this process's CPU time;"
        " server: Redis main-thread CPU, other clients of the shared server included)"
    )
    print(
        f"  {'pass':<17} {'events/s':>9} {'build':>7} {'apply':>7} {'vectors':>8}"
        f" {'cpu':>7} {'server':>7} {'reads':>6}"
    )
    for name, row in report["throughput"].items():
        us = row["us_per_event"]
        server = us.get("redis_server_cpu_shared")
        reads = row.get("records_read_per_event")
        print(
            f"  {name:<17} {row['events_per_s']:>9,} {us['build_updates']:>7.2f}"
            f" {us['apply_batch']:>7.2f} {us['feature_vectors']:>8.2f} {us['client_cpu']:>7.2f}"
            f" {'-' if server is None else f'{server:.2f}':>7}"
            f" {'-' if reads is None else f'{reads:.3f}':>6}"
        )
    print(
        "  (reads: records a store looked up in Redis per event; cold: a fresh store every"
        f" {cfg['cold_every']} batch(es))"
    )
    server = report["server"]
    print()
    print(
        f"loads of every event, apply only, on the {server['redis_server']} redis-server"
        f" (median of {cfg['runs']}):"
    )
    for name in ("warm", "cold"):
        load = server[name]
        print(
            f"  {name}: {load['events_per_s']:,.0f} ev/s, Redis main-thread CPU"
            f" {load['server_main_thread_cpu_us_per_event']:.2f} us/event"
            f" (runs {load['runs_server_main_thread_cpu_us_per_event']}; commandstats"
            f" EVALSHA {load['evalsha_us_per_event']:.2f}, MGET {load['mget_us_per_event']:.2f}),"
            f" client CPU {load['client_cpu_us_per_event']:.1f} us/event,"
            f" {load['records_read_per_event']:.3f} records read per event"
            f" ({load['records_found_per_event']:.3f} found)"
        )
    rec = report["records"]
    print()
    print(
        f"records ({server['redis_server']} redis-server), {rec['active_users']:,} active users,"
        f" {rec['records_found']:,} records:"
        f" {rec['bytes_per_user_memory_usage']:.0f} B/user (MEMORY USAGE of the user keys,"
        " which hold only the record here),"
        f" {rec['bytes_per_user_info']:.0f} B/user (INFO used_memory delta),"
        f" {rec['bytes_per_user_info_freed']:.0f} B/user (freed on delete)"
    )
    print(f"  MEMORY USAGE per key   {_dist(rec['key_memory_usage_bytes'], ' B')}")
    print(f"  blob bytes             {_dist(rec['blob_bytes'], ' B')}")
    print(f"  fields per record      {_dist(rec['fields_per_record'])}")
    print(f"  event ids per record   {_dist(rec['event_ids_per_record'])}")
    print(
        f"  encode_record {rec['encode_us_per_record']:.2f} us, decode_record"
        f" {rec['decode_us_per_record']:.2f} us CPU per record;"
        f" {rec['reencoded_identical']:,} of {rec['records_found']:,} re-encode to the same"
        f" bytes; {rec['python_bytes_per_decoded_record']:.0f} B of Python heap per decoded"
        f" record; key names {rec['key_name_chars']:.0f} chars"
    )
    targets = report["targets"]
    feature_rate = report["throughput"]["redis_features"]["events_per_s"]
    warm = server["warm"]
    print()
    print(
        f"targets: feature path {feature_rate:,} ev/s"
        f" vs >= {targets['events_per_s_feature_path']:,}"
        f" -> {'met' if targets['feature_path_met'] else 'MISSED'};"
        f" {rec['bytes_per_user_memory_usage']:.0f} B/user"
        f" vs <= {targets['bytes_per_active_user']}"
        f" -> {'met' if targets['bytes_met'] else 'MISSED'};"
        f" Redis CPU {warm['server_main_thread_cpu_us_per_event']:.2f} us/event"
        f" vs <= {targets['redis_cpu_us_per_event']:.0f}"
        f" -> {'met' if targets['redis_cpu_met'] else 'MISSED'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--mean-gap-ms",
        type=float,
        default=DEFAULT_MEAN_GAP_MS,
        help="mean event gap of the simulated world: the event-time span, on which record"
        " sizes depend (windows reach 30 days)",
    )
    parser.add_argument(
        "--cold-every",
        type=int,
        default=1,
        help="batches per fresh store in the cold passes (1: every batch reads its users)",
    )
    parser.add_argument("--top", type=int, default=15, help="profile rows to print")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="bench:", help="key prefix (pid and feat: appended)")
    parser.add_argument(
        "--memory-redis",
        choices=("private", "shared"),
        default="private",
        help="run the loads and measure the records on a private redis-server (default) or on"
        " --redis-url",
    )
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory store")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.runs, args.cold_every) < 1 or args.mean_gap_ms <= 0:
        parser.error("need --events, --batch, --runs, --cold-every >= 1, --mean-gap-ms > 0")

    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
