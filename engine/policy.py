"""Discount policies: turn a purchase probability into a discount."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    discount_pct: float
    propensity: float
    """Probability that the policy chose this discount (1.0 for deterministic policies)."""
    explore: bool = False
    rules: tuple[str, ...] = field(default_factory=tuple)


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def choose(self, p_purchase: float, features: Mapping[str, float]) -> PolicyChoice: ...


@dataclass(frozen=True, slots=True)
class ThresholdPolicy:
    """P(purchase) > threshold gives a fixed discount (the paper's case 1: P > 0.5 -> 10 %)."""

    threshold: float = 0.5
    discount_pct: float = 10.0
    name: str = "threshold"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if not 0.0 <= self.discount_pct <= 100.0:
            raise ValueError(f"discount_pct must be within [0, 100], got {self.discount_pct}")

    def choose(self, p_purchase: float, features: Mapping[str, float]) -> PolicyChoice:
        if p_purchase > self.threshold:
            return PolicyChoice(self.discount_pct, 1.0, rules=(f"p_purchase>{self.threshold:g}",))
        return PolicyChoice(0.0, 1.0)
