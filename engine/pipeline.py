"""The engine's main job for one micro-batch: features, decisions, guardrails, labels.

``DiscountEngine.process`` is the one function both the live worker and backtests call:

1. apply the batch to the feature store (one call), together with the offers the previous
   batch granted (the users' response history), and replay it to get each event's feature
   vector as of its own event time;
2. for every trigger event and eligible campaign, score and let the campaign's policy propose
   a discount (holdout users get none; a campaign its stop-loss has stopped makes only a
   random share of its offers), capped by the campaign's maximum;
3. settle all proposals and the batch's purchases with the decision ledger (one call): decision
   interval, cooldown, offers per day, daily budget, pending labels and their label events
   (windows close by the event-time clock of each lane the batch touched: ``engine.labels``),
   the stop-loss sums;
4. emit offers, decisions and training examples as typed records (which examples:
   ``engine.model.feedback``); the edges turn them into messages with ``to_message``. With
   ``learn_inline`` (backtests) the model also learns from them, in order; live, the learner
   process does.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from dealstream_native import stable_id, unit_hash

from engine.campaigns import Campaign, default_campaigns
from engine.decisions import (
    Decision,
    DecisionDraft,
    Offer,
    Proposal,
    in_holdout,
    is_eligible,
    make_decision,
    offer_beside,
    offer_cost_cents,
    order_value,
)
from engine.events import Event, PurchaseEvent
from engine.features.catalogue import compute_features
from engine.features.state import Op, apply_ops, event_kind, event_ops, offer_ops, trigger_category
from engine.features.store import Position, StateUpdate, UpdateStatus
from engine.labels import Arm, LabelEvent, PendingDecision
from engine.ledger import (
    DecisionOutcome,
    DecisionRequest,
    InMemoryLedger,
    LedgerConfig,
    LedgerOp,
    LedgerResult,
    OfferLimits,
    PurchaseNotice,
    StopLossSetting,
    event_day,
)
from engine.model.feedback import DECIDED, Feedback, TrainingExample
from engine.model.prequential import OnlineLearner
from engine.model.purchase_model import PurchaseModel
from engine.model.scoring import Scorer
from engine.policies.base import PolicyChoice, PolicyContext
from engine.ports import DecisionLedger, FeatureStore
from engine.stop_loss import EXPLORE_ONLY, EXPLORED, StopLossStatus

__all__ = [
    "BatchResult",
    "DiscountEngine",
    "EngineConfig",
    "Incoming",
    "event_time_order",
    "state_update",
]

BudgetClock = Literal["event", "wall"]
EVENT_TIME: BudgetClock = "event"
WALL_CLOCK: BudgetClock = "wall"
BUDGET_CLOCKS: tuple[BudgetClock, ...] = (EVENT_TIME, WALL_CLOCK)


class Incoming(NamedTuple):
    """An event and where it came from (a named tuple: one is built for every event)."""

    event: Event
    position: Position | None = None
    update: StateUpdate | None = None
    """``state_update(event, position)``, when it was built with the event (the worker builds
    it as it decodes, which it does ahead of the batch); else the engine builds it."""


def state_update(event: Event, position: Position | None) -> StateUpdate:
    """What an event does to its user's feature state."""
    return StateUpdate(
        user_id=event.user_id,
        event_id=event.event_id,
        ts=event.ts,
        ops=event_ops(event),
        position=position,
    )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    allowed_lateness_ms: int = 3600 * 1000
    attribution_window_ms: int = 24 * 3600 * 1000
    learn_inline: bool = True
    """Learn from labels inside ``process`` (backtests); live workers leave it to the learner."""
    feedback: Feedback = field(default_factory=Feedback)
    """How the model learns under delayed labels (the learner must use the same). A wait that
    does not fit inside the attribution window becomes half the window."""
    budget_clock: BudgetClock = EVENT_TIME
    """Which day a granted offer counts against (daily budget, offers per day): the decision's
    event-time day (``event``, backtests: history replays its own days) or the wall-clock
    day of the batch (``wall``, live workers: ``process(..., wall_clock_ms=...)``), so that
    a replay of history into a live worker cannot open fresh budgets."""

    def __post_init__(self) -> None:
        if self.budget_clock not in BUDGET_CLOCKS:
            raise ValueError(f"budget_clock must be one of {BUDGET_CLOCKS}: {self.budget_clock!r}")
        if self.feedback.ledger_elapsed_ms >= self.attribution_window_ms:
            wait = max(self.attribution_window_ms // 2, 1)
            object.__setattr__(
                self, "feedback", dataclasses.replace(self.feedback, elapsed_ms=wait)
            )

    def ledger_config(self, campaigns: Sequence[Campaign]) -> LedgerConfig:
        """What the ledger needs to know of these settings and campaigns."""
        return LedgerConfig(
            attribution_window_ms=self.attribution_window_ms,
            elapsed_ms=self.feedback.ledger_elapsed_ms,
            purchase_memory_ms=self.allowed_lateness_ms,
            stop_loss={
                c.name: StopLossSetting(c.stop_loss, c.margin)
                for c in campaigns
                if c.stop_loss is not None
            },
        )


@dataclass(slots=True)
class BatchResult:
    """What one micro-batch produced. Typed records, so that readers use attributes; only the
    edges (the Kafka sinks, the backtest's decision log) write them as messages."""

    statuses: list[UpdateStatus]
    offers: list[Offer] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    """Every settled decision, offer or not, in order."""
    training: list[TrainingExample] = field(default_factory=list)
    """Training examples for the training topic (``Feedback.wants``)."""
    labels: list[LabelEvent] = field(default_factory=list)
    """Every label event of the batch, in order (backtests book final labels from them)."""
    stop_loss: dict[str, StopLossStatus] = field(default_factory=dict)
    """Stop-loss status of each campaign that has one, after the batch."""
    denied: dict[str, int] = field(default_factory=dict)
    """Proposed offers denied by a guardrail, by rule."""
    spend_cents: dict[str, int] = field(default_factory=dict)
    """Discount granted in this batch's offers, per campaign: what the ledger charged."""


def event_time_order(batch: Sequence[Incoming]) -> list[int]:
    """Indices of the batch merged by event time across source partitions.

    A user's browse, search and purchase events arrive on different topics, which the consumer
    reads independently; merging them by event time lets a decision see only what happened
    before it and lets a purchase meet the decision it follows. Each partition's own order is
    kept (offset watermarks depend on it), so a late event stays where its partition put it.
    """
    groups: dict[tuple[str, int] | None, list[tuple[int, int]]] = {}
    for index, item in enumerate(batch):
        key = (item.position.source, item.position.partition) if item.position else None
        groups.setdefault(key, []).append((item.event.ts, index))
    if len(groups) == 1:
        return list(range(len(batch)))
    return [index for _, index in heapq.merge(*groups.values())]


class DiscountEngine:
    """Feature store + ledger + model + campaigns, wired once by the composition root."""

    def __init__(
        self,
        store: FeatureStore,
        *,
        ledger: DecisionLedger | None = None,
        model: PurchaseModel | None = None,
        campaigns: Sequence[Campaign] | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.store = store
        self.config = config if config is not None else EngineConfig()
        self.campaigns = tuple(campaigns) if campaigns is not None else default_campaigns()
        self.ledger = (
            ledger
            if ledger is not None
            else InMemoryLedger(self.config.ledger_config(self.campaigns))
        )
        self.model = model if model is not None else PurchaseModel()
        """Swappable: a live worker replaces it when the learner publishes a newer version."""
        self.learner = (
            OnlineLearner(self.model, feedback=self.config.feedback)
            if self.config.learn_inline
            else None
        )
        """Learns inline (backtests): the same learner step as ``dealstream learner``."""
        self.stop_loss: dict[str, StopLossStatus] = {}
        """Each stop-loss campaign's status as of the last ledger call."""
        self._offer_updates: list[StateUpdate] = []
        """Offers granted by the previous batch: applied to the users' state with the next."""
        self._unapplied: dict[str, list[Sequence[Op]]] = {}
        """The batch being processed: operations not yet replayed into each user's state."""
        self._started = False
        self.clock_ms = 0
        """Event-time clock: the latest event time this engine has seen on any lane (the
        stop-loss's clock)."""
        self.lane_clocks: dict[int, int] = {}
        """Each lane's event-time clock (``engine.labels``): the latest event time processed
        on that partition number; it closes the attribution windows of the lane's decisions."""
        self._budget_day: int | None = None
        """The day this batch's offers count against; None: each decision's event-time day."""

    async def process(
        self, batch: Sequence[Incoming], *, wall_clock_ms: int | None = None
    ) -> BatchResult:
        """Run one micro-batch; ``statuses`` come back in the order of ``batch``.

        ``wall_clock_ms``: when the batch runs, required with ``budget_clock="wall"`` (the day
        granted offers count against)."""
        if self.config.budget_clock == WALL_CLOCK:
            if wall_clock_ms is None:
                raise ValueError("budget_clock='wall' needs the batch's wall_clock_ms")
            self._budget_day = event_day(wall_clock_ms)
        else:
            self._budget_day = None
        if not self._started:
            # A restarted worker takes up the campaigns' stop-loss state where it was left.
            self.stop_loss.update(await self.ledger.stop_loss_status())
            self._started = True
        order = event_time_order(batch)
        offer_updates = self._offer_updates
        try:
            result = await self._process([batch[i] for i in order])
        except BaseException:
            # The batch runs again (or the process stops): the previous batch's offers must
            # still join their users' state with it.
            self._offer_updates = offer_updates
            raise
        statuses = [UpdateStatus.APPLIED] * len(batch)
        for position, index in enumerate(order):
            statuses[index] = result.statuses[position]
        result.statuses = statuses
        return result

    async def _process(self, batch: Sequence[Incoming]) -> BatchResult:
        offer_updates, self._offer_updates = self._offer_updates, []
        updates = [
            item.update if item.update is not None else state_update(item.event, item.position)
            for item in batch
        ]
        outcome = await self.store.apply_batch(
            offer_updates + updates, allowed_lateness_ms=self.config.allowed_lateness_ms
        )
        statuses = outcome.statuses[len(offer_updates) :]
        result = BatchResult(statuses=statuses)
        states = outcome.before
        ops: list[LedgerOp] = []
        learn_inline = self.config.learn_inline
        applied = UpdateStatus.APPLIED
        lane_clocks = self.lane_clocks
        lanes: dict[int, int] = {}  # the clocks of the lanes this batch moved
        # A user's state is brought up to an event only when that event needs features:
        # operations wait here, in order, so events that decide nothing cost no replay.
        # (Offers granted during the batch join them: a later event sees the offer.)
        unapplied: dict[str, list[Sequence[Op]]] = {}
        self._unapplied = unapplied
        for update, status in zip(offer_updates, outcome.statuses, strict=False):
            if status is applied:
                unapplied.setdefault(update.user_id, []).append(update.ops)
        for item, update, status in zip(batch, updates, statuses, strict=True):
            if status is not applied:
                continue
            event = item.event
            user_id = event.user_id
            waiting = unapplied.get(user_id)
            if waiting is None:
                unapplied[user_id] = [update.ops]
            else:
                waiting.append(update.ops)
            if event.ts > self.clock_ms:
                self.clock_ms = event.ts
            lane = item.position.partition if item.position is not None else 0
            lane_clock = lane_clocks.get(lane, 0)
            if event.ts > lane_clock:
                lane_clock = lane_clocks[lane] = event.ts
            lanes[lane] = lane_clock
            if isinstance(event, PurchaseEvent):
                ops.append(
                    PurchaseNotice(
                        user_id,
                        event.ts,
                        event.offer_id,
                        amount_cents=round(event.amount * 100),
                        gross_cents=round(
                            sum(item.price * item.quantity for item in event.items) * 100
                        ),
                    )
                )
            else:
                category = trigger_category(event)
                kind = event_kind(event)
                candidates = self._candidates(event, kind, category)
                if candidates:
                    state = states[user_id]
                    for pending in unapplied.pop(user_id):
                        apply_ops(state, pending)
                    features = compute_features(state, category=category)
                    # One scorer for all of the event's campaigns: same features, same model.
                    scorer = self.model.scorer(features)
                    for campaign in candidates:
                        if is_eligible(campaign, event, features, kind):
                            proposal = self._propose(campaign, event, features, scorer)
                            ops.append(self._request(proposal, lane))
            if learn_inline:
                # Settle event by event so that what the model learns from this event's
                # labels shapes the next decision: results do not depend on batch size.
                if ops or self.ledger.settle_due(lane, lane_clock):
                    await self._settle(ops, result, {lane: lane_clock})
                ops = []
        # Live, a remote ledger sees every batch, even one that applied nothing (all
        # redelivered) or had no event at all (its records were dead letters) but offers
        # granted earlier: its call also carries the batch's feature records and outbox entry
        # (``DecisionLedger.settle_due``).
        clocks = lanes.items() or ((0, self.clock_ms),)
        if ops or (
            not learn_inline
            and (batch or offer_updates)
            and any(self.ledger.settle_due(lane, clock) for lane, clock in clocks)
        ):
            await self._settle(ops, result, lanes)
        result.stop_loss = dict(self.stop_loss)
        return result

    async def _settle(
        self, ops: list[LedgerOp], result: BatchResult, lanes: dict[int, int]
    ) -> None:
        settled = await self.ledger.settle(ops, now_ms=self.clock_ms, lanes=lanes)
        drafts = [op.draft if isinstance(op, DecisionRequest) else None for op in ops]
        self._apply_settled(settled, drafts, result)

    def _apply_settled(
        self,
        settled: LedgerResult,
        drafts: Sequence[DecisionDraft | None],
        result: BatchResult,
    ) -> None:
        for draft, decided in zip(drafts, settled.outcomes, strict=True):
            if draft is not None and decided is not None and decided.decided:
                self._emit(draft, decided, result)
        for event in settled.events:
            result.labels.append(event)
            decision = event.decision
            self._train(
                TrainingExample(
                    decision_id=decision.decision_id,
                    features=decision.features,
                    discount_pct=decision.discount_pct,
                    label=event.label,
                    labeled_at=event.ts,
                    kind=str(event.kind),
                    decided_at=decision.ts,
                    converted_at=decision.converted_at,
                ),
                result,
            )
        self.stop_loss.update(settled.stop_loss)

    def settled_outputs(
        self,
        drafts: Sequence[DecisionDraft | None],
        settled: LedgerResult,
        *,
        owns: Callable[[str], bool],
    ) -> BatchResult:
        """The outputs of a batch an earlier call settled, as that batch published them.

        ``drafts`` (one per ledger op, None for a purchase) and ``settled`` come from the
        batch's outbox entry, kept with its ledger effect (``streams/adapters/outbox.py``).
        Granted offers join their users' state with the next batch, for the users this engine
        owns (``owns``); an offer already applied is recognised by its id and skipped.
        """
        result = BatchResult(statuses=[])
        queued = len(self._offer_updates)
        unapplied, self._unapplied = self._unapplied, {}
        try:
            self._apply_settled(settled, drafts, result)
        finally:
            self._unapplied = unapplied
        recovered = self._offer_updates[queued:]
        self._offer_updates[queued:] = [u for u in recovered if owns(u.user_id)]
        return result

    def take_granted_offers(self) -> list[StateUpdate]:
        """The granted offers waiting to join their users' state with the next batch, handed
        over to be stored now (and no longer with that batch): a worker giving up its
        partitions must store them before their next owner reads the users' records."""
        updates, self._offer_updates = self._offer_updates, []
        return updates

    def _train(self, example: TrainingExample, result: BatchResult) -> None:
        """Publish the example if the feedback method wants it, and learn it inline if so."""
        if not self.config.feedback.wants(example.kind):
            return
        result.training.append(example)
        if self.learner is not None:
            self.learner.model = self.model
            self.learner.learn(example)

    def _candidates(self, event: Event, kind: str, category: str | None) -> list[Campaign]:
        """The campaigns this event may trigger, before features are computed.

        Leaves out campaigns whose triggers or categories do not match (``is_eligible``
        would reject them whatever the features) and campaigns whose decision interval the
        ledger already knows has not passed for the user (``DecisionLedger.rate_limited``):
        its last decision time per user and campaign only grows, so it would drop those
        decisions at settlement too, without a trace. Features and scores are pure, so
        skipping them saves time only.
        """
        ledger = self.ledger
        candidates: list[Campaign] = []
        for campaign in self.campaigns:
            if kind not in campaign.triggers or (
                campaign.categories and category not in campaign.categories
            ):
                continue
            if ledger.rate_limited(
                event.user_id, campaign.name, event.ts, campaign.decision_interval_ms
            ):
                continue
            candidates.append(campaign)
        return candidates

    def _propose(
        self, campaign: Campaign, event: Event, features: dict[str, float], scorer: Scorer
    ) -> Proposal:
        model = self.model
        decision_id = stable_id("d-", campaign.name, event.event_id)
        holdout = in_holdout(campaign, event.user_id)
        predictions: dict[float, float] = {}

        def predict(discount_pct: float) -> float:
            p = predictions.get(discount_pct)
            if p is None:
                p = predictions[discount_pct] = scorer(discount_pct)
            return p

        value = order_value(campaign, event, features)
        context = PolicyContext(
            features=features,
            predict=predict,
            order_value=value,
            draw=unit_hash("draw", str(campaign.seed), decision_id),
            user_id=event.user_id,
            trigger_event_id=event.event_id,
        )
        # Holdout users get no offer, but the policy still says what it would have offered:
        # comparing those would-be offers with the treated users' measures the campaign.
        proposed = campaign.policy.choose(context)
        rules = list(proposed.rules)
        if proposed.discount_pct > campaign.max_discount_pct:
            rules.append(f"cap:max_discount_pct={campaign.max_discount_pct:g}")
            proposed = dataclasses.replace(proposed, discount_pct=campaign.max_discount_pct)
        arm = Arm.NONE
        if holdout:
            choice = PolicyChoice(0.0, 1.0, offer_propensity=0.0)
            rules = ["holdout"]
            if proposed.discount_pct > 0 and campaign.stop_loss is not None:
                arm = Arm.HOLDOUT
        else:
            choice = proposed
            status = self.stop_loss.get(campaign.name)
            if status is not None and status.stopped:
                choice = self._explore_only(campaign, decision_id, proposed)
                rules.append(EXPLORE_ONLY)
                if choice.discount_pct > 0:
                    rules.append(EXPLORED)
            if choice.discount_pct > 0 and campaign.stop_loss is not None:
                arm = Arm.TREATED
        reference = proposed.discount_pct or campaign.policy.reference_discount_pct
        uplift = predict(reference) - predict(0.0) if reference > 0 else 0.0
        offer_id = stable_id("o-", campaign.name, event.event_id) if choice.discount_pct else None
        return Proposal(
            campaign=campaign,
            event=event,
            features=features,
            choice=choice,
            proposed=proposed,
            uplift_score=uplift,
            holdout=holdout,
            arm=arm,
            predict=predict,
            scorer=scorer,
            p_purchase=predict(choice.discount_pct),
            model_version=model.version,
            decision_id=decision_id,
            offer_id=offer_id,
            order_value=value,
            cost_cents=offer_cost_cents(choice.discount_pct, value) if offer_id else 0,
            rules=rules,
        )

    @staticmethod
    def _explore_only(campaign: Campaign, decision_id: str, proposed: PolicyChoice) -> PolicyChoice:
        """A stopped campaign: the proposal becomes an offer only with ``explore`` probability.

        The draw is the decision's own (not the policy's), so the propensities multiply
        exactly: offering d has probability explore * P(d); no offer has P(0) + (1 - explore)
        * P(offer)."""
        assert campaign.stop_loss is not None
        explore = campaign.stop_loss.explore
        offering = proposed.offer_probability
        if proposed.discount_pct <= 0:
            return dataclasses.replace(
                proposed,
                propensity=1.0 - explore * offering,
                offer_propensity=explore * offering,
            )
        if unit_hash("stop-loss", str(campaign.seed), decision_id) < explore:
            return dataclasses.replace(
                proposed,
                propensity=explore * proposed.propensity,
                offer_propensity=explore * offering,
            )
        return PolicyChoice(
            0.0,
            1.0 - explore * offering,
            rules=proposed.rules,
            offer_propensity=explore * offering,
        )

    def _request(self, proposal: Proposal, lane: int) -> DecisionRequest:
        campaign, event = proposal.campaign, proposal.event
        limits = None
        if proposal.offer_id is not None:
            limits = OfferLimits(
                cost_cents=proposal.cost_cents,
                cooldown_ms=campaign.cooldown_ms,
                max_per_day=campaign.max_offers_per_day,
                budget_cents=campaign.daily_budget_cents,
                day=self._budget_day,
            )
        return DecisionRequest(
            decision=PendingDecision(
                decision_id=proposal.decision_id,
                user_id=event.user_id,
                campaign=campaign.name,
                ts=event.ts,
                features=proposal.features,
                discount_pct=proposal.choice.discount_pct,
                propensity=proposal.choice.propensity,
                model_version=proposal.model_version,
                offer_id=proposal.offer_id,
                arm=proposal.arm,
            ),
            decision_interval_ms=campaign.decision_interval_ms,
            offer=limits,
            draft=self._draft(proposal),
            lane=lane,
        )

    def _draft(self, proposal: Proposal) -> DecisionDraft:
        """The proposal's outputs as if the ledger grants it (``DecisionDraft``)."""
        choice, offer_id = proposal.choice, proposal.offer_id
        discount = choice.discount_pct if offer_id is not None else 0.0
        decision = make_decision(
            proposal,
            offer_id,
            discount,
            choice.propensity,
            proposal.p_purchase,
            proposal.rules,
            None,
        )
        offer = None
        if offer_id is not None:
            scorer = proposal.scorer
            reasons = (
                scorer.contributions(discount)
                if scorer.model is self.model
                else self.model.contributions(proposal.features, discount)
            )
            offer = offer_beside(decision, decision.ts + proposal.campaign.offer_ttl_ms, reasons)
        return DecisionDraft(decision, offer, proposal.predict(0.0))

    def _emit(self, draft: DecisionDraft, decided: DecisionOutcome, result: BatchResult) -> None:
        offer, decision = draft.settled(decided.granted, decided.denied_by)
        if decided.denied_by is not None:
            result.denied[decided.denied_by] = result.denied.get(decided.denied_by, 0) + 1
        if offer is not None:
            spent = result.spend_cents.get(decision.campaign, 0)
            result.spend_cents[decision.campaign] = spent + (decision.cost_cents or 0)
            ops = offer_ops(offer.issued_at, offer.discount_pct)
            # Stored with the next batch; seen at once by the user's later events in this one.
            self._offer_updates.append(
                StateUpdate(
                    user_id=offer.user_id,
                    event_id=f"offer:{offer.offer_id}",
                    ts=offer.issued_at,
                    ops=ops,
                    on_time=True,
                )
            )
            self._unapplied.setdefault(offer.user_id, []).append(ops)
            result.offers.append(offer)
        result.decisions.append(decision)
        if self.config.feedback.wants(DECIDED):
            # Only ``fnw`` takes decisions as they are made: the others need no example here.
            self._train(
                TrainingExample(
                    decision_id=decision.decision_id,
                    features=decision.features,
                    discount_pct=decision.discount_pct,
                    label=0,
                    labeled_at=decision.ts,
                    kind=DECIDED,
                    decided_at=decision.ts,
                ),
                result,
            )
