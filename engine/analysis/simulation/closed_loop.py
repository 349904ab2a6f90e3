"""Closed-loop evaluation: each policy against its own copy of the world, the oracle, regret.

For every campaign a fresh ``World`` with the same seed is the source of a backtest
(``engine.analysis.backtest.runner.run_backtest``: the same ``DiscountEngine``, in-memory store,
``learn_inline``), and receives each micro-batch's offers before the next batch is drawn, so
offers change what the shoppers do next. A copy that gets no offers is the counterfactual.
Because all copies share their random numbers (see ``engine.analysis.simulation``), they differ
only in checkouts that an offer turned around, and

- ``incremental_margin`` = margin(policy's world) - margin(no-offer world), where a world's
  margin is sum(undiscounted value) * margin - sum(discounts given), over all purchases;
- ``expected_incremental_margin`` = sum over the checkouts at which an offer applied of
  P(buy | d) * value * (margin - d/100) - P(buy | 0) * value * margin: the same difference with
  each checkout's coin flip replaced by its expectation (``World.expected_incremental_margin``);
- the oracle is the same campaign (triggers, guardrails) whose policy reads the truth instead
  of the model (``OraclePolicy``); regret = oracle's incremental margin - the policy's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

from engine.analysis.backtest.runner import BacktestResult, run_backtest
from engine.analysis.simulation.params import WorldParams
from engine.analysis.simulation.shoppers import Truth
from engine.analysis.simulation.world import DEFAULT_START_MS, World
from engine.campaigns import Campaign
from engine.errors import EngineError
from engine.events import parse_event
from engine.model.feedback import Feedback
from engine.pipeline import EngineConfig
from engine.policies.base import DiscountLevels, Policy, PolicyChoice, PolicyContext

DEFAULT_LADDER: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0)
"""The oracle's ladder for policies that have none of their own (the profit policy's default)."""


class ClosedLoopError(EngineError):
    """A closed-loop run that cannot start; the message says which setting to change."""


def continuous_optimum(truth: Truth, margin: float, max_pct: float) -> float:
    """The discount in [0, max_pct] with the highest expected incremental margin at the next
    checkout alone (a starting point for ``best_discount``).

    With base b and slope k = sensitivity * (1 - b), P(buy | x) = min(0.98, b + k x) for the
    fraction x = d/100, so the margin (b + k x)(m - x) is a concave parabola with its top at
    (k m - b) / 2k, and falls beyond the cap."""
    base = truth.p_buy(0.0)
    slope = truth.shopper.price_sensitivity * (1.0 - base)
    if slope <= 0.0 or base >= 0.98:
        return 0.0
    top = (slope * margin - base) / (2.0 * slope)
    at_cap = (0.98 - base) / slope
    return round(min(max(min(top, at_cap), 0.0), max_pct / 100.0) * 100.0, 2)


def best_discount(
    truth: Truth, ladder: Sequence[float], margin: float, *, continuous: bool = False
) -> float:
    """The choice with the highest true expected incremental margin, given the best offer the
    shopper already holds (a smaller new offer changes nothing); ties go to the smaller
    discount, and 0 when no new offer would beat what is held.

    ``continuous``: any discount in [0, max(ladder)] to 0.01 %: the ladder, the next
    checkout's closed-form optimum and a 0.5 % grid, then 0.01 % steps around the best."""
    held = truth.held_pct

    def score(d: float) -> tuple[float, float]:
        return (round(truth.expected_incremental_margin(max(d, held), margin), 9), -d)

    options = set(ladder)
    if continuous:
        top = max(ladder)
        options.add(continuous_optimum(truth, margin, top))
        options.update(step / 2 for step in range(int(top * 2) + 1))
        coarse = max(sorted(options), key=score)
        options.update(
            d for step in range(-50, 51) if 0.0 <= (d := round(coarse + step / 100.0, 2)) <= top
        )
    best = max(sorted(options), key=score)
    return best if best > held else 0.0


@dataclass(frozen=True, slots=True, eq=False)
class OraclePolicy(Policy):
    """A policy that knows each shopper's true response rule and next planned checkout.

    It decides inside the same engine as every other policy, so it meets the same triggers,
    holdout and guardrails; only its predictions come from the world instead of the model.
    It sees the world as of the end of the micro-batch (as the offer will), and counts a
    checkout only if it comes before the offer would expire."""

    world: World
    ladder: tuple[float, ...]
    margin: float
    offer_ttl_ms: int
    continuous: bool = False
    name: str = "oracle"

    @property
    def reference_discount_pct(self) -> float:
        return min((level for level in self.ladder if level > 0), default=0.0)

    def discount_levels(self) -> DiscountLevels:
        return DiscountLevels(self.ladder, is_ladder=True, continuous=self.continuous)

    def choose(self, context: PolicyContext) -> PolicyChoice:
        truth = self.world.truth(context.user_id, before_ms=self.world.clock + self.offer_ttl_ms)
        if truth is None:
            return PolicyChoice(0.0, 1.0, rules=("oracle:no-checkout-before-expiry",))
        discount = best_discount(truth, self.ladder, self.margin, continuous=self.continuous)
        return PolicyChoice(discount, 1.0, rules=(f"oracle:{discount:g}",))


def oracle_action_space(campaign: Campaign) -> tuple[tuple[float, ...], bool]:
    """The discounts the oracle may choose for a campaign: the policy's own ladder if it has
    one; otherwise the default ladder plus every discount the policy itself can give
    (continuous if the policy is), so that the oracle can always do what the policy did."""
    levels = campaign.policy.discount_levels()
    choices = set(levels.levels) if levels.is_ladder else set(DEFAULT_LADDER) | set(levels.levels)
    cap = campaign.max_discount_pct
    return tuple(sorted({min(level, cap) for level in choices} | {0.0})), levels.continuous


@dataclass(frozen=True, slots=True)
class ClosedLoopConfig:
    users: int
    events: int
    seed: int
    batch_size: int = 10
    """Events per micro-batch: offers reach the world after each batch, so a batch must span
    much less event time than a session (10 x 3 s here; sessions last minutes)."""
    margin: float = 0.3
    """Gross margin (fraction of the undiscounted value) every policy is scored with."""
    mean_gap_ms: float = 3000.0
    """Population-wide mean event gap: 200,000 events span about a week of event time."""
    start_ms: int = DEFAULT_START_MS
    world: WorldParams = field(default_factory=WorldParams)
    """The shoppers and their sessions, the same in every copy (recorded in the report)."""
    feedback: Feedback = field(default_factory=Feedback)
    """How the campaigns' models learn under delayed labels (recorded in the report)."""

    def check(self) -> None:
        if self.users < 1 or self.events < 1:
            raise ClosedLoopError("a closed loop needs at least one user and one event")
        if self.batch_size < 1:
            raise ClosedLoopError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.margin <= 1.0:
            raise ClosedLoopError(f"margin must be within (0, 1], got {self.margin}")
        if not self.mean_gap_ms > 0 or not math.isfinite(self.mean_gap_ms):
            raise ClosedLoopError(f"mean_gap_ms must be positive, got {self.mean_gap_ms}")
        self.world.check()

    def new_world(self) -> World:
        """A fresh copy of the world: every copy of a run draws the same random numbers."""
        return World(
            users=self.users,
            seed=self.seed,
            start_ms=self.start_ms,
            mean_gap_ms=self.mean_gap_ms,
            params=self.world,
        )


@dataclass(slots=True)
class RunOutcome:
    """One world driven by one campaign (or by nobody: the counterfactual)."""

    decisions: int
    offers: int
    redeemed: int
    purchases: int
    margin: float
    """The world's margin: undiscounted value * margin - discounts, over every purchase."""
    expected_incremental_margin: float
    noise_sd: float = 0.0
    """Standard deviation of the realised incremental margin around the expected one."""
    backtest: BacktestResult | None = None
    """The backtest of the run (None for the counterfactual, which needs no engine)."""


def run_world(
    config: ClosedLoopConfig,
    campaign: Campaign | None,
    *,
    oracle: bool = False,
) -> RunOutcome:
    """Drive a fresh world with one campaign (its oracle when ``oracle``), or with none.

    The loop is the backtest's (``run_backtest``): it pulls a micro-batch of the world's
    events, runs the engine, and hands the batch's offers to the world before it pulls the
    next batch."""
    world = config.new_world()
    if campaign is None:
        for _ in world.events(config.events):
            pass
        return RunOutcome(0, 0, 0, world.purchases, world.margin(config.margin), 0.0)
    if oracle:
        ladder, continuous = oracle_action_space(campaign)
        campaign = replace(
            campaign,
            policy=OraclePolicy(
                world, ladder, config.margin, campaign.offer_ttl_ms, continuous=continuous
            ),
        )
    result = run_backtest(
        (parse_event(event) for event in world.events(config.events)),
        (campaign,),
        seed=config.seed,
        batch_size=config.batch_size,
        on_offers=world.receive,
        config=EngineConfig(learn_inline=True, feedback=config.feedback),
    )
    stats = result.groups[0].stats[0]
    return RunOutcome(
        decisions=stats.decisions,
        offers=stats.offers,
        redeemed=world.redeemed,
        purchases=world.purchases,
        margin=world.margin(config.margin),
        expected_incremental_margin=world.expected_incremental_margin(config.margin),
        noise_sd=math.sqrt(world.incremental_margin_variance(config.margin)),
        backtest=result,
    )


def _oracle_key(campaign: Campaign) -> tuple[object, ...]:
    """Campaigns that differ only in policy, seed (exploration) and, without a holdout, name
    share one oracle run."""
    skip = {"policy", "seed"} | ({"name"} if campaign.holdout == 0 else set())
    setup = tuple(getattr(campaign, f.name) for f in fields(campaign) if f.name not in skip)
    return (setup, oracle_action_space(campaign))


def _money(value: float) -> float:
    return round(value, 2)


@dataclass(slots=True)
class ClosedLoopRun:
    simulation: dict[str, object]
    """The ``simulation`` section of a backtest report (deterministic for a seed)."""
    backtests: dict[str, BacktestResult]
    """Each campaign's own backtest against its own world, by campaign name."""


def simulate_closed_loop(
    campaigns: Sequence[Campaign],
    config: ClosedLoopConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Every campaign, its oracle and the no-offer counterfactual: the ``simulation`` section
    of a backtest report (deterministic for a seed)."""
    return run_closed_loop(campaigns, config, progress=progress).simulation


def run_closed_loop(
    campaigns: Sequence[Campaign],
    config: ClosedLoopConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> ClosedLoopRun:
    """``simulate_closed_loop``, keeping each campaign's backtest for the full report."""
    config.check()
    if not campaigns:
        raise ClosedLoopError("a closed loop needs at least one campaign")
    say = progress or (lambda _: None)
    baseline = run_world(config, None)
    say(f"no-offer world: {baseline.purchases} purchases, margin {baseline.margin:.2f}")
    oracles: dict[tuple[object, ...], tuple[str, RunOutcome]] = {}
    rows: list[dict[str, object]] = []
    backtests: dict[str, BacktestResult] = {}
    for campaign in campaigns:
        key = _oracle_key(campaign)
        if key not in oracles:
            outcome = run_world(config, campaign, oracle=True)
            oracles[key] = (campaign.name, outcome)
            say(f"oracle for {campaign.name}: margin {outcome.margin - baseline.margin:+.2f}")
        oracle_run = oracles[key][1]
        run = run_world(config, campaign)
        assert run.backtest is not None
        backtests[campaign.name] = run.backtest
        say(f"{campaign.name} ({campaign.policy.name}): margin {run.margin - baseline.margin:+.2f}")
        incremental = run.margin - baseline.margin
        oracle_incremental = oracle_run.margin - baseline.margin
        regret = oracle_incremental - incremental
        rows.append(
            {
                "policy": campaign.policy.name,
                "campaign": campaign.name,
                "decisions": run.decisions,
                "offers": run.offers,
                "redeemed": run.redeemed,
                "purchases": run.purchases,
                "incremental_margin": _money(incremental),
                "expected_incremental_margin": _money(run.expected_incremental_margin),
                "incremental_margin_sd": _money(run.noise_sd),
                "oracle_incremental_margin": _money(oracle_incremental),
                "oracle_expected_incremental_margin": _money(
                    oracle_run.expected_incremental_margin
                ),
                "regret": _money(regret),
                "expected_regret": _money(
                    oracle_run.expected_incremental_margin - run.expected_incremental_margin
                ),
                "regret_per_1000_decisions": (
                    _money(regret * 1000 / run.decisions) if run.decisions else None
                ),
            }
        )
    oracle_rows = [
        {
            "campaign": name,
            "decisions": run.decisions,
            "offers": run.offers,
            "redeemed": run.redeemed,
            "purchases": run.purchases,
            "incremental_margin": _money(run.margin - baseline.margin),
            "expected_incremental_margin": _money(run.expected_incremental_margin),
            "incremental_margin_sd": _money(run.noise_sd),
        }
        for name, run in oracles.values()
    ]
    simulation: dict[str, object] = {
        "seed": config.seed,
        "users": config.users,
        "events": config.events,
        "batch_size": config.batch_size,
        "margin": config.margin,
        "mean_gap_ms": config.mean_gap_ms,
        "feedback": {
            "method": str(config.feedback.method),
            "wait_s": config.feedback.elapsed_ms / 1000,
        },
        "world": config.world.as_dict(),
        "baseline": {"purchases": baseline.purchases, "margin": _money(baseline.margin)},
        "oracle_incremental_margin": _money(
            max(run.margin - baseline.margin for _, run in oracles.values())
        ),
        "oracles": oracle_rows,
        "policies": rows,
    }
    return ClosedLoopRun(simulation, backtests)
