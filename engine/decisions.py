"""One decision from proposal to record: ids, holdout, eligibility, value and cost, and the
``Offer`` and ``Decision`` records the engine returns.

Pure helpers of ``engine/pipeline.py``: deterministic ids and draws from hashes, so a live
run and a backtest of the same events decide identically. The records are typed so that
readers use attributes; ``to_message`` gives the offer v1 / decision v1 message (only the
edges, the Kafka sinks and the backtest's decision log, need it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from dealstream_native import unit_hash

from engine.campaigns import Campaign
from engine.errors import InvalidEvent
from engine.events import BrowseEvent, Event
from engine.features.state import event_kind, trigger_category
from engine.labels import Arm
from engine.model.scoring import Scorer
from engine.policies.base import PolicyChoice, Predict

SCHEMA_VERSION = 1
"""Of the offer and decision messages."""


def in_holdout(campaign: Campaign, user_id: str) -> bool:
    """Whether the campaign holds the user out: a draw (``unit_hash``, BLAKE2b of campaign and
    user) below its holdout share, the same for the user in every run."""
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
    order_value: float
    """The value of the order a discount applies to (``order_value``)."""
    cost_cents: int
    """What the offer would take from the campaign's budget (0 without an offer)."""
    rules: list[str]


DENIED_RULE_PREFIX = "denied:"
"""A decision's rule ``denied:<guardrail>`` says which guardrail denied the policy's offer."""


class Reason(NamedTuple):
    """One of the terms that contributed most to an offer's score."""

    feature: str
    """A catalogue feature, ``discount``, or ``discount_x_<feature>``."""
    contribution: float
    """Signed contribution to the model's log-odds."""


@dataclass(frozen=True, slots=True)
class Offer:
    """An offer v1 (``schemas/offer.v1.json``): a discount granted to a user.

    The fields are the message's, in its order (``schema_version`` is always
    ``SCHEMA_VERSION``), so that ``to_message`` writes what the offers topic has always carried.
    """

    offer_id: str
    user_id: str
    campaign: str
    discount_pct: float
    issued_at: int
    """The trigger event's time (epoch ms), not the wall clock."""
    expires_at: int
    trigger_event_id: str
    p_purchase: float
    """Rounded to 6 decimals, as published."""
    model_version: str
    policy: str
    propensity: float
    """Rounded to 6 decimals, as published."""
    explore: bool
    reasons: tuple[Reason, ...]
    rules: tuple[str, ...]

    def to_message(self) -> dict[str, object]:
        return {
            "schema_version": SCHEMA_VERSION,
            "offer_id": self.offer_id,
            "user_id": self.user_id,
            "campaign": self.campaign,
            "discount_pct": self.discount_pct,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "trigger_event_id": self.trigger_event_id,
            "p_purchase": self.p_purchase,
            "model_version": self.model_version,
            "policy": self.policy,
            "propensity": self.propensity,
            "explore": self.explore,
            "reasons": [
                {"feature": reason.feature, "contribution": reason.contribution}
                for reason in self.reasons
            ],
            "rules": list(self.rules),
        }

    @classmethod
    def from_message(cls, message: object) -> Offer:
        """Read an offer message back; ``InvalidEvent`` when a field is missing or of the wrong
        type (value ranges are the schema's business: this trusts the engine's own output)."""
        fields = _fields_of(message)
        if _required(fields, "schema_version") != SCHEMA_VERSION:
            raise InvalidEvent(
                "unsupported_version", "schema_version must be 1", field="schema_version"
            )
        return cls(
            offer_id=_text(fields, "offer_id"),
            user_id=_text(fields, "user_id"),
            campaign=_text(fields, "campaign"),
            discount_pct=_number(fields, "discount_pct"),
            issued_at=_integer(fields, "issued_at"),
            expires_at=_integer(fields, "expires_at"),
            trigger_event_id=_text(fields, "trigger_event_id"),
            p_purchase=_number(fields, "p_purchase"),
            model_version=_text(fields, "model_version"),
            policy=_text(fields, "policy"),
            propensity=_number(fields, "propensity"),
            explore=_flag(fields, "explore"),
            reasons=_reasons(fields),
            rules=_texts(fields, "rules"),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision v1 (``schemas/decision.v1.json``), offer or not, holdout included.

    The published fields come first, in the message's order (``schema_version`` is always
    ``SCHEMA_VERSION``). The last three spare readers from re-deriving what the engine knew:
    ``denied_by`` is published only as a rule; ``order_value`` and ``cost_cents`` are not.
    """

    decision_id: str
    user_id: str
    campaign: str
    ts: int
    """The trigger event's time (epoch ms)."""
    trigger_event_id: str
    features: Mapping[str, float]
    discount_pct: float
    """The discount decided: 0 without an offer (holdout, no discount, guardrail)."""
    propensity: float
    """Rounded to 6 decimals; 1 when a guardrail denied the offer (that action was certain)."""
    p_purchase: float
    """Rounded to 6 decimals: the model's P(purchase) at ``discount_pct``."""
    model_version: str
    policy: str
    holdout: bool
    offer_id: str | None
    """The offer published for this decision; None when there was none."""
    explore: bool
    rules: tuple[str, ...]
    proposed_discount_pct: float
    proposed_propensity: float
    offer_propensity: float
    uplift_score: float
    denied_by: str | None
    """The guardrail that denied the policy's offer (published as the rule ``denied:<name>``)."""
    order_value: float | None
    """The value of the order the discount applies to. Not published: None on a decision read
    back from its message."""
    cost_cents: int | None
    """What the offer took from the campaign's budget, 0 without an offer. Not published: None
    on a decision read back from its message."""

    def to_message(self) -> dict[str, object]:
        return {
            "schema_version": SCHEMA_VERSION,
            "decision_id": self.decision_id,
            "user_id": self.user_id,
            "campaign": self.campaign,
            "ts": self.ts,
            "trigger_event_id": self.trigger_event_id,
            "features": dict(self.features),
            "discount_pct": self.discount_pct,
            "propensity": self.propensity,
            "p_purchase": self.p_purchase,
            "model_version": self.model_version,
            "policy": self.policy,
            "holdout": self.holdout,
            "offer_id": self.offer_id,
            "explore": self.explore,
            "rules": list(self.rules),
            "proposed_discount_pct": self.proposed_discount_pct,
            "proposed_propensity": self.proposed_propensity,
            "offer_propensity": self.offer_propensity,
            "uplift_score": self.uplift_score,
        }

    @classmethod
    def from_message(cls, message: object) -> Decision:
        """Read back a decision message as the engine writes it (every field it writes is
        required); ``InvalidEvent`` when a field is missing or of the wrong type."""
        fields = _fields_of(message)
        if fields.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise InvalidEvent(
                "unsupported_version", "schema_version must be 1", field="schema_version"
            )
        rules = _texts(fields, "rules")
        denied = [rule for rule in rules if rule.startswith(DENIED_RULE_PREFIX)]
        return cls(
            decision_id=_text(fields, "decision_id"),
            user_id=_text(fields, "user_id"),
            campaign=_text(fields, "campaign"),
            ts=_integer(fields, "ts"),
            trigger_event_id=_text(fields, "trigger_event_id"),
            features=_features(fields),
            discount_pct=_number(fields, "discount_pct"),
            propensity=_number(fields, "propensity"),
            p_purchase=_number(fields, "p_purchase"),
            model_version=_text(fields, "model_version"),
            policy=_text(fields, "policy"),
            holdout=_flag(fields, "holdout"),
            offer_id=_optional_text(fields, "offer_id"),
            explore=_flag(fields, "explore"),
            rules=rules,
            proposed_discount_pct=_number(fields, "proposed_discount_pct"),
            proposed_propensity=_number(fields, "proposed_propensity"),
            offer_propensity=_number(fields, "offer_propensity"),
            uplift_score=_number(fields, "uplift_score"),
            denied_by=denied[0].removeprefix(DENIED_RULE_PREFIX) if denied else None,
            order_value=None,
            cost_cents=None,
        )


def offer_beside(
    decision: Decision, expires_at: int, reasons: Sequence[tuple[str, float]]
) -> Offer:
    """The offer published beside a decision that grants one: everything but its expiry and
    its reasons is the decision's (the outbox stores only those two: streams/adapters/outbox.py)."""
    assert decision.offer_id is not None, "a decision without an offer has no offer beside it"
    return Offer(
        offer_id=decision.offer_id,
        user_id=decision.user_id,
        campaign=decision.campaign,
        discount_pct=decision.discount_pct,
        issued_at=decision.ts,
        expires_at=expires_at,
        trigger_event_id=decision.trigger_event_id,
        p_purchase=decision.p_purchase,
        model_version=decision.model_version,
        policy=decision.policy,
        propensity=decision.propensity,
        explore=decision.explore,
        reasons=tuple(Reason(feature, contribution) for feature, contribution in reasons),
        rules=decision.rules,
    )


def make_decision(
    proposal: Proposal,
    offer_id: str | None,
    discount: float,
    propensity: float,
    p_purchase: float,
    rules: Sequence[str],
    denied_by: str | None,
) -> Decision:
    """Every settled decision, offer or not (``rules`` already name ``denied_by``)."""
    campaign, event, choice = proposal.campaign, proposal.event, proposal.choice
    proposed = proposal.proposed
    return Decision(
        decision_id=proposal.decision_id,
        user_id=event.user_id,
        campaign=campaign.name,
        ts=event.ts,
        trigger_event_id=event.event_id,
        features=proposal.features,
        discount_pct=discount,
        propensity=round(propensity, 6),
        p_purchase=round(p_purchase, 6),
        model_version=proposal.model_version,
        policy=campaign.policy.name,
        holdout=proposal.holdout,
        offer_id=offer_id,
        explore=choice.explore,
        rules=tuple(rules),
        proposed_discount_pct=proposed.discount_pct,
        proposed_propensity=round(proposed.propensity, 6),
        offer_propensity=round(choice.offer_probability, 6),
        uplift_score=round(proposal.uplift_score, 6),
        denied_by=denied_by,
        order_value=proposal.order_value,
        cost_cents=proposal.cost_cents if offer_id is not None else 0,
    )


@dataclass(frozen=True, slots=True)
class DecisionDraft:
    """A proposal's outputs before the ledger settles it: what the decision publishes if the
    ledger grants its offer, and what a denial changes.

    Built before the ledger call, so that a ledger that keeps an outbox can store a batch's
    outputs in the same atomic step as its guardrail effects (``streams/adapters/outbox.py``):
    after a crash they are published from there, and ``settled`` gives the same records the
    batch would have published.
    """

    decision: Decision
    """The decision as proposed: with its offer when it has one."""
    offer: Offer | None
    """The offer, if the proposal makes one and the ledger grants it."""
    p_no_offer: float
    """The model's P(purchase) without a discount (unrounded): a denied decision's."""

    def settled(self, granted: bool, denied_by: str | None) -> tuple[Offer | None, Decision]:
        """The offer (if granted) and the decision, once the ledger decided."""
        if granted or self.offer is None:
            return self.offer, self.decision
        decision = self.decision
        rules, propensity, p_purchase = decision.rules, decision.propensity, decision.p_purchase
        if denied_by is not None:
            # A guardrail, not the policy, chose "no discount": that action was certain. The
            # policy's own proposal stays in the record for analysis.
            rules = (*rules, f"{DENIED_RULE_PREFIX}{denied_by}")
            propensity = 1.0
            p_purchase = round(self.p_no_offer, 6)
        denied = replace(
            decision,
            offer_id=None,
            discount_pct=0.0,
            propensity=propensity,
            p_purchase=p_purchase,
            rules=rules,
            denied_by=denied_by,
            cost_cents=0,
        )
        return None, denied


# -- reading messages back ------------------------------------------------------------------


def _fields_of(message: object) -> Mapping[str, object]:
    if not isinstance(message, Mapping):
        raise InvalidEvent("not_an_object", "a message must be a JSON object")
    return message


def _required(fields: Mapping[str, object], name: str) -> object:
    if name not in fields:
        raise InvalidEvent("missing_field", f"field {name!r} is required", field=name)
    return fields[name]


def _text(fields: Mapping[str, object], name: str) -> str:
    value = _required(fields, name)
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string", field=name)
    return value


def _optional_text(fields: Mapping[str, object], name: str) -> str | None:
    return None if _required(fields, name) is None else _text(fields, name)


def _number(fields: Mapping[str, object], name: str) -> float:
    """The number as written: an integer stays one, so that it is published the same again."""
    value = _required(fields, name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidEvent("wrong_type", f"{name} must be a number", field=name)
    return value


def _integer(fields: Mapping[str, object], name: str) -> int:
    value = _required(fields, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidEvent("wrong_type", f"{name} must be an integer", field=name)
    return value


def _flag(fields: Mapping[str, object], name: str) -> bool:
    value = _required(fields, name)
    if not isinstance(value, bool):
        raise InvalidEvent("wrong_type", f"{name} must be true or false", field=name)
    return value


def _texts(fields: Mapping[str, object], name: str) -> tuple[str, ...]:
    value = _required(fields, name)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidEvent("wrong_type", f"{name} must be a list of strings", field=name)
    return tuple(value)


def _features(fields: Mapping[str, object]) -> dict[str, float]:
    value = _required(fields, "features")
    if not isinstance(value, Mapping):
        raise InvalidEvent("wrong_type", "features must be an object", field="features")
    features: dict[str, float] = {}
    for name, number in value.items():
        if not isinstance(number, int | float) or isinstance(number, bool):
            raise InvalidEvent(
                "wrong_type", f"feature {name!r} must be a number", field=f"features.{name}"
            )
        features[str(name)] = number
    return features


def _reasons(fields: Mapping[str, object]) -> tuple[Reason, ...]:
    value = _required(fields, "reasons")
    if not isinstance(value, list):
        raise InvalidEvent("wrong_type", "reasons must be a list", field="reasons")
    reasons: list[Reason] = []
    for item in value:
        entry = _fields_of(item)
        reasons.append(Reason(_text(entry, "feature"), _number(entry, "contribution")))
    return tuple(reasons)
