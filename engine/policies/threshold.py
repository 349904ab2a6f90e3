"""``threshold``: P(buy | no discount) > t gives a fixed discount
(paper case 1: P > 0.5 -> 10 %)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.policies.base import (
    DiscountLevels,
    Policy,
    PolicyChoice,
    PolicyContext,
    check_pct,
    entry_number,
)


@dataclass(frozen=True, slots=True)
class ThresholdPolicy(Policy):
    """P(purchase) > threshold gives a fixed discount (the paper's case 1: P > 0.5 -> 10 %)."""

    threshold: float = 0.5
    discount_pct: float = 10.0
    name: str = "threshold"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        check_pct("discount_pct", self.discount_pct)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> ThresholdPolicy:
        """``threshold`` (0.5) and ``discount_pct`` (10)."""
        return cls(
            threshold=entry_number(entry, "threshold", 0.5, maximum=1.0),
            discount_pct=entry_number(entry, "discount_pct", 10.0, maximum=100.0),
        )

    @property
    def reference_discount_pct(self) -> float:
        return self.discount_pct

    def discount_levels(self) -> DiscountLevels:
        return DiscountLevels((0.0, self.discount_pct))

    def choose(self, context: PolicyContext) -> PolicyChoice:
        if context.predict(0.0) > self.threshold:
            return PolicyChoice(self.discount_pct, 1.0, rules=(f"p_purchase>{self.threshold:g}",))
        return PolicyChoice(0.0, 1.0)
