"""Target policies for off-policy evaluation: the distribution pi(discount | x) per decision.

- ``constant:D``: every decision gets D % (a point mass).
- ``campaigns:FILE.toml`` (or a path ending in ``.toml``): each logged decision is evaluated
  with the campaign of the same name in the file, as the engine would have decided it: the
  campaign's holdout (same user hash as live) gives 0 %, deterministic policies a point mass,
  the profit policy its epsilon-greedy distribution (greedy level 1 - eps + eps/k, the others
  eps/k), and ``max_discount_pct`` caps the result. Decisions of campaigns missing from the file
  are skipped and counted. When no logged campaign name is in the file and the file has a single
  campaign, that campaign is evaluated on every decision ("what if we had run this instead").

Stateful guardrails (decision interval, cooldown, offers per day, budget) depend on what the
target itself would have offered before, so they are not replayed here; that is the backtest's
job. Policies that need P(purchase | x, d) (threshold, linear, profit) get it from a
PurchaseModel learned *prequentially* over the log in log order: decision i is decided with the
model trained on decisions before i (label = reward > 0), as a live model learning from the same
stream would have, and never with decision i's own outcome. The logged ``p_purchase`` is not
enough: it exists only for the logged discount, while the profit policy compares every level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.analysis.ope.decision_log import LoggedDecision
from engine.analysis.ope.errors import OpeError
from engine.campaigns import Campaign, CampaignError, load_campaigns
from engine.decisions import in_holdout
from engine.model.purchase_model import PurchaseModel
from engine.policies.base import Policy, PolicyContext, PolicyError

Distribution = dict[float, float]
"""Discount percentage -> probability under the target."""


@dataclass(slots=True)
class TargetActions:
    """Per record, the target's distribution, or None when the record is not evaluated."""

    distributions: list[Distribution | None]
    details: dict[str, Any] = field(default_factory=dict)


class TargetPolicy(Protocol):
    @property
    def description(self) -> str: ...

    def actions(self, records: Sequence[LoggedDecision]) -> TargetActions: ...


def action_key(discount_pct: float) -> float:
    """Discounts compare after rounding to 1e-6 (logs round what they write)."""
    return round(float(discount_pct), 6)


@dataclass(frozen=True, slots=True)
class ConstantTarget:
    """Every decision gets ``discount_pct``."""

    discount_pct: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.discount_pct <= 100.0:
            raise OpeError(f"constant discount must be within [0, 100], got {self.discount_pct:g}")

    @property
    def description(self) -> str:
        return f"constant:{self.discount_pct:g}"

    def actions(self, records: Sequence[LoggedDecision]) -> TargetActions:
        point = {action_key(self.discount_pct): 1.0}
        return TargetActions([dict(point) for _ in records])


def policy_distribution(policy: Policy, context: PolicyContext) -> Distribution:
    """pi(discount | context) of a policy, exactly, as the policy states it
    (``Policy.action_probabilities``)."""
    try:
        probabilities = policy.action_probabilities(context)
    except PolicyError as exc:
        raise OpeError(str(exc)) from None
    dist: Distribution = {}
    for action in probabilities:
        key = action_key(action.discount_pct)
        dist[key] = dist.get(key, 0.0) + action.probability
    return dist


def _cap(dist: Distribution, maximum: float) -> Distribution:
    capped: Distribution = {}
    for level, prob in dist.items():
        key = action_key(min(level, maximum))
        capped[key] = capped.get(key, 0.0) + prob
    return capped


def _order_value(campaign: Campaign, features: Mapping[str, float]) -> float:
    """As the engine's order value, without the trigger item's price (not in the log)."""
    aov = features.get("avg_order_value_30d", 0.0)
    return aov if aov > 0 else campaign.default_order_value


@dataclass(frozen=True, slots=True)
class CampaignsTarget:
    campaigns: tuple[Campaign, ...]
    source: str = "campaigns"

    @property
    def description(self) -> str:
        return f"campaigns:{self.source} ({', '.join(c.name for c in self.campaigns)})"

    def _assignment(self, records: Sequence[LoggedDecision]) -> list[Campaign | None]:
        by_name = {c.name: c for c in self.campaigns}
        if any(r.campaign in by_name for r in records):
            return [by_name.get(r.campaign) for r in records]
        if len(self.campaigns) == 1:
            return [self.campaigns[0]] * len(records)
        logged = sorted({r.campaign for r in records})
        shown = ", ".join(logged[:5]) + (", ..." if len(logged) > 5 else "")
        raise OpeError(
            f"no logged campaign ({shown}) is named in the target file "
            f"({', '.join(by_name)}); rename a campaign to match, or use a file with a single "
            "campaign to evaluate it on every decision"
        )

    def actions(self, records: Sequence[LoggedDecision]) -> TargetActions:
        assigned = self._assignment(records)
        needs_model = any(c is not None and c.policy.uses_model for c in assigned)
        model = PurchaseModel() if needs_model else None
        out: list[Distribution | None] = []
        per_campaign: dict[str, int] = {}
        for record, campaign in zip(records, assigned, strict=True):
            if campaign is None:
                out.append(None)
            else:
                per_campaign[campaign.name] = per_campaign.get(campaign.name, 0) + 1
                out.append(self._distribution(campaign, record, model))
            if model is not None:
                model.learn_one(record.features, record.discount_pct, int(record.reward > 0))
        skipped = sum(1 for d in out if d is None)
        details: dict[str, Any] = {"evaluated_by_campaign": per_campaign, "skipped": skipped}
        return TargetActions(out, details)

    @staticmethod
    def _distribution(
        campaign: Campaign, record: LoggedDecision, model: PurchaseModel | None
    ) -> Distribution:
        if in_holdout(campaign, record.user_id):
            return {0.0: 1.0}
        features = record.features
        predictions: dict[float, float] = {}

        def predict(discount_pct: float) -> float:
            if model is None:
                raise OpeError("internal: a policy asked for a prediction without a model")
            if discount_pct not in predictions:
                predictions[discount_pct] = model.predict_one(features, discount_pct)
            return predictions[discount_pct]

        context = PolicyContext(
            features=features,
            predict=predict,
            order_value=_order_value(campaign, features),
            draw=0.5,
            user_id=record.user_id,
            trigger_event_id=record.trigger_event_id,
        )
        return _cap(policy_distribution(campaign.policy, context), campaign.max_discount_pct)


def parse_target(spec: str) -> TargetPolicy:
    """``constant:D``, ``campaigns:FILE.toml`` or a path to a TOML file."""
    text = spec.strip()
    if text.startswith("constant:"):
        raw = text.removeprefix("constant:")
        try:
            value = float(raw)
        except ValueError:
            raise OpeError(f"constant target needs a number, got {raw!r}") from None
        return ConstantTarget(value)
    path_text = text.removeprefix("campaigns:")
    if text.startswith("campaigns:") or path_text.endswith(".toml") or Path(path_text).is_file():
        path = Path(path_text)
        try:
            campaigns = load_campaigns(path)
        except CampaignError as exc:
            raise OpeError(f"target {spec!r}: {exc}") from None
        return CampaignsTarget(campaigns, source=str(path))
    raise OpeError(
        f"unknown target {spec!r}: use constant:DISCOUNT (e.g. constant:10) or campaigns:FILE.toml"
    )
