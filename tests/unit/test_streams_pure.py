"""The pure parts of streams/: settings, topic names, record decoding, the batch worker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord
from dealstream_native import default_partition
from hypothesis import given
from hypothesis import strategies as st

from engine.campaigns import Campaign
from engine.decisions import Offer
from engine.errors import INVALID_EVENT_CODES
from engine.events import BrowseEvent
from engine.features.state import event_ops
from engine.features.store import InMemoryFeatureStore, Position
from engine.model.feedback import TrainingExample
from engine.model.signing import signing_key_from_pem, verify_key_from_pem
from engine.pipeline import DiscountEngine, Incoming, state_update
from engine.policies.threshold import ThresholdPolicy
from streams.adapters.batch_commit import ReplyWait
from streams.adapters.decode import (
    DeadLetter,
    DecodeLimits,
    RawRecord,
    decode_record,
    record_bytes,
)
from streams.adapters.redis_store import from_hash_tag, hash_tag
from streams.errors import ConfigError, StreamsError
from streams.settings import (
    DemoSettings,
    Secret,
    Settings,
    TopicReplication,
    Topics,
    redact_url,
)
from streams.worker.batch_worker import DECODE_AHEAD_CHUNK, BatchWorker, WorkerCounters
from streams.worker.consumer import raw_record
from tests.model_keys import learner_key_env, worker_key_env
from tests.sinks import ListSink

T0 = 1_767_225_600_000
HOUR = 3_600_000

# -- Settings -----------------------------------------------------------------------------------


def test_defaults_without_any_variable() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.redis_url.reveal() == "redis://127.0.0.1:6379/0"
    assert settings.topic_prefix == ""
    assert settings.redis_prefix == "ds:"
    assert settings.campaigns_path is None
    assert settings.http_port == 6066
    assert settings.group_id == "dealstream"
    assert settings.log_level == "INFO"


def test_unrelated_and_empty_variables_are_ignored() -> None:
    env = {"KAFKA_BOOTSTRAP": "elsewhere:1", "DEALSTREAM_GROUP_ID": "", "DEALSTREAM_X": "1"}
    assert Settings.from_env(env) == Settings()


@pytest.mark.parametrize(
    ("name", "raw", "attribute", "expected"),
    [
        ("KAFKA_BOOTSTRAP", "k1:9092,k2:9092", "kafka_bootstrap", "k1:9092,k2:9092"),
        ("TOPIC_PREFIX", "staging.", "topic_prefix", "staging."),
        ("REDIS_PREFIX", "dsx:", "redis_prefix", "dsx:"),
        ("REDIS_TIMEOUT_S", "0.5", "redis_timeout_s", 0.5),
        ("REDIS_RETRY_DEADLINE_S", "30", "redis_retry_deadline_s", 30.0),
        ("REDIS_RETRY_DEADLINE_S", "0", "redis_retry_deadline_s", 0.0),
        ("CAMPAIGNS", "/etc/ds/campaigns.toml", "campaigns_path", Path("/etc/ds/campaigns.toml")),
        ("HTTP_PORT", "8080", "http_port", 8080),
        ("GROUP_ID", "dealstream-canary", "group_id", "dealstream-canary"),
        ("PARTITIONS", "12", "partitions", 12),
        ("PARTITIONS", "0", "partitions", 1),
        ("BATCH_MAX", "2000", "batch_max", 2000),
        ("BATCH_WITHIN_S", "0.25", "batch_within_s", 0.25),
        ("ALLOWED_LATENESS_S", "60", "allowed_lateness_s", 60.0),
        ("ATTRIBUTION_WINDOW_S", "7200.5", "attribution_window_s", 7200.5),
        ("MAX_CLOCK_SKEW_S", "30", "max_clock_skew_s", 30.0),
        ("MAX_MESSAGE_BYTES", "4096", "max_message_bytes", 4096),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("STATE", "/var/lib/dealstream", "state_dir", Path("/var/lib/dealstream")),
    ],
)  # fmt: skip
def test_each_variable_is_read(name: str, raw: str, attribute: str, expected: object) -> None:
    settings = Settings.from_env({f"DEALSTREAM_{name}": raw})
    assert getattr(settings, attribute) == expected
    # Only that attribute changed.
    changed = {
        slot
        for slot in Settings.__dataclass_fields__
        if getattr(settings, slot) != getattr(Settings(), slot)
    }
    assert changed <= {attribute}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, TopicReplication(1, 1)),
        ({"REPLICATION_FACTOR": "2"}, TopicReplication(2, 1)),
        ({"REPLICATION_FACTOR": "3"}, TopicReplication(3, 2)),
        ({"REPLICATION_FACTOR": "5"}, TopicReplication(5, 2)),
        ({"REPLICATION_FACTOR": "3", "MIN_INSYNC_REPLICAS": "3"}, TopicReplication(3, 3)),
        ({"REPLICATION_FACTOR": "3", "MIN_INSYNC_REPLICAS": "1"}, TopicReplication(3, 1)),
    ],
)
def test_topic_replication_and_its_min_insync_replicas(
    env: dict[str, str], expected: TopicReplication
) -> None:
    settings = Settings.from_env({f"DEALSTREAM_{k}": v for k, v in env.items()})
    assert settings.replication == expected
    assert settings.replication.topic_configs() == {"min.insync.replicas": str(expected.min_insync)}


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"REPLICATION_FACTOR": "0"}, "REPLICATION_FACTOR must be at least 1"),
        ({"REPLICATION_FACTOR": "two"}, "not a valid int"),
        ({"REPLICATION_FACTOR": "2", "MIN_INSYNC_REPLICAS": "3"}, "MIN_INSYNC_REPLICAS must be"),
        ({"MIN_INSYNC_REPLICAS": "0"}, "MIN_INSYNC_REPLICAS must be"),
    ],
)
def test_bad_replication_settings_say_what_to_set(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings.from_env({f"DEALSTREAM_{k}": v for k, v in env.items()})


def test_the_demo_moves_into_its_namespace_and_tunes_its_processes() -> None:
    demo = DemoSettings.from_env(
        Path("demo.toml"), {"DEALSTREAM_TOPIC_PREFIX": "prod.", "DEALSTREAM_HTTP_PORT": "7000"}
    )
    assert (demo.settings.topic_prefix, demo.settings.redis_prefix) == ("demo.", "demo:")
    assert demo.settings.group_id == "dealstream-demo"
    env = demo.process_environment
    assert env["DEALSTREAM_TOPIC_PREFIX"] == "demo."
    assert env["DEALSTREAM_ATTRIBUTION_WINDOW_S"] == "60"
    assert env["DEALSTREAM_LEARNER_SNAPSHOT_EVERY"] == "200"
    assert env["DEALSTREAM_LEARNER_HTTP_PORT"] == "7001", "next to the worker's port"
    assert env["DEALSTREAM_CAMPAIGNS"] == "demo.toml"
    # A fresh pair for this run: the learner signs, the worker holds only the public half.
    assert demo.uses_demo_model_keys
    signing = signing_key_from_pem(env["DEALSTREAM_MODEL_SIGNING_KEY"].encode())
    verify = verify_key_from_pem(env["DEALSTREAM_MODEL_VERIFY_KEY"].encode())
    assert signing.public_key().public_bytes_raw() == verify.public_bytes_raw()
    worker = demo.worker_environment
    assert "DEALSTREAM_MODEL_SIGNING_KEY" not in worker
    assert worker["DEALSTREAM_MODEL_VERIFY_KEY"] == env["DEALSTREAM_MODEL_VERIFY_KEY"]
    again = DemoSettings.from_env(Path("demo.toml"), {}).process_environment
    assert again["DEALSTREAM_MODEL_SIGNING_KEY"] != env["DEALSTREAM_MODEL_SIGNING_KEY"]


def test_the_demo_keeps_what_the_operator_set() -> None:
    given = {
        **learner_key_env(),
        **worker_key_env(),
        "DEALSTREAM_ATTRIBUTION_WINDOW_S": "120",
        "DEALSTREAM_CAMPAIGNS": "mine.toml",
    }
    demo = DemoSettings.from_env(Path("demo.toml"), given)
    env = demo.process_environment
    assert not demo.uses_demo_model_keys
    assert env["DEALSTREAM_MODEL_SIGNING_KEY"] == learner_key_env()["DEALSTREAM_MODEL_SIGNING_KEY"]
    # Only the private key given: the worker still gets the public half, and only that.
    only_private = DemoSettings.from_env(Path("demo.toml"), learner_key_env())
    worker = only_private.worker_environment
    assert worker["DEALSTREAM_MODEL_VERIFY_KEY"] == worker_key_env()["DEALSTREAM_MODEL_VERIFY_KEY"]
    assert "DEALSTREAM_MODEL_SIGNING_KEY" not in worker and not only_private.uses_demo_model_keys
    assert env["DEALSTREAM_ATTRIBUTION_WINDOW_S"] == "120"
    assert env["DEALSTREAM_CAMPAIGNS"] == "mine.toml"
    assert demo.settings.attribution_window_s == 120.0


def test_redis_url_variable_is_a_secret() -> None:
    url = "redis://app:hunter2@cache.internal:6380/3"
    settings = Settings.from_env({"DEALSTREAM_REDIS_URL": url})
    assert isinstance(settings.redis_url, Secret)
    assert settings.redis_url.reveal() == url
    for shown in (repr(settings), str(settings), repr(settings.redis_url), str(settings.redis_url)):
        assert "hunter2" not in shown
        assert "cache.internal" not in shown
    assert "Secret('**********')" in repr(settings)


NUMERIC = [
    "HTTP_PORT",
    "PARTITIONS",
    "BATCH_MAX",
    "BATCH_WITHIN_S",
    "ALLOWED_LATENESS_S",
    "ATTRIBUTION_WINDOW_S",
    "MAX_CLOCK_SKEW_S",
    "MAX_MESSAGE_BYTES",
    "REDIS_TIMEOUT_S",
    "REDIS_RETRY_DEADLINE_S",
]


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("raw", ["abc", "1e", " "])
def test_invalid_number_names_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({f"DEALSTREAM_{name}": raw})
    assert f"DEALSTREAM_{name}" in str(info.value)
    assert isinstance(info.value, StreamsError)


@pytest.mark.parametrize("name", ["HTTP_PORT", "PARTITIONS", "MAX_MESSAGE_BYTES"])
def test_integer_variables_reject_fractions(name: str) -> None:
    with pytest.raises(ConfigError, match=f"DEALSTREAM_{name}"):
        Settings.from_env({f"DEALSTREAM_{name}": "1.5"})


@pytest.mark.parametrize("name", NUMERIC)
def test_negative_number_names_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match=f"DEALSTREAM_{name}"):
        Settings.from_env({f"DEALSTREAM_{name}": "-1"})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("HTTP_PORT", "70000"),
        ("ALLOWED_LATENESS_S", "nan"),
        ("ATTRIBUTION_WINDOW_S", "inf"),
        ("REDIS_TIMEOUT_S", "0"),
        ("REDIS_RETRY_DEADLINE_S", "inf"),
    ],
)
def test_out_of_range_numbers_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"DEALSTREAM_{name}"):
        Settings.from_env({f"DEALSTREAM_{name}": raw})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:****@host:6379/0"),
        ("redis://app:hunter2@host:6379/0", "redis://app:****@host:6379/0"),
        ("rediss://app:p%40ss@host/1", "rediss://app:****@host/1"),
        ("redis://app:p@ss@host/1", "redis://app:****@host/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://app@host:6379/0", "redis://app@host:6379/0"),
    ],
)
def test_redact_url_hides_passwords(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_hides_a_password_in_the_query() -> None:
    assert "hunter2" not in redact_url("redis://host:6379/0?password=hunter2")


# -- Topics -------------------------------------------------------------------------------------


def test_topic_names_without_a_prefix() -> None:
    topics = Topics()
    assert topics.events == ("events.browse", "events.search", "events.purchase")
    assert (topics.offers, topics.decisions, topics.training, topics.dlq) == (
        "offers",
        "decisions",
        "training",
        "events.dlq",
    )


def test_topic_names_with_a_prefix() -> None:
    topics = Settings.from_env({"DEALSTREAM_TOPIC_PREFIX": "t1."}).topics
    assert topics.all == (
        "t1.events.browse",
        "t1.events.search",
        "t1.events.purchase",
        "t1.offers",
        "t1.decisions",
        "t1.training",
        "t1.events.dlq",
    )
    assert len(set(topics.all)) == 7


@pytest.mark.parametrize("prefix", ["", "t1."])
def test_event_type_of(prefix: str) -> None:
    topics = Topics(prefix)
    assert topics.event_type_of(topics.browse) == "browse"
    assert topics.event_type_of(topics.search) == "search"
    assert topics.event_type_of(topics.purchase) == "purchase"
    for other in (topics.offers, topics.decisions, topics.training, topics.dlq):
        assert topics.event_type_of(other) is None


def test_event_type_of_requires_the_prefix() -> None:
    assert Topics("t1.").event_type_of("events.browse") is None
    assert Topics("t1.").event_type_of("t2.events.browse") is None


def test_unknown_event_topic_has_no_event_type_and_does_not_crash_decoding() -> None:
    topics = Topics()
    assert topics.event_type_of("events.click") is None
    record = raw(topic="events.click")
    assert isinstance(
        decode_record(record, topics=topics, limits=LIMITS, now_ms=T0), Incoming | DeadLetter
    )


# -- decode_record ------------------------------------------------------------------------------

TOPICS = Topics("p.")
LIMITS = DecodeLimits(max_message_bytes=400, max_clock_skew_ms=300_000)
HEADERS = (("traceparent", b"00-abc-01"), ("producer", b"shop"))


def browse_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": "e-1",
        "user_id": "u-1",
        "type": "browse",
        "ts": T0,
        "item_id": "i-1",
        "category": "books",
        "price": 12.5,
    }
    doc.update(changes)
    return doc


def raw(
    value: bytes | None = None,
    *,
    topic: str = "p.events.browse",
    key: bytes | None = b"u-1",
    partition: int = 2,
    offset: int = 17,
    headers: tuple[tuple[str, bytes], ...] = HEADERS,
    partitions: int | None = None,
) -> RawRecord:
    if value is None:
        value = orjson.dumps(browse_doc())
    return RawRecord(topic, partition, offset, key, value, T0, headers, partitions)


def decode(record: RawRecord) -> Incoming | DeadLetter:
    return decode_record(record, topics=TOPICS, limits=LIMITS, now_ms=T0)


def test_good_record_becomes_incoming_with_its_position() -> None:
    decoded = decode(raw())
    assert isinstance(decoded, Incoming)
    assert decoded.position == Position("p.events.browse", 2, 17)
    assert decoded.event == BrowseEvent(
        event_id="e-1", user_id="u-1", ts=T0, item_id="i-1", category="books", price=12.5
    )
    # What it does to the user's state is built with it (ahead of the batch, in the worker).
    assert decoded.update == state_update(decoded.event, decoded.position)
    assert decoded.update.ops == event_ops(decoded.event)
    # On its key's default partition (what every Kafka client picks): accepted as well.
    home = default_partition(b"u-1", 8)
    assert isinstance(decode(raw(partition=home, partitions=8)), Incoming)


def test_default_partition_is_kafkas() -> None:
    """``Utils.murmur2`` values from Kafka's own Java tests (signed 32-bit), made positive and
    taken modulo the partition count, as the default partitioner of every client does."""
    java = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, signed in java.items():
        assert default_partition(key, 1000) == (signed & 0x7FFFFFFF) % 1000
    with pytest.raises(ValueError, match="at least one partition"):
        default_partition(b"u-1", 0)


@given(st.binary(max_size=64), st.integers(1, 10_000))
def test_default_partition_agrees_with_aiokafkas_partitioner(key: bytes, partitions: int) -> None:
    assert default_partition(key, partitions) == (murmur2(key) & 0x7FFFFFFF) % partitions


def test_event_within_the_allowed_skew_is_accepted() -> None:
    decoded = decode(raw(orjson.dumps(browse_doc(ts=T0 + 300_000))))
    assert isinstance(decoded, Incoming)


BAD_RECORDS: list[tuple[str, RawRecord, str, str]] = [
    ("too_large", raw(orjson.dumps(browse_doc(pad="x" * 400))), "too_large", "limit"),
    ("too_large_without_key", raw(b"x" * 401, key=None), "too_large", "401"),
    ("missing_key", raw(key=None), "missing_key", "user_id"),
    ("empty_key", raw(key=b""), "missing_key", "user_id"),
    ("invalid_json", raw(b"{not json"), "invalid_json", "JSON"),
    ("tombstone", RawRecord("p.events.browse", 2, 17, b"u-1", None), "invalid_json", "JSON"),
    ("not_an_object", raw(b"[1, 2]"), "not_an_object", "object"),
    ("schema_violation", raw(orjson.dumps(browse_doc(price=-1))), "out_of_range", "'price'"),
    ("missing_field", raw(orjson.dumps({"type": "browse"})), "missing_field", "'event_id'"),
    (
        "type_topic_mismatch",
        raw(orjson.dumps(browse_doc(type="search", query="q")), topic="p.events.purchase"),
        "type_topic_mismatch",
        "events.search",
    ),
    ("key_mismatch", raw(key=b"u-2"), "key_mismatch", "user_id"),
    (
        "wrong_partition",
        raw(partition=(default_partition(b"u-1", 8) + 1) % 8, partitions=8),
        "wrong_partition",
        f"partition {default_partition(b'u-1', 8)} of 8",
    ),
    ("clock_skew", raw(orjson.dumps(browse_doc(ts=T0 + 300_001))), "clock_skew", "ahead"),
]


@pytest.mark.parametrize(
    ("record", "code", "fragment"),
    [pytest.param(r, c, f, id=i) for i, r, c, f in BAD_RECORDS],
)
def test_bad_records_become_dead_letters(record: RawRecord, code: str, fragment: str) -> None:
    letter = decode(record)
    assert isinstance(letter, DeadLetter)
    assert letter.code == code
    assert fragment in letter.reason
    assert letter.record is record


@pytest.mark.parametrize(
    ("record", "code"),
    [pytest.param(r, c, id=i) for i, r, c, _ in BAD_RECORDS],
)
def test_dead_letter_codes_are_in_the_closed_set(record: RawRecord, code: str) -> None:
    letter = decode(record)
    assert isinstance(letter, DeadLetter)
    assert letter.code in INVALID_EVENT_CODES


@pytest.mark.parametrize(
    ("record", "code"),
    [pytest.param(r, c, id=i) for i, r, c, _ in BAD_RECORDS],
)
def test_dead_letter_headers_say_where_from_and_why(record: RawRecord, code: str) -> None:
    letter = decode(record)
    assert isinstance(letter, DeadLetter)
    headers = letter.headers()
    assert headers[: len(record.headers)] == list(record.headers)
    added = dict(headers[len(record.headers) :])
    assert added == {
        "dealstream.source.topic": record.topic.encode(),
        "dealstream.source.partition": str(record.partition).encode(),
        "dealstream.source.offset": str(record.offset).encode(),
        "dealstream.error.class": code.encode(),
        "dealstream.error.reason": letter.reason.encode(),
    }
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)


def test_dead_letter_headers_without_original_headers() -> None:
    letter = decode(raw(key=None, headers=()))
    assert isinstance(letter, DeadLetter)
    names = [name for name, _ in letter.headers()]
    assert names == [
        "dealstream.source.topic",
        "dealstream.source.partition",
        "dealstream.source.offset",
        "dealstream.error.class",
        "dealstream.error.reason",
    ]


def test_our_dead_letter_headers_replace_a_producers_of_the_same_name() -> None:
    spoofed = (
        *HEADERS,
        ("dealstream.error.class", b"nothing_wrong"),
        ("dealstream.source.offset", b"0"),
        ("dealstream.error.truncated", b"value"),
    )
    letter = decode(raw(b"{oops", headers=spoofed))
    assert isinstance(letter, DeadLetter)
    headers = letter.headers()
    assert headers[: len(HEADERS)] == list(HEADERS)
    names = [name for name, _ in headers]
    assert len(names) == len(set(names))
    assert "dealstream.error.truncated" not in names
    assert dict(headers)["dealstream.error.class"] == b"invalid_json"
    assert dict(headers)["dealstream.source.offset"] == b"17"


@pytest.mark.parametrize("max_bytes", [1_000_000, 400], ids=["whole", "cut"])
def test_the_dead_letter_message_carries_only_our_error_headers(max_bytes: int) -> None:
    """What reaches the DLQ topic, whole or cut to fit: a producer's ``dealstream.error.*`` /
    ``dealstream.source.*`` headers, in any letter case, are replaced by ours."""
    spoofed = (
        *HEADERS,
        ("dealstream.error.class", b"nothing_wrong"),
        ("DealStream.Error.Reason", b"all good"),
        ("dealstream.source.topic", b"elsewhere"),
        ("dealstream.error.original_size", b"1"),
        ("dealstream.errors", b"kept: not our prefix"),
    )
    letter = decode(raw(b"{oops" + b"x" * 300, headers=spoofed))
    assert isinstance(letter, DeadLetter)
    message = letter.message(max_bytes)
    assert message.truncated is (max_bytes == 400)
    ours = [(n, v) for n, v in message.headers if n.lower().startswith("dealstream.")]
    names = [n.lower() for n, _ in ours]
    assert len(names) == len(set(names)), names
    found = dict(ours)
    assert found["dealstream.error.class"] == b"invalid_json"
    assert found["dealstream.error.reason"] == letter.reason.encode()
    assert found["dealstream.source.topic"] == letter.record.topic.encode()
    assert "DealStream.Error.Reason" not in found
    if message.truncated:
        assert (
            found["dealstream.error.original_size"] == str(len(letter.record.value or b"")).encode()
        )
    else:
        assert "dealstream.error.original_size" not in found
        assert found["dealstream.errors"] == b"kept: not our prefix"


def test_a_dead_letter_that_fits_goes_whole() -> None:
    letter = decode(raw(b"{oops"))
    assert isinstance(letter, DeadLetter)
    message = letter.message(1_000_000)
    assert (message.key, message.value, list(message.headers)) == (
        b"u-1",
        b"{oops",
        letter.headers(),
    )
    assert not message.truncated


def test_an_oversized_dead_letter_is_cut_to_fit_with_its_original_size() -> None:
    value = orjson.dumps(browse_doc(pad="x" * 5000))
    letter = decode(raw(value))
    assert isinstance(letter, DeadLetter)
    assert letter.code == "too_large"
    message = letter.message(2000)
    assert message.truncated
    assert record_bytes(message.key, message.value, message.headers) <= 2000
    assert message.key == b"u-1"
    assert 0 < len(message.value) < len(value)
    assert value.startswith(message.value)
    headers = dict(message.headers)
    assert headers["dealstream.error.truncated"] == b"value"
    assert headers["dealstream.error.original_size"] == str(len(value)).encode()
    assert headers["dealstream.error.class"] == b"too_large"
    assert list(message.headers[: len(HEADERS)]) == list(HEADERS)


@pytest.mark.parametrize("limit", [1000, 1500, 1999, 2000, 2001, 10_000])
@pytest.mark.parametrize("size", [0, 100, 1800, 1900, 2500, 130_000])
def test_a_dead_letter_always_fits_and_is_a_prefix(limit: int, size: int) -> None:
    value = b"y" * size
    letter = DeadLetter(raw(value), "invalid_json", "not JSON")
    message = letter.message(limit)
    assert record_bytes(message.key, message.value, message.headers) <= limit
    assert value.startswith(message.value)
    assert message.truncated == (message.value != value)
    if message.truncated:  # as much of the value as the limit leaves room for
        longer = message.value + b"y"
        assert record_bytes(message.key, longer, message.headers) > limit


def test_huge_headers_and_key_are_cut_too() -> None:
    big_headers = (("trace", b"t" * 3000),)
    letter = DeadLetter(raw(b"v" * 10, headers=big_headers), "invalid_json", "not JSON")
    message = letter.message(2000)
    assert record_bytes(message.key, message.value, message.headers) <= 2000
    assert dict(message.headers)["dealstream.error.truncated"] == b"value,headers"
    assert "trace" not in dict(message.headers)
    assert message.value == b"v" * 10

    letter = DeadLetter(raw(b"v", key=b"k" * 5000), "key_mismatch", "key differs")
    message = letter.message(2000)
    assert record_bytes(message.key, message.value, message.headers) <= 2000
    assert dict(message.headers)["dealstream.error.truncated"] == b"value,headers,key"
    assert message.key is not None and len(message.key) < 5000
    assert (b"k" * 5000).startswith(message.key)


# -- BatchWorker --------------------------------------------------------------------------------


def make_worker(
    prefix: str = "t1.", reply_wait: ReplyWait | None = None
) -> tuple[BatchWorker, ListSink]:
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=[Campaign("spring", ThresholdPolicy(threshold=0.3), decision_interval_ms=0)],
    )
    sink = ListSink()
    worker = BatchWorker(
        engine,
        sink,
        topics=Topics(prefix),
        limits=DecodeLimits(),
        wall_clock_ms=lambda: T0 + HOUR,
        reply_wait=reply_wait,
    )
    return worker, sink


def record(doc: dict[str, Any] | bytes, topic: str, offset: int, key: bytes | None) -> RawRecord:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return RawRecord(f"t1.events.{topic}", 0, offset, key, value, None, (("h", b"v"),))


def mixed_batch() -> list[RawRecord]:
    search = {"event_id": "s-1", "user_id": "u-2", "type": "search", "ts": T0, "query": "lamp"}
    buy = {
        "event_id": "p-1",
        "user_id": "u-1",
        "type": "purchase",
        "ts": T0 + 1000,
        "order_id": "o-1",
        "items": [{"item_id": "i-1", "category": "books", "price": 12.5, "quantity": 1}],
        "amount": 12.5,
    }
    return [
        record(browse_doc(), "browse", 0, b"u-1"),  # applied, decision + offer
        record(search, "search", 0, b"u-2"),  # applied, decision + offer
        record(b"{oops", "browse", 1, b"u-1"),  # dead letter: invalid_json
        record(browse_doc(event_id="e-9"), "browse", 2, None),  # dead letter: missing_key
        record(browse_doc(), "browse", 3, b"u-1"),  # duplicate event id
        record(browse_doc(event_id="e-old", ts=T0 - 2 * HOUR), "browse", 4, b"u-1"),  # late
        record(buy, "purchase", 0, b"u-1"),  # applied, labels u-1's decision
    ]


async def test_counters_balance_for_a_mixed_batch_and_its_redelivery() -> None:
    worker, _ = make_worker()
    batch = mixed_batch()
    await worker.handle(batch)
    counters = worker.counters
    assert counters.balanced()
    assert (counters.consumed, counters.applied, counters.duplicates, counters.late) == (7, 3, 1, 1)
    assert counters.redelivered == 0
    assert dict(counters.dead_lettered) == {"invalid_json": 1, "missing_key": 1}
    assert (counters.offers, counters.decisions, counters.training) == (2, 2, 1)

    await worker.handle(batch)  # the whole batch again, e.g. after a rebalance
    assert counters.balanced()
    assert (counters.consumed, counters.applied, counters.redelivered) == (14, 3, 5)
    assert dict(counters.dead_lettered) == {"invalid_json": 2, "missing_key": 2}
    assert (counters.offers, counters.decisions, counters.training) == (2, 2, 1)
    assert counters.batches == 2
    assert counters.as_dict()["consumed"] == 14


def test_balanced_detects_an_unaccounted_record() -> None:
    counters = WorkerCounters(consumed=3, applied=1, late=1)
    assert not counters.balanced()
    counters.dead_lettered["invalid_json"] += 1
    assert counters.balanced()


async def test_outputs_go_to_the_right_topics() -> None:
    worker, sink = make_worker()
    result = await worker.handle(mixed_batch())
    topics_used = {record.topic for record in sink.records}
    assert topics_used == {"t1.events.dlq", "t1.offers", "t1.decisions", "t1.training"}

    dlq = sink.to("t1.events.dlq")
    assert [(key, value) for key, value, _ in dlq] == [
        (b"u-1", b"{oops"),
        (None, orjson.dumps(browse_doc(event_id="e-9"))),
    ]
    for _, _, headers in dlq:
        assert headers[0] == ("h", b"v")
        assert ("dealstream.source.topic", b"t1.events.browse") in headers
    assert dict(dlq[0][2])["dealstream.error.class"] == b"invalid_json"
    assert dict(dlq[1][2])["dealstream.source.offset"] == b"2"

    offers = [orjson.loads(value) for _, value, _ in sink.to("t1.offers")]
    assert offers == [offer.to_message() for offer in result.offers]
    assert [Offer.from_message(offer) for offer in offers] == result.offers
    assert [key for key, _, _ in sink.to("t1.offers")] == [b"u-1", b"u-2"]

    decisions = [orjson.loads(value) for _, value, _ in sink.to("t1.decisions")]
    assert decisions == [decision.to_message() for decision in result.decisions]
    assert [key for key, _, _ in sink.to("t1.decisions")] == [b"u-1", b"u-2"]

    ((key, value, _),) = sink.to("t1.training")
    example = orjson.loads(value)
    assert TrainingExample.from_message(example) == result.training[0]
    assert example["label"] == 1
    assert key == str(example["decision_id"]).encode()
    assert example["decision_id"] == decisions[0]["decision_id"]


def views(count: int, first_offset: int) -> list[RawRecord]:
    """``count`` view records of five users, at offsets from ``first_offset``."""
    return [
        record(
            browse_doc(event_id=f"v-{offset}", user_id=f"u-{offset % 5}", ts=T0 + offset),
            "browse",
            offset,
            f"u-{offset % 5}".encode(),
        )
        for offset in range(first_offset, first_offset + count)
    ]


async def handled_inline(*batches: list[RawRecord]) -> tuple[WorkerCounters, ListSink]:
    worker, sink = make_worker()
    for batch in batches:
        await worker.handle(batch)
    return worker.counters, sink


async def test_a_batch_decoded_ahead_gives_what_decoding_it_in_the_batch_gives() -> None:
    first, second = mixed_batch(), views(20, 10)
    worker, sink = make_worker()
    worker.decode_ahead(second)  # the consumer: the next batch, then the current one
    await worker.handle(first)
    await asyncio.sleep(0)  # the loop's turn: 20 records are one chunk
    await worker.handle(second)

    inline, inline_sink = await handled_inline(first, second)
    assert worker.counters.decoded_ahead == len(second)
    assert inline.decoded_ahead == 0
    worker.counters.decoded_ahead = 0
    assert worker.counters == inline
    assert sink.records == inline_sink.records


async def test_what_the_task_has_not_reached_is_decoded_in_the_batch() -> None:
    first, second = views(10, 0), views(2 * DECODE_AHEAD_CHUNK + 5, 10)
    worker, sink = make_worker()
    worker.decode_ahead(second)
    await worker.handle(first)
    await asyncio.sleep(0)  # one chunk decoded, then the task yields
    await worker.handle(second)  # stops the task: the rest is decoded here

    inline, inline_sink = await handled_inline(first, second)
    assert worker.counters.decoded_ahead == DECODE_AHEAD_CHUNK
    worker.counters.decoded_ahead = 0
    assert worker.counters == inline
    assert sink.records == inline_sink.records


async def test_results_decoded_ahead_serve_only_the_records_object_they_were_made_for() -> None:
    batch = mixed_batch()
    worker, sink = make_worker()
    worker.decode_ahead(batch)
    await asyncio.sleep(0)
    await worker.handle(list(batch))  # e.g. the consumer left out a revoked partition's record
    assert worker.counters.decoded_ahead == 0
    inline, inline_sink = await handled_inline(batch)
    assert worker.counters == inline
    assert sink.records == inline_sink.records


async def test_decoding_ahead_runs_only_while_a_redis_call_waits() -> None:
    reply_wait = ReplyWait()
    batch = views(10, 0)
    worker, _ = make_worker(reply_wait=reply_wait)
    worker.decode_ahead(batch)
    for _ in range(3):
        await asyncio.sleep(0)  # the loop's turns, but no call waits
    await worker.handle(batch)
    assert worker.counters.decoded_ahead == 0

    later = views(10, 10)
    worker.decode_ahead(later)
    reply_wait.open()  # what BatchCommit does while its reply is on the way
    await asyncio.sleep(0)
    reply_wait.close()
    await worker.handle(later)
    assert worker.counters.decoded_ahead == len(later)
    assert worker.counters.applied == len(batch) + len(later)


async def test_a_revoke_stops_the_decoding_ahead() -> None:
    worker, _ = make_worker()
    batch = views(3 * DECODE_AHEAD_CHUNK, 0)
    worker.decode_ahead(batch)
    await asyncio.sleep(0)
    worker.on_revoked([("t1.events.browse", 0)])
    await asyncio.sleep(0)
    decoding = [
        task for task in asyncio.all_tasks() if task.get_name() == "dealstream-decode-ahead"
    ]
    assert not decoding, "the task ended at its next chunk"
    await worker.handle(batch)  # read again after the revoke: decoded here
    assert worker.counters.decoded_ahead == 0
    assert worker.counters.applied == len(batch)


async def test_worker_uses_its_clock_for_the_skew_check() -> None:
    worker, sink = make_worker()
    future = record(browse_doc(ts=T0 + HOUR + 301_000), "browse", 0, b"u-1")
    await worker.handle([future])
    assert dict(worker.counters.dead_lettered) == {"clock_skew": 1}
    ((_, _, headers),) = sink.to("t1.events.dlq")
    assert dict(headers)["dealstream.error.class"] == b"clock_skew"


@pytest.mark.parametrize("headers", [[], None])
def test_a_consumed_record_without_headers_has_none(headers: Any) -> None:
    consumed = ConsumerRecord("t", 1, 7, 1_700, 0, b"u1", b"{}", None, 2, 2, headers)
    record = raw_record(consumed, partitions=4)
    assert record == ("t", 1, 7, b"u1", b"{}", 1_700, (), 4)


def test_a_consumed_record_keeps_its_headers_as_text_and_bytes() -> None:
    headers = [("trace", b"abc"), ("empty", None)]
    consumed = ConsumerRecord("t", 0, 1, -1, 0, b"u1", b"{}", None, 2, 3, headers)
    record = raw_record(consumed)
    assert record.headers == (("trace", b"abc"), ("empty", b""))
    assert record.timestamp_ms is None  # Kafka's -1: no timestamp


@given(st.text())
def test_a_hash_tag_gives_back_the_user_id(user_id: str) -> None:
    """Label events name users as the ledger script keys them (``hash_tag``)."""
    tag = hash_tag(user_id)
    assert "{" not in tag and "}" not in tag
    assert from_hash_tag(tag) == user_id


def test_a_hash_tag_escapes_what_looks_like_an_escape() -> None:
    for user_id in ("%7B", "a%25b", "{x}", "%", "%%7D}"):
        assert from_hash_tag(hash_tag(user_id)) == user_id
