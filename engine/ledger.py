"""The decision ledger: rate limits, stateful guardrails and pending labels, one call per batch.

The engine proposes decisions for a micro-batch; the ledger settles them in event order in one
call: it drops decisions inside the user's decision interval, grants or denies each proposed
offer (cooldown, offers per day, daily budget — the budget check and the spend are one atomic
step, so concurrent workers can never overspend), records every decision as pending, labels
pending decisions with the batch's purchases (and remembered ones), and expires the windows
that ended before their lane's clock (``engine.labels`` says what a lane is).

``InMemoryLedger`` serves backtests and tests; ``streams/adapters/redis_ledger.py`` implements
the same contract (the port: ``engine.ports.DecisionLedger``) in one Redis Lua call, held to the
same tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from engine.decisions import DecisionDraft
from engine.features.state import DAY_MS
from engine.labels import Arm, LabelEvent, PendingDecision, PendingLabels, PurchaseSeen
from engine.stop_loss import CampaignStopLoss, StopLoss, StopLossStatus, purchase_margin_cents


@dataclass(frozen=True, slots=True)
class OfferLimits:
    """What a proposed offer must pass, and what it costs the campaign's budget."""

    cost_cents: int
    cooldown_ms: int = 0
    max_per_day: int | None = None
    budget_cents: int | None = None
    day: int | None = None
    """The day (days since the epoch, UTC) whose budget and offers-per-day cap the offer counts
    against; None: the decision's event-time day. Live workers count by the wall-clock day
    (``EngineConfig.budget_clock``), so that a replay of history spends today's budget."""


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    decision: PendingDecision
    """The decision as proposed: the offer's discount and id when ``offer`` is set."""
    decision_interval_ms: int = 0
    offer: OfferLimits | None = None
    draft: DecisionDraft | None = None
    """What the decision publishes once settled; a ledger with an outbox stores it with its
    effect (``RedisLedger``), others ignore it."""
    lane: int = 0
    """The lane (partition number) of its trigger event, whose clock closes its window."""


@dataclass(frozen=True, slots=True)
class PurchaseNotice:
    user_id: str
    ts: int
    offer_id: str | None = None
    amount_cents: int = 0
    """What the user paid."""
    gross_cents: int = 0
    """The undiscounted value of the order (items' price x quantity)."""


LedgerOp = DecisionRequest | PurchaseNotice


@dataclass(frozen=True, slots=True)
class DecisionOutcome:
    decided: bool
    """False when the decision fell inside the user's decision interval (nothing recorded)."""
    granted: bool = False
    denied_by: str | None = None
    """``cooldown``, ``max_offers_per_day`` or ``budget`` when a proposed offer was denied."""


RATE_LIMITED = DecisionOutcome(decided=False)


@dataclass(slots=True)
class LedgerResult:
    outcomes: list[DecisionOutcome | None]
    """One per op: the outcome of a ``DecisionRequest``, None for a ``PurchaseNotice``."""
    events: list[LabelEvent] = field(default_factory=list)
    """Label events in the order they happened: conversions by the call's purchases (and by
    remembered purchases, as decisions are recorded), then windows that elapsed or closed
    before their lane's clock."""
    stop_loss: dict[str, StopLossStatus] = field(default_factory=dict)
    """Each stop-loss campaign's status after the call."""


@dataclass(frozen=True, slots=True)
class StopLossSetting:
    config: StopLoss
    margin: float
    """The campaign's gross margin: what a purchase's outcome is measured with."""


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    attribution_window_ms: int = 24 * 3600 * 1000
    elapsed_ms: int = 0
    """Emit an ``elapsed`` label event this long after each decision (0: none)."""
    purchase_memory_ms: int = 0
    """How long, in a user's event time, a purchase is remembered to convert decisions read
    after it (the engine's allowed lateness: no older event of the user is decided)."""
    stop_loss: Mapping[str, StopLossSetting] = field(default_factory=dict)
    """Campaigns with a stop-loss, by name."""


def event_day(ts: int) -> int:
    return ts // DAY_MS


def final_decision(request: DecisionRequest, granted: bool) -> PendingDecision:
    """The decision as recorded: a denied offer becomes a no-discount decision."""
    if request.offer is None or granted:
        return request.decision
    return without_offer(request.decision)


def without_offer(decision: PendingDecision) -> PendingDecision:
    return replace(decision, discount_pct=0.0, offer_id=None)


class InMemoryLedger:
    """Dict-backed ledger; the same rules as ``streams/adapters/commit_batch.lua``."""

    def __init__(self, config: LedgerConfig | None = None) -> None:
        self.config = config if config is not None else LedgerConfig()
        self.labels = PendingLabels(
            self.config.attribution_window_ms,
            self.config.elapsed_ms,
            self.config.purchase_memory_ms,
        )
        self.stop_loss = {
            name: CampaignStopLoss(setting.config, setting.margin)
            for name, setting in self.config.stop_loss.items()
        }
        self._last_decision: dict[tuple[str, str], int] = {}
        self._last_offer: dict[tuple[str, str], int] = {}
        self._offers_per_day: dict[tuple[str, str, int], int] = {}
        self._spent: dict[tuple[str, int], int] = {}

    async def settle(
        self, ops: Sequence[LedgerOp], *, now_ms: int, lanes: Mapping[int, int] | None = None
    ) -> LedgerResult:
        result = LedgerResult(outcomes=[])
        for op in ops:
            if isinstance(op, PurchaseNotice):
                result.outcomes.append(None)
                if self.stop_loss:
                    self._purchase_outcomes(op)
                seen = PurchaseSeen(op.ts, op.amount_cents, op.gross_cents)
                result.events.extend(self.labels.on_purchase(op.user_id, seen))
                continue
            result.outcomes.append(self._decide(op, result.events))
        result.events.extend(self.labels.expire({0: now_ms} if lanes is None else lanes))
        for name, campaign in self.stop_loss.items():
            result.stop_loss[name] = campaign.update(now_ms)
        return result

    def _purchase_outcomes(self, purchase: PurchaseNotice) -> None:
        """The purchase's margin is the outcome of every sampled open decision it converts."""
        window = self.config.attribution_window_ms
        for decision in self.labels.open_decisions(purchase.user_id):
            campaign = self.stop_loss.get(decision.campaign)
            if campaign is None or decision.arm is Arm.NONE or decision.converted_at is not None:
                continue
            if 0 <= purchase.ts - decision.ts <= window:
                cents = purchase_margin_cents(
                    purchase.amount_cents, purchase.gross_cents, campaign.margin
                )
                epoch = campaign.config.epoch(decision.ts)
                campaign.record_outcome(epoch, decision.arm, decision.user_id, cents)

    async def stop_loss_status(self) -> dict[str, StopLossStatus]:
        return {name: campaign.status for name, campaign in self.stop_loss.items()}

    def settle_due(self, lane: int, now_ms: int) -> bool:
        # A stop-loss status follows event time, but stands while nothing is recorded within
        # an epoch (``CampaignStopLoss.settled_at``). The engine settles at its own clock, which
        # may be ahead of this lane's; it asks on the lane that moved its clock, so a status
        # settled in this lane's epoch was settled in the epoch of the engine's clock too.
        return self.labels.due(lane, now_ms) or any(
            not campaign.settled_at(now_ms) for campaign in self.stop_loss.values()
        )

    def rate_limited(self, user_id: str, campaign: str, ts: int, interval_ms: int) -> bool:
        """Whether a decision at ``ts`` would fall inside the user's decision interval now.

        Such a decision changes nothing here, so the engine can skip proposing it (no
        features, no scoring) with the same results."""
        # Anything earlier than the last decision (a late event) counts as inside the interval.
        last = self._last_decision.get((user_id, campaign))
        return interval_ms > 0 and last is not None and ts - last < interval_ms

    def _decide(self, request: DecisionRequest, events: list[LabelEvent]) -> DecisionOutcome:
        decision = request.decision
        key = (decision.user_id, decision.campaign)
        ts = decision.ts
        last = self._last_decision.get(key)
        if self.rate_limited(decision.user_id, decision.campaign, ts, request.decision_interval_ms):
            return RATE_LIMITED
        self._last_decision[key] = ts if last is None else max(ts, last)
        granted, denied_by = False, None
        limits = request.offer
        if limits is not None:
            day = limits.day if limits.day is not None else event_day(ts)
            last_offer = self._last_offer.get(key)
            spent = self._spent.get((decision.campaign, day), 0)
            if (
                limits.cooldown_ms > 0
                and last_offer is not None
                and ts - last_offer < limits.cooldown_ms
            ):
                denied_by = "cooldown"
            elif (
                limits.max_per_day is not None
                and self._offers_per_day.get((*key, day), 0) >= limits.max_per_day
            ):
                denied_by = "max_offers_per_day"
            elif (
                limits.budget_cents is not None and spent + limits.cost_cents > limits.budget_cents
            ):
                denied_by = "budget"
            else:
                granted = True
                self._last_offer[key] = ts if last_offer is None else max(ts, last_offer)
                self._offers_per_day[(*key, day)] = self._offers_per_day.get((*key, day), 0) + 1
                self._spent[(decision.campaign, day)] = spent + limits.cost_cents
        recorded = final_decision(request, granted)
        campaign = self.stop_loss.get(decision.campaign)
        sampled = campaign is not None and decision.arm is not Arm.NONE
        if campaign is not None and sampled:
            campaign.record_decision(campaign.config.epoch(ts), decision.arm, decision.user_id)
        conversion = self.labels.add(recorded, request.lane)
        if conversion is not None:
            events.append(conversion.event)
            if campaign is not None and sampled:
                purchase = conversion.purchase
                cents = purchase_margin_cents(
                    purchase.amount_cents, purchase.gross_cents, campaign.margin
                )
                campaign.record_outcome(
                    campaign.config.epoch(ts), decision.arm, decision.user_id, cents
                )
        return DecisionOutcome(decided=True, granted=granted, denied_by=denied_by)

    async def budget_spent_cents(self, campaign: str, day: int) -> int:
        return self._spent.get((campaign, day), 0)

    async def pending_count(self) -> int:
        return len(self.labels)
