"""The backtest loop: events in batches through one ``DiscountEngine`` per campaign set.

Each campaign set (one campaigns file) runs in its own engine, with its own in-memory store,
ledger and model, over the same events in the same order, so sets never interfere. Events
are pulled from ``source`` lazily, ``batch_size`` at a time; after each batch the offers of
every engine go to ``on_offers`` *before* the next batch is pulled, so a simulated world can
react to them (closed loop).

The whole run is one coroutine under ``asyncio.run``: the engine's in-memory store and ledger
never suspend, so awaiting them costs no more than a call, and the event loop adds nothing per
batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, TypeVar

import orjson

from engine.analysis.backtest.metrics import (
    CampaignStats,
    ModelStats,
    OpenDecision,
    p_segment,
)
from engine.analysis.backtest.stop_loss import StopLossLog, track_transitions
from engine.campaigns import Campaign
from engine.decisions import Offer
from engine.errors import EngineError
from engine.events import BROWSE_ACTIONS, Event, PurchaseEvent
from engine.features.state import event_kind, trigger_category
from engine.features.store import InMemoryFeatureStore, UpdateStatus
from engine.labels import LabelKind
from engine.ledger import InMemoryLedger, event_day
from engine.model.feedback import TrainingExample
from engine.pipeline import BatchResult, DiscountEngine, EngineConfig, Incoming
from engine.stop_loss import EXPLORE_ONLY

DEFAULT_BATCH_SIZE = 2000
PENDING = 2
"""``rewards`` value of a decision whose attribution window had not closed at the end."""
REWARD_PLACEHOLDER = b'"reward":-1'
"""Written in place of the reward until it is known; ``finalize_decision_lines`` fills it."""
_DUMPS_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
_TRIGGER_SEGMENTS = {kind: f"trigger:{kind}" for kind in (*BROWSE_ACTIONS, "search")}
"""Segment names of the trigger kinds, built once (``_absorb`` names three per decision)."""

OffersHook = Callable[[list[dict[str, object]]], None]
T = TypeVar("T")


class BacktestError(EngineError):
    """A backtest that cannot run as asked (the message says what to change)."""


@dataclass(slots=True)
class GroupResult:
    """One campaign set's engine and what it measured."""

    name: str
    campaigns: tuple[Campaign, ...]
    keys: tuple[str, ...]
    stats: list[CampaignStats]
    model: ModelStats
    engine: DiscountEngine
    served: ModelStats = field(default_factory=ModelStats)
    """The P(purchase) each decision was made with, against its label: the model as served."""
    open: dict[str, tuple[int, OpenDecision]] = field(default_factory=dict)
    """Decisions waiting for their label: decision id -> (campaign index, details)."""
    by_name: dict[str, int] = field(default_factory=dict)
    stop_loss: dict[str, StopLossLog] = field(default_factory=dict)
    """Each stop-loss campaign's transitions, by campaign name."""
    scores: dict[str, float] = field(default_factory=dict)
    """The prequential score of each decision whose final label the learner has seen, until
    its window closes and it is booked (``_absorb``)."""

    def keep_score(self, example: TrainingExample, p: float, label: int) -> None:
        """``OnlineLearner.on_final``: the model's score just before it learned the label."""
        del label  # the label is booked with the window's closing
        self.scores[example.decision_id] = p

    def pending_by_campaign(self) -> list[dict[str, int]]:
        """Decisions whose window had not closed, per campaign: holdout / treated / untreated."""
        counts = [{"holdout": 0, "treated": 0, "untreated": 0} for _ in self.campaigns]
        for index, opened in self.open.values():
            kind = "holdout" if opened.holdout else "treated" if opened.granted else "untreated"
            counts[index][kind] += 1
        return counts


@dataclass(slots=True)
class BacktestResult:
    groups: list[GroupResult]
    events: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    statuses: Counter[str] = field(default_factory=Counter)
    """What the (first) feature store did with each event: applied, duplicate, late, ..."""
    events_by_kind: Counter[str] = field(default_factory=Counter)
    rewards: bytearray = field(default_factory=bytearray)
    """Per decision, in processing order: 0/1 label, or ``PENDING``."""
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE


def campaign_sets(
    campaigns: Sequence[Campaign] | Mapping[str, Sequence[Campaign]],
) -> list[tuple[str, tuple[Campaign, ...]]]:
    if isinstance(campaigns, Mapping):
        sets = [(name, tuple(group)) for name, group in campaigns.items()]
    else:
        sets = [("", tuple(campaigns))]
    if not sets or any(not group for _, group in sets):
        raise BacktestError("a backtest needs at least one campaign in every campaign set")
    return sets


def _new_group(
    name: str, campaigns: tuple[Campaign, ...], seed: int, config: EngineConfig, single: bool
) -> GroupResult:
    seeded = tuple(dataclasses.replace(c, seed=c.seed + seed) for c in campaigns)
    keys = tuple(c.name if single else f"{name}/{c.name}" for c in seeded)
    model_stats = ModelStats()
    ledger = InMemoryLedger(config.ledger_config(seeded))
    stop_loss = track_transitions(ledger)
    engine = DiscountEngine(InMemoryFeatureStore(), ledger=ledger, campaigns=seeded, config=config)
    assert engine.learner is not None  # backtests learn inline
    group = GroupResult(
        name=name,
        campaigns=seeded,
        keys=keys,
        stats=[CampaignStats(key) for key in keys],
        model=model_stats,
        engine=engine,
        by_name={c.name: i for i, c in enumerate(seeded)},
        stop_loss=stop_loss,
    )
    engine.learner.on_final = group.keep_score
    return group


def _absorb(
    group: GroupResult,
    batch: BatchResult,
    triggers: dict[str, Event],
    rewards: bytearray,
    decisions_out: IO[bytes] | None,
) -> None:
    """Book a batch's decisions, then its labels (a label may close a decision of this batch)."""
    for decision in batch.decisions:
        index = group.by_name[decision.campaign]
        stats = group.stats[index]
        seq = len(rewards)
        rewards.append(PENDING)
        holdout = decision.holdout
        granted = decision.offer_id is not None
        # Floats for the report, whatever number type a policy built in code gave.
        discount = float(decision.discount_pct)
        p_purchase = float(decision.p_purchase)
        offer_propensity = float(decision.offer_propensity)
        features = decision.features
        event = triggers[decision.trigger_event_id]
        stats.decisions += 1
        if decision.propensity < 1.0:
            stats.propensity_below_one += 1
        if 0.0 < offer_propensity < 1.0:
            stats.exploring_decisions += 1
        if decision.denied_by is not None:
            stats.denied[decision.denied_by] = stats.denied.get(decision.denied_by, 0) + 1
        if EXPLORE_ONLY in decision.rules:
            stats.stopped_decisions += 1
            if granted:
                stats.stopped_offers += 1
        segments: tuple[str, ...] = ()
        if holdout:
            stats.holdout_decisions += 1
        else:
            returning = features.get("purchase_count_30d", 0.0) > 0
            kind = event_kind(event)
            trigger = _TRIGGER_SEGMENTS.get(kind) or f"trigger:{kind}"
            segments = (
                "customer:returning" if returning else "customer:new",
                trigger,
                p_segment(p_purchase),
            )
            for name in segments:
                segment = stats.segment(name)
                segment.decisions += 1
                if granted:
                    segment.offers += 1
                    segment.discount_sum += discount
            stats.discounts[discount] = stats.discounts.get(discount, 0) + 1
            stats.fairness.add(features, trigger_category(event), granted, discount)
        cost, value = 0, 0.0
        if granted:
            # Always known on the engine's own decisions (only read-back messages lack them).
            assert decision.cost_cents is not None and decision.order_value is not None
            cost, value = decision.cost_cents, decision.order_value
            stats.offers += 1
            stats.burn.add(event_day(decision.ts), decision.ts, cost)
        group.open[decision.decision_id] = (
            index,
            OpenDecision(
                seq,
                holdout,
                granted,
                cost,
                value,
                p_purchase,
                segments,
                decision.user_id,
                float(decision.uplift_score),
                offer_propensity,
                decision.denied_by is not None,
            ),
        )
        if decisions_out is not None:
            line = decision.to_message()
            line["campaign_key"] = stats.key
            line["reward"] = -1
            decisions_out.write(orjson.dumps(line, option=_DUMPS_OPTIONS))
    for name, cents in batch.spend_cents.items():
        group.stats[group.by_name[name]].committed_spend_cents += cents
    for labelled in batch.labels:
        # Outcomes are booked when a decision's window closes, conversions included: booking
        # a conversion at once would count the last window's buyers while its non-buyers
        # are still open, and overstate every rate measured near the end of the input.
        if labelled.kind is not LabelKind.CLOSED:
            continue
        decision_id = labelled.decision.decision_id
        prequential = group.scores.pop(decision_id, None)
        found = group.open.pop(decision_id, None)
        if found is None:
            continue
        index, opened = found
        label = labelled.label
        group.stats[index].on_label(opened, label)
        group.served.update(opened.p_purchase, label)
        if prequential is not None:
            group.model.update(prequential, label)
        rewards[opened.seq] = label


def _offer_messages(group: GroupResult, offers: Iterable[Offer]) -> list[dict[str, object]]:
    """Offer v1 messages for ``on_offers``, each with its campaign's report key added."""
    messages: list[dict[str, object]] = []
    for offer in offers:
        message = offer.to_message()
        message["campaign_key"] = group.stats[group.by_name[offer.campaign]].key
        messages.append(message)
    return messages


def _batches(source: Iterable[T], size: int) -> Iterable[list[T]]:
    iterator = iter(source)
    while batch := list(islice(iterator, size)):
        yield batch


def run_backtest(
    source: Iterable[Event],
    campaigns: Sequence[Campaign] | Mapping[str, Sequence[Campaign]],
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_offers: OffersHook | None = None,
    decisions_out: IO[bytes] | None = None,
    config: EngineConfig | None = None,
) -> BacktestResult:
    """Run ``source`` through one engine per campaign set; see the package docstring."""
    if batch_size < 1:
        raise BacktestError(f"batch_size must be at least 1, got {batch_size}")
    engine_config = dataclasses.replace(config or EngineConfig(), learn_inline=True)
    sets = campaign_sets(campaigns)
    single = len(sets) == 1
    groups = [_new_group(name, group, seed, engine_config, single) for name, group in sets]
    result = BacktestResult(groups=groups, seed=seed, batch_size=batch_size)
    asyncio.run(_run(source, result, on_offers, decisions_out))
    return result


async def _run(
    source: Iterable[Event],
    result: BacktestResult,
    on_offers: OffersHook | None,
    decisions_out: IO[bytes] | None,
) -> None:
    groups = result.groups
    rewards = result.rewards
    kinds = result.events_by_kind
    for events in _batches(source, result.batch_size):
        incoming = [Incoming(event) for event in events]
        triggers: dict[str, Event] = {}
        low = high = events[0].ts
        for event in events:  # one pass: kinds, triggers, the batch's time range
            kinds[event_kind(event)] += 1
            if not isinstance(event, PurchaseEvent):
                triggers[event.event_id] = event
            ts = event.ts
            if ts < low:
                low = ts
            elif ts > high:
                high = ts
        result.events += len(events)
        result.first_ts = low if result.first_ts is None else min(result.first_ts, low)
        result.last_ts = high if result.last_ts is None else max(result.last_ts, high)
        offers: list[dict[str, object]] = []
        for number, group in enumerate(groups):
            batch = await group.engine.process(incoming)
            if number == 0:
                result.statuses.update(UpdateStatus(s).name.lower() for s in batch.statuses)
            _absorb(group, batch, triggers, rewards, decisions_out)
            if on_offers is not None:
                offers.extend(_offer_messages(group, batch.offers))
        if on_offers is not None:
            on_offers(offers)


def finalize_decision_lines(
    lines: Iterable[bytes], rewards: bytearray, labelled: IO[bytes], pending: IO[bytes]
) -> tuple[int, int]:
    """Fill in each decision's reward: labelled decisions to ``labelled`` (the OPE log, reward
    0/1), decisions still in their attribution window to ``pending`` (reward ``null``).

    Returns the number of lines written to each.
    """
    values = (b'"reward":0', b'"reward":1', b'"reward":null')
    written = [0, 0]
    for seq, line in enumerate(lines):
        reward = rewards[seq]
        target = pending if reward == PENDING else labelled
        target.write(line.replace(REWARD_PLACEHOLDER, values[reward], 1))
        written[reward == PENDING] += 1
    return written[0], written[1]
