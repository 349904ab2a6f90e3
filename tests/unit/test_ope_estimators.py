"""engine.analysis.ope estimators on synthetic decision logs whose true target value is known
exactly.

The logging policy depends on the context (users with carts are mostly offered 20 %), so the
naive mean reward of the logged 10 % decisions is confounded; IPS, SNIPS and DR must correct it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from engine.analysis.ope.decision_log import LoggedDecision
from engine.analysis.ope.errors import OpeError
from engine.analysis.ope.estimators import effective_sample_size, estimate_arrays
from engine.analysis.ope.evaluate import estimate
from engine.analysis.ope.targets import ConstantTarget

LADDER = (0.0, 5.0, 10.0, 15.0, 20.0)
CARTS = (0, 1, 2, 3)


def true_p(cart: int, discount: float) -> float:
    """P(buy | cart count, discount): logistic in the PurchaseModel's own inputs."""
    lc, d = math.log1p(cart), discount / 100.0
    return 1.0 / (1.0 + math.exp(-(-2.0 + 0.8 * lc + 4.0 * d + 3.0 * d * lc)))


def truth(discount: float) -> float:
    """The target constant:discount's value: carts are uniform over CARTS."""
    return sum(true_p(c, discount) for c in CARTS) / len(CARTS)


def logging_distribution(cart: int, epsilon: float) -> dict[float, float]:
    greedy = 20.0 if cart >= 2 else 0.0
    k = len(LADDER)
    return {d: epsilon / k + (1.0 - epsilon if d == greedy else 0.0) for d in LADDER}


def make_log(
    n: int, seed: int, *, epsilon: float = 0.5, features: bool = True
) -> list[LoggedDecision]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        cart = rng.choice(CARTS)
        dist = logging_distribution(cart, epsilon)
        discount = rng.choices(LADDER, weights=[dist[d] for d in LADDER])[0]
        reward = 1.0 if rng.random() < true_p(cart, discount) else 0.0
        records.append(
            LoggedDecision(
                discount_pct=discount,
                propensity=dist[discount],
                reward=reward,
                features={"cart_count_24h": float(cart)} if features else {},
                campaign="c",
                user_id=f"u{i}",
            )
        )
    return records


@pytest.fixture(scope="module")
def log() -> list[LoggedDecision]:
    return make_log(20_000, seed=7)


def test_the_naive_estimate_is_confounded(log: list[LoggedDecision]) -> None:
    """Why OPE is needed here: the logged 10 % decisions are not a random sample of users."""
    naive = np.mean([r.reward for r in log if r.discount_pct == 10.0])
    logged_20 = np.mean([r.reward for r in log if r.discount_pct == 20.0])
    assert logged_20 - truth(20.0) > 0.03  # 20 % went mostly to the users with carts
    assert abs(naive - truth(10.0)) < 0.05  # (10 % is explored uniformly, so close)


@pytest.mark.parametrize("discount", [0.0, 10.0, 20.0])
def test_every_estimator_covers_the_truth(log: list[LoggedDecision], discount: float) -> None:
    report = estimate(log, ConstantTarget(discount), seed=1)
    for name in ("ips", "snips", "dr"):
        interval = getattr(report, name)
        assert interval.contains(truth(discount)), (name, interval, truth(discount))
    assert report.defined and report.n == len(log)
    assert report.reward_model.startswith("logistic")


def test_dr_with_a_correct_reward_model_has_lower_variance() -> None:
    """The model is well specified (logistic in the PurchaseModel inputs), so DR removes the
    part of IPS's variance that comes from E[r | x, a]; what is left is the Bernoulli noise of
    r itself, so for purchase rates of 0.1-0.6 the interval shrinks to roughly
    sqrt(1 - rate) ~ 0.75-0.85 of IPS's, not to nothing."""
    log = make_log(20_000, seed=8, epsilon=0.25)
    report = estimate(log, ConstantTarget(20.0), seed=1)
    ips_width = report.ips.high - report.ips.low  # type: ignore[operator]
    dr_width = report.dr.high - report.dr.low  # type: ignore[operator]
    assert dr_width < 0.85 * ips_width, (dr_width, ips_width)
    assert report.dr.contains(truth(20.0))


def test_estimates_are_consistent_over_independent_logs() -> None:
    """Unbiasedness: the mean of IPS over 30 logs is within 3 standard errors of the truth."""
    values = {"ips": [], "snips": [], "dr": []}  # type: dict[str, list[float]]
    for seed in range(30):
        report = estimate(
            make_log(2_000, seed=100 + seed), ConstantTarget(10.0), seed=0, n_bootstrap=10
        )
        for name, found in values.items():
            found.append(getattr(report, name).value)
    for name, xs in values.items():
        mean, se = float(np.mean(xs)), float(np.std(xs, ddof=1) / math.sqrt(len(xs)))
        assert abs(mean - truth(10.0)) < 3 * se + 1e-3, (name, mean, se, truth(10.0))
    assert np.std(values["dr"]) < np.std(values["ips"])


def test_without_features_dr_uses_the_mean_reward_per_discount() -> None:
    log = make_log(20_000, seed=3, features=False)
    report = estimate(log, ConstantTarget(10.0), seed=2)
    assert report.reward_model.startswith("mean reward per discount")
    for name in ("ips", "snips", "dr"):
        assert getattr(report, name).contains(truth(10.0)), name


def test_a_target_without_support_is_undefined(log: list[LoggedDecision]) -> None:
    report = estimate(log, ConstantTarget(7.0), seed=0)
    assert not report.defined and report.supported == 0
    assert report.ips.value is None and report.snips.value is None and report.dr.value is None
    doc = report.to_dict()
    assert doc["defined"] is False and doc["ips"] == {"value": None, "low": None, "high": None}
    assert any("no support" in note for note in report.warnings)
    assert any("discount 7 %" in note for note in report.warnings)


def test_same_seed_same_report_other_seed_other_intervals(log: list[LoggedDecision]) -> None:
    small = log[:3000]
    one = estimate(small, ConstantTarget(10.0), seed=5).to_dict()
    assert estimate(small, ConstantTarget(10.0), seed=5).to_dict() == one
    other = estimate(small, ConstantTarget(10.0), seed=6).to_dict()
    assert other["ips"]["value"] == one["ips"]["value"]  # the point estimate has no randomness
    assert other["ips"]["low"] != one["ips"]["low"]


def test_report_document_has_the_contract_keys(log: list[LoggedDecision]) -> None:
    doc = estimate(log[:2000], ConstantTarget(5.0), seed=0, n_bootstrap=50).to_dict()
    for key in ("n", "ess", "max_weight", "ips", "snips", "dr", "logged_value", "warnings"):
        assert key in doc
    assert set(doc["dr"]) == {"value", "low", "high"}
    assert doc["n_bootstrap"] == 50 and doc["target"] == "constant:5"
    assert doc["logged_value"] == pytest.approx(np.mean([r.reward for r in log[:2000]]))


def test_deterministic_logging_records_are_flagged() -> None:
    """Holdout and denied decisions (propensity 1, no discount) only inform the 0 % action."""
    log = make_log(4000, seed=11)
    certain = [
        LoggedDecision(0.0, 1.0, 1.0, {"cart_count_24h": 1.0}, "c", f"h{i}", holdout=True)
        for i in range(200)
    ]
    report = estimate(log + certain, ConstantTarget(10.0), seed=0)
    assert report.details["records_by_kind"]["holdout"] == 200
    assert any("propensity 1" in note for note in report.warnings)
    no_discount = estimate(log + certain, ConstantTarget(0.0), seed=0)
    assert not any("propensity 1" in note for note in no_discount.warnings)
    assert no_discount.supported > estimate(log, ConstantTarget(0.0), seed=0).supported


def test_small_effective_sample_size_warns() -> None:
    log = make_log(300, seed=4, epsilon=0.05)
    report = estimate(log, ConstantTarget(15.0), seed=0, n_bootstrap=20)
    assert report.ess < 100
    assert any("effective sample size" in note for note in report.warnings)


def test_effective_sample_size() -> None:
    assert effective_sample_size(np.ones(10)) == pytest.approx(10.0)
    assert effective_sample_size(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_sample_size(np.zeros(3)) == 0.0


def test_estimate_arrays_rejects_bad_input() -> None:
    ones = np.ones(3)
    with pytest.raises(ValueError, match="no records"):
        estimate_arrays(np.ones(0), np.ones(0), np.ones(0), np.ones(0), seed=0)
    with pytest.raises(ValueError, match="finite"):
        estimate_arrays(np.array([1.0, np.nan, 1.0]), ones, ones, ones, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        estimate_arrays(np.array([1.0, -1.0, 1.0]), ones, ones, ones, seed=0)
    with pytest.raises(OpeError, match="no valid logged decision"):
        estimate([], ConstantTarget(1.0), seed=0)


def test_oracle_dr_beats_ips_on_arrays() -> None:
    """With the true reward function as q, DR's only noise is the reward's own."""
    rng = np.random.default_rng(0)
    n, k = 5000, 5
    mu = rng.uniform(0.1, 0.9, size=(n, k))  # true mean reward of each action per record
    logged = rng.integers(0, k, size=n)  # uniform logging, propensity 1/k
    rows = np.arange(n)
    r = (rng.uniform(size=n) < mu[rows, logged]).astype(float)
    w = np.where(logged == 0, float(k), 0.0)  # the target always takes action 0
    report = estimate_arrays(w, r, mu[rows, logged], mu[:, 0], seed=0)
    true_value = float(mu[:, 0].mean())
    assert report.ips.contains(true_value) and report.dr.contains(true_value)
    ips_width = report.ips.high - report.ips.low  # type: ignore[operator]
    assert report.dr.high - report.dr.low < 0.8 * ips_width  # type: ignore[operator]


def test_a_profit_campaign_target_is_estimated_within_its_interval() -> None:
    """The target's distribution per decision is known (the engine's profit policy over a
    prequential model), so its true value is sum_i sum_d pi_i(d) P(buy | x_i, d) / n."""
    from engine.analysis.ope.targets import CampaignsTarget, TargetActions
    from engine.campaigns import parse_campaigns

    class Precomputed:
        description = "precomputed"

        def __init__(self, actions: TargetActions) -> None:
            self._actions = actions

        def actions(self, records: object) -> TargetActions:
            return self._actions

    log = make_log(20_000, seed=1)
    target = CampaignsTarget(
        parse_campaigns({"campaign": [{"name": "c", "policy": "profit", "epsilon": 0.2}]})
    )
    actions = target.actions(log)
    dists = actions.distributions
    value = sum(
        p * true_p(int(rec.features["cart_count_24h"]), d)
        for rec, dist in zip(log, dists, strict=True)
        if dist is not None
        for d, p in dist.items()
    ) / len(log)
    report = estimate(log, Precomputed(actions), seed=0)  # the same actions, computed once
    assert report.dr.contains(value) and report.snips.contains(value), (report, value)
    assert report.ips.value is not None and abs(report.ips.value - value) < 0.03
