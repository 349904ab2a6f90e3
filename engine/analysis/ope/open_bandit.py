"""The Open Bandit Dataset sample as logged bandit records, and the classic validation on it.

ZOZOTOWN ran two policies side by side for a week on each campaign (``all``, ``men``,
``women``): a uniform-random one and Bernoulli Thompson sampling (BTS). Each CSV row is one
(impression, position) record: ``item_id`` shown at ``position`` (1-3), ``click`` and the
logging policy's ``propensity_score`` of that item at that position. We estimate BTS's click
rate from the *random* logs and compare with BTS's own mean click (the on-policy truth).

BTS's action distribution pi_bts(item | position) is context-free but it changed every few
minutes during the week (its Beta posteriors were refreshed in production), so we derive it
from the BTS logs, two ways:

- ``time-local``: for each (item, position), the BTS logs' ``propensity_score`` of that cell
  interpolated linearly in time at the random record's timestamp (held constant before the
  first and after the last observation), then normalised over items so that each position's
  distribution sums to 1. This follows the policy as it moved.
- ``static``: the share of BTS records at each position that show each item: the
  week-averaged distribution, the analogue of obp's single Monte-Carlo action distribution.

The DR reward model is the click rate per (item, position) of the random logs, shrunk towards
the overall rate, cross-fitted over two folds.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.analysis.ope.errors import OpeError
from engine.analysis.ope.estimators import (
    DEFAULT_BOOTSTRAP,
    FloatArray,
    Interval,
    OpeReport,
    estimate_arrays,
)
from engine.analysis.ope.reward import IntArray, action_mean_fitter, cross_fit, folds_for

CAMPAIGNS = ("all", "men", "women")
METHODS = ("time-local", "static")
REWARD_PRIOR = 10.0
"""Pseudo-records pulling each (item, position) click rate towards the overall rate."""


@dataclass(frozen=True, slots=True)
class BanditLog:
    """One policy's logs for one campaign, as arrays (positions are 0-based)."""

    item: IntArray
    position: IntArray
    click: FloatArray
    propensity: FloatArray
    ts: FloatArray
    """Epoch seconds."""
    n_items: int
    n_positions: int

    @property
    def n(self) -> int:
        return int(self.item.shape[0])


def _csv_path(root: Path, policy: str, campaign: str) -> Path:
    return root / policy / campaign / f"{campaign}.csv.gz"


def read_bandit_log(path: Path) -> BanditLog:
    """One Open Bandit CSV (gzip or plain); ``OpeError`` names the file and the row if bad."""
    opener = gzip.open if path.suffix == ".gz" else open
    items: list[int] = []
    positions: list[int] = []
    clicks: list[float] = []
    propensities: list[float] = []
    stamps: list[float] = []
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            for row_number, row in enumerate(csv.DictReader(handle), start=2):
                try:
                    items.append(int(row["item_id"]))
                    positions.append(int(row["position"]) - 1)
                    clicks.append(float(row["click"]))
                    propensities.append(float(row["propensity_score"]))
                    stamps.append(datetime.fromisoformat(row["timestamp"]).timestamp())
                except (KeyError, TypeError, ValueError) as exc:
                    raise OpeError(
                        f"{path}: row {row_number} is not Open Bandit data: {exc}"
                    ) from None
    except OSError as exc:
        raise OpeError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise OpeError(f"{path} is not an Open Bandit CSV: {exc}") from None
    if not items:
        raise OpeError(f"{path} has no records")
    item = np.array(items, dtype=np.int64)
    position = np.array(positions, dtype=np.int64)
    propensity = np.array(propensities)
    if item.min() < 0 or position.min() < 0 or not np.all((propensity > 0) & (propensity <= 1)):
        raise OpeError(f"{path}: negative item/position or propensity outside (0, 1]")
    return BanditLog(
        item=item,
        position=position,
        click=np.array(clicks),
        propensity=propensity,
        ts=np.array(stamps),
        n_items=int(item.max()) + 1,
        n_positions=int(position.max()) + 1,
    )


def static_distribution(bts: BanditLog, n_items: int, n_positions: int) -> FloatArray:
    """pi[item, position]: the share of BTS records at each position showing each item."""
    counts = np.zeros((n_items, n_positions))
    np.add.at(counts, (bts.item, bts.position), 1.0)
    totals = counts.sum(axis=0)
    totals[totals == 0] = 1.0
    result: FloatArray = counts / totals
    return result


def time_local_distribution(
    bts: BanditLog, times: FloatArray, n_items: int, n_positions: int
) -> FloatArray:
    """pi[t, item, position] at the given times from the BTS logs' propensity_score."""
    dist = np.zeros((times.shape[0], n_items, n_positions))
    order = np.argsort(bts.ts, kind="stable")
    ts, item, pos, prop = bts.ts[order], bts.item[order], bts.position[order], bts.propensity[order]
    for a in range(n_items):
        for k in range(n_positions):
            cell = (item == a) & (pos == k)
            if np.any(cell):
                dist[:, a, k] = np.interp(times, ts[cell], prop[cell])
    totals = dist.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    normalised: FloatArray = dist / totals
    return normalised


def estimate_bandit(
    logged: BanditLog, pi: FloatArray, *, seed: int, n_bootstrap: int = DEFAULT_BOOTSTRAP
) -> OpeReport:
    """IPS/SNIPS/DR of a target giving ``pi[i, item, position]`` for record i of ``logged``."""
    n = logged.n
    rows = np.arange(n)
    pi_logged = pi[rows, logged.item, logged.position]
    w = pi_logged / logged.propensity
    key = (logged.item * logged.n_positions + logged.position).astype(float)[:, None]
    # Every item the target may show at the record's position, with its probability.
    probs = pi[rows, :, logged.position]  # (n, n_items)
    owner, pair_item = np.nonzero(probs > 0)
    pairs_key = (pair_item * logged.n_positions + logged.position[owner]).astype(float)[:, None]
    q_logged, q_target = cross_fit(
        action_mean_fitter(REWARD_PRIOR),
        key,
        logged.click,
        folds_for(n, seed),
        pairs_key,
        owner.astype(np.int64),
        probs[owner, pair_item],
    )
    return estimate_arrays(
        w,
        logged.click,
        q_logged,
        q_target,
        seed=seed,
        n_bootstrap=n_bootstrap,
        reward_model=f"click rate per (item, position), shrunk by {REWARD_PRIOR:g}, 2-fold "
        "cross-fitted",
    )


@dataclass(frozen=True, slots=True)
class Validation:
    campaign: str
    truth: Interval
    """BTS's on-policy click rate with its bootstrap 95 % interval."""
    n_bts: int
    estimates: dict[str, OpeReport]
    """By method (``time-local``, ``static``)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "truth": self.truth.to_dict(),
            "n_bts": self.n_bts,
            "estimates": {m: r.to_dict() for m, r in self.estimates.items()},
        }


def validate_campaign(
    root: Path, campaign: str, *, seed: int, n_bootstrap: int = DEFAULT_BOOTSTRAP
) -> Validation:
    """BTS's click rate estimated from the random logs, next to its on-policy truth."""
    random_log = read_bandit_log(_csv_path(root, "random", campaign))
    bts_log = read_bandit_log(_csv_path(root, "bts", campaign))
    n_items = max(random_log.n_items, bts_log.n_items)
    n_positions = max(random_log.n_positions, bts_log.n_positions)
    if np.any(bts_log.item >= random_log.n_items):
        raise OpeError(f"campaign {campaign}: BTS shows items the random logs never show")
    pis = {
        "time-local": time_local_distribution(bts_log, random_log.ts, n_items, n_positions),
        "static": np.broadcast_to(
            static_distribution(bts_log, n_items, n_positions),
            (random_log.n, n_items, n_positions),
        ),
    }
    estimates = {
        method: estimate_bandit(random_log, pi, seed=seed, n_bootstrap=n_bootstrap)
        for method, pi in pis.items()
    }
    truth_report = estimate_arrays(
        np.ones(bts_log.n),
        bts_log.click,
        np.zeros(bts_log.n),
        np.zeros(bts_log.n),
        seed=seed,
        n_bootstrap=n_bootstrap,
    )
    return Validation(campaign, truth_report.logged, bts_log.n, estimates)


def validate(
    root: Path,
    campaigns: tuple[str, ...] = CAMPAIGNS,
    *,
    seed: int = 0,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
) -> list[Validation]:
    if not (root / "random").is_dir() or not (root / "bts").is_dir():
        raise OpeError(f"{root} is not an Open Bandit sample (expected random/ and bts/ in it)")
    return [validate_campaign(root, c, seed=seed, n_bootstrap=n_bootstrap) for c in campaigns]
