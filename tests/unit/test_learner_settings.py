"""The learner's settings and the shared model key, read from the environment (no services)."""

from __future__ import annotations

import pytest

from streams.errors import ConfigError
from streams.learner.http_endpoints import LearnerHealth, LearnerMetrics
from streams.learner.process import _parse_offsets
from streams.settings import LearnerSettings, model_key_from_env, require_model_key

KEY = "0123456789abcdef-secret"


def test_defaults_with_only_the_key() -> None:
    config = LearnerSettings.from_env({"DEALSTREAM_MODEL_KEY": KEY})
    assert config.model_key.reveal() == KEY
    assert (config.snapshot_every, config.snapshot_interval_s) == (1000, 10.0)
    assert config.dedup_window == 100_000


def test_each_variable_is_read() -> None:
    config = LearnerSettings.from_env(
        {
            "DEALSTREAM_MODEL_KEY": KEY,
            "DEALSTREAM_LEARNER_SNAPSHOT_EVERY": "250",
            "DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S": "2.5",
            "DEALSTREAM_LEARNER_DEDUP_WINDOW": "5000",
        }
    )
    assert (config.snapshot_every, config.snapshot_interval_s) == (250, 2.5)
    assert config.dedup_window == 5000


def test_a_missing_key_refuses_to_start_with_advice() -> None:
    with pytest.raises(ConfigError, match=r"DEALSTREAM_MODEL_KEY is not set.*openssl rand"):
        LearnerSettings.from_env({})
    with pytest.raises(ConfigError):
        LearnerSettings.from_env({"DEALSTREAM_MODEL_KEY": ""})
    assert model_key_from_env({}) is None


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        require_model_key({"DEALSTREAM_MODEL_KEY": "short"})


def test_the_key_never_shows_in_reprs() -> None:
    config = LearnerSettings.from_env({"DEALSTREAM_MODEL_KEY": KEY})
    assert KEY not in repr(config) and KEY not in str(config)
    assert KEY not in repr(config.model_key)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("LEARNER_SNAPSHOT_EVERY", "0"),
        ("LEARNER_SNAPSHOT_EVERY", "1.5"),
        ("LEARNER_SNAPSHOT_EVERY", "many"),
        ("LEARNER_SNAPSHOT_INTERVAL_S", "-1"),
        ("LEARNER_SNAPSHOT_INTERVAL_S", "inf"),
        ("LEARNER_SNAPSHOT_INTERVAL_S", "nan"),
        ("LEARNER_DEDUP_WINDOW", "0"),
        ("LEARNER_DEDUP_WINDOW", "1e5"),
    ],
)
def test_bad_numbers_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"DEALSTREAM_{name}"):
        LearnerSettings.from_env({"DEALSTREAM_MODEL_KEY": KEY, f"DEALSTREAM_{name}": raw})


def test_checkpoint_offsets_parse_and_ignore_garbage() -> None:
    offsets = _parse_offsets({"p.training:0": 12, "p.training:2": 0, "bad": 3, "x:1": -1})
    assert {(tp.topic, tp.partition): o for tp, o in offsets.items()} == {
        ("p.training", 0): 12,
        ("p.training", 2): 0,
    }
    assert _parse_offsets(None) == {}


def test_the_learner_http_port_defaults_to_6067_and_0_turns_it_off() -> None:
    base = {"DEALSTREAM_MODEL_KEY": KEY}
    assert LearnerSettings.from_env(base).http_port == 6067
    assert LearnerSettings.from_env({**base, "DEALSTREAM_LEARNER_HTTP_PORT": "0"}).http_port == 0
    for bad in ("-1", "70000", "http"):
        with pytest.raises(ConfigError, match="LEARNER_HTTP_PORT"):
            LearnerSettings.from_env({**base, "DEALSTREAM_LEARNER_HTTP_PORT": bad})


def test_learner_metrics_show_the_model_and_nan_while_quality_is_undefined() -> None:
    metrics = LearnerMetrics()
    metrics.observe_status(
        {"model_version": "lr-42", "examples_learned": 42, "auc": 0.75, "log_loss": None}
    )
    metrics.observe_snapshot(1_700_000_000.0)
    metrics.observe_lag({0: 5, 1: -1})
    text = metrics.exposition().decode()
    assert 'dealstream_learner_model_info{version="lr-42"} 1.0' in text
    assert "dealstream_learner_model_examples 42.0" in text
    assert "dealstream_learner_auc 0.75" in text
    assert "dealstream_learner_log_loss NaN" in text
    assert "dealstream_learner_snapshots_total 1.0" in text
    assert 'dealstream_learner_lag{partition="0"} 5.0' in text
    assert 'dealstream_learner_lag{partition="1"} 0.0' in text


def test_learner_readiness_needs_the_lease_and_the_partitions() -> None:
    health = LearnerHealth()
    ready, body = health.readiness()
    assert not ready and not body["checks"]["lease"]["ok"]
    health.lease_held, health.assigned = True, 4
    ready, body = health.readiness()
    assert ready and body["checks"]["partitions"]["detail"].startswith("4 partition")
