"""Within a micro-batch, events from different topics are handled in event-time order."""

from __future__ import annotations

from engine.campaigns import Campaign
from engine.events import BrowseEvent, PurchaseEvent, PurchaseItem
from engine.features.store import InMemoryFeatureStore, Position, UpdateStatus
from engine.pipeline import DiscountEngine, Incoming, event_time_order
from engine.policies.threshold import ThresholdPolicy

T0 = 1_767_225_600_000


def view(event_id: str, ts: int, offset: int) -> Incoming:
    event = BrowseEvent(event_id, "u1", ts, "i1", "books", 20.0, "view")
    return Incoming(event, Position("events.browse", 0, offset))


def purchase(event_id: str, ts: int, offset: int) -> Incoming:
    item = PurchaseItem(item_id="i1", category="books", price=20.0, quantity=1)
    event = PurchaseEvent(event_id, "u1", ts, f"o-{event_id}", (item,), 20.0)
    return Incoming(event, Position("events.purchase", 0, offset))


def test_merge_keeps_each_partitions_order_and_interleaves_by_event_time() -> None:
    batch = [
        purchase("p1", T0 + 30, 0),
        purchase("p2", T0 + 10, 1),  # late within its partition: stays after p1
        view("v1", T0, 0),
        view("v2", T0 + 20, 1),
    ]
    assert event_time_order(batch) == [2, 3, 0, 1]


async def test_a_purchase_read_first_still_labels_the_decision_it_follows() -> None:
    campaign = Campaign("c", ThresholdPolicy(threshold=0.0), decision_interval_ms=0)
    engine = DiscountEngine(InMemoryFeatureStore(), campaigns=[campaign])
    # The consumer handed over the purchase topic's record before the browse topic's.
    result = await engine.process([purchase("p1", T0 + 60_000, 0), view("v1", T0, 0)])
    assert result.statuses == [UpdateStatus.APPLIED, UpdateStatus.APPLIED]
    (decision,) = result.decisions
    assert decision.trigger_event_id == "v1"
    assert decision.features["purchase_count_30d"] == 0  # no peeking at the later purchase
    (example,) = result.training
    assert example.decision_id == decision.decision_id
    assert example.label == 1
