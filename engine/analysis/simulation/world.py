"""The world itself: shoppers' sessions merged into one event-time stream, offers received,
checkouts decided by the known rule, and the truth an oracle reads."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Iterator, Mapping

from engine.analysis.simulation.errors import WorldError
from engine.analysis.simulation.params import WorldParams
from engine.analysis.simulation.shoppers import (
    INTRA_SESSION_GAP_MS,
    MAX_SESSION_STEPS,
    MAX_TRUTH_CHECKOUTS,
    QUERIES,
    TASTE_SLOTS,
    Live,
    Session,
    Shopper,
    Truth,
    events_per_session,
    make_shopper,
    purchase_probability,
)

DEFAULT_START_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z: simulated event time starts here unless told otherwise."""
DEFAULT_MEAN_GAP_MS = 100.0
"""The open-loop world's population-wide mean event gap unless told otherwise."""


class World:
    """A population of shoppers producing event v1 dicts in event-time order.

    ``mean_gap_ms`` is the mean event-time gap between consecutive events of the whole
    population; each shopper's share of events follows their activity. ``params`` sets the
    shoppers and their sessions (``WorldParams()``, the documented world, when None).
    """

    def __init__(
        self,
        *,
        users: int,
        seed: int,
        start_ms: int = DEFAULT_START_MS,
        mean_gap_ms: float = DEFAULT_MEAN_GAP_MS,
        user_prefix: str = "u",
        params: WorldParams | None = None,
    ) -> None:
        if users < 1:
            raise WorldError(f"a world needs at least one user, got {users}")
        if not mean_gap_ms > 0 or not math.isfinite(mean_gap_ms):
            raise WorldError(f"mean_gap_ms must be a positive number, got {mean_gap_ms}")
        params = params or WorldParams()
        params.check()
        self.params = params
        self.seed = seed
        self._live: list[Live] = []
        self._by_id: dict[str, int] = {}
        for index in range(users):
            user_id = f"{user_prefix}{index:07d}"
            rng = random.Random(f"{seed}:{user_id}")
            self._live.append(Live(index, make_shopper(user_id, rng, params), rng))
            self._by_id[user_id] = index
        total = math.fsum(live.shopper.activity for live in self._live)
        per_session = events_per_session(params)
        self._heap: list[tuple[float, int]] = []
        for live in self._live:
            user_gap = mean_gap_ms * total / live.shopper.activity
            intra = min(INTRA_SESSION_GAP_MS, user_gap / 4.0)
            inter = per_session * user_gap - (per_session - 1.0) * intra
            live.intra_rate, live.inter_rate = 1.0 / intra, 1.0 / inter
            first = start_ms + live.rng.uniform(0.0, per_session * user_gap)
            self._enter(live, self._plan(live, first))
            self._heap.append((first, live.index))
        heapq.heapify(self._heap)
        self.clock = start_ms
        """Event time of the latest event produced."""
        self.purchases = 0
        self.redeemed = 0
        self.gross_cents = 0
        """Undiscounted value of every purchase, in cents."""
        self.paid_cents = 0
        """What shoppers paid (after discounts), in cents."""
        self.offers_received = 0
        self.offers_ignored = 0
        """Offers for users this world does not know, or with a zero discount."""
        self._tally = _Tally()

    @property
    def shoppers(self) -> list[Shopper]:
        return [live.shopper for live in self._live]

    def margin(self, margin: float) -> float:
        """Margin earned from every purchase so far: value * margin - discounts given."""
        return (self.gross_cents * margin - (self.gross_cents - self.paid_cents)) / 100.0

    def expected_incremental_margin(self, margin: float) -> float:
        """Sum over the checkouts so far at which an offer applied of
        V * (P(buy | d) * (margin - d/100) - P(buy | 0) * margin): the realised incremental
        margin against a no-offer copy with each checkout's coin flip replaced by its
        expectation (the same sum, less the sampling noise of the treated checkouts)."""
        return self._tally.mean(margin)

    def incremental_margin_variance(self, margin: float) -> float:
        """Variance of the realised incremental margin around the expected one (the treated
        checkouts' coin flips): what a statistical check of the two needs."""
        return self._tally.variance(margin)

    # -- sessions -------------------------------------------------------------------------------

    def _plan(self, live: Live, start: float) -> Session:
        """Draw a whole session up front: its steps never depend on offers, and sessions are
        drawn from the shopper's stream in order, whether the truth looks ahead or not."""
        rng = live.rng
        table = live.table
        params = self.params
        search_p, cart_p, end_p = params.search_p, params.cart_p, params.session_end_p
        cart_or_favorite_p = cart_p + params.favorite_p
        ts = start
        steps: list[tuple[object, ...]] = []
        cart: list[tuple[str, str, float]] = []
        viewed: tuple[str, str, float] | None = None
        while True:
            if rng.random() < search_p:
                category = table[int(rng.random() * TASTE_SLOTS)] if rng.random() < 0.6 else None
                steps.append(("s", ts, QUERIES[int(rng.random() * len(QUERIES))], category))
            else:
                roll = rng.random()
                if viewed is not None and roll < cart_p:
                    cart.append(viewed)
                    steps.append(("b", ts, *viewed, "cart"))
                elif viewed is not None and roll < cart_or_favorite_p:
                    steps.append(("b", ts, *viewed, "favorite"))
                else:
                    category = table[int(rng.random() * TASTE_SLOTS)]
                    price = round(math.exp(rng.gauss(3.2, 0.9)), 2)
                    viewed = (f"i{int(rng.random() * 5000):05d}", category, price)
                    steps.append(("b", ts, *viewed, "view"))
            if rng.random() < end_p or len(steps) >= MAX_SESSION_STEPS:
                break
            ts += rng.expovariate(live.intra_rate)
        checkout = None
        if cart:
            ts += rng.expovariate(live.intra_rate)
            value = round(sum(price for _, _, price in cart), 2)
            checkout = (int(ts), len(cart), value)
            steps.append(("c", ts, tuple(cart), value, rng.random()))
        live.planned += 1
        live.planned_end = ts
        return (live.planned, steps, checkout)

    def _next_session(self, live: Live) -> Session:
        if live.ahead:
            return live.ahead.pop(0)
        return self._plan(live, live.planned_end + live.rng.expovariate(live.inter_rate))

    @staticmethod
    def _enter(live: Live, session: Session) -> None:
        live.session, live.plan, live.checkout = session
        live.pos = 0

    # -- events ---------------------------------------------------------------------------------

    def events(self, limit: int | None = None) -> Iterator[dict[str, object]]:
        """The next ``limit`` events (all, forever, when None), lazily, in event-time order.

        Offers received while this iterator is suspended affect only the events after it."""
        heap, lives, seed = self._heap, self._live, self.seed
        emitted = 0
        while limit is None or emitted < limit:
            _, index = heap[0]
            live = lives[index]
            step = live.plan[live.pos]
            live.pos += 1
            live.count = count = live.count + 1
            user_id = live.user_id
            event_id = f"sim-{seed}-{index}-{count}"
            ts = int(step[1])  # type: ignore[call-overload]
            kind = step[0]
            event: dict[str, object]
            if kind == "b":
                event = {
                    "event_id": event_id,
                    "user_id": user_id,
                    "ts": ts,
                    "type": "browse",
                    "item_id": step[2],
                    "category": step[3],
                    "price": step[4],
                    "action": step[5],
                }
            elif kind == "s":
                event = {
                    "event_id": event_id,
                    "user_id": user_id,
                    "ts": ts,
                    "type": "search",
                    "query": step[2],
                }
                if step[3] is not None:
                    event["category"] = step[3]
            else:
                event = self._checkout(live, step, event_id, ts)
            if live.pos == len(live.plan):
                self._enter(live, self._next_session(live))
            heapq.heapreplace(heap, (live.plan[live.pos][1], index))  # type: ignore[misc]
            emitted += 1
            self.clock = ts
            yield event

    def _checkout(
        self, live: Live, step: tuple[object, ...], event_id: str, ts: int
    ) -> dict[str, object]:
        """The known rule at work: the best valid offer raises P(buy); a purchase redeems it."""
        _, _, cart, value, draw = step
        assert isinstance(cart, tuple) and isinstance(value, float) and isinstance(draw, float)
        offer = self._best_offer(live, ts)
        discount = offer[2] if offer is not None else 0.0
        p_buy = purchase_probability(live.shopper, len(cart), discount)
        if offer is not None:
            p_none = purchase_probability(live.shopper, len(cart), 0.0)
            self._tally.add(value, discount / 100.0, p_buy, p_none)
        if draw >= p_buy:
            # Abandoned: the shopper looks at the last cart item once more and leaves.
            item_id, category, price = cart[-1]
            return {
                "event_id": event_id,
                "user_id": live.shopper.user_id,
                "ts": ts,
                "type": "browse",
                "item_id": item_id,
                "category": category,
                "price": price,
                "action": "view",
            }
        amount = round(value * (1.0 - discount / 100.0), 2)
        self.purchases += 1
        self.gross_cents += round(value * 100)
        self.paid_cents += round(amount * 100)
        event: dict[str, object] = {
            "event_id": event_id,
            "user_id": live.shopper.user_id,
            "ts": ts,
            "type": "purchase",
            "order_id": f"o-{event_id}",
            "items": [
                {"item_id": item, "category": cat, "price": price, "quantity": 1}
                for item, cat, price in cart
            ],
            "amount": amount,
        }
        if offer is not None:
            live.offers.remove(offer)
            self.redeemed += 1
            event["offer_id"] = offer[3]
        return event

    @staticmethod
    def _best_offer(live: Live, ts: int) -> tuple[int, int, float, str] | None:
        """The valid offer with the highest discount (the earliest issued on a tie)."""
        if not live.offers:
            return None
        live.offers = [offer for offer in live.offers if offer[1] > ts]
        valid = [offer for offer in live.offers if offer[0] <= ts]
        if not valid:
            return None
        return max(valid, key=lambda offer: (offer[2], -offer[0]))

    # -- the closed loop ------------------------------------------------------------------------

    def receive(self, offers: Iterable[Mapping[str, object]]) -> None:
        """Hand offers (offer v1 dicts) to their shoppers; they shape later checkouts only."""
        for offer in offers:
            self.offers_received += 1
            index = self._by_id.get(str(offer.get("user_id")))
            discount = offer.get("discount_pct")
            issued, expires, offer_id = (
                offer.get("issued_at"),
                offer.get("expires_at"),
                offer.get("offer_id"),
            )
            if (
                not isinstance(discount, int | float)
                or not isinstance(issued, int)
                or not isinstance(expires, int)
                or not isinstance(offer_id, str)
            ):
                raise WorldError(f"not an offer v1 object: {dict(offer)!r:.200}")
            if index is None or not discount > 0:
                self.offers_ignored += 1
                continue
            self._live[index].offers.append((issued, expires, float(discount), offer_id))

    def truth(self, user_id: str, *, before_ms: float) -> Truth | None:
        """The shopper's checkouts that have not happened yet and come before ``before_ms``
        (an offer's expiry): what an offer decided now could change. None without any.

        Looking ahead plans the shopper's next sessions early; they are drawn in the same
        order either way, so asking never changes the events."""
        index = self._by_id.get(user_id)
        if index is None:
            return None
        live = self._live[index]
        found: list[tuple[int, int, int, float]] = []
        if live.checkout is not None:
            found.append((live.session, *live.checkout))
        ahead = 0
        while len(found) < MAX_TRUTH_CHECKOUTS:
            if ahead == len(live.ahead):
                if live.planned_end >= before_ms:
                    break
                live.ahead.append(
                    self._plan(live, live.planned_end + live.rng.expovariate(live.inter_rate))
                )
            number, steps, checkout = live.ahead[ahead]
            ahead += 1
            if steps[0][1] >= before_ms:  # type: ignore[operator]
                break
            if checkout is not None:
                found.append((number, *checkout))
        found = [checkout for checkout in found if checkout[1] < before_ms]
        if not found:
            return None
        number, ts, items, value = found[0]
        held = max((offer[2] for offer in live.offers if offer[0] <= ts < offer[1]), default=0.0)
        later = tuple((t, n, v) for _, t, n, v in found[1:])
        return Truth(index, number, ts, items, value, held, live.shopper, later)


class _Tally:
    """Sums over treated checkouts from which the expected incremental margin and its variance
    follow for any margin m. Per checkout (value V, discount x = d/100, P(buy) p with the offer
    and q without), the realised difference is -V x (both buy, prob q), V (m - x) (only with
    the offer, prob p - q) or 0."""

    __slots__ = ("cost", "cost2", "cross", "lift", "lift2", "pq2", "pq2x", "pq2x2", "q2")

    def __init__(self) -> None:
        self.lift = self.cost = self.lift2 = self.cross = self.cost2 = 0.0
        self.q2 = self.pq2 = self.pq2x = self.pq2x2 = 0.0

    def add(self, value: float, x: float, p: float, q: float) -> None:
        lift, cost = value * (p - q), value * p * x  # mean = m * lift - cost
        self.lift += lift
        self.cost += cost
        self.lift2 += lift * lift
        self.cross += lift * cost
        self.cost2 += cost * cost
        v2 = value * value
        self.q2 += q * v2 * x * x
        self.pq2 += (p - q) * v2
        self.pq2x += (p - q) * v2 * x
        self.pq2x2 += (p - q) * v2 * x * x

    def mean(self, m: float) -> float:
        return m * self.lift - self.cost

    def variance(self, m: float) -> float:
        second = self.q2 + m * m * self.pq2 - 2 * m * self.pq2x + self.pq2x2
        squared_means = m * m * self.lift2 - 2 * m * self.cross + self.cost2
        return max(second - squared_means, 0.0)


def open_loop(
    *,
    users: int,
    events: int,
    seed: int,
    start_ms: int = DEFAULT_START_MS,
    mean_gap_ms: float = DEFAULT_MEAN_GAP_MS,
    user_prefix: str = "u",
    params: WorldParams | None = None,
) -> Iterator[dict[str, object]]:
    """``events`` event v1 dicts from a world that receives no offers."""
    if events < 0:
        raise WorldError(f"the event count must not be negative, got {events}")
    world = World(
        users=users,
        seed=seed,
        start_ms=start_ms,
        mean_gap_ms=mean_gap_ms,
        user_prefix=user_prefix,
        params=params,
    )
    return world.events(events)
