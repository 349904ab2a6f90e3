"""The stop-loss guardrail: a campaign that demonstrably loses money against its own holdout
falls back to exploration only, until the evidence says otherwise.

What is compared. Decisions where the policy proposes an offer are sampled into two arms:
``treated`` (users outside the holdout, whose proposal was live: granted, or denied by a
guardrail) and ``holdout`` (users in the holdout, whose proposal was only recorded). Each
sampled decision's outcome is the margin of the purchase that converts it (the user's first
within the attribution window after it; 0 without one): ``amount - (1 - margin) *
undiscounted value``, in cents. (Summing every purchase of the window measured the same thing
with several times the variance: active users buy again and again, with or without offers.)
The holdout is a random set of users, so the difference of the two arms' mean outcome per
decision is an unbiased estimate of what one live proposal earns against none, discount costs
included.

Users as clusters. One user's decisions are not independent, so each arm's variance is the
cluster-robust (sandwich) estimate over users: with per-user sums (n_g decisions, y_g cents),
``G / (G - 1) * sum_g (y_g - mean * n_g) ** 2 / (sum n_g) ** 2``. Everything needed is kept as
running integer sums (n, y, y^2, y*n, n^2 over users, user count) per *epoch* of half a window;
the statistic uses the current and the previous epoch (so it covers between one half and one
whole window of decision time) and counts a user active in both as two clusters.

When it acts. Once the window holds ``min_decisions`` sampled decisions and at least
``min_users`` users in each arm: the campaign stops when the 95 % upper bound of the
incremental margin per decision is below zero, and resumes when the estimate itself is no
longer below zero (a band between the two: while stopped, the treated arm holds only the
explored offers, and a bound over so few straddles zero whether the campaign loses or not).
After a change the
state holds for at least half a window of event time (a bound hovering around zero would
otherwise flip it back and forth within minutes). While stopped, the
policy's proposals become offers only with probability ``explore`` (a deterministic draw per
decision, logged in the propensities), which keeps measuring the campaign; without enough
evidence the state stays as it is. Outcomes accrue as purchases arrive, so recent decisions
count with what they have earned so far in both arms alike: the comparison is never biased
by the delay, only a little conservative.

The arithmetic is integer sums and one square root, the same in Python (``InMemoryLedger``)
and in ``streams/adapters/commit_batch.lua`` (several workers share the state in Redis).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

Z95 = 1.959964
EXPLORE_ONLY = "stop_loss:explore_only"
"""The rule of a non-holdout decision made while its campaign was stopped."""
EXPLORED = "stop_loss:explored"
"""... and of one whose offer the explore draw let through."""


@dataclass(frozen=True, slots=True)
class StopLoss:
    """A campaign's ``stop_loss = { window_h = 24, min_decisions = 200, explore = 0.05 }``."""

    window_ms: int = 24 * 3600 * 1000
    min_decisions: int = 200
    explore: float = 0.05
    """Share of the policy's offers still made while stopped (to keep measuring)."""
    min_users: int = 20
    """Users each arm needs before the interval is trusted."""
    epoch_ms: int = field(init=False, repr=False, compare=False)
    """Half the window (at least 1 ms): the sums' epoch. Kept, not derived at each use: the
    ledger asks for the epoch of every decision, purchase and settled event."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "epoch_ms", max(self.window_ms // 2, 1))

    def epoch(self, ts: int) -> int:
        return ts // self.epoch_ms


def purchase_margin_cents(amount_cents: int, gross_cents: int, margin: float) -> int:
    """What a purchase leaves after the cost of goods: amount - (1 - margin) * gross, rounded.

    ``gross_cents`` is the undiscounted value (sum of item price x quantity): a discount lowers
    ``amount`` and so the margin, one for one."""
    return math.floor(amount_cents - (1.0 - margin) * gross_cents + 0.5)


@dataclass(slots=True)
class ArmSums:
    """Running sums over one arm and epoch; per-user sums are kept by the caller."""

    n: int = 0
    y: int = 0
    yy: int = 0
    yn: int = 0
    nn: int = 0
    users: int = 0

    @classmethod
    def of_clusters(cls, clusters: Iterable[tuple[int, int]]) -> ArmSums:
        """The sums of finished per-user totals (decisions, outcome) at once."""
        sums = cls()
        for n, y in clusters:
            if n:
                sums.n += n
                sums.y += y
                sums.yy += y * y
                sums.yn += y * n
                sums.nn += n * n
                sums.users += 1
        return sums

    def add_decision(self, user_n: int, user_y: int) -> None:
        """One more decision of a user who had ``user_n`` decisions and ``user_y`` cents."""
        self.n += 1
        self.nn += 2 * user_n + 1
        self.yn += user_y
        if user_n == 0:
            self.users += 1

    def add_outcome(self, user_n: int, user_y: int, cents: int) -> None:
        """``cents`` more outcome for a user with ``user_n`` decisions and ``user_y`` so far."""
        self.y += cents
        self.yy += 2 * user_y * cents + cents * cents
        self.yn += cents * user_n

    def merged(self, other: ArmSums) -> ArmSums:
        return ArmSums(
            self.n + other.n,
            self.y + other.y,
            self.yy + other.yy,
            self.yn + other.yn,
            self.nn + other.nn,
            self.users + other.users,
        )

    def mean_and_variance(self) -> tuple[float, float] | None:
        """Mean outcome per decision (cents) and its cluster-robust variance; None if < 2 users."""
        if self.users < 2 or self.n == 0:
            return None
        mean = self.y / self.n
        spread = self.yy - 2.0 * mean * self.yn + mean * mean * self.nn
        g = self.users
        return mean, g / (g - 1) * max(spread, 0.0) / (self.n * self.n)


@dataclass(frozen=True, slots=True)
class StopLossStatus:
    """A campaign's stop-loss state and the figures it was decided on (cents per decision)."""

    stopped: bool = False
    since_ms: int | None = None
    """Event time of the last change of state (None: never changed)."""
    decisions: int = 0
    """Sampled decisions in the window (both arms)."""
    incremental_margin: float | None = None
    """Treated minus holdout mean outcome per decision, in currency units."""
    upper_bound: float | None = None
    lower_bound: float | None = None


def evaluate(
    treated: ArmSums, holdout: ArmSums, config: StopLoss, previous: StopLossStatus, now_ms: int
) -> StopLossStatus:
    """The next status from the window's sums (see the module docstring for the rule)."""
    decisions = treated.n + holdout.n
    t, h = treated.mean_and_variance(), holdout.mean_and_variance()
    if t is None or h is None:
        return StopLossStatus(previous.stopped, previous.since_ms, decisions)
    diff = (t[0] - h[0]) / 100.0
    half_width = Z95 * math.sqrt(t[1] + h[1]) / 100.0
    upper, lower = diff + half_width, diff - half_width
    stopped = previous.stopped
    settled = previous.since_ms is None or now_ms - previous.since_ms >= config.epoch_ms
    if (
        settled
        and decisions >= config.min_decisions
        and treated.users >= config.min_users
        and holdout.users >= config.min_users
    ):
        # Stop on the bound, resume on the estimate: while stopped the treated arm holds only
        # the explored offers, too few for a bound that means anything; a bound over them
        # straddles zero at once and resumed a losing campaign within a window.
        stopped = diff < 0.0 if previous.stopped else upper < 0.0
    since = now_ms if stopped != previous.stopped else previous.since_ms
    return StopLossStatus(stopped, since, decisions, diff, upper, lower)


@dataclass(slots=True)
class CampaignStopLoss:
    """One campaign's sums by (epoch, arm), its users' sums, and its status (in memory)."""

    config: StopLoss
    margin: float
    sums: dict[tuple[int, str], ArmSums] = field(default_factory=dict)
    users: dict[tuple[int, str, str], tuple[int, int]] = field(default_factory=dict)
    """(epoch, arm, user) -> (decisions, outcome cents)."""
    status: StopLossStatus = field(default_factory=StopLossStatus)
    settled_epoch: int | None = None
    """The epoch in which ``status`` became what ``update`` returns for as long as no decision
    or outcome is recorded (None: not known to be so). The ledger updates after every call,
    mostly with nothing recorded, so this spares the evaluation, not a different result."""

    def record_decision(self, epoch: int, arm: str, user_id: str) -> None:
        key = (epoch, arm, user_id)
        n, y = self.users.get(key, (0, 0))
        self._sums(epoch, arm).add_decision(n, y)
        self.users[key] = (n + 1, y)
        self.settled_epoch = None

    def record_outcome(self, epoch: int, arm: str, user_id: str, cents: int) -> None:
        key = (epoch, arm, user_id)
        n, y = self.users.get(key, (0, 0))
        self._sums(epoch, arm).add_outcome(n, y, cents)
        self.users[key] = (n, y + cents)
        self.settled_epoch = None

    def _sums(self, epoch: int, arm: str) -> ArmSums:
        found = self.sums.get((epoch, arm))
        if found is None:
            found = self.sums[(epoch, arm)] = ArmSums()
        return found

    def settled_at(self, now_ms: int) -> bool:
        """Whether ``update(now_ms)`` would return ``status`` as it stands and change nothing."""
        return self.settled_epoch == self.config.epoch(now_ms)

    def update(self, now_ms: int) -> StopLossStatus:
        """Re-evaluate as of ``now_ms`` and forget epochs older than the window.

        Nothing recorded since an evaluation that was free to change the state (not within an
        epoch of the last change), in the same epoch: the same sums give the same status, and
        no epoch has grown stale, so the status stands.
        """
        current = self.config.epoch(now_ms)
        if self.settled_epoch == current:
            return self.status
        previous = self.status
        free = previous.since_ms is None or now_ms - previous.since_ms >= self.config.epoch_ms
        empty = ArmSums()
        arms = []
        for arm in ("T", "H"):
            arms.append(
                self.sums.get((current, arm), empty).merged(
                    self.sums.get((current - 1, arm), empty)
                )
            )
        self.status = evaluate(arms[0], arms[1], self.config, previous, now_ms)
        # Outcomes still arrive for decisions up to one window old: keep three epochs.
        stale = [key for key in self.sums if key[0] < current - 2]
        for key in stale:
            del self.sums[key]
        if stale:
            self.users = {k: v for k, v in self.users.items() if k[0] >= current - 2}
        self.settled_epoch = current if free else None
        return self.status
