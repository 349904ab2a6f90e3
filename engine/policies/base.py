"""What every discount policy is: the ``Policy`` base class, what it sees and what it returns.

A policy sees a ``PolicyContext``: the user's features, a function giving the model's
P(purchase | features, discount) for any discount, the estimated order value, and one uniform
random draw that is a deterministic function of the decision (so live runs and backtests
explore identically). It returns a ``PolicyChoice``: the discount and its exact propensity.

Besides choosing, a policy answers what the rest of the engine asks of it, so that no caller
needs to know which policy it holds: off-policy evaluation asks for its action probabilities;
the reports for its margin and exploration rate; campaigns, reports and the closed loop's
oracle for the discounts it can give. Each policy module also builds its policy from a
campaign's TOML entry (a ``from_entry`` classmethod, listed in ``engine.policies.registry``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.errors import EngineError

Predict = Callable[[float], float]
"""P(purchase) at a given discount percentage, for the user being decided."""


class PolicyError(EngineError):
    """A policy asked for something it cannot give (e.g. the distribution of a randomised
    policy that does not state it)."""


@dataclass(frozen=True, slots=True)
class PolicyContext:
    features: Mapping[str, float]
    predict: Predict
    order_value: float
    """Estimated value of the order the discount applies to (currency units)."""
    draw: float
    """A uniform draw in [0, 1), deterministic per decision."""
    user_id: str = ""
    trigger_event_id: str = ""
    """The decision's user and trigger event: the simulator's oracle looks its truth up by them."""


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    discount_pct: float
    propensity: float
    """Probability that the policy chose this discount (1.0 for deterministic policies)."""
    explore: bool = False
    rules: tuple[str, ...] = field(default_factory=tuple)
    offer_propensity: float | None = None
    """Probability that the policy offers any discount here (exact); None means the choice
    was deterministic, so it is 1 when ``discount_pct`` > 0 and 0 otherwise."""

    @property
    def offer_probability(self) -> float:
        if self.offer_propensity is not None:
            return self.offer_propensity
        return 1.0 if self.discount_pct > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ActionProbability:
    """One discount and the probability that the policy gives it, in one context."""

    discount_pct: float
    probability: float


@dataclass(frozen=True, slots=True)
class DiscountLevels:
    """The discounts a policy can give."""

    levels: tuple[float, ...]
    is_ladder: bool = False
    """The policy chooses among exactly these levels, its own ladder: the campaign's
    ``max_discount_pct`` must cover them, the report's OPE section evaluates each one and the
    closed loop's oracle chooses among them alone."""
    continuous: bool = False
    """The policy gives any discount up to the largest level, not just these."""


class Policy(ABC):
    """A discount policy. Subclasses are frozen dataclasses with a ``name`` field.

    ``choose``, ``reference_discount_pct`` and ``discount_levels`` are required; the others
    have defaults that fit a deterministic policy. Members are methods, not properties, so that
    a subclass's dataclass field never takes a base property for its default."""

    __slots__ = ()

    name: str
    uses_model: ClassVar[bool] = True
    """Whether ``choose`` asks ``context.predict``; off-policy evaluation trains a model only
    for policies that do."""

    @property
    @abstractmethod
    def reference_discount_pct(self) -> float:
        """The discount a decision's uplift score refers to when the policy proposes none."""

    @abstractmethod
    def choose(self, context: PolicyContext) -> PolicyChoice: ...

    @abstractmethod
    def discount_levels(self) -> DiscountLevels:
        """The discounts the policy can give, so that the closed loop's oracle can always do
        what the policy did."""

    def optimised_margin(self) -> float | None:
        """The gross margin the policy optimises for; None: it has none, and the reports
        measure the campaign with their default."""
        return None

    def exploration_rate(self) -> float | None:
        """The policy's exploration rate (epsilon); None: it never explores."""
        return None

    def action_probabilities(self, context: PolicyContext) -> tuple[ActionProbability, ...]:
        """pi(discount | context), exactly, for off-policy evaluation.

        This default fits deterministic policies: a point mass on ``choose``. A policy that
        randomises must override it."""
        choice = self.choose(context)
        if choice.propensity < 1.0:
            raise PolicyError(
                f"policy {self.name!r} is randomised and does not state its action "
                "distribution; override action_probabilities in its module"
            )
        return (ActionProbability(choice.discount_pct, 1.0),)


def check_pct(name: str, value: float) -> None:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be within [0, 100], got {value}")


def entry_number(
    entry: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
) -> float:
    """A numeric field of a campaign's TOML entry, checked; the ValueError names the field
    (the caller adds which campaign)."""
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{key!r} must be a number, got {value!r}")
    if value < minimum or value > maximum or value in (math.inf, -math.inf):
        raise ValueError(f"{key!r} must be within [{minimum:g}, {maximum:g}], got {value!r}")
    return float(value)
