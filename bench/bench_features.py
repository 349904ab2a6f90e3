"""Time the feature path against real Redis: one Lua call per micro-batch, then feature vectors.

What ``DiscountEngine.process`` does before scoring, single process: build ``StateUpdate``s with
``event_ops``, call ``RedisFeatureStore.apply_batch`` (one script call per batch), and replay
the batch on the returned ``before`` states with ``apply_ops`` + ``compute_features``. The same
passes run on ``InMemoryFeatureStore`` for comparison. Then it loads the whole data set once
more and measures Redis bytes per active user (``INFO memory`` delta and ``MEMORY USAGE`` on a
sample), and profiles one pass with cProfile. Prints figures and writes
``bench/results/features.json``; it never asserts on them.

    .venv/bin/python bench/bench_features.py [--users 50000] [--events 300000] [--batch 500]

Needs a Redis (``--redis-url``, default ``redis://127.0.0.1:6379/0``). Every key it writes
carries its own prefix (``bench:feat:<pid>:...``) and is deleted at the end; it never flushes.
The memory figures come from a private ``redis-server`` it starts on a free port (same listpack
settings as the shared one) and stops at the end, because on a Redis other processes write to,
the ``used_memory`` delta measures them too; ``--memory-redis shared`` measures on the shared one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import io
import os
import platform
import pstats
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from engine.analysis.simulation.world import open_loop
from engine.events import Event, PurchaseEvent, parse_event
from engine.features.catalogue import compute_features
from engine.features.state import apply_ops, event_ops, trigger_category
from engine.features.store import (
    InMemoryFeatureStore,
    Position,
    StateUpdate,
    UpdateStatus,
)
from engine.pipeline import EngineConfig
from engine.ports import FeatureStore
from streams.adapters.redis_store import RedisFeatureStore

RESULTS = Path(__file__).resolve().parent / "results" / "features.json"
TARGET_EVENTS_PER_S = 40_000
TARGET_BYTES_PER_USER = 300
SOURCE = "bench"
PRODUCTION_PREFIX = "ds:"
"""``streams.settings`` default; used on the private memory server only."""
INTERESTING = (
    "apply_batch",
    "_decode_state",
    "pack_command",
    "encode",
    "event_ops",
    "apply_ops",
    "compute_features",
    "build_context",
    "_session_events",
    "<dictcomp>",
    "select",
    "poll",
)


# -- data ------------------------------------------------------------------------------------


def make_batches(events: Sequence[Event], size: int) -> list[list[tuple[Event, Position]]]:
    positioned = [(event, Position(SOURCE, 0, offset)) for offset, event in enumerate(events)]
    return [positioned[i : i + size] for i in range(0, len(positioned), size)]


# -- one pass --------------------------------------------------------------------------------


@dataclass(slots=True)
class PassResult:
    events: int
    wall_s: float
    build_s: float
    """``event_ops`` + ``StateUpdate`` construction."""
    apply_s: float
    """``apply_batch`` as the caller sees it (args, script call, reply decoding)."""
    features_s: float
    """Replay: ``apply_ops`` on the before state + ``compute_features`` per applied event
    (purchases get no vector, as in ``process``)."""
    vectors: int
    statuses: dict[str, int]
    cpu_s: float = 0.0
    """This process's CPU time over the pass (less sensitive to a busy machine than wall)."""
    server: dict[str, dict[str, int]] = field(default_factory=dict)
    """Redis ``INFO commandstats`` deltas over the pass (calls, usec)."""

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s


async def run_pass(
    store: FeatureStore,
    batches: Sequence[Sequence[tuple[Event, Position]]],
    *,
    features: bool,
    lateness_ms: int,
) -> PassResult:
    """Exactly the feature part of ``DiscountEngine.process`` for every batch."""
    clock = time.perf_counter
    build_s = apply_s = features_s = 0.0
    vectors = 0
    statuses: Counter[UpdateStatus] = Counter()
    applied = UpdateStatus.APPLIED
    cpu_start = time.process_time()
    start = clock()
    for batch in batches:
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
    """CPU seconds of the server's main thread (commands, Lua, network I/O)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


_LISTPACK_SETTINGS = (
    "hash-max-listpack-entries",
    "hash-max-listpack-value",
    "zset-max-listpack-entries",
    "zset-max-listpack-value",
)


@contextlib.contextmanager
def private_redis(settings: dict[str, str]) -> Iterator[str | None]:
    """A throw-away ``redis-server`` (no persistence) on a free port; ``None`` without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        for name, value in settings.items():
            argv += [f"--{name}", value]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            probe_client = redis.Redis(port=port, socket_timeout=1)
            for _ in range(100):
                try:
                    probe_client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            probe_client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class RedisStores:
    """Every Redis store a run needs, built up front, each under its own fresh key prefix.

    ``RedisFeatureStore`` reads ``streams/adapters/features.lua`` when it is constructed;
    building them all at start keeps every pass on the script that matches the already imported
    Python."""

    def __init__(
        self, client: aioredis.Redis, base: str, count: int, *, exact: bool = False
    ) -> None:
        self.base = base
        prefixes = [base] if exact else [f"{base}{n}:" for n in range(1, count + 1)]
        self._free = [(RedisFeatureStore(client, prefix=prefix), prefix) for prefix in prefixes]

    def take(self) -> tuple[RedisFeatureStore, str]:
        return self._free.pop(0)

    @property
    def script_sha(self) -> str:
        store = self._free[0][0] if self._free else None
        return str(store._script.sha) if store is not None else ""


async def redis_pass(
    client: aioredis.Redis,
    stores: RedisStores,
    batches: Sequence[Sequence[tuple[Event, Position]]],
    *,
    features: bool,
    lateness_ms: int,
    profiler: cProfile.Profile | None = None,
) -> PassResult:
    store, prefix = stores.take()
    stats_before = await commandstats(client)
    if profiler is not None:
        profiler.enable()
    try:
        result = await run_pass(store, batches, features=features, lateness_ms=lateness_ms)
    finally:
        if profiler is not None:
            profiler.disable()
    result.server = stats_delta(stats_before, await commandstats(client))
    await delete_prefix(client, prefix)
    return result


async def memory_pass(
    client: aioredis.Redis,
    stores: RedisStores,
    batches: Sequence[Sequence[tuple[Event, Position]]],
    users: Sequence[str],
    *,
    sample_size: int,
    lateness_ms: int,
) -> dict[str, Any]:
    """Load every event once into a fresh prefix and measure what the keys cost."""
    store, prefix = stores.take()
    await asyncio.sleep(0.2)
    before = await used_memory(client)
    stats_before, cpu_before = await commandstats(client), await server_cpu(client)
    load = await run_pass(store, batches, features=False, lateness_ms=lateness_ms)
    stats = stats_delta(stats_before, await commandstats(client))
    cpu = await server_cpu(client) - cpu_before
    after = await used_memory(client)
    evalsha = stats.get("evalsha", {"calls": 0, "usec": 0})
    load_figures = {
        "events_per_s": load.events_per_s,
        "evalsha_calls": evalsha["calls"],
        "batches": len(batches),
        "evalsha_us_per_event": evalsha["usec"] / load.events,
        "server_main_thread_cpu_us_per_event": cpu * 1e6 / load.events,
        "client_cpu_us_per_event": load.cpu_s * 1e6 / load.events,
    }

    hlens: list[int] = []
    zcards: list[int] = []
    for i in range(0, len(users), 2000):
        async with client.pipeline(transaction=False) as pipe:
            for user in users[i : i + 2000]:
                pipe.hlen(store.state_key(user))
                pipe.zcard(store.dedup_key(user))
            replies = await pipe.execute()
        hlens.extend(replies[0::2])
        zcards.extend(replies[1::2])

    sample = random.Random(0).sample(list(users), min(sample_size, len(users)))
    async with client.pipeline(transaction=False) as pipe:
        for user in sample:
            for key in (store.state_key(user), store.dedup_key(user)):
                pipe.memory_usage(key, samples=0)
                pipe.object("encoding", key)
            pipe.hgetall(store.state_key(user))
            pipe.zrange(store.dedup_key(user), 0, -1, withscores=True)
        replies = await pipe.execute()
    state_bytes: list[int] = []
    dedup_bytes: list[int] = []
    encodings: dict[str, Counter[str]] = {"state": Counter(), "dedup": Counter()}
    groups: dict[str, list[int]] = {}
    state_payload: list[int] = []
    dedup_payload: list[int] = []
    key_lengths = {
        "state": len(store.state_key(sample[0])),
        "dedup": len(store.dedup_key(sample[0])),
    }
    for n in range(len(sample)):
        s_mem, s_enc, d_mem, d_enc, state, dedup = replies[6 * n : 6 * n + 6]
        state_bytes.append(s_mem or 0)
        dedup_bytes.append(d_mem or 0)
        encodings["state"][_text(s_enc) if s_enc else "missing"] += 1
        encodings["dedup"][_text(d_enc) if d_enc else "missing"] += 1
        payload = 0
        for raw_field, raw_value in state.items():
            group = field_group(raw_field.decode())
            entry = lp_entry(raw_field) + lp_entry(raw_value)
            groups.setdefault(group, []).append(entry)
            payload += entry
        state_payload.append(payload)
        dedup_payload.append(
            sum(lp_entry(member) + lp_entry(_score(score)) for member, score in dedup)
        )
    sampled = len(sample)
    active = len(users)
    before_delete = await used_memory(client)
    await delete_prefix(client, prefix)
    await asyncio.sleep(0.2)
    after_delete = await used_memory(client)
    return {
        "load_pass_apply_only": load_figures,
        "active_users": active,
        "used_memory_before": before,
        "used_memory_after": after,
        "used_memory_after_delete": after_delete,
        "bytes_per_user_info": (after - before) / active,
        "bytes_per_user_info_freed": (before_delete - after_delete) / active,
        "key_prefix": prefix,
        "sample_users": sampled,
        "bytes_per_user_memory_usage": (sum(state_bytes) + sum(dedup_bytes)) / sampled,
        "state_key_bytes_avg": statistics.fmean(state_bytes),
        "dedup_key_bytes_avg": statistics.fmean(dedup_bytes),
        "dedup_keys_present": sum(1 for b in dedup_bytes if b),
        "state_listpack_payload_avg": statistics.fmean(state_payload),
        "dedup_listpack_payload_avg": statistics.fmean(dedup_payload),
        "key_name_chars": key_lengths,
        "fields_per_state_avg": statistics.fmean(hlens),
        "fields_per_state_p50_p99_max": _percentiles(hlens),
        "members_per_dedup_avg": statistics.fmean(zcards),
        "members_per_dedup_p50_p99_max": _percentiles(zcards),
        "encodings": {kind: dict(counter) for kind, counter in encodings.items()},
        "state_fields_by_group": {
            group: {
                "fields_per_user": len(sizes) / sampled,
                "listpack_bytes_per_field": statistics.fmean(sizes),
                "listpack_bytes_per_user": sum(sizes) / sampled,
            }
            for group, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))
        },
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _score(score: float) -> bytes:
    return str(int(score)).encode() if score.is_integer() else repr(score).encode()


def _percentiles(values: Sequence[int]) -> list[int]:
    ordered = sorted(values)
    return [ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)], ordered[-1]]


def field_group(name: str) -> str:
    """Which part of the catalogue a state field belongs to (see
    ``engine/features/catalogue.py``)."""
    if name.startswith("k") and ":" in name:
        return "category day k<day>:<cat>"
    if len(name) > 2 and name[1] in "mhd" and name[2:].isdigit():
        return {"m": "minute buckets", "h": "hour buckets", "d": "day buckets"}[name[1]]
    if name in ("lt", "fs"):
        return "lt / fs"
    if name.startswith("l"):
        return "last seen l<kind>"
    if name.startswith("n"):
        return "lifetime n<kind>"
    return "other"


def lp_entry(raw: bytes) -> int:
    """Bytes one listpack element takes (header + data + back-length), as Redis 7 encodes it."""
    text = raw.decode()
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is not None and str(value) == text and -(2**63) <= value < 2**63:
        if 0 <= value <= 127:
            return 2
        for size, bits in ((3, 13), (4, 16), (5, 24), (6, 32)):
            if -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
                return size
        return 10
    n = len(raw)
    header = 1 if n < 64 else 2 if n < 4096 else 5
    body = header + n
    return body + (1 if body < 128 else 2 if body < 16384 else 3)


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


def median_of(results: Sequence[PassResult]) -> dict[str, Any]:
    def med(attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results)

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
        "statuses": results[0].statuses,
        "vectors": results[0].vectors,
    }
    servers = [r.server for r in results if r.server]
    if servers:
        calls = [s.get("evalsha", {}).get("usec", 0) for s in servers]
        summary["us_per_event"]["redis_server_script"] = round(statistics.median(calls) / events, 2)
        summary["server_commandstats_run1"] = servers[0]
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


def code_info(script_sha: str) -> dict[str, Any]:
    """Which product code was measured: commit, uncommitted product files, Lua script SHA1."""
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
    return {
        "git_head": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_product_files": [line[3:] for line in dirty.splitlines()],
        "features_lua_sha1": script_sha,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


async def parity_check(
    client: aioredis.Redis,
    redis_stores: RedisStores,
    batches: Sequence[Sequence[tuple[Event, Position]]],
    lateness_ms: int,
) -> bool:
    """Redis and in-memory stores give the same feature vectors (first batches, untimed)."""
    redis_store, prefix = redis_stores.take()
    vectors: list[list[dict[str, float]]] = []
    stores: list[FeatureStore] = [redis_store, InMemoryFeatureStore()]
    for store in stores:
        out: list[dict[str, float]] = []
        for batch in batches:
            updates = [StateUpdate(e.user_id, e.event_id, e.ts, event_ops(e), p) for e, p in batch]
            outcome = await store.apply_batch(updates, allowed_lateness_ms=lateness_ms)
            for (event, _), update, status in zip(batch, updates, outcome.statuses, strict=True):
                if status is UpdateStatus.APPLIED:
                    state = outcome.before[event.user_id]
                    apply_ops(state, update.ops)
                    out.append(compute_features(state, category=trigger_category(event)))
        vectors.append(out)
    await delete_prefix(client, prefix)
    return vectors[0] == vectors[1]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    lateness_ms = EngineConfig().allowed_lateness_ms
    t0 = time.perf_counter()
    events = [
        parse_event(raw) for raw in open_loop(users=args.users, events=args.events, seed=args.seed)
    ]
    generate_s = time.perf_counter() - t0
    batches = make_batches(events, args.batch)
    users = sorted({event.user_id for event in events})
    span_h = (events[-1].ts - events[0].ts) / 3_600_000 if events else 0.0
    mix = Counter(type(event).__name__ for event in events)
    print(
        f"{len(events):,} events of {len(users):,} active users ({args.users:,} simulated),"
        f" {span_h:.1f} h of event time, {dict(mix)}; generated + parsed in {generate_s:.1f} s"
    )

    client = aioredis.Redis.from_url(args.redis_url)
    base = f"{args.prefix}{os.getpid()}:"
    stores = RedisStores(client, base, 2 * args.runs + 3)
    script_sha = stores.script_sha
    exits = contextlib.ExitStack()
    memory_client = client
    memory_stores = stores
    memory_server = "shared"
    report: dict[str, Any] = {}
    try:
        info_server = await client.info("server")
        if args.memory_redis == "private":
            settings = await client.config_get(*_LISTPACK_SETTINGS)
            url = exits.enter_context(
                private_redis({_text(k): _text(v) for k, v in settings.items()})
            )
            if url is None:
                print("no redis-server on PATH: measuring memory on the shared Redis")
            else:
                memory_client = aioredis.Redis.from_url(url)
                # the production prefix: key names count in the bytes per user
                memory_stores = RedisStores(memory_client, PRODUCTION_PREFIX, 1, exact=True)
                memory_server = "private"
        load_start = os.getloadavg()[0]
        parity = await parity_check(client, stores, batches[:20], lateness_ms)
        print(f"parity: Redis and in-memory feature vectors equal on 20 batches: {parity}")

        runs: dict[str, list[PassResult]] = {}
        plan: list[tuple[str, bool]] = [("redis_apply", False), ("redis_features", True)]
        if not args.no_in_memory:
            plan += [("memory_apply", False), ("memory_features", True)]
        for run in range(args.runs):
            for name, features in plan:
                result: PassResult
                if name.startswith("redis"):
                    result = await redis_pass(
                        client, stores, batches, features=features, lateness_ms=lateness_ms
                    )
                else:
                    result = await run_pass(
                        InMemoryFeatureStore(),
                        batches,
                        features=features,
                        lateness_ms=lateness_ms,
                    )
                runs.setdefault(name, []).append(result)
                print(
                    f"  run {run + 1}/{args.runs} {name:<16} {result.events_per_s:>10,.0f} ev/s"
                    f"  (build {result.build_s:.2f} s, apply {result.apply_s:.2f} s,"
                    f" features {result.features_s:.2f} s)"
                )
        throughput = {name: median_of(results) for name, results in runs.items()}

        print(f"measuring Redis memory ({memory_server} redis-server) ...")
        memory = await memory_pass(
            memory_client,
            memory_stores,
            batches,
            users,
            sample_size=args.sample,
            lateness_ms=lateness_ms,
        )

        print("profiling one Redis pass with feature vectors ...")
        profiler = cProfile.Profile()
        profiled = await redis_pass(
            client, stores, batches, features=True, lateness_ms=lateness_ms, profiler=profiler
        )
        profile_text, profile_rows = profile_tables(profiler, args.top)
        load_end = os.getloadavg()[0]
        memory["redis_server"] = memory_server
    finally:
        leftovers = await delete_prefix(client, stores.base)
        await client.aclose()
        if memory_client is not client:
            await memory_client.aclose()
        exits.close()
    if leftovers:
        print(f"deleted {leftovers} leftover keys")

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
            "batches": len(batches),
            "runs": args.runs,
            "seed": args.seed,
            "allowed_lateness_ms": lateness_ms,
            "generate_and_parse_s": round(generate_s, 2),
        },
        "parity_redis_vs_memory": parity,
        "throughput": throughput,
        "memory": _rounded(memory),
        "profile": {
            "pass": "redis_features, under cProfile",
            "events_per_s_profiled": round(profiled.events_per_s),
            "redis_server_script_s": round(
                profiled.server.get("evalsha", {}).get("usec", 0) / 1e6, 3
            ),
            "wall_s": round(profiled.wall_s, 3),
            "top_cumulative": profile_text.strip().splitlines(),
            "selected_functions": profile_rows,
        },
        "targets": {
            "events_per_s_feature_path": TARGET_EVENTS_PER_S,
            "bytes_per_active_user": TARGET_BYTES_PER_USER,
            "feature_path_met": throughput["redis_features"]["events_per_s"] >= TARGET_EVENTS_PER_S,
            "bytes_met": memory["bytes_per_user_info"] <= TARGET_BYTES_PER_USER,
        },
        "code": code_info(script_sha),
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
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


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
        f" median of {cfg['runs']} runs, us/event by phase"
        " (lua: server time in EVALSHA; cpu: this process's CPU time)"
    )
    header = (
        f"  {'pass':<16} {'events/s':>10} {'build':>7} {'apply':>7} {'lua':>7}"
        f" {'vectors':>8} {'cpu':>7}"
    )
    print(header)
    for name, row in report["throughput"].items():
        us = row["us_per_event"]
        lua = us.get("redis_server_script")
        print(
            f"  {name:<16} {row['events_per_s']:>10,} {us['build_updates']:>7.2f}"
            f" {us['apply_batch']:>7.2f} {'-' if lua is None else f'{lua:.2f}':>7}"
            f" {us['feature_vectors']:>8.2f} {us['client_cpu']:>7.2f}"
        )
    mem = report["memory"]
    print()
    print(
        f"Redis memory ({mem['redis_server']} redis-server),"
        f" {mem['active_users']:,} active users:"
        f" {mem['bytes_per_user_info']:.0f} B/user (INFO used_memory delta),"
        f" {mem['bytes_per_user_info_freed']:.0f} B/user (freed on delete),"
        f" {mem['bytes_per_user_memory_usage']:.0f} B/user"
        f" (MEMORY USAGE, {mem['sample_users']} users)"
    )
    print(
        f"  state hash {mem['state_key_bytes_avg']:.0f} B avg ({mem['fields_per_state_avg']:.1f}"
        f" fields, p50/p99/max {mem['fields_per_state_p50_p99_max']}),"
        f" dedup zset {mem['dedup_key_bytes_avg']:.0f} B avg ({mem['members_per_dedup_avg']:.2f}"
        f" members, p50/p99/max {mem['members_per_dedup_p50_p99_max']})"
    )
    print(
        f"  listpack payload: state {mem['state_listpack_payload_avg']:.0f} B,"
        f" dedup {mem['dedup_listpack_payload_avg']:.0f} B; the rest of MEMORY USAGE is"
        f" per-key overhead (key {mem['key_name_chars']['state']} chars, robj, dict entry,"
        f" allocator rounding); INFO adds the expires entry and hash-table slots"
    )
    print(f"  encodings {mem['encodings']}")
    for group, row in mem["state_fields_by_group"].items():
        print(
            f"  {group:<26} {row['fields_per_user']:5.2f} fields/user"
            f" x {row['listpack_bytes_per_field']:5.1f} B = {row['listpack_bytes_per_user']:6.1f} B"
        )
    load = mem["load_pass_apply_only"]
    print(
        f"  the load pass (apply only) on that server: {load['events_per_s']:,.0f} ev/s,"
        f" EVALSHA {load['evalsha_us_per_event']:.1f} us/event, server main-thread CPU"
        f" {load['server_main_thread_cpu_us_per_event']:.1f} us/event, client CPU"
        f" {load['client_cpu_us_per_event']:.1f} us/event"
    )
    shared = report["throughput"]["redis_features"].get("server_commandstats_run1", {})
    calls = shared.get("evalsha", {}).get("calls", 0)
    if calls > report["config"]["batches"]:
        print(
            f"  note: {calls} EVALSHA calls on the shared Redis during a pass of"
            f" {report['config']['batches']} batches: its 'lua' column includes other clients"
        )
    targets = report["targets"]
    feature_rate = report["throughput"]["redis_features"]["events_per_s"]
    print()
    print(
        f"targets: feature path {feature_rate:,} ev/s"
        f" vs >= {targets['events_per_s_feature_path']:,}"
        f" -> {'met' if targets['feature_path_met'] else 'MISSED'};"
        f" {mem['bytes_per_user_info']:.0f} B/user vs <= {targets['bytes_per_active_user']}"
        f" -> {'met' if targets['bytes_met'] else 'MISSED'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample", type=int, default=1000, help="users for MEMORY USAGE")
    parser.add_argument("--top", type=int, default=15, help="profile rows to print")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="bench:feat:", help="key prefix (pid appended)")
    parser.add_argument(
        "--memory-redis",
        choices=("private", "shared"),
        default="private",
        help="measure bytes per user on a private redis-server (default) or on --redis-url",
    )
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory store")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
