"""The learner's settings and the shared model key, read from the environment (no services)."""

from __future__ import annotations

import pytest

from streams.errors import ConfigError
from streams.learner import LearnerSettings, _parse_offsets
from streams.model_store import model_key_from_env, require_model_key

KEY = "0123456789abcdef-secret"


def test_defaults_with_only_the_key() -> None:
    config = LearnerSettings.from_env({"DEALSTREAM_MODEL_KEY": KEY})
    assert config.model_key.reveal() == KEY
    assert (config.snapshot_every, config.snapshot_interval_s) == (1000, 10.0)


def test_each_variable_is_read() -> None:
    config = LearnerSettings.from_env(
        {
            "DEALSTREAM_MODEL_KEY": KEY,
            "DEALSTREAM_LEARNER_SNAPSHOT_EVERY": "250",
            "DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S": "2.5",
        }
    )
    assert (config.snapshot_every, config.snapshot_interval_s) == (250, 2.5)


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
