"""Delayed labels: decisions wait for a purchase within the attribution window.

A purchase by the user labels their latest open decision 1 (or, when it carries ``offer_id``,
the decision that issued that offer). A decision whose window passes without a purchase is
labelled 0. Expiry follows event-time progress, never the wall clock, so a live run and a
backtest of the same events produce the same labels.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.features import FEATURE_NAMES


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

    def to_record(self) -> dict[str, object]:
        """A JSON-ready record (what the Redis ledger stores)."""
        return {
            "decision_id": self.decision_id,
            "user_id": self.user_id,
            "campaign": self.campaign,
            "ts": self.ts,
            "features": dict(self.features),
            "discount_pct": self.discount_pct,
            "propensity": self.propensity,
            "model_version": self.model_version,
            "offer_id": self.offer_id,
        }

    def to_compact(self) -> list[Any]:
        """A positional JSON-ready record, about a third of ``to_record``'s size.

        ``[ts, campaign, offer_id, decision_id, user_id, discount_pct, propensity,
        model_version, features]``: the fields the Redis ledger's script reads come first, and
        the features are their values in catalogue order (the catalogue only ever grows at its
        end, so a record stays readable after features are added) unless the names differ from
        the catalogue, when they stay a mapping.
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
        ]

    @classmethod
    def from_compact(cls, record: Sequence[Any]) -> PendingDecision:
        ts, campaign, offer_id, decision_id, user_id, discount, propensity, version, raw = record
        features = (
            {str(k): float(v) for k, v in raw.items()}
            if isinstance(raw, dict)
            else {name: float(v) for name, v in zip(FEATURE_NAMES, raw, strict=False)}
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
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PendingDecision:
        return cls(
            decision_id=str(record["decision_id"]),
            user_id=str(record["user_id"]),
            campaign=str(record["campaign"]),
            ts=int(record["ts"]),
            features={str(k): float(v) for k, v in dict(record["features"]).items()},
            discount_pct=float(record["discount_pct"]),
            propensity=float(record["propensity"]),
            model_version=str(record["model_version"]),
            offer_id=None if record.get("offer_id") is None else str(record["offer_id"]),
        )


@dataclass(frozen=True, slots=True)
class LabelledExample:
    decision: PendingDecision
    label: int
    labeled_at: int

    def to_message(self) -> dict[str, object]:
        """The training example v1 message."""
        return {
            "decision_id": self.decision.decision_id,
            "features": dict(self.decision.features),
            "discount_pct": self.decision.discount_pct,
            "label": self.label,
            "labeled_at": self.labeled_at,
        }


class PendingLabels:
    """Open decisions per user, labelled by purchases or by the passing of event time."""

    def __init__(self, attribution_window_ms: int = 24 * 3600 * 1000) -> None:
        self.attribution_window_ms = attribution_window_ms
        self._by_user: dict[str, list[PendingDecision]] = {}
        self._expiry: list[tuple[int, str, str]] = []  # (deadline, decision_id, user_id)

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_user.values())

    def add(self, decision: PendingDecision) -> None:
        self._by_user.setdefault(decision.user_id, []).append(decision)
        deadline = decision.ts + self.attribution_window_ms
        heapq.heappush(self._expiry, (deadline, decision.decision_id, decision.user_id))

    def on_purchase_all(
        self, user_id: str, ts: int, offer_id: str | None = None
    ) -> list[LabelledExample]:
        """Label, for every campaign, the open decision this purchase is attributed to."""
        campaigns = sorted({d.campaign for d in self._by_user.get(user_id, ())})
        labelled = (self.on_purchase(user_id, ts, offer_id, campaign=c) for c in campaigns)
        return [example for example in labelled if example is not None]

    def on_purchase(
        self, user_id: str, ts: int, offer_id: str | None = None, *, campaign: str | None = None
    ) -> LabelledExample | None:
        """Label the decision this purchase is attributed to, if one is open.

        That is the decision that issued ``offer_id`` when the purchase redeemed an offer,
        else the latest decision within the attribution window (of ``campaign`` when given).
        """
        pending = self._by_user.get(user_id)
        if not pending:
            return None
        in_window = [
            d
            for d in pending
            if 0 <= ts - d.ts <= self.attribution_window_ms
            and (campaign is None or d.campaign == campaign)
        ]
        chosen: PendingDecision | None = None
        if offer_id is not None:
            chosen = next((d for d in in_window if d.offer_id == offer_id), None)
        if chosen is None and in_window:
            chosen = max(in_window, key=lambda d: (d.ts, d.decision_id))
        if chosen is None:
            return None
        pending.remove(chosen)
        if not pending:
            del self._by_user[user_id]
        return LabelledExample(chosen, 1, ts)

    def due(self, now: int) -> bool:
        """Whether ``expire(now)`` has any window to close (it may still label nothing)."""
        return bool(self._expiry) and self._expiry[0][0] < now

    def expire(self, now: int) -> list[LabelledExample]:
        """Label 0 every open decision whose attribution window ended before ``now``."""
        examples: list[LabelledExample] = []
        while self._expiry and self._expiry[0][0] < now:
            deadline, decision_id, user_id = heapq.heappop(self._expiry)
            pending = self._by_user.get(user_id)
            if not pending:
                continue
            for index, decision in enumerate(pending):
                if decision.decision_id == decision_id:
                    del pending[index]
                    if not pending:
                        del self._by_user[user_id]
                    examples.append(LabelledExample(decision, 0, deadline))
                    break
        return examples
