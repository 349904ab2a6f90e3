"""IPS, self-normalised IPS and doubly-robust estimates with seeded bootstrap intervals.

Everything here works on per-record arrays, whatever the data source, so decision logs and the
Open Bandit sample share one implementation:

- ``w[i] = pi(a_i | x_i) / p_i``: the importance weight of the logged action under the target;
- ``r[i]``: the logged reward;
- ``q_logged[i] = q(x_i, a_i)`` and ``q_target[i] = sum_a pi(a | x_i) q(x_i, a)``: a reward
  model's prediction for the logged action and its expectation under the target (fitted without
  record ``i``: cross-fitting), used by DR only.

The bootstrap resamples records with the reward model held fixed: the intervals cover the
sampling noise of the log, not the noise of fitting the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

DEFAULT_BOOTSTRAP = 200
MIN_ESS = 100.0
"""Below this effective sample size the intervals are unreliable and the report warns."""

_RESAMPLE_CELLS = 2_000_000
"""Bootstrap indices drawn at once (16 MB): replicates are drawn in chunks of this / n."""


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with its 95 % bootstrap percentile interval; ``None`` when undefined."""

    value: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def contains(self, truth: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= truth <= self.high


UNDEFINED = Interval(None, None, None)


@dataclass(frozen=True, slots=True)
class OpeReport:
    """What ``estimate`` returns. ``to_dict`` is the JSON document of ``dealstream ope --json``."""

    n: int
    """Records used."""
    ess: float
    """Effective sample size of the weights, (sum w)^2 / sum w^2 (0 when every w is 0)."""
    max_weight: float
    supported: int
    """Records with w > 0: the logged action is one the target could take."""
    ips: Interval
    snips: Interval
    dr: Interval
    logged: Interval
    """The logging policy's own value: the mean logged reward."""
    n_bootstrap: int
    seed: int
    reward_model: str
    warnings: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    """Source-specific counts (bad lines, skipped records, per-campaign numbers...)."""

    @property
    def defined(self) -> bool:
        return self.supported > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "ess": round(self.ess, 3),
            "max_weight": round(self.max_weight, 6),
            "supported": self.supported,
            "defined": self.defined,
            "ips": self.ips.to_dict(),
            "snips": self.snips.to_dict(),
            "dr": self.dr.to_dict(),
            "logged_value": self.logged.value,
            "logged": self.logged.to_dict(),
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "reward_model": self.reward_model,
            "warnings": list(self.warnings),
            **self.details,
        }


def effective_sample_size(w: FloatArray) -> float:
    total_sq = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / total_sq if total_sq > 0 else 0.0


def _percentiles(samples: FloatArray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _interval(value: float, samples: FloatArray) -> Interval:
    low, high = _percentiles(samples)
    return Interval(value, low, high)


def estimate_arrays(
    w: FloatArray,
    r: FloatArray,
    q_logged: FloatArray,
    q_target: FloatArray,
    *,
    seed: int,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    reward_model: str = "",
    min_ess: float = MIN_ESS,
    warnings: tuple[str, ...] = (),
    details: dict[str, Any] | None = None,
) -> OpeReport:
    """The three estimates, their bootstrap intervals and the weight diagnostics.

    Deterministic for a given ``seed``. With no supported record (every ``w`` is 0) IPS, SNIPS
    and DR are undefined (``None``): the log says nothing about the target's actions.
    """
    n = int(w.shape[0])
    if n == 0:
        raise ValueError("no records to evaluate")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    for name, array in (("w", w), ("r", r), ("q_logged", q_logged), ("q_target", q_target)):
        if array.shape != (n,) or not np.all(np.isfinite(array)):
            raise ValueError(f"{name} must be {n} finite numbers")
    if np.any(w < 0):
        raise ValueError("importance weights must be non-negative")
    wr = w * r
    dr_terms = q_target + w * (r - q_logged)
    ess = effective_sample_size(w)
    supported = int(np.count_nonzero(w))
    notes = list(warnings)

    rng = np.random.default_rng(seed)
    ips_s = np.empty(n_bootstrap)
    snips_s = np.empty(n_bootstrap)
    dr_s = np.empty(n_bootstrap)
    logged_s = np.empty(n_bootstrap)
    chunk = max(1, _RESAMPLE_CELLS // n)
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        index = rng.integers(0, n, size=(size, n))
        sum_w = w[index].sum(axis=1)
        sum_wr = wr[index].sum(axis=1)
        ips_s[start : start + size] = sum_wr / n
        with np.errstate(invalid="ignore", divide="ignore"):
            snips_s[start : start + size] = sum_wr / sum_w
        dr_s[start : start + size] = dr_terms[index].mean(axis=1)
        logged_s[start : start + size] = r[index].mean(axis=1)

    logged = _interval(float(r.mean()), logged_s)
    if supported == 0:
        notes.append(
            "undefined: no logged record took an action the target policy would take "
            "(no support), so the log says nothing about this target"
        )
        ips = snips = dr = UNDEFINED
    else:
        ips = _interval(float(wr.mean()), ips_s)
        snips = _interval(float(wr.sum() / w.sum()), snips_s)
        dr = _interval(float(dr_terms.mean()), dr_s)
        if ess < min_ess:
            notes.append(
                f"effective sample size {ess:.1f} is below {min_ess:g}: the estimates rest on "
                "few records (a small log, or a target that acts unlike the logging policy) "
                "and the intervals are unreliable"
            )
    return OpeReport(
        n=n,
        ess=ess,
        max_weight=float(w.max()),
        supported=supported,
        ips=ips,
        snips=snips,
        dr=dr,
        logged=logged,
        n_bootstrap=n_bootstrap,
        seed=seed,
        reward_model=reward_model,
        warnings=tuple(notes),
        details=dict(details or {}),
    )
