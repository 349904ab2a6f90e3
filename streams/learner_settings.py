"""Settings of ``dealstream learner`` (the shared ones come from ``streams.settings``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from streams.errors import ConfigError
from streams.model_store import DEFAULT_KEEP, require_model_key
from streams.settings import ENV_PREFIX, Secret

DEFAULT_HTTP_PORT = 6067


@dataclass(frozen=True, slots=True)
class LearnerSettings:
    """The learner's own settings (the shared ones come from ``Settings``)."""

    model_key: Secret = field(repr=False)
    snapshot_every: int = 1000
    snapshot_interval_s: float = 10.0
    keep_versions: int = DEFAULT_KEEP
    metrics_window: int = 1000
    lease_ttl_s: float = 30.0
    batch_max: int = 1000
    poll_timeout_s: float = 0.2
    http_port: int = DEFAULT_HTTP_PORT
    """``/metrics``, ``/health``, ``/ready`` of the learner; 0 turns them off."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LearnerSettings:
        """``DEALSTREAM_MODEL_KEY`` (required), ``DEALSTREAM_LEARNER_SNAPSHOT_EVERY`` (1000),
        ``DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S`` (10), ``DEALSTREAM_LEARNER_HTTP_PORT`` (6067)."""
        env = os.environ if environ is None else environ
        key = require_model_key(env)
        every = _positive(env, "LEARNER_SNAPSHOT_EVERY", 1000, int)
        interval = _positive(env, "LEARNER_SNAPSHOT_INTERVAL_S", 10.0, float)
        return cls(
            model_key=key,
            snapshot_every=int(every),
            snapshot_interval_s=interval,
            http_port=_port_or_off(env, "LEARNER_HTTP_PORT", DEFAULT_HTTP_PORT),
        )


def _positive(
    env: Mapping[str, str], name: str, default: float, kind: type[int] | type[float]
) -> float:
    raw = env.get(ENV_PREFIX + name) or None
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not a valid {kind.__name__}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{ENV_PREFIX}{name} must be a positive finite number, got {raw}")
    return value


def _port_or_off(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(ENV_PREFIX + name) or None
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(f"{ENV_PREFIX}{name} must be a port (1-65535) or 0 for none, got {raw!r}")
    return int(raw)
