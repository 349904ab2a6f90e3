"""``profit``: over a discount ladder, the level maximising expected incremental margin
P(buy|x,d) * value * (m - d) - P(buy|x,0) * value * m, with exploration."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.policies.base import (
    ActionProbability,
    DiscountLevels,
    Policy,
    PolicyChoice,
    PolicyContext,
    check_pct,
    entry_number,
)


@dataclass(frozen=True, slots=True)
class ProfitPolicy(Policy):
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
            check_pct("ladder level", level)
        if not 0.0 < self.margin <= 1.0:
            raise ValueError(f"margin must be within (0, 1], got {self.margin}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be within [0, 1], got {self.epsilon}")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 <= self.min_margin <= 1.0:
            raise ValueError(f"min_margin must be within [0, 1], got {self.min_margin}")

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> ProfitPolicy:
        """``ladder`` ([0, 5, 10, 15, 20]), ``margin`` (0.3), ``epsilon`` (0.1),
        ``temperature`` (0) and ``min_margin`` (0)."""
        ladder = entry.get("ladder", [0, 5, 10, 15, 20])
        if not isinstance(ladder, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in ladder
        ):
            raise ValueError("'ladder' must be a list of numbers")
        return cls(
            ladder=tuple(float(v) for v in ladder),
            margin=entry_number(entry, "margin", 0.3, maximum=1.0),
            epsilon=entry_number(entry, "epsilon", 0.1, maximum=1.0),
            temperature=entry_number(entry, "temperature", 0.0),
            min_margin=entry_number(entry, "min_margin", 0.0, maximum=1.0),
        )

    @property
    def reference_discount_pct(self) -> float:
        return min((level for level in self.ladder if level > 0), default=0.0)

    def discount_levels(self) -> DiscountLevels:
        return DiscountLevels(self.ladder, is_ladder=True)

    def optimised_margin(self) -> float:
        return self.margin

    def exploration_rate(self) -> float:
        return self.epsilon

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

    def greedy_index(self, margins: Sequence[float]) -> int:
        """The ladder index with the highest margin; ties go to the smaller discount."""
        levels = self.ladder
        best, best_key = 0, (round(margins[0], 9), -levels[0])
        for index in range(1, len(levels)):
            key = (round(margins[index], 9), -levels[index])
            if key > best_key:
                best, best_key = index, key
        return best

    def probabilities(self, margins: Sequence[float], greedy: int) -> list[float]:
        """Each level's probability of being chosen, given the expected margins."""
        k = len(margins)
        if self.temperature <= 0.0:
            return self._epsilon_greedy(k, greedy)
        top = max(margins)
        weights = [math.exp((m - top) / self.temperature) for m in margins]
        total = math.fsum(weights)
        return [(1.0 - self.epsilon) * w / total + self.epsilon / k for w in weights]

    def action_probabilities(self, context: PolicyContext) -> tuple[ActionProbability, ...]:
        """The distribution ``choose`` samples from: epsilon-greedy, or softmax with a floor."""
        margins = self.expected_margins(context)
        shares = self.probabilities(margins, self.greedy_index(margins))
        return tuple(
            ActionProbability(level, share)
            for level, share in zip(self.ladder, shares, strict=True)
        )

    def _epsilon_greedy(self, k: int, greedy: int) -> list[float]:
        """Epsilon/k for each of the k levels, plus 1 - epsilon for the greedy one."""
        return [self.epsilon / k + (1.0 - self.epsilon if i == greedy else 0.0) for i in range(k)]

    def choose(self, context: PolicyContext) -> PolicyChoice:
        levels = self.ladder
        margins = self.expected_margins(context)
        greedy = self.greedy_index(margins)
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
