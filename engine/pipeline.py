"""The engine's main job for one micro-batch: features, labels, scoring, decisions, offers.

``DiscountEngine.process`` is the one function both the live worker and backtests call. It
takes decoded events with their source positions, applies them to the feature store in one
call, replays the batch to get each event's feature vector as of its own event time, labels
pending decisions, learns from the labels in event order, and decides for every trigger event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.campaigns import Campaign, default_campaigns
from engine.events import Event, PurchaseEvent
from engine.features import (
    apply_ops,
    compute_features,
    event_kind,
    event_ops,
    trigger_category,
)
from engine.labels import LabelledExample, PendingDecision, PendingLabels
from engine.model import PurchaseModel
from engine.store import FeatureStore, Position, StateUpdate, UpdateStatus

OFFER_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Incoming:
    event: Event
    position: Position | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    allowed_lateness_ms: int = 3600 * 1000
    attribution_window_ms: int = 24 * 3600 * 1000


@dataclass(slots=True)
class BatchResult:
    statuses: list[UpdateStatus]
    offers: list[dict[str, object]] = field(default_factory=list)
    decisions: list[dict[str, object]] = field(default_factory=list)
    training: list[dict[str, object]] = field(default_factory=list)

    def count(self, status: UpdateStatus) -> int:
        return sum(1 for s in self.statuses if s is status)


def stable_id(prefix: str, *parts: str) -> str:
    """A short deterministic id: the same campaign and trigger event always give the same id."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()
    return f"{prefix}{digest}"


class DiscountEngine:
    """Feature store + model + campaigns, wired once by the composition root."""

    def __init__(
        self,
        store: FeatureStore,
        *,
        model: PurchaseModel | None = None,
        campaigns: Sequence[Campaign] | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.store = store
        self.model = model if model is not None else PurchaseModel()
        self.campaigns = tuple(campaigns) if campaigns is not None else default_campaigns()
        self.config = config if config is not None else EngineConfig()
        self.labels = PendingLabels(self.config.attribution_window_ms)
        self.clock_ms = 0
        """Event-time clock: the latest event time this engine has seen."""
        self._last_decision: dict[tuple[str, str], int] = {}

    async def process(self, batch: Sequence[Incoming]) -> BatchResult:
        updates = [
            StateUpdate(
                user_id=item.event.user_id,
                event_id=item.event.event_id,
                ts=item.event.ts,
                ops=event_ops(item.event),
                position=item.position,
            )
            for item in batch
        ]
        outcome = await self.store.apply_batch(
            updates, allowed_lateness_ms=self.config.allowed_lateness_ms
        )
        result = BatchResult(statuses=outcome.statuses)
        states = outcome.before
        for item, update, status in zip(batch, updates, outcome.statuses, strict=True):
            if status is not UpdateStatus.APPLIED:
                continue
            event = item.event
            state = states[event.user_id]
            apply_ops(state, update.ops)
            self.clock_ms = max(self.clock_ms, event.ts)
            self._learn(self.labels.expire(self.clock_ms), result)
            features = compute_features(state, category=trigger_category(event))
            if isinstance(event, PurchaseEvent):
                example = self.labels.on_purchase(event.user_id, event.ts, event.offer_id)
                if example is not None:
                    self._learn([example], result)
                continue
            kind = event_kind(event)
            for campaign in self.campaigns:
                if kind in campaign.triggers:
                    self._decide(campaign, event, features, result)
        return result

    def _learn(self, examples: Sequence[LabelledExample], result: BatchResult) -> None:
        for example in examples:
            decision = example.decision
            self.model.learn(decision.features, decision.discount_pct, example.label)
            result.training.append(example.to_message())

    def _decide(
        self, campaign: Campaign, event: Event, features: dict[str, float], result: BatchResult
    ) -> None:
        key = (event.user_id, campaign.name)
        last = self._last_decision.get(key)
        interval = campaign.decision_interval_ms
        if interval > 0 and last is not None and abs(event.ts - last) < interval:
            return
        self._last_decision[key] = max(event.ts, last or event.ts)
        p_no_discount = self.model.predict(features, 0.0)
        choice = campaign.policy.choose(p_no_discount, features)
        # Outputs report P(purchase) at the discount actually chosen.
        p_purchase = (
            self.model.predict(features, choice.discount_pct)
            if choice.discount_pct > 0
            else p_no_discount
        )
        model_version = self.model.version
        decision_id = stable_id("d-", campaign.name, event.event_id)
        offer_id: str | None = None
        if choice.discount_pct > 0:
            offer_id = stable_id("o-", campaign.name, event.event_id)
            reasons = self.model.contributions(features, choice.discount_pct)
            result.offers.append(
                {
                    "schema_version": OFFER_SCHEMA_VERSION,
                    "offer_id": offer_id,
                    "user_id": event.user_id,
                    "campaign": campaign.name,
                    "discount_pct": choice.discount_pct,
                    "issued_at": event.ts,
                    "expires_at": event.ts + campaign.offer_ttl_ms,
                    "trigger_event_id": event.event_id,
                    "p_purchase": round(p_purchase, 6),
                    "model_version": model_version,
                    "policy": campaign.policy.name,
                    "propensity": choice.propensity,
                    "explore": choice.explore,
                    "reasons": [{"feature": n, "contribution": c} for n, c in reasons],
                    "rules": list(choice.rules),
                }
            )
        result.decisions.append(
            {
                "schema_version": OFFER_SCHEMA_VERSION,
                "decision_id": decision_id,
                "user_id": event.user_id,
                "campaign": campaign.name,
                "ts": event.ts,
                "trigger_event_id": event.event_id,
                "features": features,
                "discount_pct": choice.discount_pct,
                "propensity": choice.propensity,
                "p_purchase": round(p_purchase, 6),
                "model_version": model_version,
                "policy": campaign.policy.name,
                "holdout": False,
                "offer_id": offer_id,
            }
        )
        self.labels.add(
            PendingDecision(
                decision_id=decision_id,
                user_id=event.user_id,
                campaign=campaign.name,
                ts=event.ts,
                features=features,
                discount_pct=choice.discount_pct,
                propensity=choice.propensity,
                model_version=model_version,
                offer_id=offer_id,
            )
        )
