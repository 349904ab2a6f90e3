"""Discount policies: turn purchase probabilities into a discount, and say how likely it was.

A policy sees a ``PolicyContext``: the user's features, a function giving the model's
P(purchase | features, discount) for any discount, the estimated order value, and one uniform
random draw that is a deterministic function of the decision (so live runs and backtests
explore identically). It returns the discount and its exact propensity.

- ``threshold``: P(buy | no discount) > t gives a fixed discount (paper case 1: P > 0.5 -> 10 %).
- ``linear``: D = a * P + b, clipped to [0, max] (paper section 4.2).
- ``rules``: feature conditions -> discount, first match wins
  (paper case 2: ``purchase_frequency_30d`` > 3 -> 20 %).
- ``profit``: over a discount ladder, the level maximising expected incremental margin
  P(buy|x,d) * value * (m - d) - P(buy|x,0) * value * m, with epsilon-greedy exploration.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Predict = Callable[[float], float]
"""P(purchase) at a given discount percentage, for the user being decided."""


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


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def reference_discount_pct(self) -> float:
        """The discount a decision's uplift score refers to when the policy proposes none."""
        ...

    def choose(self, context: PolicyContext) -> PolicyChoice: ...


def _check_pct(name: str, value: float) -> None:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be within [0, 100], got {value}")


@dataclass(frozen=True, slots=True)
class ThresholdPolicy:
    """P(purchase) > threshold gives a fixed discount (the paper's case 1: P > 0.5 -> 10 %)."""

    threshold: float = 0.5
    discount_pct: float = 10.0
    name: str = "threshold"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        _check_pct("discount_pct", self.discount_pct)

    @property
    def reference_discount_pct(self) -> float:
        return self.discount_pct

    def choose(self, context: PolicyContext) -> PolicyChoice:
        if context.predict(0.0) > self.threshold:
            return PolicyChoice(self.discount_pct, 1.0, rules=(f"p_purchase>{self.threshold:g}",))
        return PolicyChoice(0.0, 1.0)


@dataclass(frozen=True, slots=True)
class LinearPolicy:
    """D = a * P + b, clipped to [0, max_discount_pct] (paper section 4.2)."""

    a: float = 20.0
    b: float = 0.0
    max_discount_pct: float = 30.0
    name: str = "linear"

    def __post_init__(self) -> None:
        _check_pct("max_discount_pct", self.max_discount_pct)
        for name, value in (("a", self.a), ("b", self.b)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")

    @property
    def reference_discount_pct(self) -> float:
        return self.max_discount_pct

    def choose(self, context: PolicyContext) -> PolicyChoice:
        raw = self.a * context.predict(0.0) + self.b
        discount = round(min(max(raw, 0.0), self.max_discount_pct), 2)
        rules = (f"linear:{self.a:g}*p+{self.b:g}",) if discount > 0 else ()
        return PolicyChoice(discount, 1.0, rules=rules)


_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass(frozen=True, slots=True)
class Rule:
    """``feature op value`` -> ``discount_pct``."""

    feature: str
    op: str
    value: float
    discount_pct: float

    def __post_init__(self) -> None:
        if self.op not in _OPERATORS:
            raise ValueError(f"rule operator must be one of {sorted(_OPERATORS)}, got {self.op!r}")
        _check_pct("discount_pct", self.discount_pct)

    def matches(self, features: Mapping[str, float]) -> bool:
        return _OPERATORS[self.op](float(features.get(self.feature, 0.0)), self.value)

    def describe(self) -> str:
        return f"{self.feature}{self.op}{self.value:g}"


@dataclass(frozen=True, slots=True)
class RulesPolicy:
    """The first rule whose condition holds gives its discount (paper case 2)."""

    rules: tuple[Rule, ...]
    name: str = "rules"

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("a rules policy needs at least one rule")

    @property
    def reference_discount_pct(self) -> float:
        return self.rules[0].discount_pct

    def choose(self, context: PolicyContext) -> PolicyChoice:
        for rule in self.rules:
            if rule.matches(context.features):
                return PolicyChoice(rule.discount_pct, 1.0, rules=(rule.describe(),))
        return PolicyChoice(0.0, 1.0)


@dataclass(frozen=True, slots=True)
class ProfitPolicy:
    """The ladder level with the highest expected incremental margin, with exploration.

    ``margin`` is the gross margin as a fraction of the order value; a discount of d % costs
    d/100 of the value. With ``temperature`` 0, exploration is epsilon-greedy: a uniform ladder
    level with probability ``epsilon``. With ``temperature`` T > 0 (currency units) it is a
    softmax over the expected margins with a floor: level i has probability
    ``(1 - epsilon) * softmax(margin / T)_i + epsilon / k``, so the policy explores where the
    levels' margins are close (it is unsure which is best) and hardly where an offer clearly
    loses, while every level keeps at least ``epsilon / k`` (what off-policy evaluation needs).
    ``propensity`` is always the exact probability of the level finally chosen.
    """

    ladder: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0)
    margin: float = 0.3
    epsilon: float = 0.1
    temperature: float = 0.0
    min_margin: float = 0.0
    """An offer must be expected to earn at least this share of the order value more than no
    offer: a margin of safety against the model's own noise, since the level with the best
    estimate is also the one most likely overestimated."""
    name: str = "profit"

    def __post_init__(self) -> None:
        if not self.ladder or 0.0 not in self.ladder:
            raise ValueError("the ladder must include 0 (no discount)")
        if len(set(self.ladder)) != len(self.ladder):
            raise ValueError("ladder levels must be distinct")
        for level in self.ladder:
            _check_pct("ladder level", level)
        if not 0.0 < self.margin <= 1.0:
            raise ValueError(f"margin must be within (0, 1], got {self.margin}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be within [0, 1], got {self.epsilon}")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 <= self.min_margin <= 1.0:
            raise ValueError(f"min_margin must be within [0, 1], got {self.min_margin}")

    @property
    def reference_discount_pct(self) -> float:
        return min((level for level in self.ladder if level > 0), default=0.0)

    def expected_margins(self, context: PolicyContext) -> list[float]:
        """Expected incremental margin of each ladder level, in currency units, less the
        required margin of safety (``min_margin`` of the order value) for an offer."""
        value = context.order_value
        base = context.predict(0.0) * value * self.margin
        safety = self.min_margin * value
        return [
            context.predict(d) * value * (self.margin - d / 100.0) - base - safety if d else 0.0
            for d in self.ladder
        ]

    def probabilities(self, margins: Sequence[float], greedy: int) -> list[float]:
        """Each level's probability of being chosen, given the expected margins."""
        k = len(margins)
        if self.temperature <= 0.0:
            return [
                self.epsilon / k + (1.0 - self.epsilon if i == greedy else 0.0) for i in range(k)
            ]
        top = max(margins)
        weights = [math.exp((m - top) / self.temperature) for m in margins]
        total = math.fsum(weights)
        return [(1.0 - self.epsilon) * w / total + self.epsilon / k for w in weights]

    def choose(self, context: PolicyContext) -> PolicyChoice:
        levels = self.ladder
        margins = self.expected_margins(context)
        # Highest margin; ties go to the smaller discount.
        greedy = max(range(len(levels)), key=lambda i: (round(margins[i], 9), -levels[i]))
        k = len(levels)
        if self.temperature > 0.0:
            return self._sample(context.draw, levels, margins, greedy)
        explore = context.draw < self.epsilon
        index = min(int(context.draw / self.epsilon * k), k - 1) if explore else greedy
        propensity = self.epsilon / k + (1.0 - self.epsilon if index == greedy else 0.0)
        rules = (f"profit:argmax={levels[greedy]:g}",) + (("explore",) if explore else ())
        offering = sum(1 for level in levels if level > 0) / k
        offer_propensity = self.epsilon * offering + (1.0 - self.epsilon) * (levels[greedy] > 0)
        return PolicyChoice(
            levels[index], propensity, explore, rules, offer_propensity=offer_propensity
        )

    def _sample(
        self, draw: float, levels: tuple[float, ...], margins: list[float], greedy: int
    ) -> PolicyChoice:
        """Softmax exploration: the level whose cumulative probability first exceeds ``draw``."""
        probabilities = self.probabilities(margins, greedy)
        index, cumulative = len(levels) - 1, 0.0
        for i, probability in enumerate(probabilities):
            cumulative += probability
            if draw < cumulative:
                index = i
                break
        explore = index != greedy
        rules = (f"profit:argmax={levels[greedy]:g}",) + (("explore",) if explore else ())
        offer_propensity = math.fsum(p for p, d in zip(probabilities, levels, strict=True) if d > 0)
        return PolicyChoice(
            levels[index], probabilities[index], explore, rules, offer_propensity=offer_propensity
        )


def policy_names() -> Sequence[str]:
    return ("threshold", "linear", "rules", "profit")
