"""The stop-loss in a backtest: when each campaign stopped and resumed, and what it cost.

A campaign's stop-loss status changes at a ledger settle, which a backtest makes event by
event. ``BatchResult.stop_loss`` only shows the status at the end of each batch: transitions
read from it would depend on the batch size, and a stop and a resume within one batch would
be lost. So ``track_transitions`` swaps each campaign's ``CampaignStopLoss`` in the in-memory
ledger for a ``RecordingStopLoss``, which evaluates exactly as before and notes every change
of state at the event time it happened. The log is bounded: the first ``TRANSITIONS_KEPT``
transitions are kept, the rest only counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.campaigns import Campaign
from engine.ledger import InMemoryLedger
from engine.stop_loss import CampaignStopLoss, StopLossStatus

TRANSITIONS_KEPT = 50


@dataclass(frozen=True, slots=True)
class Transition:
    ts: int
    """Event time of the change."""
    stopped: bool
    """True: the campaign stopped; False: it resumed."""


@dataclass(slots=True)
class StopLossLog:
    """A campaign's changes of stop-loss state over a run, in bounded memory."""

    transitions: list[Transition] = field(default_factory=list)
    """The first ``TRANSITIONS_KEPT`` changes."""
    total: int = 0
    stops: int = 0
    stopped_ms: int = 0
    """Event time spent stopped, over the stops that have ended."""
    stopped_at: int | None = None
    """Event time of the stop in progress, if any."""

    def add(self, ts: int, stopped: bool) -> None:
        self.total += 1
        if len(self.transitions) < TRANSITIONS_KEPT:
            self.transitions.append(Transition(ts, stopped))
        if stopped:
            self.stops += 1
            self.stopped_at = ts
        elif self.stopped_at is not None:
            self.stopped_ms += ts - self.stopped_at
            self.stopped_at = None

    def stopped_time_ms(self, end_ms: int) -> int:
        """Event time spent stopped up to ``end_ms`` (a stop in progress counts up to it)."""
        running = max(end_ms - self.stopped_at, 0) if self.stopped_at is not None else 0
        return self.stopped_ms + running


@dataclass(slots=True)
class RecordingStopLoss(CampaignStopLoss):
    """A ``CampaignStopLoss`` that writes each change of state to its ``log``."""

    log: StopLossLog = field(default_factory=StopLossLog)

    def update(self, now_ms: int) -> StopLossStatus:
        was_stopped = self.status.stopped
        # Explicit base call: zero-argument super() fails in slotted dataclasses.
        status = CampaignStopLoss.update(self, now_ms)
        if status.stopped != was_stopped:
            self.log.add(now_ms if status.since_ms is None else status.since_ms, status.stopped)
        return status


def track_transitions(ledger: InMemoryLedger) -> dict[str, StopLossLog]:
    """Make the ledger's stop-loss campaigns record their transitions; their logs by name."""
    logs: dict[str, StopLossLog] = {}
    for name, state in list(ledger.stop_loss.items()):
        recording = RecordingStopLoss(
            state.config, state.margin, state.sums, state.users, state.status
        )
        ledger.stop_loss[name] = recording
        logs[name] = recording.log
    return logs


def stop_loss_section(
    campaign: Campaign,
    log: StopLossLog | None,
    status: StopLossStatus,
    *,
    non_holdout_decisions: int,
    stopped_decisions: int,
    stopped_offers: int,
    end_ms: int,
) -> dict[str, Any] | None:
    """A campaign's ``stop_loss`` section of report.json (None without a stop-loss)."""
    config = campaign.stop_loss
    if config is None:
        return None
    log = log if log is not None else StopLossLog()
    return {
        "window_h": config.window_ms / 3_600_000,
        "min_decisions": config.min_decisions,
        "min_users": config.min_users,
        "explore": config.explore,
        "transitions": [
            {"ts": t.ts, "direction": "stopped" if t.stopped else "resumed"}
            for t in log.transitions
        ],
        "transitions_total": log.total,
        "transitions_omitted": log.total - len(log.transitions),
        "stops": log.stops,
        "stopped_s": log.stopped_time_ms(end_ms) / 1000,
        "stopped_decisions": stopped_decisions,
        "stopped_offers": stopped_offers,
        "stopped_share": (
            stopped_decisions / non_holdout_decisions if non_holdout_decisions else None
        ),
        "final": {
            "stopped": status.stopped,
            "since_ts": status.since_ms,
            "decisions": status.decisions,
            "incremental_margin": status.incremental_margin,
            "lower_bound": status.lower_bound,
            "upper_bound": status.upper_bound,
        },
    }
