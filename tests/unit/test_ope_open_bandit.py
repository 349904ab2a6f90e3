"""The classic OPE check on the real Open Bandit sample (../shared/data/open-bandit-sample).

Bernoulli TS's click rate is estimated from the uniform-random policy's logs and compared with
BTS's own mean click. The truth is itself an estimate (10,000 BTS records with 42-69 clicks),
so an estimate agrees with it when their difference is within 1.96 standard errors of a
difference of two independent estimates, sqrt(se_estimate^2 + se_truth^2), each standard error
read off its 95 % bootstrap interval (width / 3.92). Everything is seeded: the figures are the
ones in docs/ope.md.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from engine.analysis.ope.errors import OpeError
from engine.analysis.ope.estimators import Interval
from engine.analysis.ope.open_bandit import (
    Validation,
    read_bandit_log,
    static_distribution,
    time_local_distribution,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
OBD = REPO.parent / "shared" / "data" / "open-bandit-sample"


@pytest.fixture(scope="module")
def results() -> list[Validation]:
    if not (OBD / "random").is_dir():
        pytest.skip(f"the Open Bandit sample is absent ({OBD}); see ../shared/data/README.md")
    return validate(OBD, seed=0)


def z_score(estimate: Interval, truth: Interval) -> float:
    assert estimate.value is not None and estimate.low is not None and estimate.high is not None
    assert truth.value is not None and truth.low is not None and truth.high is not None
    se_e = (estimate.high - estimate.low) / 3.92
    se_t = (truth.high - truth.low) / 3.92
    return (estimate.value - truth.value) / math.sqrt(se_e**2 + se_t**2)


def test_every_estimate_agrees_with_the_on_policy_truth(results: list[Validation]) -> None:
    assert [v.campaign for v in results] == ["all", "men", "women"]
    for v in results:
        truth = v.truth.value
        assert v.n_bts == 10_000 and truth is not None and 0.003 < truth < 0.01
        for method, report in v.estimates.items():
            assert report.n == 10_000 and report.ess > 1000 and not report.warnings
            for name in ("ips", "snips", "dr"):
                z = z_score(getattr(report, name), v.truth)
                assert abs(z) < 1.96, (v.campaign, method, name, z)


def test_the_static_estimates_cover_the_truth(results: list[Validation]) -> None:
    for v in results:
        for name in ("ips", "snips", "dr"):
            interval = getattr(v.estimates["static"], name)
            assert interval.contains(v.truth.value), (v.campaign, name, interval, v.truth)


def test_the_estimates_are_not_just_the_random_policys_click_rate(
    results: list[Validation],
) -> None:
    """BTS clicks more than random on men (0.0069 vs 0.0046); the estimates move that way."""
    men = next(v for v in results if v.campaign == "men")
    for report in men.estimates.values():
        assert report.logged.value == pytest.approx(0.0046)
    assert men.estimates["static"].ips.value > men.estimates["static"].logged.value  # type: ignore[operator]


def test_bts_distributions_are_distributions() -> None:
    if not (OBD / "bts").is_dir():
        pytest.skip(f"the Open Bandit sample is absent ({OBD}); see ../shared/data/README.md")
    bts = read_bandit_log(OBD / "bts" / "men" / "men.csv.gz")
    static = static_distribution(bts, bts.n_items, bts.n_positions)
    assert np.allclose(static.sum(axis=0), 1.0)
    times = np.linspace(bts.ts.min(), bts.ts.max(), 50)
    local = time_local_distribution(bts, times, bts.n_items, bts.n_positions)
    assert np.allclose(local.sum(axis=1), 1.0) and np.all(local >= 0)
    # The policy moved during the week: the distributions at the start and the end differ.
    assert np.abs(local[0] - local[-1]).sum() > 0.5


def test_bad_files_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv.gz"
    bad.write_bytes(gzip.compress(b",timestamp,item_id\n0,2019-11-24 00:00:00+00:00,oops\n"))
    with pytest.raises(OpeError, match="row 2 is not Open Bandit data"):
        read_bandit_log(bad)
    with pytest.raises(OpeError, match="cannot read"):
        read_bandit_log(tmp_path / "missing.csv.gz")
    binary = tmp_path / "y.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(OpeError):
        read_bandit_log(binary)
