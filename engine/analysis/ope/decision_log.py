"""Reading a decision log for off-policy evaluation: decision v1 JSON lines plus ``reward``.

Each usable line becomes a :class:`LoggedDecision`. The logged action is what actually
happened: ``discount_pct`` with its ``propensity`` (a guardrail's denial is logged as discount
0 with propensity 1, a holdout decision likewise; both are kept as valid data for the
no-discount action). Lines that cannot be used are counted by reason with their line numbers
and never stop the read:

``invalid_json``, ``not_an_object``, ``missing_propensity``, ``bad_propensity`` (not a number
in (0, 1]), ``missing_reward``, ``bad_reward`` (not a finite number), ``bad_discount``
(missing, or not within [0, 100]), ``bad_features`` (not an object of numbers).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

KEEP_LINE_NUMBERS = 10
"""Line numbers kept per reason for the report."""


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One logged decision with its outcome."""

    discount_pct: float
    propensity: float
    reward: float
    features: Mapping[str, float] = field(default_factory=dict)
    campaign: str = ""
    user_id: str = ""
    decision_id: str = ""
    trigger_event_id: str = ""
    p_purchase: float | None = None
    holdout: bool = False
    denied: bool = False
    """A guardrail, not the policy, chose "no discount" (a ``denied:<rule>`` entry in rules)."""
    line: int = 0


@dataclass(slots=True)
class DecisionLog:
    records: list[LoggedDecision] = field(default_factory=list)
    lines: int = 0
    """Non-blank lines read."""
    bad: Counter[str] = field(default_factory=Counter)
    bad_lines: dict[str, list[int]] = field(default_factory=dict)

    def reject(self, reason: str, line: int) -> None:
        self.bad[reason] += 1
        kept = self.bad_lines.setdefault(reason, [])
        if len(kept) < KEEP_LINE_NUMBERS:
            kept.append(line)

    def summary(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "valid": len(self.records),
            "bad": dict(sorted(self.bad.items())),
            "bad_lines": {k: v for k, v in sorted(self.bad_lines.items())},
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _parse(obj: dict[str, Any], line: int) -> LoggedDecision | str:
    """The record, or the reason it cannot be used."""
    if "propensity" not in obj or obj["propensity"] is None:
        return "missing_propensity"
    propensity = _number(obj["propensity"])
    if propensity is None or not 0.0 < propensity <= 1.0:
        return "bad_propensity"
    if "reward" not in obj or obj["reward"] is None:
        return "missing_reward"
    reward = _number(obj["reward"])
    if reward is None:
        return "bad_reward"
    discount = _number(obj.get("discount_pct"))
    if discount is None or not 0.0 <= discount <= 100.0:
        return "bad_discount"
    raw_features = obj.get("features") or {}
    if not isinstance(raw_features, dict):
        return "bad_features"
    features: dict[str, float] = {}
    for name, value in raw_features.items():
        number = _number(value)
        if number is None:
            return "bad_features"
        features[str(name)] = number
    rules = obj.get("rules") or []
    denied = isinstance(rules, list) and any(
        isinstance(rule, str) and rule.startswith("denied:") for rule in rules
    )
    p_purchase = _number(obj.get("p_purchase"))
    return LoggedDecision(
        discount_pct=discount,
        propensity=propensity,
        reward=reward,
        features=features,
        campaign=str(obj.get("campaign") or ""),
        user_id=str(obj.get("user_id") or ""),
        decision_id=str(obj.get("decision_id") or ""),
        trigger_event_id=str(obj.get("trigger_event_id") or ""),
        p_purchase=p_purchase,
        holdout=obj.get("holdout") is True,
        denied=denied,
        line=line,
    )


def read_decision_log(lines: Iterable[bytes | str]) -> DecisionLog:
    """Parse decision v1 + ``reward`` JSON lines; blank lines are skipped, bad ones counted."""
    log = DecisionLog()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        log.lines += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.reject("invalid_json", number)
            continue
        if not isinstance(obj, dict):
            log.reject("not_an_object", number)
            continue
        parsed = _parse(obj, number)
        if isinstance(parsed, str):
            log.reject(parsed, number)
        else:
            log.records.append(parsed)
    return log
