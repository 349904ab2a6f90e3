"""One decision before the ledger settles it: ids, holdout, eligibility, value and cost.

Pure helpers of ``engine/pipeline.py``: deterministic ids and draws from hashes, so a live
run and a backtest of the same events decide identically.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from engine.campaigns import Campaign
from engine.events import BrowseEvent, Event
from engine.labels import Arm
from engine.policies.base import PolicyChoice, Predict
from engine.scoring import Scorer
from engine.state import event_kind, trigger_category

SCHEMA_VERSION = 1
"""Of the offer and decision messages."""


def stable_id(prefix: str, *parts: str) -> str:
    """A short deterministic id: the same campaign and trigger event always give the same id."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()
    return f"{prefix}{digest}"


def unit_hash(*parts: str) -> float:
    """A deterministic uniform number in [0, 1) from the given strings."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_holdout(campaign: Campaign, user_id: str) -> bool:
    return campaign.holdout > 0 and unit_hash("holdout", campaign.name, user_id) < campaign.holdout


def is_eligible(
    campaign: Campaign, event: Event, features: dict[str, float], kind: str | None = None
) -> bool:
    """Whether the event triggers a decision of the campaign (``kind``: ``event_kind(event)``)."""
    if (kind if kind is not None else event_kind(event)) not in campaign.triggers:
        return False
    if campaign.categories and trigger_category(event) not in campaign.categories:
        return False
    returning = features.get("purchase_count_30d", 0.0) > 0
    if campaign.customers == "new":
        return not returning
    if campaign.customers == "returning":
        return returning
    return True


def order_value(campaign: Campaign, event: Event, features: dict[str, float]) -> float:
    """The expected value of the order a discount applies to (the whole cart, not one item).

    The cart in the making (the items put in the cart in the last hour, the trigger's price
    included when it is a cart event) when there is one; else the larger of the user's average
    order over 30 days and the trigger item's price; else the campaign's default."""
    cart = features.get("cart_value_1h", 0.0)
    if cart > 0:
        return cart
    price = event.price if isinstance(event, BrowseEvent) else 0.0
    average = features.get("avg_order_value_30d", 0.0)
    if price > 0 or average > 0:
        return max(price, average)
    return campaign.default_order_value


def offer_cost_cents(discount_pct: float, value: float) -> int:
    """What an offer takes from the budget: the discount on the order value, in cents, rounded
    up so that no offer is ever free (the epsilon absorbs binary-float noise)."""
    return math.ceil(discount_pct * value - 1e-9)


@dataclass(slots=True)
class Proposal:
    """A decision before the ledger settles it."""

    campaign: Campaign
    event: Event
    features: dict[str, float]
    choice: PolicyChoice
    """What the decision does: the policy's proposal, or no offer in the holdout."""
    proposed: PolicyChoice
    """What the policy proposed (capped by the campaign's maximum), holdout users included."""
    uplift_score: float
    """Model P(purchase) at the proposed discount (or the policy's reference discount when it
    proposes none) minus P(purchase) without an offer: the served uplift score."""
    holdout: bool
    arm: Arm
    """Where the decision counts in the campaign's stop-loss comparison."""
    predict: Predict
    """The model's P(purchase) at a discount for this user, memoised per discount."""
    scorer: Scorer
    """What ``predict`` computes with; also gives the offer's ``reasons`` cheaply."""
    p_purchase: float
    model_version: str
    decision_id: str
    offer_id: str | None
    cost_cents: int
    """What the offer would take from the campaign's budget (0 without an offer)."""
    rules: list[str]


def offer_message(
    proposal: Proposal,
    offer_id: str,
    discount: float,
    p_purchase: float,
    rules: list[str],
    reasons: list[tuple[str, float]],
) -> dict[str, object]:
    """The offer v1 message of a granted proposal."""
    campaign, event, choice = proposal.campaign, proposal.event, proposal.choice
    return {
        "schema_version": SCHEMA_VERSION,
        "offer_id": offer_id,
        "user_id": event.user_id,
        "campaign": campaign.name,
        "discount_pct": discount,
        "issued_at": event.ts,
        "expires_at": event.ts + campaign.offer_ttl_ms,
        "trigger_event_id": event.event_id,
        "p_purchase": round(p_purchase, 6),
        "model_version": proposal.model_version,
        "policy": campaign.policy.name,
        "propensity": round(choice.propensity, 6),
        "explore": choice.explore,
        "reasons": [{"feature": n, "contribution": c} for n, c in reasons],
        "rules": rules,
    }


def decision_message(
    proposal: Proposal,
    offer_id: str | None,
    discount: float,
    propensity: float,
    p_purchase: float,
    rules: list[str],
) -> dict[str, object]:
    """The decision v1 message: every settled decision, offer or not."""
    campaign, event, choice = proposal.campaign, proposal.event, proposal.choice
    proposed = proposal.proposed
    return {
        "schema_version": SCHEMA_VERSION,
        "decision_id": proposal.decision_id,
        "user_id": event.user_id,
        "campaign": campaign.name,
        "ts": event.ts,
        "trigger_event_id": event.event_id,
        "features": proposal.features,
        "discount_pct": discount,
        "propensity": round(propensity, 6),
        "p_purchase": round(p_purchase, 6),
        "model_version": proposal.model_version,
        "policy": campaign.policy.name,
        "holdout": proposal.holdout,
        "offer_id": offer_id,
        "explore": choice.explore,
        "rules": rules,
        "proposed_discount_pct": proposed.discount_pct,
        "proposed_propensity": round(proposed.propensity, 6),
        "offer_propensity": round(choice.offer_probability, 6),
        "uplift_score": round(proposal.uplift_score, 6),
    }
