"""``linear``: D = a * P + b, clipped to [0, max_discount_pct] (paper section 4.2)."""

from __future__ import annotations

import math
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
class LinearPolicy(Policy):
    """D = a * P + b, clipped to [0, max_discount_pct] (paper section 4.2)."""

    a: float = 20.0
    b: float = 0.0
    max_discount_pct: float = 30.0
    name: str = "linear"

    def __post_init__(self) -> None:
        check_pct("max_discount_pct", self.max_discount_pct)
        for name, value in (("a", self.a), ("b", self.b)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> LinearPolicy:
        """``a`` (20), ``b`` (0) and ``max_discount_pct`` (30)."""
        return cls(
            a=entry_number(entry, "a", 20.0, minimum=-math.inf),
            b=entry_number(entry, "b", 0.0, minimum=-math.inf),
            max_discount_pct=entry_number(entry, "max_discount_pct", 30.0, maximum=100.0),
        )

    @property
    def reference_discount_pct(self) -> float:
        return self.max_discount_pct

    def discount_levels(self) -> DiscountLevels:
        return DiscountLevels((0.0, self.max_discount_pct), continuous=True)

    def choose(self, context: PolicyContext) -> PolicyChoice:
        raw = self.a * context.predict(0.0) + self.b
        discount = round(min(max(raw, 0.0), self.max_discount_pct), 2)
        rules = (f"linear:{self.a:g}*p+{self.b:g}",) if discount > 0 else ()
        return PolicyChoice(discount, 1.0, rules=rules)
