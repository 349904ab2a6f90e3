"""The closed-loop world (engine/analysis/simulation): determinism, event-time order, common random
numbers between copies, offers that never reach into the past, and the response rule itself."""

from __future__ import annotations

import math
from collections.abc import Iterator

import orjson
import pytest

from engine.analysis.simulation.errors import WorldError
from engine.analysis.simulation.shoppers import Shopper, events_per_session, purchase_probability
from engine.analysis.simulation.world import DEFAULT_START_MS, World, open_loop
from engine.events import parse_event

FAR = DEFAULT_START_MS + 10**12
"""An expiry no test reaches."""


def offer(
    user_id: str, discount: float, issued_at: int, offer_id: str = "o-test"
) -> dict[str, object]:
    return {
        "offer_id": offer_id,
        "user_id": user_id,
        "campaign": "test",
        "discount_pct": discount,
        "issued_at": issued_at,
        "expires_at": FAR,
    }


def test_the_same_seed_gives_the_same_events_and_another_seed_other_events() -> None:
    first = list(open_loop(users=50, events=3000, seed=7))
    second = list(open_loop(users=50, events=3000, seed=7))
    other = list(open_loop(users=50, events=3000, seed=8))
    assert orjson.dumps(first) == orjson.dumps(second)
    assert [e["event_id"] for e in first] != [e["event_id"] for e in other]


def test_events_are_valid_unique_and_in_event_time_order() -> None:
    events = list(open_loop(users=40, events=5000, seed=3))
    parsed = [parse_event(orjson.loads(orjson.dumps(event))) for event in events]
    assert len({e.event_id for e in parsed}) == len(parsed)
    stamps = [e.ts for e in parsed]
    assert stamps == sorted(stamps)
    kinds = {e.type for e in parsed}
    actions = {e.action for e in parsed if e.type == "browse"}  # type: ignore[union-attr]
    assert kinds == {"browse", "search", "purchase"}
    assert actions == {"view", "cart", "favorite"}


def test_a_purchase_follows_a_cart_of_the_same_items_in_its_session() -> None:
    carted: dict[str, set[str]] = {}
    purchases = 0
    for event in open_loop(users=30, events=4000, seed=5):
        user = str(event["user_id"])
        if event["type"] == "browse" and event["action"] == "cart":
            carted.setdefault(user, set()).add(str(event["item_id"]))
        elif event["type"] == "purchase":
            purchases += 1
            items = event["items"]
            assert isinstance(items, list)
            assert {item["item_id"] for item in items} <= carted.get(user, set())
            total = round(sum(item["price"] for item in items), 2)
            assert event["amount"] == total  # no offers: nothing discounted
            carted.pop(user, None)
    assert purchases > 20


def test_the_population_event_rate_follows_mean_gap_ms() -> None:
    events = list(open_loop(users=300, events=60_000, seed=2, mean_gap_ms=250.0))
    span = int(events[-1]["ts"]) - int(events[0]["ts"])  # type: ignore[call-overload]
    # Stationary sessions give 250 ms per event on average; the first sessions start spread
    # over one session cycle, so allow a few per cent.
    assert 0.9 < span / len(events) / 250.0 < 1.1
    assert 4.0 < events_per_session() < 10.0


def test_shoppers_have_tastes_that_sum_to_one_and_drive_their_categories() -> None:
    world = World(users=20, seed=1)
    for shopper in world.shoppers:
        assert math.isclose(sum(w for _, w in shopper.tastes), 1.0, abs_tol=1e-3)
        assert 0.0 < shopper.propensity <= 0.9
    counts: dict[str, dict[str, int]] = {}
    for event in world.events(20_000):
        if event["type"] == "browse" and event["action"] == "view":
            per_user = counts.setdefault(str(event["user_id"]), {})
            per_user[str(event["category"])] = per_user.get(str(event["category"]), 0) + 1
    hits = 0
    for shopper in world.shoppers:
        seen = counts.get(shopper.user_id)
        if seen and sum(seen.values()) >= 50:
            hits += max(seen, key=seen.__getitem__) == shopper.tastes[0][0]
    assert hits >= 12  # the heaviest taste is the most viewed category for most shoppers


def test_bad_worlds_raise_world_errors() -> None:
    with pytest.raises(WorldError, match="at least one user"):
        World(users=0, seed=1)
    with pytest.raises(WorldError, match="mean_gap_ms"):
        World(users=1, seed=1, mean_gap_ms=0)
    with pytest.raises(WorldError, match="negative"):
        open_loop(users=1, events=-1, seed=1)
    with pytest.raises(WorldError, match="offer v1"):
        World(users=1, seed=1).receive([{"user_id": "u0000000", "discount_pct": "ten"}])


# -- common random numbers --------------------------------------------------------------------


def take(stream: Iterator[dict[str, object]], count: int) -> list[dict[str, object]]:
    return [next(stream) for _ in range(count)]


def find_turnable_checkout(seed: int) -> tuple[int, dict[str, object]]:
    """The position and event of an abandoned checkout by a deal seeker in the no-offer world:
    a 100 % offer before it must turn it into a purchase."""
    world = World(users=60, seed=seed)
    sensitive = {s.user_id for s in world.shoppers if s.price_sensitivity >= 1.5}
    carts: dict[str, set[str]] = {}
    for position, event in enumerate(world.events(20_000)):
        user = str(event["user_id"])
        if event["type"] == "browse" and event["action"] == "cart":
            carts.setdefault(user, set()).add(str(event["item_id"]))
        elif event["type"] == "purchase":
            carts.pop(user, None)
        elif (
            event["type"] == "browse"
            and event["action"] == "view"
            and str(event["item_id"]) in carts.get(user, set())
            and user in sensitive
            and position > 500
        ):
            # An abandoned checkout is a last look at an item already in the cart.
            return position, event
    raise AssertionError("no abandoned checkout by a deal seeker found")


def test_copies_diverge_only_after_an_offer_and_only_for_that_user() -> None:
    seed = 11
    position, abandoned = find_turnable_checkout(seed)
    user = str(abandoned["user_id"])
    plain, treated = World(users=60, seed=seed), World(users=60, seed=seed)
    plain_stream, treated_stream = plain.events(), treated.events()
    before = position - 200
    assert take(plain_stream, before) == take(treated_stream, before)
    treated.receive([offer(user, 100.0, treated.clock)])
    after_plain, after_treated = take(plain_stream, 3000), take(treated_stream, 3000)
    differing = [(a, b) for a, b in zip(after_plain, after_treated, strict=True) if a != b]
    assert differing, "the offer changed nothing"
    for a, b in differing:
        # Same slot in the stream: same user, event id and time; only the checkout outcome.
        assert a["user_id"] == b["user_id"] == user
        assert (a["event_id"], a["ts"]) == (b["event_id"], b["ts"])
    first_a, first_b = differing[0]
    if first_a["type"] == "purchase":  # the offer may have met an earlier checkout instead
        assert first_b["type"] == "purchase" and first_b["offer_id"] == "o-test"
    else:
        assert first_b["type"] == "purchase" and first_b["offer_id"] == "o-test"
        assert first_b["amount"] == 0.0  # 100 % off
    assert treated.redeemed == 1 and plain.redeemed == 0


def test_offers_never_change_past_events_and_time_never_goes_back() -> None:
    plain, treated = World(users=40, seed=4), World(users=40, seed=4)
    plain_events = list(plain.events(4000))
    treated_stream = treated.events()
    head = take(treated_stream, 2000)
    clock = treated.clock
    # Back-dated offers, issued at the very start, to everybody.
    treated.receive(
        [offer(s.user_id, 50.0, DEFAULT_START_MS, f"o-{i}") for i, s in enumerate(treated.shoppers)]
    )
    tail = take(treated_stream, 2000)
    assert head == plain_events[:2000]
    assert all(int(e["ts"]) >= clock for e in tail)  # type: ignore[call-overload]
    stamps = [int(e["ts"]) for e in head + tail]  # type: ignore[call-overload]
    assert stamps == sorted(stamps)
    assert [e["event_id"] for e in tail] == [e["event_id"] for e in plain_events[2000:]]
    assert treated.purchases > plain.purchases - sum(
        1 for e in plain_events[:2000] if e["type"] == "purchase"
    )


def test_asking_the_truth_never_changes_the_events() -> None:
    quiet, curious = World(users=30, seed=9), World(users=30, seed=9)
    quiet_events = list(quiet.events(3000))
    curious_events: list[dict[str, object]] = []
    stream = curious.events()
    for position in range(3000):
        curious_events.append(next(stream))
        if position % 7 == 0:
            for shopper in curious.shoppers[:10]:
                curious.truth(shopper.user_id, before_ms=curious.clock + 7 * 86_400_000)
    assert quiet_events == curious_events


def test_the_truth_is_the_next_checkout_before_the_expiry() -> None:
    world = World(users=25, seed=6)
    horizon = DEFAULT_START_MS + 10**11
    truths = {s.user_id: world.truth(s.user_id, before_ms=horizon) for s in world.shoppers}
    checkouts: dict[str, dict[str, object]] = {}
    for event in world.events(20_000):
        user = str(event["user_id"])
        truth = truths.get(user)
        if truth is not None and user not in checkouts and event["ts"] == truth.ts:
            checkouts[user] = event
    assert len(checkouts) >= 20
    for user, event in checkouts.items():
        truth = truths[user]
        assert truth is not None
        if event["type"] == "purchase":
            assert len(event["items"]) == truth.items  # type: ignore[arg-type]
            assert event["amount"] == truth.value
    assert world.truth("nobody", before_ms=horizon) is None
    assert world.truth(world.shoppers[0].user_id, before_ms=world.clock) is None


# -- the response rule ----------------------------------------------------------------------------


def test_offers_raise_checkout_conversion_as_the_rule_says_in_proportion_to_sensitivity() -> None:
    """Every shopper gets a 20 % offer up front; with common random numbers each first
    checkout converts in the treated copy whenever it converts in the plain one, and also
    with probability P(buy | 20) - P(buy | 0) more. Observed extra purchases per sensitivity
    group must match the rule within four standard deviations of the sampling noise."""
    users, discount = 3000, 20.0
    plain, treated = World(users=users, seed=21), World(users=users, seed=21)
    horizon = DEFAULT_START_MS + 10**12
    first = {s.user_id: plain.truth(s.user_id, before_ms=horizon) for s in plain.shoppers}
    treated.receive(
        [
            offer(s.user_id, discount, DEFAULT_START_MS, f"o-{i}")
            for i, s in enumerate(treated.shoppers)
        ]
    )
    outcome: dict[str, list[bool]] = {}
    for a, b in zip(plain.events(150_000), treated.events(150_000), strict=True):
        user = str(a["user_id"])
        truth = first[user]
        if truth is not None and a["ts"] == truth.ts and user not in outcome:
            outcome[user] = [a["type"] == "purchase", b["type"] == "purchase"]
    shoppers = {s.user_id: s for s in plain.shoppers}
    groups: dict[str, list[tuple[Shopper, int, bool, bool]]] = {"low": [], "high": []}
    for user, (bought, bought_treated) in outcome.items():
        shopper, truth = shoppers[user], first[user]
        assert truth is not None
        assert bought_treated or not bought  # an offer never loses a purchase
        group = "high" if shopper.price_sensitivity >= 1.5 else "low"
        groups[group].append((shopper, truth.items, bought, bought_treated))
    uplifts = {}
    for name, rows in groups.items():
        assert len(rows) > 300, name
        lifts = [
            purchase_probability(s, n, discount) - purchase_probability(s, n, 0.0)
            for s, n, _, _ in rows
        ]
        expected = sum(lifts)
        observed = sum(int(t) - int(b) for _, _, b, t in rows)
        sigma = math.sqrt(sum(p * (1 - p) for p in lifts))
        assert abs(observed - expected) < 4 * sigma + 1, (name, observed, expected, sigma)
        uplifts[name] = observed / len(rows)
    assert uplifts["high"] > 2 * uplifts["low"] > 0


def test_the_expected_incremental_margin_is_the_realised_one_without_the_coin_flips() -> None:
    """Against a no-offer copy, the realised difference of margins is a sum over treated
    checkouts of independent draws; the expected version is its mean given the offers. They
    must agree within four standard deviations (the world reports the variance)."""
    margin = 0.3
    plain, treated = World(users=2000, seed=31), World(users=2000, seed=31)
    treated.receive(
        [offer(s.user_id, 15.0, DEFAULT_START_MS, f"o-{i}") for i, s in enumerate(treated.shoppers)]
    )
    for _ in zip(plain.events(60_000), treated.events(60_000), strict=True):
        pass
    realised = treated.margin(margin) - plain.margin(margin)
    expected = treated.expected_incremental_margin(margin)
    sigma = math.sqrt(treated.incremental_margin_variance(margin))
    assert treated.redeemed > 300 and sigma > 0
    assert abs(realised - expected) < 4 * sigma, (realised, expected, sigma)
    assert plain.expected_incremental_margin(margin) == 0.0
