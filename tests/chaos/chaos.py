"""The chaos suite (issue 15): a replay through the local cluster while faults are injected on
a seeded schedule, then everything checked against references computed in the test.

``run_chaos`` drives one run on a started ``Cluster`` (tests/cluster/conftest.py): it starts
the workers and the learner, produces the simulated events (plus poison records) with an
idempotent ``acks=all`` producer, injects each fault of the schedule when the replay has
produced its fraction of the events, waits for lag 0 and checks features, outputs, budgets,
training examples and dead letters. ``tests/chaos/test_chaos.py`` is the pytest form (short in
``make chaos-short``, 500,000 events in ``make chaos``).

Faults (``FaultKind``):

- ``worker_kill``: SIGKILL one worker, start it again at once;
- ``broker_kill``: SIGKILL one Kafka broker, start it again 5 s later (it rejoins the ISR);
- ``redis_primary_kill``: SIGKILL the primary of the deployment's slot, wait for its replica to
  be promoted, start the old one again (it rejoins as the replica; until then ``WAIT 1`` holds
  every batch back);
- ``rolling_restart``: SIGTERM each worker in turn, start it again, wait for its progress
  before the next;
- ``learner_kill``: SIGKILL the learner right after it logs a snapshot (published together
  with its checkpoint; its Kafka commit follows the log line, so the kill lands around that
  commit: the learner has no crash point of its own), start it again.

**Time to recover** of a fault: from its injection until (a) what it broke is whole again
(the restarted worker logged progress having consumed something; all partitions of the event
topics have 3 in-sync replicas; the old Redis primary answers ``ROLE`` as a replica; the
restarted learner logged a snapshot) and (b) the workers' consumer group committed past what
it had committed when the fault began (or has no lag left).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord
from redis.asyncio.cluster import RedisCluster

from engine.analysis.simulation.world import open_loop
from engine.decisions import offer_cost_cents, order_value
from engine.events import parse_event
from engine.features.catalogue import compute_features
from engine.ledger import event_day
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_client import deployment_node, redis_from_settings
from tests.chaos.reference import expected_features
from tests.cluster.conftest import Cluster
from tests.cluster.deployment import (
    Deployment,
    committed_and_lag,
    primary_pid,
    read_records,
    role,
    try_committed_and_lag,
    wait_until,
)
from tests.cluster.test_topology import all_isr, cluster_nodes
from tests.feature_reference import reference_states
from tests.worker_process import WorkerProcess, log_entries, progress

PARTITIONS = 6
BUDGET = 150.0
ATTRIBUTION_WINDOW_S = 600
"""Short, so that windows close during the run (in event time)."""
ALLOWED_LATENESS_S = 86_400 * 7
"""Beyond the input's event-time span: nothing is late, so any difference from the reference
is an event lost or applied twice."""
MEAN_GAP_MS = 400
CAMPAIGNS = f"""
[[campaign]]
name = "ch-everyone"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 600

[[campaign]]
name = "ch-budget"
policy = "threshold"
threshold = 0.0
discount_pct = 20
decision_interval_s = 600
daily_budget = {BUDGET}
"""
POISON_EVERY = 5_000
"""One poison record (alternately bad JSON and an invalid event) per this many events."""
GATE = 0.03
"""How far (a fraction of the replay) the producer may run past a fault not yet injected."""
FAULT_TIMEOUT_S = 300
DRAIN_TIMEOUT_S = 900


class FaultKind(StrEnum):
    WORKER_KILL = "worker_kill"
    BROKER_KILL = "broker_kill"
    REDIS_PRIMARY_KILL = "redis_primary_kill"
    ROLLING_RESTART = "rolling_restart"
    LEARNER_KILL = "learner_kill"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    at: float
    """Fraction of the events produced when it is injected."""


def schedule(seed: int, repeats: int = 1) -> list[Fault]:
    """Every kind ``repeats`` times, in a seeded order, at seeded fractions within 5-80 % of
    the replay (sorted, so the order of the kinds is the shuffled one)."""
    rng = random.Random(seed)
    kinds = [kind for kind in FaultKind for _ in range(repeats)]
    rng.shuffle(kinds)
    fractions = sorted(rng.uniform(0.05, 0.8) for _ in kinds)
    return [Fault(kind, round(at, 3)) for kind, at in zip(kinds, fractions, strict=True)]


@dataclass(frozen=True)
class ChaosConfig:
    events: int
    users: int
    seed: int
    faults: tuple[Fault, ...]
    workers: int = 3
    rate: float = 0.0
    """Events per second the producer keeps to at most; 0: as fast as ``max_lag`` allows."""
    max_lag: int = 20_000
    """The producer waits while the group is this many records behind."""


@dataclass
class FaultRecord:
    kind: str
    at: float
    target: str
    injected_s: float
    """Seconds since the replay began."""
    recover_s: float
    detail: str = ""


@dataclass
class ChaosReport:
    events: int
    poison: int
    users: int
    seed: int
    faults: list[FaultRecord] = field(default_factory=list)
    replay_s: float = 0.0
    drain_s: float = 0.0
    lost_events: int = 0
    doubled_events: int = 0
    users_differing_from_engine: int = 0
    features_checked: int = 0
    decisions: int = 0
    decisions_published_twice: int = 0
    offers: int = 0
    offers_published_twice: int = 0
    offers_applied_twice: int = 0
    offers_missing_from_state: int = 0
    """Offers published but not in their user's state (``od<day>`` counts), checked after the
    workers stopped: a worker stores the offers its last batch granted as it stops."""
    offers_without_decision: int = 0
    decisions_without_offer: int = 0
    budget_spent_cents: int = 0
    budget_granted_cents: int = 0
    overspent_cents: int = 0
    budget_denials: int = 0
    training: int = 0
    training_published_twice: int = 0
    training_orphans: int = 0
    learner_duplicates_skipped: int = 0
    learner_consumed: int = 0
    """Training records the learner read (summed over its runs): it learns slower than the
    workers produce, so at the end it may not have reached every copy."""
    windows_due: int = 0
    windows_closed_once: int = 0
    windows_not_closed: int = 0
    windows_closed_twice_differently: int = 0
    dead_letters: int = 0
    dead_letters_unique: int = 0
    dead_letters_logged_count: int = 0
    redelivered: int = 0
    """Records the workers read again after a fault and skipped by their watermark (at least:
    a SIGKILLed run's counts since its last progress line are not logged)."""
    republished: int = 0
    """Outputs a worker sent again from a batch's outbox entry, the batch having been settled
    in Redis before a crash or a lost reply (at least, likewise)."""
    final_lag: int = -1
    worker_exit_codes: list[int] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Events, offers, decisions and closed windows whose effect is missing."""
        return (
            self.lost_events
            + self.offers_missing_from_state
            + self.offers_without_decision
            + self.decisions_without_offer
            + self.windows_not_closed
            + max(self.poison - self.dead_letters_unique, 0)
        )

    @property
    def doubled(self) -> int:
        """Effects applied twice: events counted twice in features, offers twice in a user's
        state, budget charged beyond the unique offers (in offers' worth: 1 if any), closed
        windows with two different final labels."""
        return (
            self.doubled_events
            + self.offers_applied_twice
            + (1 if self.budget_spent_cents > self.budget_granted_cents else 0)
            + self.windows_closed_twice_differently
        )

    def table(self) -> str:
        rows = [
            ("faults injected", str(len(self.faults))),
            ("events (+ poison records)", f"{self.events:,} (+{self.poison})"),
            ("lost", str(self.lost)),
            (
                "  of them: events in features / offers in state / windows",
                (
                    f"{self.lost_events} / {self.offers_missing_from_state} / "
                    f"{self.windows_not_closed}"
                ),
            ),
            ("doubled (applied twice)", str(self.doubled)),
            ("overspent cents", str(self.overspent_cents)),
            ("lag at the end", str(self.final_lag)),
            (
                "features checked / users differing from the engine",
                f"{self.features_checked:,} / {self.users_differing_from_engine}",
            ),
            (
                "published twice: decisions / offers / training",
                (
                    f"{self.decisions_published_twice} / {self.offers_published_twice} / "
                    f"{self.training_published_twice}"
                ),
            ),
            (
                "learner: records read / copies skipped",
                f"{self.learner_consumed:,} / {self.learner_duplicates_skipped}",
            ),
            (
                "workers: records redelivered / outputs sent from an outbox",
                f"{self.redelivered:,} / {self.republished}",
            ),
            (
                "decisions / offers / training (unique)",
                (f"{self.decisions:,} / {self.offers:,} / {self.training:,}"),
            ),
            (
                "windows closed exactly once / due",
                f"{self.windows_closed_once} / {self.windows_due}",
            ),
            (
                "budget spent / granted / denials",
                (
                    f"{self.budget_spent_cents} / {self.budget_granted_cents} cents / "
                    f"{self.budget_denials}"
                ),
            ),
            (
                "dead letters on the DLQ (unique) / logged by workers",
                (
                    f"{self.dead_letters} ({self.dead_letters_unique}) / "
                    f"{self.dead_letters_logged_count}"
                ),
            ),
            ("replay / drain after it", f"{self.replay_s:.0f} s / {self.drain_s:.0f} s"),
        ]
        for n, fault in enumerate(self.faults, 1):
            detail = f"; {fault.detail}" if fault.detail else ""
            rows.append(
                (
                    f"fault {n}: {fault.kind} ({fault.target}) at {fault.at:.0%}",
                    f"recovered in {fault.recover_s:.1f} s{detail}",
                )
            )
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "lost": self.lost, "doubled": self.doubled}


def poison_records(count: int, user_ids: Sequence[str]) -> list[tuple[str, str, bytes]]:
    """(topic suffix, key, value): alternately bad JSON and an event missing its ``ts``."""
    out = []
    for n in range(count):
        user = user_ids[n % len(user_ids)]
        if n % 2 == 0:
            out.append(("browse", user, f"{{not json, poison {n}".encode()))
        else:
            bad = {"event_id": f"poison-{n}", "user_id": user, "type": "purchase"}
            out.append(("purchase", user, orjson.dumps(bad)))
    return out


class Run:
    """One chaos run: producer, fault injector, checks."""

    def __init__(self, cluster: Cluster, tmp_path: Path, config: ChaosConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.deployment = Deployment(
            cluster,
            tmp_path,
            env={
                "DEALSTREAM_TOPIC_PREFIX": "ch.",
                "DEALSTREAM_GROUP_ID": "ch-workers",
                "DEALSTREAM_PARTITIONS": str(PARTITIONS),
                "DEALSTREAM_BATCH_MAX": "500",
                "DEALSTREAM_ALLOWED_LATENESS_S": str(ALLOWED_LATENESS_S),
                "DEALSTREAM_ATTRIBUTION_WINDOW_S": str(ATTRIBUTION_WINDOW_S),
                "DEALSTREAM_SESSION_TIMEOUT_S": "10",
                "DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S": "3",
            },
            workers=config.workers,
            campaigns=CAMPAIGNS,
        )
        self.settings = self.deployment.settings
        self.bootstrap = self.settings.kafka_bootstrap
        self.topics = self.deployment.topics
        self.rng = random.Random(config.seed)
        now_ms = int(time.time() * 1000)
        span_ms = config.events * MEAN_GAP_MS
        self.events = list(
            open_loop(
                users=config.users,
                events=config.events,
                seed=config.seed,
                start_ms=now_ms - span_ms - 600_000,
                mean_gap_ms=MEAN_GAP_MS,
            )
        )
        users = sorted({str(e["user_id"]) for e in self.events})
        self.poison = poison_records(max(config.events // POISON_EVERY, 2), users)
        self.produced = 0
        self.started = 0.0
        self.injecting = 0
        """1 while a fault is being injected and recovered from."""
        self.report = ChaosReport(config.events, len(self.poison), config.users, config.seed)

    # --- producing -------------------------------------------------------------------------

    async def produce(self) -> None:
        """The events in order (poison records spread among them), paced by ``rate`` and
        ``max_lag``. The producer never runs more than ``GATE`` of the replay past a fault not
        injected yet (faults wait for the one before to recover), so that each fault lands
        while events still flow."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=10,
            request_timeout_ms=30_000,
        )
        await producer.start()
        chunk = 500
        total = len(self.events)
        poison_every = max(total // len(self.poison), 1)
        faults = self.config.faults
        try:
            for start in range(0, total, chunk):
                while (k := len(self.report.faults) + self.injecting) < len(faults) and (
                    start >= (faults[k].at + GATE) * total
                ):
                    await asyncio.sleep(0.2)
                await self._pace(start)
                pending = []
                for n, event in enumerate(self.events[start : start + chunk], start):
                    pending.append(
                        await producer.send(
                            f"{self.topics.prefix}events.{event['type']}",
                            orjson.dumps(event),
                            key=str(event["user_id"]).encode(),
                        )
                    )
                    if n % poison_every == poison_every // 2 and n // poison_every < len(
                        self.poison
                    ):
                        suffix, key, value = self.poison[n // poison_every]
                        pending.append(
                            await producer.send(
                                f"{self.topics.prefix}events.{suffix}", value, key=key.encode()
                            )
                        )
                await asyncio.gather(*pending)
                self.produced = min(start + chunk, total)
        finally:
            await producer.stop()

    async def _pace(self, start: int) -> None:
        if self.config.rate > 0:
            due = self.started + start / self.config.rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
        if start % 5_000 == 0:
            while True:
                found = await try_committed_and_lag(
                    self.bootstrap, self.settings.group_id, self.topics, PARTITIONS
                )
                if found is not None and found[1] < self.config.max_lag:
                    return
                await asyncio.sleep(1.0)

    # --- faults ----------------------------------------------------------------------------

    async def inject_all(self) -> None:
        for fault in self.config.faults:
            while self.produced < fault.at * len(self.events):
                await asyncio.sleep(0.2)
            self.injecting = 1
            self.report.faults.append(await self.inject(fault))
            self.injecting = 0

    async def inject(self, fault: Fault) -> FaultRecord:
        before = await self._committed()
        began = time.monotonic()
        injected_s = began - self.started
        handlers = {
            FaultKind.WORKER_KILL: self._worker_kill,
            FaultKind.BROKER_KILL: self._broker_kill,
            FaultKind.REDIS_PRIMARY_KILL: self._redis_primary_kill,
            FaultKind.ROLLING_RESTART: self._rolling_restart,
            FaultKind.LEARNER_KILL: self._learner_kill,
        }
        target, detail = await handlers[fault.kind]()

        async def progressed() -> bool:
            found = await try_committed_and_lag(
                self.bootstrap, self.settings.group_id, self.topics, PARTITIONS
            )
            return found is not None and (found[0] > before or found[1] == 0)

        await wait_until(f"{fault.kind}: the group committing again", progressed, FAULT_TIMEOUT_S)
        recover_s = time.monotonic() - began
        print(
            f"chaos: {fault.kind} ({target}) at {injected_s:.0f} s, recovered in {recover_s:.1f} s"
        )
        return FaultRecord(fault.kind.value, fault.at, target, injected_s, recover_s, detail)

    async def _committed(self) -> int:
        while (
            found := await try_committed_and_lag(
                self.bootstrap, self.settings.group_id, self.topics, PARTITIONS
            )
        ) is None:
            await asyncio.sleep(0.5)
        return found[0]

    async def _worker_kill(self) -> tuple[str, str]:
        n = self.rng.randrange(len(self.deployment.workers))
        worker = self.deployment.workers[n]
        await asyncio.to_thread(worker.kill9)
        worker.start()
        await rejoined(worker)
        return f"worker {n + 1}", ""

    async def _broker_kill(self) -> tuple[str, str]:
        broker = self.rng.choice((1, 2, 3))
        os.kill(self.cluster.broker_pid(broker), signal.SIGKILL)
        await asyncio.sleep(5)
        await asyncio.to_thread(self.cluster.start)
        await wait_until(
            "ISR 3 again",
            lambda: all_isr(self.bootstrap, list(self.topics.events), 3),
            FAULT_TIMEOUT_S,
        )
        return f"broker {broker}", ""

    async def _redis_primary_kill(self) -> tuple[str, str]:
        client = redis_from_settings(self.settings)
        assert isinstance(client, RedisCluster)
        try:
            old_port = int((await deployment_node(client, self.settings.redis_prefix)).port)
        finally:
            await client.aclose()
        nodes = await cluster_nodes(old_port)
        [new_port] = [n.port for n in nodes.values() if n.primary_id == nodes[old_port].id]
        os.kill(await asyncio.to_thread(primary_pid, old_port), signal.SIGKILL)
        killed = time.monotonic()

        async def promoted() -> bool:
            return await asyncio.to_thread(role, new_port) == "master"

        await wait_until("the replica promoted", promoted, FAULT_TIMEOUT_S)
        promoted_s = time.monotonic() - killed
        await asyncio.to_thread(self.cluster.start)

        async def rejoined() -> bool:
            return await asyncio.to_thread(role, old_port) == "slave"

        await wait_until("the old primary a replica", rejoined, FAULT_TIMEOUT_S)
        return f"primary :{old_port}", f"replica :{new_port} promoted in {promoted_s:.1f} s"

    async def _rolling_restart(self) -> tuple[str, str]:
        for worker in self.deployment.workers:
            code = await asyncio.to_thread(worker.stop)
            assert code == 0, f"worker exit status {code} on SIGTERM" + worker.tail()
            worker.start()
            await rejoined(worker)
        return f"{len(self.deployment.workers)} workers", ""

    async def _learner_kill(self) -> tuple[str, str]:
        deployment = self.deployment
        assert deployment.learner is not None
        offset = deployment.learner_log.stat().st_size
        await wait_until(
            "a learner snapshot",
            lambda: _true(bool(deployment.learner_entries("snapshot", offset))),
            FAULT_TIMEOUT_S,
        )
        deployment.learner.send_signal(signal.SIGKILL)
        await asyncio.to_thread(deployment.learner.wait)
        restarted = deployment.start_learner()
        await wait_until(
            "a snapshot of the restarted learner",
            lambda: _true(bool(deployment.learner_entries("snapshot", restarted))),
            FAULT_TIMEOUT_S,
        )
        return "learner", "killed right after its snapshot log line"

    # --- the run ---------------------------------------------------------------------------

    async def replay(self) -> None:
        self.started = time.monotonic()
        injecting = asyncio.create_task(self.inject_all())
        await self.produce()
        await injecting
        self.report.replay_s = time.monotonic() - self.started
        drained = time.monotonic()

        async def no_lag() -> bool:
            found = await try_committed_and_lag(
                self.bootstrap, self.settings.group_id, self.topics, PARTITIONS
            )
            return found is not None and found[1] == 0

        await wait_until("lag 0 after the replay", no_lag, DRAIN_TIMEOUT_S)
        self.report.drain_s = time.monotonic() - drained
        self.report.final_lag = (
            await committed_and_lag(self.bootstrap, self.settings.group_id, self.topics, PARTITIONS)
        )[1]


async def rejoined(worker: WorkerProcess) -> None:
    """Until the worker (re)started last was assigned event partitions (its group joined)."""

    async def assigned() -> bool:
        if not worker.alive():
            raise AssertionError("worker exited after its restart" + worker.tail())
        return '"msg":"assigned ' in worker.run_log_text()

    await wait_until("the restarted worker assigned partitions", assigned, FAULT_TIMEOUT_S)


async def _true(value: bool) -> bool:
    return value


def run_chaos(cluster: Cluster, tmp_path: Path, config: ChaosConfig) -> ChaosReport:
    """Start the deployment, replay with faults, check; the report (checks not asserted)."""
    run = Run(cluster, tmp_path, config)
    deployment = run.deployment
    asyncio.run(
        ensure_topics(
            run.bootstrap,
            run.topics.all,
            partitions=PARTITIONS,
            replication=run.settings.replication,
        )
    )
    days_from = event_day(int(time.time() * 1000))
    try:
        for worker in deployment.workers:
            worker.start()
        deployment.start_learner()
        for worker in deployment.workers:
            asyncio.run(worker.wait_progress(lambda p: True, timeout_s=180))
        asyncio.run(run.replay())
        days = set(range(days_from, event_day(int(time.time() * 1000)) + 1))
        # Stopped first: a stopping worker stores the offers its last batch granted.
        run.report.worker_exit_codes = deployment.stop()
        asyncio.run(check(run, days))
    finally:
        if not run.report.worker_exit_codes:
            run.report.worker_exit_codes = deployment.stop()
    last_lines = _last_per_run(deployment.learner_entries("snapshot"))
    run.report.learner_duplicates_skipped = sum(
        int(line["status"].get("duplicates", 0)) for line in last_lines
    )
    run.report.learner_consumed = sum(int(line["status"].get("consumed", 0)) for line in last_lines)
    return run.report


def _last_per_run(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last snapshot line of each learner run (its counters start at 0 again)."""
    last: list[dict[str, Any]] = []
    for entry in entries:
        snapshots = int(entry["status"].get("snapshots", 0))
        if last and snapshots > int(last[-1]["status"].get("snapshots", 0)):
            last[-1] = entry
        else:
            last.append(entry)
    return last


async def check(run: Run, days: set[int]) -> None:
    """Fill the report: features, outputs, budgets, training, dead letters."""
    report, deployment = run.report, run.deployment
    events = run.events
    engine_states = await reference_states(events, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000)
    got, spent = await deployment.stored(engine_states, campaign="ch-budget", days=days)

    # Features: the engine's in-memory store on the same events (every field but the offers,
    # which join a user's state with the user's next batch), and the test's own reference.
    plain = {u: {k: v for k, v in s.items() if not k.startswith("od")} for u, s in got.items()}
    report.users_differing_from_engine = sum(
        1 for user, state in engine_states.items() if plain.get(user) != state
    )
    expected = expected_features(events)
    for user, want in expected.items():
        have = compute_features(got.get(user, {}))
        for name, value in want.items():
            report.features_checked += 1
            difference = have[name] - value
            if name.startswith(
                tuple(f"{k}_count_" for k in ("view", "cart", "favorite", "search", "purchase"))
            ) and name.endswith("_30d"):
                if difference < 0:
                    report.lost_events += int(-difference)
                elif difference > 0:
                    report.doubled_events += int(difference)
            elif abs(difference) > 1e-6:
                report.lost_events += 1  # a feature wrong in another way: counted, reported
                print(f"chaos: {user} {name} got {have[name]} want {value}")

    bootstrap = run.bootstrap
    decision_list = [
        orjson.loads(r.value)
        for r in await read_records(bootstrap, run.topics.decisions, PARTITIONS)
    ]
    offer_list = [
        orjson.loads(r.value) for r in await read_records(bootstrap, run.topics.offers, PARTITIONS)
    ]
    training_list = [
        orjson.loads(r.value)
        for r in await read_records(bootstrap, run.topics.training, PARTITIONS)
    ]
    dlq = await read_records(bootstrap, run.topics.dlq, PARTITIONS)

    decisions = {d["decision_id"]: d for d in decision_list}
    report.decisions = len(decisions)
    report.decisions_published_twice = len(decision_list) - len(decisions)
    offers = {o["offer_id"]: o for o in offer_list}
    report.offers = len(offers)
    report.offers_published_twice = len(offer_list) - len(offers)
    offered = {d["offer_id"]: d for d in decisions.values() if d["offer_id"] is not None}
    report.offers_without_decision = len(offers.keys() - offered.keys())
    report.decisions_without_offer = len(offered.keys() - offers.keys())

    # An offer joins its user's state once (od<day> counts; the run spans less than their 30
    # days): more than the user's unique offers is an offer applied twice, fewer a lost one.
    per_user = Counter(str(o["user_id"]) for o in offers.values())
    where = {str(e["event_id"]): n / len(events) for n, e in enumerate(events)}
    for user in sorted(per_user.keys() | got.keys()):
        state = got.get(user, {})
        in_state = int(sum(v for k, v in state.items() if k.startswith("od") and k != "od"))
        report.offers_applied_twice += max(in_state - per_user[user], 0)
        missing = per_user[user] - in_state
        report.offers_missing_from_state += max(missing, 0)
        if missing > 0:
            counts = {k: v for k, v in state.items() if k.startswith("od")}
            triggers = sorted(
                (where.get(str(d["trigger_event_id"]), -1.0), d["ts"], d["offer_id"])
                for d in offered.values()
                if d["offer_id"] in offers and str(offers[d["offer_id"]]["user_id"]) == user
            )
            print(
                f"chaos: {user} has {in_state} offers in state, {per_user[user]} published "
                f"({counts}); triggers at "
                + ", ".join(f"{at:.1%} ts {ts} {offer_id}" for at, ts, offer_id in triggers)
            )

    by_id = {str(e["event_id"]): e for e in events}
    budgeted = next(c for c in deployment.campaigns if c.name == "ch-budget")
    report.budget_granted_cents = sum(
        offer_cost_cents(
            d["discount_pct"],
            order_value(budgeted, parse_event(by_id[d["trigger_event_id"]]), d["features"]),
        )
        for d in offered.values()
        if d["campaign"] == "ch-budget" and d["offer_id"] in offers
    )
    report.budget_spent_cents = sum(spent.values())
    budget_cents = round(BUDGET * 100)
    report.overspent_cents = sum(max(c - budget_cents, 0) for c in spent.values()) + max(
        report.budget_granted_cents - budget_cents * len(days), 0
    )
    report.budget_denials = sum(
        1 for d in decisions.values() if "denied:budget" in d.get("rules", ())
    )

    # Training: examples by (decision_id, kind); each closed window once.
    examples: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in training_list:
        examples[(t["decision_id"], t.get("kind", "closed"))].append(t)
    report.training = len(examples)
    report.training_published_twice = len(training_list) - len(examples)
    report.training_orphans = sum(1 for d, _ in examples if d not in decisions)
    report.windows_closed_twice_differently = sum(
        1
        for (_, kind), copies in examples.items()
        if kind == "closed"
        and len({orjson.dumps(c, option=orjson.OPT_SORT_KEYS) for c in copies}) > 1
    )
    last_ts = max(int(str(e["ts"])) for e in events)
    due = [
        d
        for d in decisions.values()
        if int(d["ts"]) + ATTRIBUTION_WINDOW_S * 1000 < last_ts - 600_000
    ]
    report.windows_due = len(due)
    closed = {d for d, kind in examples if kind == "closed"}
    report.windows_closed_once = sum(1 for d in due if d["decision_id"] in closed)
    report.windows_not_closed = report.windows_due - report.windows_closed_once

    def source(record: ConsumerRecord[bytes, bytes]) -> tuple[bytes, ...]:
        headers = dict(record.headers)
        return tuple(
            headers.get(f"dealstream.source.{part}", b"")
            for part in ("topic", "partition", "offset")
        )

    report.dead_letters = len(dlq)
    report.dead_letters_unique = len({source(r) for r in dlq})
    logged: set[tuple[Any, Any, Any]] = set()
    for worker in deployment.workers:
        logged |= dead_letters_logged(worker.log_text())
    report.dead_letters_logged_count = len(logged)
    for worker in deployment.workers:
        report.redelivered += counted_over_runs(worker.log_text(), "redelivered")
        report.republished += counted_over_runs(worker.log_text(), "republished")


def counted_over_runs(log_text: str, counter: str) -> int:
    """A worker's counter summed over its runs, from its progress lines (each run counts from
    0: a run begins where ``consumed`` drops)."""
    total, last, consumed = 0, 0, -1
    for counters in progress(log_text):
        if int(counters["consumed"]) < consumed:
            total += last
        consumed, last = int(counters["consumed"]), int(counters[counter])
    return total + last


def dead_letters_logged(log_text: str) -> set[tuple[Any, Any, Any]]:
    """Where the records a worker logged as dead-lettered (every run of it) came from."""
    return {
        (entry.get("topic"), entry.get("partition"), entry.get("offset"))
        for entry in log_entries(log_text, "dead-lettered a record")
    }


def write_json(report: ChaosReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
