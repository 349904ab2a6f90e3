"""``rules``: feature conditions -> discount, the first match wins
(paper case 2: ``purchase_frequency_30d`` > 3 -> 20 %)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.policies.base import (
    DiscountLevels,
    Policy,
    PolicyChoice,
    PolicyContext,
    check_pct,
    entry_number,
)

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
        check_pct("discount_pct", self.discount_pct)

    def matches(self, features: Mapping[str, float]) -> bool:
        return _OPERATORS[self.op](float(features.get(self.feature, 0.0)), self.value)

    def describe(self) -> str:
        return f"{self.feature}{self.op}{self.value:g}"


def _rule(index: int, item: object) -> Rule:
    """Rule #``index`` of a campaign's ``rules`` list."""
    required = ("feature", "value", "discount_pct")
    if (
        not isinstance(item, dict)
        or not all(key in item for key in required)
        or not isinstance(item["feature"], str)
    ):
        raise ValueError(f"rule #{index} needs 'feature', 'op', 'value', 'discount_pct'")
    feature, op = item["feature"], str(item.get("op", ">"))
    value = entry_number(item, "value", 0.0, minimum=-math.inf)
    discount_pct = entry_number(item, "discount_pct", 0.0, maximum=100.0)
    try:
        return Rule(feature=feature, op=op, value=value, discount_pct=discount_pct)
    except ValueError as exc:
        raise ValueError(f"rule #{index}: {exc}") from None


@dataclass(frozen=True, slots=True)
class RulesPolicy(Policy):
    """The first rule whose condition holds gives its discount (paper case 2)."""

    rules: tuple[Rule, ...]
    name: str = "rules"
    uses_model: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("a rules policy needs at least one rule")

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> RulesPolicy:
        """A non-empty ``rules`` list of ``{feature, op (">"), value, discount_pct}`` tables."""
        raw = entry.get("rules")
        if not isinstance(raw, list) or not raw:
            raise ValueError("policy 'rules' needs a non-empty 'rules' list")
        return cls(rules=tuple(_rule(index, item) for index, item in enumerate(raw, start=1)))

    @property
    def reference_discount_pct(self) -> float:
        return self.rules[0].discount_pct

    def discount_levels(self) -> DiscountLevels:
        return DiscountLevels((0.0, *(rule.discount_pct for rule in self.rules)))

    def choose(self, context: PolicyContext) -> PolicyChoice:
        for rule in self.rules:
            if rule.matches(context.features):
                return PolicyChoice(rule.discount_pct, 1.0, rules=(rule.describe(),))
        return PolicyChoice(0.0, 1.0)
