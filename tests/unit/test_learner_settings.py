"""The learner's settings and the model keys, read from the environment (no services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.errors import ConfigError
from streams.learner.http_endpoints import LearnerHealth, LearnerMetrics
from streams.learner.process import _parse_offsets
from streams.settings import (
    LearnerSettings,
    Settings,
    model_signing_key_in_env,
    model_verify_key_from_env,
    require_signing_key,
)
from tests.model_keys import SIGNING_PEM, VERIFY_KEY, VERIFY_PEM

KEY = SIGNING_PEM
SIGNING = "DEALSTREAM_MODEL_SIGNING_KEY"
VERIFY = "DEALSTREAM_MODEL_VERIFY_KEY"


def test_defaults_with_only_the_key() -> None:
    config = LearnerSettings.from_env({SIGNING: KEY})
    assert config.signing_key.reveal() == KEY
    assert (config.snapshot_every, config.snapshot_interval_s) == (1000, 10.0)
    assert config.dedup_window == 100_000


def test_each_variable_is_read() -> None:
    config = LearnerSettings.from_env(
        {
            SIGNING: KEY,
            "DEALSTREAM_LEARNER_SNAPSHOT_EVERY": "250",
            "DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S": "2.5",
            "DEALSTREAM_LEARNER_DEDUP_WINDOW": "5000",
        }
    )
    assert (config.snapshot_every, config.snapshot_interval_s) == (250, 2.5)
    assert config.dedup_window == 5000


def test_a_missing_key_refuses_to_start_with_advice() -> None:
    with pytest.raises(ConfigError, match=rf"{SIGNING} .*is not set.*model keygen"):
        LearnerSettings.from_env({})
    with pytest.raises(ConfigError):
        LearnerSettings.from_env({SIGNING: ""})
    assert model_verify_key_from_env({}) is None


@pytest.mark.parametrize("value", ["short", VERIFY_PEM, "-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_anything_but_an_ed25519_private_key_is_refused_without_echoing_it(value: str) -> None:
    """The public key where the private one goes (a common mix-up) included."""
    with pytest.raises(ConfigError, match=f"{SIGNING}: not an Ed25519 private key") as info:
        require_signing_key({SIGNING: value})
    assert value.strip() not in str(info.value)


def test_the_public_key_is_read_from_a_value_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "verify.pem"
    path.write_text(VERIFY_PEM)
    for env in ({VERIFY: VERIFY_PEM}, {f"{VERIFY}_FILE": str(path)}):
        key = model_verify_key_from_env(env)
        assert key is not None and key.public_bytes_raw() == VERIFY_KEY.public_bytes_raw()
    with pytest.raises(ConfigError, match="not both"):
        model_verify_key_from_env({VERIFY: VERIFY_PEM, f"{VERIFY}_FILE": str(path)})
    with pytest.raises(ConfigError, match=f"{VERIFY}_FILE=.*cannot read it"):
        model_verify_key_from_env({f"{VERIFY}_FILE": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match=f"{VERIFY}: not an Ed25519 public key"):
        model_verify_key_from_env({VERIFY: SIGNING_PEM})


def test_the_private_key_is_read_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    path.write_text(SIGNING_PEM)
    env = {f"{SIGNING}_FILE": str(path)}
    assert LearnerSettings.from_env(env).signing_key.reveal() == SIGNING_PEM
    assert model_signing_key_in_env(env) and not model_signing_key_in_env({VERIFY: VERIFY_PEM})


def test_a_workers_settings_hold_no_private_key() -> None:
    """What a worker reads (``Settings`` and the verify key) has no field for the private key,
    even when it is in the worker's environment."""
    env = {SIGNING: SIGNING_PEM, VERIFY: VERIFY_PEM}
    settings = Settings.from_env(env)
    held = [getattr(settings, name) for name in Settings.__slots__]
    assert all(SIGNING_PEM not in (v.reveal() if hasattr(v, "reveal") else str(v)) for v in held)
    assert not hasattr(model_verify_key_from_env(env), "private_bytes")


def test_the_key_never_shows_in_reprs() -> None:
    config = LearnerSettings.from_env({SIGNING: KEY})
    body = KEY.splitlines()[1]
    assert body not in repr(config) and body not in str(config)
    assert body not in repr(config.signing_key)


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
        LearnerSettings.from_env({SIGNING: KEY, f"DEALSTREAM_{name}": raw})


def test_checkpoint_offsets_parse_and_ignore_garbage() -> None:
    offsets = _parse_offsets({"p.training:0": 12, "p.training:2": 0, "bad": 3, "x:1": -1})
    assert {(tp.topic, tp.partition): o for tp, o in offsets.items()} == {
        ("p.training", 0): 12,
        ("p.training", 2): 0,
    }
    assert _parse_offsets(None) == {}


def test_the_learner_http_port_defaults_to_6067_and_0_turns_it_off() -> None:
    base = {SIGNING: KEY}
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
