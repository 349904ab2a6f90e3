"""``dealstream demo`` (``make demo``): worker + learner + simulator on real Kafka and Redis.

Prints offers as they arrive and a one-line summary every few seconds (events/s, offers,
consumer lag), and stops everything cleanly on Ctrl-C or after the given duration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from streams.cli import Subparsers
from streams.settings import DemoSettings, Settings

SUMMARY_EVERY_S = 5.0
DEMO_CAMPAIGNS = Path(__file__).resolve().parents[2] / "deploy" / "campaigns" / "demo.toml"


def add_parser(subparsers: Subparsers) -> None:
    demo = subparsers.add_parser("demo", help="worker + simulator, printing offers as they arrive")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds (0 = until Ctrl-C)")
    demo.add_argument("--rate", type=float, default=200.0, help="simulated events/s")
    demo.add_argument("--users", type=int, default=300)
    demo.set_defaults(handler=run_demo_command)


def run_demo_command(settings: Settings, args: argparse.Namespace) -> int:
    """The demo reads its own settings: the shared ones moved into the demo's namespace."""
    demo = DemoSettings.from_env(DEMO_CAMPAIGNS)
    return run_demo(demo, duration_s=args.duration, rate=args.rate, users=args.users)


async def _forget_previous_run(settings: Settings) -> None:
    """Delete the demo namespace's Redis keys: each run starts from an untrained model."""
    from streams.adapters.kafka_io import check_redis
    from streams.adapters.redis_client import redis_from_settings

    client = redis_from_settings(settings)
    try:
        await check_redis(client, settings.redis_url.reveal())
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


def _format_offer(offer: dict[str, object]) -> str:
    reasons = offer.get("reasons") or []
    top = reasons[0]["feature"] if isinstance(reasons, list) and reasons else "-"
    return (
        f"offer {offer['offer_id']} campaign={offer['campaign']} "
        f"discount={offer['discount_pct']}% p={offer['p_purchase']} "
        f"model={offer['model_version']} top_reason={top}"
    )


async def _demo(demo: DemoSettings, duration_s: float, rate: float, users: int) -> int:
    from aiokafka import AIOKafkaConsumer

    from streams.adapters.kafka_io import check_kafka, ensure_topics, kafka_client_options
    from streams.cli.simulation import simulate_to_kafka
    from streams.operations.lag import LagProbe, total_lag

    settings = demo.settings
    await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
    await _forget_previous_run(settings)
    await ensure_topics(
        settings.kafka_bootstrap,
        settings.topics.all,
        partitions=settings.partitions,
        replication=settings.replication,
        security=settings.kafka_security,
    )
    log_dir = settings.state_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "demo-worker.log"
    env = demo.process_environment
    if demo.uses_demo_model_keys:
        print("demo: signing models with a key pair made for this run")
    if demo.uses_raw_user_ids:
        print("demo: DEALSTREAM_PSEUDONYM_KEY is not set: raw user ids are stored (demo only)")
    learner_log = log_dir / "demo-learner.log"
    with log_path.open("ab") as log, learner_log.open("ab") as learner_out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"],
            env=demo.worker_environment,
            stdout=log,
            stderr=log,
        )
        learner = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "learner"],
            env=env,
            stdout=learner_out,
            stderr=learner_out,
        )
    print(
        f"demo: worker pid {worker.pid} (log: {log_path}), learner pid {learner.pid} "
        f"(log: {learner_log}); simulator at {rate:g} events/s"
    )

    offers_seen = 0
    consumer = AIOKafkaConsumer(
        settings.topics.offers,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        **kafka_client_options(settings.kafka_security).kwargs(),
    )
    await consumer.start()
    await consumer.seek_to_end()
    probe = LagProbe(
        settings.kafka_bootstrap, security=settings.kafka_security
    )  # one set of clients for every summary line
    run_id = int(time.time())  # fresh users each run: no cooldowns left over from the last
    events_total = max(1, int(rate * duration_s)) if duration_s > 0 else 10**12
    simulator = asyncio.create_task(
        simulate_to_kafka(
            users=users,
            events=events_total,
            seed=run_id,
            bootstrap=settings.kafka_bootstrap,
            security=settings.kafka_security,
            topics=settings.topics,
            rate=rate,
            user_prefix=f"demo{run_id}-u",
        )
    )
    started = time.monotonic()
    next_summary = started + SUMMARY_EVERY_S
    last_offers = 0
    last_committed: int | None = None
    last_summary = started
    try:
        while duration_s <= 0 or time.monotonic() - started < duration_s:
            for name, process, path in (
                ("worker", worker, log_path),
                ("learner", learner, learner_log),
            ):
                if process.poll() is not None:
                    print(f"demo: {name} exited with code {process.returncode}; see {path}")
                    return 1
            batch = await consumer.getmany(timeout_ms=500, max_records=50)
            for records in batch.values():
                for record in records:
                    offers_seen += 1
                    if offers_seen <= 20 or offers_seen % 50 == 0:
                        print(_format_offer(orjson.loads(record.value)))
            now = time.monotonic()
            if now >= next_summary:
                lags = await probe.measure(settings.group_id, settings.topics.events)
                committed = sum(p.position for p in lags)
                consumed_rate = (
                    (committed - last_committed) / (now - last_summary)
                    if last_committed is not None
                    else 0.0
                )
                print(
                    f"summary t={now - started:5.0f}s events/s={consumed_rate:7.1f} "
                    f"offers={offers_seen} (+{offers_seen - last_offers}) "
                    f"lag={total_lag(lags)}"
                )
                last_offers, last_committed, last_summary = offers_seen, committed, now
                next_summary = now + SUMMARY_EVERY_S
    finally:
        simulator.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await simulator
        await consumer.stop()
        await probe.close()
        for process in (worker, learner):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (worker, learner):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        print(f"demo: stopped; {offers_seen} offers printed or counted")
    return 0


def run_demo(demo: DemoSettings, *, duration_s: float, rate: float, users: int) -> int:
    try:
        return asyncio.run(_demo(demo, duration_s, rate, users))
    except KeyboardInterrupt:
        return 0
