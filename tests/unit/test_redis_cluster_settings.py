"""``DEALSTREAM_REDIS_CLUSTER`` and the replicas each batch waits for (docs/cluster.md): the
prefix must carry one hash tag, so that every key of a deployment hashes to one slot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streams.errors import ConfigError
from streams.settings import Settings, redis_cluster_tag
from tests.conftest import REPO

CLUSTER = {"DEALSTREAM_REDIS_CLUSTER": "1", "DEALSTREAM_REDIS_URL": "redis://127.0.0.1:7001/0"}


@pytest.mark.parametrize(
    ("prefix", "tag"),
    [
        ("dealstream:{ds}:", "ds"),
        ("{shop-7}", "shop-7"),
        ("a{b}{c}", "b"),  # Redis hashes the first tag only
        ("ds:", None),
        ("ds:{}:", None),  # an empty tag is no tag: the whole key is hashed
        ("ds:{}{x}:", None),  # nor is a tag after an empty one
        ("ds:{x", None),  # closed only by the user's tag further on: a slot per user
        ("ds:}{x}", "x"),
    ],
)
def test_the_tag_a_prefix_gives_every_key(prefix: str, tag: str | None) -> None:
    assert redis_cluster_tag(prefix) == tag


def test_cluster_mode_needs_a_prefix_with_a_hash_tag() -> None:
    with pytest.raises(
        ConfigError, match=r"no hash tag.*DEALSTREAM_REDIS_PREFIX='dealstream:\{ds\}:'"
    ):
        Settings.from_env(CLUSTER)  # the default prefix `ds:` has none
    with pytest.raises(ConfigError, match="no hash tag"):
        Settings.from_env({**CLUSTER, "DEALSTREAM_REDIS_PREFIX": "ds:{}:"})
    settings = Settings.from_env({**CLUSTER, "DEALSTREAM_REDIS_PREFIX": "ds:{ds}:"})
    assert settings.redis_cluster
    assert settings.redis_wait_replicas == 1  # WAIT 1 by default in a cluster
    assert not Settings.from_env({}).redis_cluster
    assert Settings.from_env({}).redis_wait_replicas == 0  # no WAIT on one Redis by default
    assert not Settings.from_env({"DEALSTREAM_REDIS_CLUSTER": ""}).redis_cluster


def test_what_a_redis_cluster_cannot_take_is_refused() -> None:
    tagged = {**CLUSTER, "DEALSTREAM_REDIS_PREFIX": "ds:{ds}:"}
    with pytest.raises(ConfigError, match="database 2"):
        Settings.from_env({**tagged, "DEALSTREAM_REDIS_URL": "redis://127.0.0.1:7001/2"})
    with pytest.raises(ConfigError, match="unix"):
        Settings.from_env({**tagged, "DEALSTREAM_REDIS_URL": "unix:///run/redis.sock"})
    with pytest.raises(ConfigError, match="true or false"):
        Settings.from_env({**tagged, "DEALSTREAM_REDIS_CLUSTER": "maybe"})


def test_the_wait_settings() -> None:
    settings = Settings.from_env(
        {"DEALSTREAM_REDIS_WAIT_REPLICAS": "2", "DEALSTREAM_REDIS_WAIT_TIMEOUT_S": "0.25"}
    )
    assert (settings.redis_wait_replicas, settings.redis_wait_timeout_s) == (2, 0.25)
    tagged = {**CLUSTER, "DEALSTREAM_REDIS_PREFIX": "ds:{ds}:"}
    assert (
        Settings.from_env({**tagged, "DEALSTREAM_REDIS_WAIT_REPLICAS": "0"}).redis_wait_replicas
        == 0
    )
    # Checked against the client's timeout only when replicas are waited for.
    assert Settings.from_env({"DEALSTREAM_REDIS_TIMEOUT_S": "0.5"}).redis_timeout_s == 0.5
    with pytest.raises(ConfigError, match="must be below DEALSTREAM_REDIS_TIMEOUT_S"):
        Settings.from_env(
            {"DEALSTREAM_REDIS_WAIT_REPLICAS": "1", "DEALSTREAM_REDIS_TIMEOUT_S": "0.5"}
        )
    with pytest.raises(ConfigError, match="above 0"):
        Settings.from_env({"DEALSTREAM_REDIS_WAIT_TIMEOUT_S": "0"})
    with pytest.raises(ConfigError, match="not be negative"):
        Settings.from_env({"DEALSTREAM_REDIS_WAIT_REPLICAS": "-1"})


def test_the_command_line_refuses_to_start_with_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "features", "u1"],
        env={"PATH": "/usr/bin:/bin", **CLUSTER, "DEALSTREAM_REDIS_PREFIX": "ds:"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DEALSTREAM_REDIS_PREFIX" in lines[0], result.stderr
