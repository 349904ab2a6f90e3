"""Shared plumbing of the end-to-end benchmark: names, the machine, worker subprocesses, clean-up.

Everything the benchmark creates carries its own names (topic prefix ``bench.<pid>.<tag>.``,
Redis key prefix ``bench:<pid>:<tag>:``, consumer group ``bench-<pid>-<tag>``) and is deleted by
``clean_up``; the shared Kafka and Redis are never reset or flushed.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics

REPO = Path(__file__).resolve().parents[2]
CAMPAIGNS = Path(__file__).resolve().parent / "campaigns.toml"
CONSUMED = re.compile(r"^dealstream_events_consumed_total\{[^}]*\} ([0-9.e+]+)$", re.M)
REDELIVERED = re.compile(
    r'^dealstream_events_skipped_total\{reason="redelivered"\} ([0-9.e+]+)$', re.M
)
HELD = re.compile(r"^dealstream_events_held ([0-9.e+]+)$", re.M)
GC_PAUSE = re.compile(
    r'^dealstream_gc_pause_seconds_(count|sum)\{generation="(\d)"\} ([0-9.e+-]+)$', re.M
)
GC_PAUSE_OVER_25_MS = re.compile(
    r'^dealstream_gc_pause_seconds_bucket\{generation="(\d)",le="0.025"\} ([0-9.e+]+)$', re.M
)


def load_average() -> float:
    """The 1-minute load average: recorded next to every figure (the machine is shared)."""
    return round(os.getloadavg()[0], 2)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return float(sorted_values[rank])


@dataclass(frozen=True, slots=True)
class Names:
    """One isolated namespace on the shared services."""

    topic_prefix: str
    redis_prefix: str
    group_id: str

    @classmethod
    def make(cls, tag: str) -> Names:
        pid = os.getpid()
        return cls(f"bench.{pid}.{tag}.", f"bench:{pid}:{tag}:", f"bench-{pid}-{tag}")

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _kafka_version() -> str:
    """The broker jar's version as resolved by deploy/kafka (the wire protocol does not say)."""
    cache = Path(os.environ.get("DEALSTREAM_CACHE", Path.home() / ".cache" / "dealstream"))
    jars = sorted(cache.glob("kafka-*/libs/kafka_2.13-*.jar"))
    if jars:
        return jars[-1].name.removeprefix("kafka_2.13-").removesuffix(".jar")
    return "unknown"


async def machine(redis_url: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        info = await client.info("server")
        redis_version = str(info.get("redis_version", "unknown"))
    finally:
        await client.aclose()
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("aiokafka", "faust-streaming", "redis", "hiredis", "river", "orjson")
        },
        "kafka": _kafka_version(),
        "redis_server": redis_version,
        "load_average_at_start": list(round(x, 2) for x in os.getloadavg()),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    """One ``dealstream worker`` subprocess with its own HTTP port; output goes to a log file."""

    def __init__(
        self,
        names: Names,
        *,
        bootstrap: str,
        redis_url: str,
        log_dir: Path,
        extra: Mapping[str, str],
    ) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"worker-{names.group_id}-{self.port}.log"
        self.env = {
            **os.environ,
            "DEALSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "DEALSTREAM_REDIS_URL": redis_url,
            "DEALSTREAM_TOPIC_PREFIX": names.topic_prefix,
            "DEALSTREAM_REDIS_PREFIX": names.redis_prefix,
            "DEALSTREAM_GROUP_ID": names.group_id,
            # the product's default: user ids pseudonymised (docs/privacy.md)
            "DEALSTREAM_PSEUDONYM_KEY": "bench-pseudonym-key-0123456789abcdef",
            "DEALSTREAM_HTTP_PORT": str(self.port),
            "DEALSTREAM_CAMPAIGNS": str(CAMPAIGNS),
            "DEALSTREAM_LOG_LEVEL": "WARNING",
            **extra,
        }
        for name in ("DEALSTREAM_MODEL_VERIFY_KEY", "DEALSTREAM_MODEL_VERIFY_KEY_FILE"):
            self.env.pop(name, None)  # no hot reload: the bench measures one fixed model
        self.process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker"],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_kib(self) -> int:
        """VmRSS of the worker process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def consumed(self) -> int | None:
        """Records consumed and processed so far: not counting redeliveries (a rebalance hands
        a partition over before its last offsets were committed), nor the events the worker's
        event-time aligner holds right now (consumed, not yet applied); None before the web
        server answers."""
        text = await self._metrics()
        if text is None:
            return None
        consumed = sum(float(v) for v in CONSUMED.findall(text))
        redelivered = sum(float(v) for v in REDELIVERED.findall(text))
        held = sum(float(v) for v in HELD.findall(text))
        return int(consumed - redelivered - held)

    async def gc_pauses(self) -> dict[str, dict[str, float]] | None:
        """Per collector generation: collections so far, their seconds in all, and how many
        paused the worker 25 ms or more (``dealstream_gc_pause_seconds``)."""
        text = await self._metrics()
        if text is None:
            return None
        pauses: dict[str, dict[str, float]] = {}
        for kind, generation, value in GC_PAUSE.findall(text):
            pauses.setdefault(generation, {})[kind] = float(value)
        for generation, within in GC_PAUSE_OVER_25_MS.findall(text):
            counts = pauses.setdefault(generation, {})
            counts["over_25ms"] = counts.get("count", 0.0) - float(within)
        return pauses

    async def _metrics(self) -> str | None:
        """The worker's ``/metrics`` text; None before its web server answers."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.get(f"http://127.0.0.1:{self.port}/metrics") as response:
                return await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    async def stop(self, timeout_s: float = 60.0) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            await asyncio.to_thread(self.process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def wait_consumed(
    workers: Sequence[Worker],
    target: int,
    *,
    timeout_s: float,
    interval_s: float = 0.25,
    on_sample: Callable[[int], Awaitable[None]] | None = None,
) -> list[tuple[float, int]]:
    """Poll the workers' counters until together they consumed ``target`` records.

    Returns the (monotonic time, total consumed) samples; raises with the log tail when a
    worker exits or nothing moves for ``timeout_s``.
    """
    samples: list[tuple[float, int]] = []
    last_change = time.monotonic()
    last_total = -1
    while True:
        counts = [await w.consumed() for w in workers]
        now = time.monotonic()
        total = sum(c or 0 for c in counts)
        samples.append((now, total))
        if on_sample is not None:
            await on_sample(total)
        if total >= target:
            return samples
        if total != last_total:
            last_total, last_change = total, now
        for w in workers:
            if not w.alive():
                raise RuntimeError(f"worker exited during the benchmark:\n{w.tail()}")
        if now - last_change > timeout_s:
            raise RuntimeError(
                f"no progress for {timeout_s:.0f} s at {total}/{target} consumed:\n"
                + workers[0].tail()
            )
        await asyncio.sleep(interval_s)


def crossing(samples: Sequence[tuple[float, int]], level: float) -> float:
    """The time at which the consumed count reached ``level`` (linear between samples)."""
    previous = samples[0]
    for sample in samples:
        if sample[1] >= level:
            t0, n0 = previous
            t1, n1 = sample
            if n1 == n0:
                return t1
            return t0 + (t1 - t0) * (level - n0) / (n1 - n0)
        previous = sample
    return samples[-1][0]


async def create_topics(bootstrap: str, names: Names, partitions: int) -> None:
    await ensure_topics(bootstrap, names.topics.all, partitions=partitions)


async def clean_up(bootstrap: str, redis_url: str, names: Sequence[Names]) -> None:
    """Delete the benchmark's Redis keys and topics, nothing outside its prefixes."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        for n in names:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{n.redis_prefix}*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
    finally:
        await client.aclose()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        prefixes = tuple(n.topic_prefix for n in names) + tuple(f"{n.group_id}-" for n in names)
        mine = [t for t in await admin.list_topics() if t.startswith(prefixes)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()
