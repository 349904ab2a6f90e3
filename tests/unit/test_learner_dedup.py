"""The learner learns each training example once: copies within the window are skipped,
counted, and the model is the one that learned each example once (no services).

The learner step (``Learner.learn_record``) is fed ``ConsumerRecord``s built here; its Redis
client is never connected (only ``run`` uses it).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterable
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import ConsumerRecord, TopicPartition

from engine.model.feedback import DECIDED, Feedback, FeedbackMethod, TrainingExample
from engine.model.prequential import OnlineLearner
from streams.learner.dedup import RecentExamples, example_key
from streams.learner.process import Learner
from streams.settings import LearnerSettings, Secret, Settings
from tests.model_keys import SIGNING_PEM

TOPIC = "training"
T0 = 1_767_225_600_000
HOUR = 3_600_000


def decision_examples(count: int, *, seed: int) -> list[TrainingExample]:
    """Every example the training topic carries for ``count`` decisions, in event-time order:
    ``decided``, ``elapsed`` and ``closed`` for each, ``converted`` for those that buy."""
    rng = random.Random(seed)
    examples: list[TrainingExample] = []
    for index in range(count):
        decided_at = T0 + index * 60_000
        converted_at = decided_at + rng.randint(1, 23) * HOUR if rng.random() < 0.4 else None
        elapsed_at = decided_at + HOUR
        base = TrainingExample(
            decision_id=f"d-{index:06d}",
            features={
                "cart_count_24h": float(rng.choice([0, 1, 2, 5])),
                "view_count_24h": float(rng.randint(0, 30)),
                "purchase_count_30d": float(rng.choice([0, 1, 3])),
            },
            discount_pct=float(rng.choice([0, 10, 20])),
            label=0,
            labeled_at=decided_at,
            kind=DECIDED,
            decided_at=decided_at,
        )
        examples.append(base)
        elapsed_label = int(converted_at is not None and converted_at <= elapsed_at)
        examples.append(replace(base, kind="elapsed", label=elapsed_label, labeled_at=elapsed_at))
        if converted_at is not None:
            examples.append(replace(base, kind="converted", label=1, labeled_at=converted_at))
        examples.append(
            replace(
                base,
                kind="closed",
                label=int(converted_at is not None),
                labeled_at=decided_at + 24 * HOUR,
                converted_at=converted_at,
            )
        )
    return sorted(examples, key=lambda e: (e.labeled_at, e.decision_id))


def record(partition: int, offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=(),
    )


def learner(feedback: Feedback, window: int) -> Learner:
    settings = Settings(feedback=feedback)
    config = LearnerSettings(signing_key=Secret(SIGNING_PEM), dedup_window=window)
    subject = Learner(settings, config, redis=aioredis.Redis())  # never connected
    subject.online = OnlineLearner(window=config.metrics_window, feedback=feedback)
    return subject


def feed(subject: Learner, values: Iterable[bytes], partition: int = 0, start: int = 0) -> None:
    tp = TopicPartition(TOPIC, partition)
    for offset, value in enumerate(values, start):
        subject.learn_record(tp, record(partition, offset, value))


def assert_same_model(a: OnlineLearner, b: OnlineLearner) -> None:
    """Weights, scaler statistics, auxiliary models and metrics: exactly equal."""
    assert a.model.version == b.model.version
    mine, theirs = a.model.river_pipelines(), b.model.river_pipelines()
    for x, y in zip(
        (mine.purchase, mine.late, mine.never),
        (theirs.purchase, theirs.late, theirs.never),
        strict=True,
    ):
        assert pickle.dumps(x, protocol=5) == pickle.dumps(y, protocol=5)
    terms_a, terms_b = a.model.linear_terms(), b.model.linear_terms()
    assert (terms_a.weights, terms_a.intercept) == (terms_b.weights, terms_b.intercept)
    assert a.metrics.to_state() == b.metrics.to_state()
    assert a.last_labeled_at == b.last_labeled_at


@pytest.mark.parametrize("method", [FeedbackMethod.DFM, FeedbackMethod.FNW, FeedbackMethod.ESDFM])
def test_copies_are_skipped_and_the_model_is_the_one_that_learned_each_once(
    method: FeedbackMethod,
) -> None:
    feedback = Feedback(method, elapsed_ms=HOUR)
    examples = decision_examples(300, seed=5)
    encoded = [orjson.dumps(e.to_message()) for e in examples]
    reference = OnlineLearner(feedback=feedback)
    for example in examples:
        reference.learn(example)

    # Each example once, then a copy of about a third of them, 0 to 40 records later
    # (interleaved with other examples and other copies; some twice over).
    rng = random.Random(11)
    stream: list[bytes] = []
    due: list[tuple[int, bytes]] = []
    copies = 0
    for index, value in enumerate(encoded):
        stream.append(value)
        for _ in range(rng.choice([1, 1, 2]) if rng.random() < 0.35 else 0):
            due.append((index + rng.randint(0, 40), value))
        for _, copy in [d for d in due if d[0] <= index]:
            stream.append(copy)
            copies += 1
        due = [d for d in due if d[0] > index]
    stream.extend(copy for _, copy in due)
    copies += len(due)
    assert copies > 100

    subject = learner(feedback, window=1000)
    feed(subject, stream)
    assert subject.online is not None
    assert_same_model(subject.online, reference)
    counters = subject.counters
    assert (counters.consumed, counters.learned) == (len(stream), len(examples))
    assert counters.duplicates == copies and counters.invalid == 0
    assert subject.status()["duplicates"] == copies
    sample = 'dealstream_learner_records_total{result="duplicate"}'
    assert f"{sample} {float(copies)}" in subject.metrics.exposition().decode()


def test_the_examples_of_one_decision_are_told_apart_by_kind() -> None:
    """elapsed, converted and closed of one decision are three examples, not copies."""
    feedback = Feedback(FeedbackMethod.DFM, elapsed_ms=HOUR)
    examples = [e for e in decision_examples(40, seed=2) if e.decision_id == "d-000003"]
    assert len({e.kind for e in examples}) >= 3
    subject = learner(feedback, window=100)
    feed(subject, [orjson.dumps(e.to_message()) for e in examples])
    assert (subject.counters.learned, subject.counters.duplicates) == (len(examples), 0)


def test_a_copy_is_recognised_within_the_window_only() -> None:
    """The bound: a copy ``window`` offsets after its original is skipped, one more is not."""
    feedback = Feedback(FeedbackMethod.DFM, elapsed_ms=HOUR)
    examples = [orjson.dumps(e.to_message()) for e in decision_examples(30, seed=3)]
    window = 20
    # Originals at offsets 0..29; copies of offset 0 at 20 (window) and of offset 1 at 22
    # (window + 1): offset 20's window is [0, 20), offset 22's is [2, 22).
    stream = [*examples[:20], examples[0], examples[20], examples[1], *examples[21:]]
    subject = learner(feedback, window=window)
    feed(subject, stream)
    assert subject.counters.duplicates == 1
    assert subject.counters.learned == len(examples) + 1  # offset 1 learned again


def test_invalid_records_are_counted_apart_and_occupy_their_offsets() -> None:
    feedback = Feedback(FeedbackMethod.DFM, elapsed_ms=HOUR)
    examples = [orjson.dumps(e.to_message()) for e in decision_examples(5, seed=4)]
    stream = [examples[0], b"not json", examples[0], b"{}", examples[1], examples[1]]
    subject = learner(feedback, window=3)
    feed(subject, stream)
    counters = subject.counters
    assert (counters.learned, counters.invalid, counters.duplicates) == (2, 2, 2)
    assert counters.consumed == counters.learned + counters.invalid + counters.duplicates
    # The window spans offsets: at offset 6, [3, 6) holds examples[1] and an invalid record.
    feed(subject, [examples[0], examples[1]], start=6)
    assert (counters.learned, counters.duplicates) == (3, 3)


def test_a_copy_on_another_partition_is_recognised_while_its_original_is_in_the_window() -> None:
    feedback = Feedback(FeedbackMethod.DFM, elapsed_ms=HOUR)
    examples = [orjson.dumps(e.to_message()) for e in decision_examples(10, seed=6)]
    subject = learner(feedback, window=5)
    feed(subject, examples[:3], partition=0)
    feed(subject, [examples[2], examples[3]], partition=1)
    assert (subject.counters.learned, subject.counters.duplicates) == (4, 1)
    feed(subject, examples[3:8], partition=0, start=3)  # offsets 3-7: [3, 8) now on partition 0
    assert subject.counters.duplicates == 2  # examples[3] was read on partition 1
    feed(subject, [examples[2]], partition=1, start=2)  # still in partition 1's window
    feed(subject, [examples[0]], partition=1, start=3)  # gone from partition 0's [3, 8)
    assert (subject.counters.learned, subject.counters.duplicates) == (9, 3)


# -- the window itself ---------------------------------------------------------------------------


def keys(n: int) -> list[str]:
    return [example_key(e) for e in decision_examples(n, seed=9)]


def test_a_window_rebuilt_from_its_last_offsets_equals_the_one_kept_while_reading() -> None:
    """What a restarted learner relies on: remembering the ``window`` offsets before the
    resume position gives the same window as having read everything before it."""
    all_keys = keys(200)
    window = 37
    rng = random.Random(1)
    offsets, offset = [], 0
    for _ in all_keys:
        offset += rng.choice([1, 1, 1, 2, 5])  # gaps in the log
        offsets.append(offset)
    slots = [None if rng.random() < 0.1 else key for key in all_keys]  # invalid records
    for stop in (10, 100, len(all_keys)):
        position = offsets[stop - 1] + rng.choice([1, 3])
        live = RecentExamples(window)
        for at, key in zip(offsets[:stop], slots[:stop], strict=True):
            live.add(0, at, key)
        live.advance(0, position)
        rebuilt = RecentExamples(window)
        first = max(0, position - window)
        rebuilt.advance(0, first)
        for at, key in zip(offsets[:stop], slots[:stop], strict=True):
            if first <= at < position:
                rebuilt.add(0, at, key)
        rebuilt.advance(0, position)
        assert len(live) == len(rebuilt) > 0
        assert [key in live for key in all_keys] == [key in rebuilt for key in all_keys]
        expected = {key for at, key in zip(offsets, slots, strict=True) if first <= at < position}
        assert {key for key in all_keys if key in live} == expected - {None}


def test_the_window_forgets_on_a_jump_or_a_rewind_and_keeps_a_key_held_twice() -> None:
    a, b, c = keys(1)[:3]
    recent = RecentExamples(3)
    recent.add(0, 0, a)
    recent.add(0, 1, a)  # held twice: forgotten only when both copies left the window
    recent.add(0, 2, b)
    recent.add(0, 3, c)
    assert a in recent and len(recent) == 3
    recent.add(0, 4, None)
    assert a not in recent and b in recent
    recent.advance(0, 100)  # a jump past the window: nothing remains
    assert len(recent) == 0
    recent.add(0, 100, a)
    recent.add(0, 50, b)  # a rewind (the log was truncated): the window restarts there
    assert a not in recent and b in recent and len(recent) == 1
    with pytest.raises(ValueError):
        RecentExamples(0)
