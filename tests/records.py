"""Offer and Decision records as the engine builds them, for tests that need one by hand."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.decisions import Decision, Offer, Reason

T0 = 1_767_225_600_000


def sample_offer(**changes: Any) -> Offer:
    """A granted offer of campaign ``spring``; ``changes`` replace fields."""
    offer = Offer(
        offer_id="o-1",
        user_id="u-1",
        campaign="spring",
        discount_pct=10.0,
        issued_at=T0,
        expires_at=T0 + 3_600_000,
        trigger_event_id="e-1",
        p_purchase=0.412345,
        model_version="lr-7",
        policy="threshold",
        propensity=1.0,
        explore=False,
        reasons=(Reason("cart_count_24h", 0.81), Reason("discount", -0.2)),
        rules=("p_purchase>0.3",),
    )
    return dataclasses.replace(offer, **changes)


def sample_decision(**changes: Any) -> Decision:
    """The decision behind ``sample_offer()``; ``changes`` replace fields."""
    decision = Decision(
        decision_id="d-1",
        user_id="u-1",
        campaign="spring",
        ts=T0,
        trigger_event_id="e-1",
        features={"cart_count_24h": 2.0, "purchase_count_30d": 0.0},
        discount_pct=10.0,
        propensity=1.0,
        p_purchase=0.412345,
        model_version="lr-7",
        policy="threshold",
        holdout=False,
        offer_id="o-1",
        explore=False,
        rules=("p_purchase>0.3",),
        proposed_discount_pct=10.0,
        proposed_propensity=1.0,
        offer_propensity=1.0,
        uplift_score=0.05,
        denied_by=None,
        order_value=35.5,
        cost_cents=355,
    )
    return dataclasses.replace(decision, **changes)


def denied_decision() -> Decision:
    """The same decision when the cooldown denied the offer."""
    return sample_decision(
        discount_pct=0.0,
        p_purchase=0.3,
        offer_id=None,
        rules=("p_purchase>0.3", "denied:cooldown"),
        denied_by="cooldown",
        cost_cents=0,
    )
