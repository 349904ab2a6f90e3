"""Delayed labels: did the user buy within the attribution window after a decision?

A decision's label is 1 when the user makes a purchase within ``attribution_window_ms`` of
event time after it, whatever the purchase redeemed, and 0 otherwise. The same rule holds for
decisions with and without an offer, so the label measures what a discount changes: an offer
does not widen the window in which its decision can be credited (it did, when a redeemed
offer claimed the purchase for its own decision, and the model learned that offers multiply
purchases several times over).

A decision stays open until its window closes, and produces label events in event time:

- ``converted`` when the first purchase in its window arrives (label 1 from then on);
- ``elapsed`` when ``elapsed_ms`` of event time have passed (if configured): the label as far
  as it is known then, for delayed-feedback learners that do not wait for the whole window;
- ``closed`` when the window ends: the final label.

Expiry follows event-time progress, never the wall clock, so a live run and a backtest of the
same events produce the same events. Each *lane* has its own clock: a lane is a partition number,
whose browse, search and purchase partitions hold the same users (co-partitioned by user id), so
a purchase that can convert a decision always arrives on the decision's own lane. A lane read
ahead of another therefore closes none of the other's windows. A backtest has one lane.

A purchase is remembered for ``purchase_memory_ms`` of its user's event time (the allowed
lateness: no later event of the user older than that is applied), so a decision read after a
purchase that followed it is still converted by it: labels do not depend on which of the two
was read first.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import orjson

from engine.features.catalogue import StoredFeatures, features_from_stored, stored_features


class Arm(StrEnum):
    """Where a decision counts in its campaign's stop-loss comparison."""

    NONE = ""
    TREATED = "T"
    """Not in the holdout, and the policy, active for this decision, proposed an offer."""
    HOLDOUT = "H"
    """In the holdout, and the policy would have proposed an offer."""


@dataclass(frozen=True, slots=True)
class PendingDecision:
    decision_id: str
    user_id: str
    campaign: str
    ts: int
    features: Mapping[str, float]
    discount_pct: float
    propensity: float
    model_version: str
    offer_id: str | None
    arm: Arm = Arm.NONE
    converted_at: int | None = None
    """Event time of the first purchase within the window, once there is one."""

    def to_compact(self, packed: StoredFeatures | None = None) -> list[Any]:
        """A positional JSON-ready record (what the Redis ledger stores, under its decision id
        in its user's hash: neither is repeated in it).

        ``[ts, campaign, arm, offer, discount_pct, propensity, model_version, features]``,
        then ``converted_at`` when there is one: the fields the Redis ledger's script reads
        come first. ``offer`` is 1 when the offer id is the one the decision id implies
        (``offer_id_of``), the id itself when it is another, None when there is no offer.
        Features are ``stored_features``: their values in catalogue order (the catalogue
        only ever grows at its end) packed into short text (``packed``, when the caller has
        packed them already).
        """
        record: list[Any] = [
            self.ts,
            self.campaign,
            str(self.arm),
            self._stored_offer(),
            self.discount_pct,
            self.propensity,
            self.model_version,
            stored_features(self.features) if packed is None else packed,
        ]
        if self.converted_at is not None:
            record.append(self.converted_at)
        return record

    def compact_json(self, packed: StoredFeatures | None = None) -> bytes:
        """``to_compact`` as JSON."""
        return orjson.dumps(self.to_compact(packed))

    def _stored_offer(self) -> str | int | None:
        """1 for the offer id the decision id implies, else the offer id (or None)."""
        offer = self.offer_id
        return 1 if offer is not None and offer == offer_id_of(self.decision_id) else offer

    @classmethod
    def from_compact(
        cls,
        record: Sequence[Any],
        *,
        decision_id: str,
        user_id: str,
        converted_at: int | None = None,
    ) -> PendingDecision:
        """The decision ``to_compact`` wrote, stored under ``decision_id`` for ``user_id``;
        ``converted_at``, when given, replaces the record's (the Redis ledger keeps the first
        conversion beside the record)."""
        ts, campaign, arm, offer, discount, propensity, version, raw = record[:8]
        if converted_at is None and len(record) > 8:
            converted_at = record[8]
        features = features_from_stored(raw)
        offer_id = offer_id_of(decision_id) if offer == 1 else offer
        return cls(
            decision_id=decision_id,
            user_id=user_id,
            campaign=str(campaign),
            ts=int(ts),
            features=features,
            discount_pct=float(discount),
            propensity=float(propensity),
            model_version=str(version),
            offer_id=None if offer_id is None else str(offer_id),
            arm=Arm(arm),
            converted_at=None if converted_at is None else int(converted_at),
        )


def offer_id_of(decision_id: str) -> str | None:
    """The offer id a decision's id implies: both are ``stable_id`` of the same campaign and
    trigger event (``engine/pipeline.py``), with prefixes ``o-`` and ``d-``. None for an id
    of another form."""
    return "o-" + decision_id[2:] if decision_id.startswith("d-") else None


class LabelKind(StrEnum):
    CONVERTED = "converted"
    ELAPSED = "elapsed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class LabelEvent:
    """Something learned about a decision's label at event time ``ts``."""

    decision: PendingDecision
    kind: LabelKind
    ts: int

    @property
    def label(self) -> int:
        """The label as known at ``ts``: 1 once a purchase in the window has been seen."""
        converted = self.decision.converted_at
        return 1 if converted is not None and converted <= self.ts else 0

    @property
    def final(self) -> bool:
        """Whether ``label`` is the decision's final label (it can still change otherwise)."""
        return self.kind is not LabelKind.ELAPSED or self.label == 1


@dataclass(frozen=True, slots=True)
class PurchaseSeen:
    """What the labels remember of a purchase: when, and what it was worth (the stop-loss
    measures a converted decision by its first purchase's margin)."""

    ts: int
    amount_cents: int = 0
    gross_cents: int = 0


@dataclass(frozen=True, slots=True)
class Conversion:
    """A decision converted when it was recorded, by a purchase remembered from before."""

    event: LabelEvent
    purchase: PurchaseSeen


class PendingLabels:
    """Open decisions per user, converted by purchases, closed by the passing of event time on
    their lane."""

    def __init__(
        self,
        attribution_window_ms: int = 24 * 3600 * 1000,
        elapsed_ms: int = 0,
        purchase_memory_ms: int = 0,
    ) -> None:
        if elapsed_ms < 0 or (elapsed_ms and elapsed_ms >= attribution_window_ms):
            raise ValueError(
                f"elapsed_ms must be 0 (off) or within (0, {attribution_window_ms}), "
                f"got {elapsed_ms}"
            )
        if purchase_memory_ms < 0:
            raise ValueError(f"purchase_memory_ms must be >= 0, got {purchase_memory_ms}")
        self.attribution_window_ms = attribution_window_ms
        self.elapsed_ms = elapsed_ms
        self.purchase_memory_ms = purchase_memory_ms
        self._by_user: dict[str, dict[str, PendingDecision]] = {}
        self._due: dict[int, list[tuple[int, int, str, str]]] = {}
        """Per lane, (event time, 0 elapsed / 1 closed, decision_id, user_id): a heap."""
        self._purchases: dict[str, list[PurchaseSeen]] = {}
        """Each user's purchases within ``purchase_memory_ms`` of their latest, by time."""

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_user.values())

    def add(self, decision: PendingDecision, lane: int = 0) -> Conversion | None:
        """Open ``decision`` on ``lane``; if a remembered purchase falls in its window, the
        first one converts it at once (returned)."""
        conversion = self._remembered_conversion(decision)
        if conversion is not None:
            decision = conversion.event.decision
        self._by_user.setdefault(decision.user_id, {})[decision.decision_id] = decision
        due = self._due.get(lane)
        if due is None:
            due = self._due[lane] = []
        deadline = decision.ts + self.attribution_window_ms
        heapq.heappush(due, (deadline, 1, decision.decision_id, decision.user_id))
        if self.elapsed_ms:
            heapq.heappush(
                due, (decision.ts + self.elapsed_ms, 0, decision.decision_id, decision.user_id)
            )
        return conversion

    def _remembered_conversion(self, decision: PendingDecision) -> Conversion | None:
        purchases = self._purchases.get(decision.user_id)
        if not purchases:
            return None
        first = bisect.bisect_left(purchases, decision.ts, key=_purchase_time)
        if first == len(purchases):
            return None
        purchase = purchases[first]
        if purchase.ts - decision.ts > self.attribution_window_ms:
            return None
        converted = replace(decision, converted_at=purchase.ts)
        return Conversion(LabelEvent(converted, LabelKind.CONVERTED, purchase.ts), purchase)

    def open_decisions(self, user_id: str) -> list[PendingDecision]:
        return list(self._by_user.get(user_id, {}).values())

    def on_purchase(self, user_id: str, purchase: PurchaseSeen) -> list[LabelEvent]:
        """Convert every open decision of the user whose window holds the purchase, in
        (ts, id) order, and remember the purchase for decisions read after it."""
        ts = purchase.ts
        self._remember(user_id, purchase)
        pending = self._by_user.get(user_id)
        if not pending:
            return []
        window = self.attribution_window_ms
        events: list[LabelEvent] = []
        for decision in sorted(pending.values(), key=lambda d: (d.ts, d.decision_id)):
            if decision.converted_at is None and 0 <= ts - decision.ts <= window:
                converted = replace(decision, converted_at=ts)
                pending[decision.decision_id] = converted
                events.append(LabelEvent(converted, LabelKind.CONVERTED, ts))
        return events

    def _remember(self, user_id: str, purchase: PurchaseSeen) -> None:
        purchases = self._purchases.get(user_id)
        if purchases is None:
            self._purchases[user_id] = [purchase]
            return
        bisect.insort(purchases, purchase, key=_purchase_time)
        horizon = purchases[-1].ts - self.purchase_memory_ms
        if purchases[0].ts < horizon:
            del purchases[: bisect.bisect_left(purchases, horizon, key=_purchase_time)]

    def due(self, lane: int, now: int) -> bool:
        """Whether ``expire({lane: now})`` has anything to emit (it may still emit nothing)."""
        due = self._due.get(lane)
        return due is not None and bool(due) and due[0][0] < now

    def expire(self, lanes: Mapping[int, int]) -> list[LabelEvent]:
        """``elapsed`` and ``closed`` events for every point in event time before each lane's
        clock (``lanes``: lane -> now), in event-time order across the lanes."""
        popped: list[tuple[int, int, str, str]] = []
        for lane, now in lanes.items():
            due = self._due.get(lane)
            while due and due[0][0] < now:
                popped.append(heapq.heappop(due))
        if len(lanes) > 1:
            popped.sort()
        events: list[LabelEvent] = []
        for at, closing, decision_id, user_id in popped:
            pending = self._by_user.get(user_id)
            decision = pending.get(decision_id) if pending else None
            if decision is None or pending is None:
                continue
            if closing:
                del pending[decision_id]
                if not pending:
                    del self._by_user[user_id]
                events.append(LabelEvent(decision, LabelKind.CLOSED, at))
            else:
                events.append(LabelEvent(decision, LabelKind.ELAPSED, at))
        return events


def _purchase_time(purchase: PurchaseSeen) -> int:
    return purchase.ts
