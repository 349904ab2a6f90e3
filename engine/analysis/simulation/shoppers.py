"""Shoppers of the world: the shop they browse (categories, search queries), their latent
traits, the known response rule, the truth at a decision, session maths."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from engine.analysis.simulation.params import WorldParams

CATEGORIES: tuple[str, ...] = (
    "electronics",
    "books",
    "fashion",
    "home",
    "beauty",
    "sports",
    "toys",
    "grocery",
)
"""The shop's categories: shoppers' tastes are weights over them."""
QUERIES: tuple[str, ...] = (
    "wireless headphones",
    "running shoes",
    "coffee maker",
    "desk lamp",
    "novel",
    "yoga mat",
    "lego",
    "face cream",
)
"""What shoppers type into the search box."""

INTRA_SESSION_GAP_MS = 30_000.0
"""Mean gap between two events of one session (shorter when a shopper is very active)."""
TASTE_SLOTS = 100
"""Category tastes are drawn from a table of this many slots (1 % resolution)."""
MAX_SESSION_STEPS = 60
MAX_TRUTH_CHECKOUTS = 20
"""The truth looks at most this many checkouts ahead (an offer rarely lives through more)."""


@dataclass(frozen=True, slots=True)
class Shopper:
    """A shopper's latent traits: what the oracle knows and the engine has to learn."""

    user_id: str
    propensity: float
    """Chance that a checkout of one item ends in a purchase without a discount."""
    price_sensitivity: float
    """How much a 100 % discount would add to that chance (scaled by the discount)."""
    tastes: tuple[tuple[str, float], ...]
    """Weights over categories (summing to 1): where this shopper's views fall."""
    activity: float
    """Relative event rate within the population."""


class Responsive(Protocol):
    """What the response rule reads of a shopper (``Shopper`` has both)."""

    @property
    def propensity(self) -> float: ...

    @property
    def price_sensitivity(self) -> float: ...


def purchase_probability(user: Responsive, cart_items: int, discount_pct: float) -> float:
    """The known response rule: P(checkout) given cart size and the best offered discount.

    ``base = 1 - (1 - propensity) ** items``; a discount d adds
    ``price_sensitivity * d/100 * (1 - base)``; the result is capped at 0.98."""
    if cart_items <= 0:
        return 0.0
    base = 1.0 - (1.0 - user.propensity) ** cart_items
    return min(0.98, base + user.price_sensitivity * discount_pct / 100.0 * (1.0 - base))


@dataclass(frozen=True, slots=True)
class Truth:
    """What the world knows at a decision: the shopper's checkouts before an offer expires."""

    user_index: int
    session: int
    ts: int
    """Event time of the next checkout."""
    items: int
    value: float
    """Undiscounted value of the cart at that checkout."""
    held_pct: float
    """The best discount the shopper already holds that is still valid at the checkout."""
    shopper: Shopper
    later: tuple[tuple[int, int, float], ...] = ()
    """Further checkouts before the expiry, (ts, items, value): an offer that an abandoned
    checkout leaves unused waits for them."""

    @property
    def key(self) -> tuple[int, int]:
        return (self.user_index, self.session)

    def p_buy(self, discount_pct: float) -> float:
        """P(buy) at the next checkout."""
        return purchase_probability(self.shopper, self.items, discount_pct)

    def expected_incremental_margin(self, discount_pct: float, margin: float) -> float:
        """What an offer of d is worth against no offer, over the checkouts it can reach:
        sum_i alive_i * V_i * (P_i(buy | d) * (margin - d/100) - P_i(buy | 0) * margin), where
        alive_i = prod_{j<i} (1 - P_j(buy | d)) is the chance that no earlier purchase used it.
        """
        if not discount_pct:
            return 0.0
        shopper, cut = self.shopper, margin - discount_pct / 100.0
        total, alive = 0.0, 1.0
        for items, value in ((self.items, self.value), *((i, v) for _, i, v in self.later)):
            p_offer = purchase_probability(shopper, items, discount_pct)
            p_none = purchase_probability(shopper, items, 0.0)
            total += alive * value * (p_offer * cut - p_none * margin)
            alive *= 1.0 - p_offer
        return total


def events_per_session(params: WorldParams | None = None) -> float:
    """Mean events of a session (steps plus the checkout when the cart is not empty).

    States per step: no item viewed yet, an item viewed with an empty cart, a non-empty cart;
    the length is 1 + a geometric number of further steps."""
    params = params or WorldParams()
    search_p, cart_p, end_p = params.search_p, params.cart_p, params.session_end_p
    browse = 1.0 - search_p
    p_none, p_viewed, p_cart = 1.0, 0.0, 0.0
    with_cart = 0.0
    survive = 1.0
    for _ in range(10_000):
        p_none, p_viewed, p_cart = (
            p_none * search_p,
            p_none * browse + p_viewed * (1.0 - browse * cart_p),
            p_cart + p_viewed * browse * cart_p,
        )
        with_cart += survive * end_p * p_cart
        survive *= 1.0 - end_p
        if survive < 1e-15:
            break
    return 1.0 / end_p + with_cart


Session = tuple[int, list[tuple[object, ...]], tuple[int, int, float] | None]
"""(number, steps, (checkout ts, items, value) or None)."""


class Live:
    """A shopper's mutable state inside the world (kept small: one per user)."""

    __slots__ = (
        "ahead",
        "checkout",
        "count",
        "index",
        "inter_rate",
        "intra_rate",
        "offers",
        "plan",
        "planned",
        "planned_end",
        "pos",
        "rng",
        "session",
        "shopper",
        "table",
        "user_id",
    )

    def __init__(self, index: int, shopper: Shopper, rng: random.Random) -> None:
        self.index = index
        self.shopper = shopper
        self.user_id = shopper.user_id
        self.rng = rng
        self.table: tuple[str, ...] = taste_table(shopper.tastes)
        self.intra_rate = 0.0
        self.inter_rate = 0.0
        self.plan: list[tuple[object, ...]] = []
        self.pos = 0
        self.session = 0
        self.checkout: tuple[int, int, float] | None = None
        """(ts, items, value) of the current session's checkout, if it has one."""
        self.ahead: list[Session] = []
        """Sessions planned beyond the current one (only when the truth looked ahead)."""
        self.planned = 0
        """Sessions planned so far; the last one ends at ``planned_end``."""
        self.planned_end = 0.0
        self.offers: list[tuple[int, int, float, str]] = []
        """Received offers: (issued_at, expires_at, discount_pct, offer_id)."""
        self.count = 0


def taste_table(tastes: tuple[tuple[str, float], ...]) -> tuple[str, ...]:
    table: list[str] = []
    cumulative = 0.0
    for category, weight in tastes:
        cumulative += weight
        table.extend([category] * (round(cumulative * TASTE_SLOTS) - len(table)))
    table.extend([tastes[-1][0]] * (TASTE_SLOTS - len(table)))
    return tuple(table[:TASTE_SLOTS])


def make_shopper(user_id: str, rng: random.Random, params: WorldParams | None = None) -> Shopper:
    """Draw a shopper's traits from their own random stream (the draws' order is fixed:
    changing a parameter changes values, never which draw feeds which trait)."""
    params = params or WorldParams()
    propensity = min(params.propensity_cap, rng.betavariate(*params.propensity_beta))
    deal_seeker = rng.random() < params.deal_seekers
    low, high = params.deal_seeker_sensitivity if deal_seeker else params.sensitivity
    sensitivity = rng.uniform(low, high)
    favourites = rng.sample(CATEGORIES, k=rng.randint(1, 3))
    raw = [rng.expovariate(1.0) for _ in favourites]
    weights = dict.fromkeys(CATEGORIES, 0.2 / len(CATEGORIES))
    for category, share in zip(favourites, raw, strict=True):
        weights[category] += 0.8 * share / sum(raw)
    tastes = tuple((c, round(w, 4)) for c, w in sorted(weights.items(), key=lambda cw: -cw[1]))
    activity = rng.lognormvariate(0.0, 0.8)
    return Shopper(user_id, propensity, sensitivity, tastes, activity)
