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
same events produce the same events.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from engine.features.catalogue import FEATURE_NAMES


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

    def to_compact(self) -> list[Any]:
        """A positional JSON-ready record (what the Redis ledger stores).

        ``[ts, campaign, offer_id, decision_id, user_id, discount_pct, propensity,
        model_version, features, arm, converted_at]``: the fields the Redis ledger's script
        reads come first; features are their values in catalogue order (the catalogue only
        ever grows at its end) unless the names differ from the catalogue, when they stay a
        mapping; the script sets ``converted_at`` in place.
        """
        names = tuple(self.features)
        features: Any = (
            list(self.features.values()) if names == FEATURE_NAMES else dict(self.features)
        )
        return [
            self.ts,
            self.campaign,
            self.offer_id,
            self.decision_id,
            self.user_id,
            self.discount_pct,
            self.propensity,
            self.model_version,
            features,
            str(self.arm),
            self.converted_at,
        ]

    @classmethod
    def from_compact(
        cls, record: Sequence[Any], converted_at: int | None = None
    ) -> PendingDecision:
        """The decision ``to_compact`` wrote; ``converted_at``, when given, replaces the
        record's (the Redis ledger keeps the first conversion beside the record)."""
        (ts, campaign, offer_id, decision_id, user_id, discount, propensity, version, raw) = record[
            :9
        ]
        arm = record[9]
        if converted_at is None:
            converted_at = record[10]
        features = (
            {str(k): float(v) for k, v in raw.items()}
            if isinstance(raw, dict)
            else dict(zip(FEATURE_NAMES, map(float, raw), strict=False))
        )
        return cls(
            decision_id=str(decision_id),
            user_id=str(user_id),
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


class PendingLabels:
    """Open decisions per user, converted by purchases, closed by the passing of event time."""

    def __init__(self, attribution_window_ms: int = 24 * 3600 * 1000, elapsed_ms: int = 0) -> None:
        if elapsed_ms < 0 or (elapsed_ms and elapsed_ms >= attribution_window_ms):
            raise ValueError(
                f"elapsed_ms must be 0 (off) or within (0, {attribution_window_ms}), "
                f"got {elapsed_ms}"
            )
        self.attribution_window_ms = attribution_window_ms
        self.elapsed_ms = elapsed_ms
        self._by_user: dict[str, dict[str, PendingDecision]] = {}
        self._due: list[tuple[int, int, str, str]] = []
        """(event time, 0 elapsed / 1 closed, decision_id, user_id): a heap."""

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_user.values())

    def add(self, decision: PendingDecision) -> None:
        self._by_user.setdefault(decision.user_id, {})[decision.decision_id] = decision
        due = self._due
        deadline = decision.ts + self.attribution_window_ms
        heapq.heappush(due, (deadline, 1, decision.decision_id, decision.user_id))
        if self.elapsed_ms:
            heapq.heappush(
                due, (decision.ts + self.elapsed_ms, 0, decision.decision_id, decision.user_id)
            )

    def open_decisions(self, user_id: str) -> list[PendingDecision]:
        return list(self._by_user.get(user_id, {}).values())

    def on_purchase(self, user_id: str, ts: int) -> list[LabelEvent]:
        """Convert every open decision of the user whose window holds ``ts``; in (ts, id) order."""
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

    def due(self, now: int) -> bool:
        """Whether ``expire(now)`` has anything to emit (it may still emit nothing)."""
        return bool(self._due) and self._due[0][0] < now

    def expire(self, now: int) -> list[LabelEvent]:
        """``elapsed`` and ``closed`` events for every point in event time before ``now``."""
        events: list[LabelEvent] = []
        due = self._due
        while due and due[0][0] < now:
            at, closing, decision_id, user_id = heapq.heappop(due)
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
