"""Model quality on real data: the Taobao excerpt through Kafka, the worker and the learner.

The excerpt (``../shared/data``, 2017 user behaviour, about two hours of event time) is turned
into event v1 by ``engine.importers.taobao.import_taobao`` and produced with a plain aiokafka
producer (key = user_id, topic by type). ``dealstream worker`` decides on every view, cart and
favorite (one threshold campaign, at most one decision per user every ``DECISION_INTERVAL_S``),
labels the decisions by purchases within ``ATTRIBUTION_WINDOW_S`` of event time and publishes
the training examples; ``dealstream learner`` learns them prequentially (test, then train).

The training topic holds the decision snapshots (features and discount as the worker saw them,
plus the label). The test reads them back and prints one table:

- the product's prequential figures: the learner's own (its last window) and the same run
  replayed in-process through ``engine.model.prequential.OnlineLearner`` over every example;
- a scikit-learn logistic regression (``StandardScaler`` + ``LogisticRegression``) fitted in
  hindsight on all the snapshots with the product's input transform
  (``engine.model.inputs.model_inputs``): in-sample, and 5-fold cross-validated (the honest
  reference). scikit-learn is a reference here, not a dependency of the product.

Every figure is given over all examples and over the "steady state": examples labelled once a
whole attribution window of data has passed. Before that only purchases can label a decision
(a 0 needs its window to run out), so the stream starts with positives only.

The tests at the end pin down three ways the labels and features used to depend on the order
in which the worker read its topics (strict xfails until fixed). Since they pass, the excerpt is
produced all at once, as a bulk replay of history would be, and gives the figures the paced
replay gave. Figures and what they mean: ``docs/model-quality.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from engine.alignment import EventTimeAligner
from engine.campaigns import parse_campaigns
from engine.events import parse_event
from engine.features.store import InMemoryFeatureStore, Position
from engine.ledger import InMemoryLedger
from engine.model.feedback import TrainingExample
from engine.model.inputs import model_inputs
from engine.model.prequential import OnlineLearner, roc_auc
from engine.pipeline import DiscountEngine, EngineConfig, Incoming
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_ledger import RedisLedger
from streams.adapters.redis_store import RedisFeatureStore
from streams.settings import LearnerSettings, Settings, Topics
from tests.conftest import REPO, Isolation, Services
from tests.model_keys import SIGNING_PEM, VERIFY_PEM
from tests.worker_process import WorkerProcess, clean_up, log_entries, worker_env

pytestmark = pytest.mark.integration

TAOBAO = REPO.parent / "shared" / "data" / "taobao-userbehavior-excerpt.csv.gz"
SCHEMA = REPO / "schemas" / "training.v1.json"

ROWS: int | None = None
"""Events replayed (the first ``ROWS`` of the import); None = all of them (96,168)."""
SLICE_S: int | None = None
"""None: the events are produced all at once; a number: that many seconds of event time at a
time (``replay_in_slices``)."""
ATTRIBUTION_WINDOW_S = 1800
"""Half an hour of event time, so that windows opened in the first 85 minutes expire within
the 115 minutes of data (with the default 24 h no decision would ever be labelled 0)."""
DECISION_INTERVAL_S = 300
ALLOWED_LATENESS_S = 86_400
"""A replay of history: nothing is dropped as late."""
SNAPSHOT_EVERY = 500
CAMPAIGNS_TOML = f"""\
[[campaign]]
name = "taobao-threshold"
policy = "threshold"          # the paper's case 1: P(purchase) > 0.5 -> 10 %
threshold = 0.5
discount_pct = 10
triggers = ["view", "cart", "favorite"]
decision_interval_s = {DECISION_INTERVAL_S}
"""
EPS = 1e-15
"""Probabilities are clipped to [EPS, 1 - EPS] for log loss, as in ``engine.model.prequential``."""

Pairs = Sequence[tuple[float, int]]


# -- processes --------------------------------------------------------------------------------


def learner_snapshots(log_text: str) -> list[dict[str, Any]]:
    """Every "snapshot" line of a learner log, parsed, in order."""
    return [entry["status"] for entry in log_entries(log_text, "snapshot")]


class LearnerProcess:
    """``dealstream learner`` as a subprocess; its output goes to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = {**os.environ, **env}, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "learner"],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM (the learner then publishes and logs a last snapshot); SIGKILL after 60 s."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("learner ignored SIGTERM for 60 s" + self.tail()) from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self) -> str:
        return "\n--- learner log (tail) ---\n" + self.log_text()[-3000:]

    async def wait_learned(self, count: int, timeout_s: float) -> dict[str, Any]:
        """The first snapshot line with ``examples_learned >= count``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in learner_snapshots(self.log_text()):
                if line["examples_learned"] >= count:
                    return line
            if not self.alive():
                raise AssertionError("the learner exited" + self.tail())
            await asyncio.sleep(0.5)
        raise AssertionError(f"the learner did not learn {count} examples" + self.tail())


# -- Kafka ------------------------------------------------------------------------------------


def event_time_slices(
    events: Sequence[dict[str, Any]], slice_ms: int | None
) -> list[list[dict[str, Any]]]:
    """``events`` (sorted by event time) cut at every multiple of ``slice_ms`` (None: one
    slice)."""
    if slice_ms is None:
        return [list(events)]
    slices: list[list[dict[str, Any]]] = []
    end: int | None = None
    for event in events:
        if end is None or event["ts"] >= end:
            slices.append([])
            end = event["ts"] - event["ts"] % slice_ms + slice_ms
        slices[-1].append(event)
    return slices


async def replay_in_slices(
    services: Services,
    isolation: Isolation,
    events: Sequence[dict[str, Any]],
    *,
    slice_ms: int | None,
    timeout_s: float,
) -> int:
    """Produce ``events`` one slice of event time at a time, each once the worker has applied
    the previous one (its per-partition offset watermarks in Redis say so); returns the
    number of slices.

    A shop publishes its events about when they happen, so the worker sees the topics advance
    together; produced all at once, history lets the worker read the small purchase topic far
    ahead of the browse topic, which the worker's event-time alignment and per-lane label
    clocks make harmless (the tests below). Slices bound that skew to ``slice_ms``.
    """
    topics = Topics(isolation.topic_prefix)
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all", linger_ms=2)
    client = aioredis.Redis.from_url(services.redis_url)
    store = RedisFeatureStore(client, prefix=isolation.redis_prefix)
    deadline = time.monotonic() + timeout_s
    slices = event_time_slices(events, slice_ms)
    await producer.start()
    try:
        for piece in slices:
            pending = []
            for event in piece:
                topic = f"{topics.prefix}events.{event['type']}"
                key = str(event["user_id"]).encode()
                pending.append(await producer.send(topic, orjson.dumps(event), key=key))
            target: dict[tuple[str, int], int] = {}
            for meta in await asyncio.gather(*pending):
                where = (meta.topic, meta.partition)
                target[where] = max(target.get(where, -1), meta.offset)
            while True:
                marks = await store.watermarks()
                if all(marks.get(where, -1) >= offset for where, offset in target.items()):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"the worker did not apply {target} in time: {marks}")
                await asyncio.sleep(0.01)
    finally:
        await producer.stop()
        await client.aclose()
    return len(slices)


async def end_offset(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def wait_end_offset(bootstrap: str, topic: str, count: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    seen = await end_offset(bootstrap, topic)
    while seen < count and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        seen = await end_offset(bootstrap, topic)
    return seen


async def read_topic(bootstrap: str, topic: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` records of the single-partition ``topic``, decoded, in order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while len(out) < count:
            batch = await consumer.getmany(tp, timeout_ms=2000, max_records=10_000)
            if not batch:
                break
            out.extend(orjson.loads(r.value or b"") for r in batch.get(tp, []))
    finally:
        await consumer.stop()
    return out


# -- figures ----------------------------------------------------------------------------------


def log_loss(pairs: Pairs) -> float:
    def loss(p: float, y: int) -> float:
        p = min(max(p, EPS), 1 - EPS)
        return -math.log(p) if y else -math.log(1 - p)

    return math.fsum(loss(p, y) for p, y in pairs) / len(pairs)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    n: int
    label_rate: float | None
    auc: float | None
    log_loss: float | None


def row(name: str, pairs: Pairs) -> Row:
    return Row(
        name, len(pairs), sum(y for _, y in pairs) / len(pairs), roc_auc(pairs), log_loss(pairs)
    )


def hindsight_predictions(examples: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """P(label 1) for every example from a scikit-learn logistic regression fitted in hindsight
    on all of them: in-sample, and out-of-fold over a seeded stratified 5-fold split."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = [model_inputs(e["features"], e["discount_pct"]) for e in examples]
    columns = sorted(rows[0])
    x = np.array([[r[c] for c in columns] for r in rows], dtype=float)
    y = np.array([int(e["label"]) for e in examples])

    def model() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))

    in_sample = model().fit(x, y).predict_proba(x)[:, 1]
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    out_of_fold = cross_val_predict(model(), x, y, cv=folds, method="predict_proba")[:, 1]
    return [float(p) for p in in_sample], [float(p) for p in out_of_fold]


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(rows: Sequence[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [
        f"| {'model':<{width}} | {'n':>6} | label rate | AUC    | log loss |",
        f"|{'-' * (width + 2)}|--------|------------|--------|----------|",
    ]
    lines.extend(
        f"| {r.name:<{width}} | {r.n:>6} | {fmt(r.label_rate):>10} | {fmt(r.auc):>6} "
        f"| {fmt(r.log_loss):>8} |"
        for r in rows
    )
    return "\n".join(lines)


# -- the test ---------------------------------------------------------------------------------


async def test_taobao_prequential_model_next_to_a_hindsight_sklearn_reference(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    if not TAOBAO.exists():
        pytest.skip(f"the Taobao excerpt is absent ({TAOBAO}); see ../shared/data/README.md")
    from jsonschema import Draft202012Validator
    from sklearn.metrics import roc_auc_score

    from engine.importers.taobao import import_taobao

    started = time.monotonic()
    run = import_taobao(TAOBAO)
    events = sorted(list(run)[:ROWS], key=lambda event: int(event["ts"]))
    total = len(events)
    first_ts, last_ts = int(events[0]["ts"]), int(events[-1]["ts"])
    users = len({e["user_id"] for e in events})

    topics = Topics(isolation.topic_prefix)
    bootstrap = services.kafka_bootstrap
    # One partition for `training`: the learner reads it in offset order, and the replay
    # below sees the examples in exactly that order.
    await ensure_topics(bootstrap, [topics.training], partitions=1)
    await ensure_topics(bootstrap, topics.all, partitions=4)
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS_TOML, encoding="utf-8")
    env = worker_env(
        services,
        isolation,
        http_port=free_port,
        campaigns=campaigns,
        model_signing_key=SIGNING_PEM,
        model_verify_key=VERIFY_PEM,
        attribution_window_s=ATTRIBUTION_WINDOW_S,
        allowed_lateness_s=ALLOWED_LATENESS_S,
        learner_snapshot_every=SNAPSHOT_EVERY,
        learner_snapshot_interval_s=1,
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    learner = LearnerProcess(env, tmp_path / "learner.log")
    try:
        learner.start()
        worker.start()
        replay_started = time.monotonic()
        slices = await replay_in_slices(
            services,
            isolation,
            events,
            slice_ms=None if SLICE_S is None else SLICE_S * 1000,
            timeout_s=240,
        )
        replay_s = time.monotonic() - replay_started
        final = await worker.wait_progress(lambda line: line["consumed"] >= total, 30)
        n_training = int(final["training"])
        on_topic = await wait_end_offset(bootstrap, topics.training, n_training, 30)
        await learner.wait_learned(on_topic, 60)
        assert learner.stop() == 0, learner.tail()
        examples = await read_topic(bootstrap, topics.training, on_topic)
        assert worker.stop() == 0, worker.tail()
    finally:
        if learner.alive():
            learner.stop()
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    last = learner_snapshots(learner.log_text())[-1]

    assert final["consumed"] == final["applied"] == total, final
    assert on_topic == n_training == len(examples), (on_topic, n_training, len(examples))
    validator = Draft202012Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    invalid = [(e, [err.message for err in validator.iter_errors(e)]) for e in examples]
    invalid = [(e, errors) for e, errors in invalid if errors]
    assert not invalid, f"{len(invalid)} training examples break the schema: {invalid[:3]}"

    # The learner's run again, in-process, in the same (offset) order: same model, same window.
    window = next(
        f.default for f in dataclasses.fields(LearnerSettings) if f.name == "metrics_window"
    )
    feedback = Settings.from_env(env).feedback
    finals: list[tuple[float, int]] = []
    online = OnlineLearner(
        window=window, feedback=feedback, on_final=lambda _example, p, y: finals.append((p, y))
    )
    final_examples = []
    for example in examples:
        online.learn(example)
        if TrainingExample.from_message(example).final_label is not None:
            final_examples.append(example)
    assert online.model.examples_learned == last["examples_learned"], last
    # Each decision's final label once: its conversion, or its window closing without one.
    assert len(finals) == len(final_examples) == last["seen"], last
    prequential = finals
    examples = final_examples
    for name in ("auc", "log_loss", "ece", "label_rate"):
        ours, theirs = online.metrics.as_dict()[name], last[name]
        assert (ours is None) == (theirs is None), (name, ours, theirs)
        if ours is not None:
            assert math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=1e-12), (name, ours, theirs)

    in_sample, out_of_fold = hindsight_predictions(examples)
    labels = [y for _, y in prequential]
    steady_from = first_ts + ATTRIBUTION_WINDOW_S * 1000
    steady = [i for i, e in enumerate(examples) if e["labeled_at"] >= steady_from]

    def on(indices: Sequence[int], scores: Sequence[float]) -> list[tuple[float, int]]:
        return [(scores[i], labels[i]) for i in indices]

    everything = range(len(examples))
    product = [p for p, _ in prequential]
    rate_all = sum(labels) / len(labels)
    rate_steady = sum(labels[i] for i in steady) / len(steady)
    rows = [
        Row(
            "product, learner's last window",
            last["count"],
            last["label_rate"],
            last["auc"],
            last["log_loss"],
        ),
        row("product, prequential, all", on(everything, product)),
        row("product, prequential, steady state", on(steady, product)),
        row("sklearn LR hindsight in-sample, all", on(everything, in_sample)),
        row("sklearn LR hindsight in-sample, steady state", on(steady, in_sample)),
        row("sklearn LR hindsight 5-fold CV, all", on(everything, out_of_fold)),
        row("sklearn LR hindsight 5-fold CV, steady state", on(steady, out_of_fold)),
        row("constant label rate, all", on(everything, [rate_all] * len(labels))),
        row("constant label rate, steady state", on(steady, [rate_steady] * len(labels))),
    ]
    offers = sum(1 for e in examples if e["discount_pct"] > 0)
    print(
        f"\nTaobao excerpt: {total} events of {users} users over "
        f"{(last_ts - first_ts) / 60_000:.0f} min of event time, produced "
        + ("all at once" if SLICE_S is None else f"in {slices} slices of {SLICE_S} s")
        + f"; the worker applied them in {replay_s:.0f} s "
        f"({total / replay_s:.0f} events/s); whole test so far {time.monotonic() - started:.0f} s"
        f"\nworker: {final}\nlearner, last snapshot: {last}\n"
        f"training examples: {len(examples)} ({sum(labels)} labelled 1, {offers} with a "
        f"discount); steady state = labelled from {ATTRIBUTION_WINDOW_S} s after the first event "
        f"on ({len(steady)} examples)\n" + table(rows)
    )

    for r in rows[1:]:
        assert r.auc is not None and 0.0 <= r.auc <= 1.0, r
        assert r.log_loss is not None and math.isfinite(r.log_loss), r
    assert last["auc"] is None or 0.0 <= last["auc"] <= 1.0, last
    # An independent implementation of ROC AUC agrees with the engine's.
    sk_auc = float(roc_auc_score(labels, product))
    assert math.isclose(rows[1].auc or 0.0, sk_auc, rel_tol=1e-9), (rows[1].auc, sk_auc)
    # Over all examples the product ranks better than chance in every run measured (0.61-0.65,
    # helped by the positives-only warm-up). The steady-state figure (0.52-0.58 over the runs
    # in docs/model-quality.md) is printed, not asserted: it is within two standard errors of
    # 0.5 in some runs, and a test must not fail by chance.
    assert (rows[1].auc or 0.0) > 0.5, f"prequential AUC {rows[1].auc}: no better than chance"


# -- labels and features do not depend on how the worker interleaves partitions and topics ----
#
# A worker reads its partitions (and the browse and purchase topics) at their own pace. These
# tests feed the same events in event-time order and in an order a worker can see (one
# partition or topic read ahead of another), over the in-memory and the Redis backends, and
# expect the same labels and features (they were strict xfails until issue 13 fixed them:
# per-lane label clocks, remembered purchases, the event-time aligner).

T0 = 1_511_658_000_000
"""2017-11-26 01:00 UTC, where the Taobao excerpt starts."""
MINUTE_MS = 60_000


def view(user: str, ts: int) -> dict[str, Any]:
    return {
        "event_id": f"{user}-view-{ts}",
        "user_id": user,
        "type": "browse",
        "ts": ts,
        "item_id": "i1",
        "category": "c1",
        "price": 0,
        "action": "view",
    }


def purchase(user: str, ts: int) -> dict[str, Any]:
    return {
        "event_id": f"{user}-buy-{ts}",
        "user_id": user,
        "type": "purchase",
        "ts": ts,
        "order_id": f"{user}-order-{ts}",
        "items": [{"item_id": "i1", "category": "c1", "price": 0, "quantity": 1}],
        "amount": 0,
    }


EngineFactory = Callable[[], DiscountEngine]


@pytest.fixture(params=["memory", "redis"])
async def make_engine(
    request: pytest.FixtureRequest, isolation: Isolation
) -> AsyncIterator[EngineFactory]:
    """Fresh engines (own state each) with the Taobao test's campaign and windows."""
    campaigns = parse_campaigns(tomllib.loads(CAMPAIGNS_TOML))
    window_ms = ATTRIBUTION_WINDOW_S * 1000
    config = EngineConfig(
        allowed_lateness_ms=ALLOWED_LATENESS_S * 1000,
        attribution_window_ms=window_ms,
        learn_inline=False,
    )
    if request.param == "memory":
        yield lambda: DiscountEngine(
            InMemoryFeatureStore(),
            ledger=InMemoryLedger(config.ledger_config(campaigns)),
            campaigns=campaigns,
            config=config,
        )
        return
    services: Services = request.getfixturevalue("services")
    client = aioredis.Redis.from_url(services.redis_url)
    made = 0

    def redis_engine() -> DiscountEngine:
        nonlocal made
        made += 1
        prefix = f"{isolation.redis_prefix}{made}:"
        return DiscountEngine(
            RedisFeatureStore(client, prefix=prefix),
            ledger=RedisLedger(client, prefix=prefix, config=config.ledger_config(campaigns)),
            campaigns=campaigns,
            config=config,
        )

    try:
        yield redis_engine
    finally:
        await client.aclose()
        await clean_up(services, isolation)


async def labels_of(
    engine: DiscountEngine,
    batches: list[list[dict[str, Any]]],
    partitions: dict[str, int] | None = None,
) -> dict[str, int]:
    """The label of each user's decision (user id -> 0/1) once ``batches`` are processed.

    ``partitions``: each user's partition (the worker's positions: the event's topic, that
    partition, the next offset there); None: no positions, as a backtest reads."""
    decided: dict[str, str] = {}
    labelled: dict[str, int] = {}
    offsets: dict[tuple[str, int], int] = {}

    def incoming(event: dict[str, Any]) -> Incoming:
        if partitions is None:
            return Incoming(parse_event(event))
        where = (f"events.{event['type']}", partitions[event["user_id"]])
        offsets[where] = offsets.get(where, -1) + 1
        return Incoming(parse_event(event), Position(*where, offsets[where]))

    for batch in batches:
        result = await engine.process([incoming(e) for e in batch])
        decided.update({d.decision_id: d.user_id for d in result.decisions})
        # The last word on a decision: its conversion, then its window closing.
        labelled.update({t.decision_id: t.label for t in result.training})
    return {decided[d]: label for d, label in labelled.items()}


async def test_a_partition_read_ahead_does_not_expire_other_users_decisions(
    make_engine: EngineFactory,
) -> None:
    """Each partition number is a lane with its own clock (engine/labels.py)."""
    a_view, a_buy = view("a", T0), purchase("a", T0 + MINUTE_MS)
    b_later = view("b", T0 + 120 * MINUTE_MS)  # on another partition, read first
    lanes = {"a": 0, "b": 1}
    in_event_time = await labels_of(make_engine(), [[a_view], [a_buy], [b_later]], lanes)
    as_read = await labels_of(make_engine(), [[b_later], [a_view], [a_buy]], lanes)
    assert in_event_time == {"a": 1}
    assert as_read == in_event_time


async def test_a_purchase_read_before_the_decision_it_follows_still_labels_it(
    make_engine: EngineFactory,
) -> None:
    """A purchase is remembered for the allowed lateness (engine/labels.py)."""
    a_view, a_buy = view("a", T0), purchase("a", T0 + MINUTE_MS)
    c_later = view("c", T0 + 120 * MINUTE_MS)  # event time moves on: open windows expire
    in_event_time = await labels_of(make_engine(), [[a_view], [a_buy], [c_later]])
    as_read = await labels_of(make_engine(), [[a_buy], [a_view], [c_later]])
    assert in_event_time == {"a": 1}
    assert as_read == in_event_time


async def features_of(
    engine: DiscountEngine, batches: list[list[dict[str, Any]]]
) -> dict[str, Any]:
    """The features of each user's decision (user id -> features), the batches fed through
    the event-time aligner as the worker does: each event at the next offset of its topic's
    partition 0, browse and purchase lagging while batches remain, all caught up at the end."""
    topics = Topics()
    aligner = EventTimeAligner(topics.events)
    offsets: dict[str, int] = {}
    lagging = {(topics.browse, 0), (topics.purchase, 0)}
    features: dict[str, Any] = {}
    for batch, last in [*((b, False) for b in batches), ([], True)]:
        incoming = []
        for doc in batch:
            topic = f"{topics.prefix}events.{doc['type']}"
            offset = offsets[topic] = offsets.get(topic, -1) + 1
            incoming.append(Incoming(parse_event(doc), Position(topic, 0, offset)))
        aligner.push(incoming, lagging=() if last else lagging)
        released = aligner.release()
        if released:
            result = await engine.process(released)
            features.update({d.user_id: d.features for d in result.decisions})
    assert aligner.held() == 0
    return features


async def test_a_decision_sees_no_purchase_made_after_it(make_engine: EngineFactory) -> None:
    a_view, a_buy = view("a", T0), purchase("a", T0 + MINUTE_MS)
    in_event_time = await features_of(make_engine(), [[a_view], [a_buy]])
    as_read = await features_of(make_engine(), [[a_buy], [a_view]])
    assert in_event_time["a"]["purchase_count_30d"] == 0
    assert as_read["a"] == in_event_time["a"]
