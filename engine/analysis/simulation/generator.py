"""Synthetic shoppers: seeded browse, search and purchase traffic with a known response rule.

Each user has a latent purchase propensity, a price sensitivity and favourite categories.
Users act in sessions: they search, view items, add some to the cart, and check out with a
probability that grows with their propensity and cart size. A discount offered to the user
(``offers`` in ``generate``) raises that probability by their price sensitivity, which is the
"known rule" a backtest can measure policies against.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

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
DEFAULT_START_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z: simulated event time starts here unless told otherwise."""


@dataclass(frozen=True, slots=True)
class SimUser:
    user_id: str
    propensity: float
    """Baseline chance that a session with items in the cart ends in a purchase."""
    price_sensitivity: float
    """How much a discount of 100 % would add to that chance (scaled linearly by discount)."""
    categories: tuple[str, ...]
    activity: float


def make_users(count: int, rng: random.Random, prefix: str = "u") -> list[SimUser]:
    users = []
    for index in range(count):
        propensity = min(0.9, rng.betavariate(1.5, 6.0))
        sensitivity = rng.uniform(0.0, 1.5)
        categories = tuple(rng.sample(CATEGORIES, k=rng.randint(1, 3)))
        activity = rng.lognormvariate(0.0, 0.8)
        users.append(SimUser(f"{prefix}{index:07d}", propensity, sensitivity, categories, activity))
    return users


class Responsive(Protocol):
    """What the response rule reads of a shopper.

    ``SimUser`` here, ``engine.analysis.simulation.shoppers.Shopper`` in the closed-loop world.
    """

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


def generate(
    *,
    users: int,
    events: int,
    seed: int,
    start_ms: int = DEFAULT_START_MS,
    mean_gap_ms: float = 100.0,
    offers: Mapping[str, float] | None = None,
    user_prefix: str = "u",
) -> Iterator[dict[str, object]]:
    """Yield ``events`` event v1 dicts in event-time order, deterministic for a given seed.

    ``mean_gap_ms`` is the average event-time gap between consecutive events of the whole
    population. ``offers`` maps user ids to a discount currently offered to them.
    """
    if users < 1 or events < 0:
        raise ValueError("need at least one user and a non-negative event count")
    rng = random.Random(seed)
    population = make_users(users, rng, user_prefix)
    cum_weights = list(itertools.accumulate(u.activity for u in population))
    carts: dict[str, list[tuple[str, str, float]]] = {}
    ts = float(start_ms)
    order = 0
    offered = offers or {}
    for index in range(events):
        ts += rng.expovariate(1.0 / mean_gap_ms) if mean_gap_ms > 0 else 0.0
        user = rng.choices(population, cum_weights=cum_weights)[0]
        cart = carts.setdefault(user.user_id, [])
        base = {"event_id": f"sim-{seed}-{index}", "user_id": user.user_id, "ts": int(ts)}
        roll = rng.random()
        category = rng.choice(user.categories) if rng.random() < 0.8 else rng.choice(CATEGORIES)
        if cart and roll < 0.12:
            discount = offered.get(user.user_id, 0.0)
            if rng.random() < purchase_probability(user, len(cart), discount):
                order += 1
                items = [
                    {"item_id": item, "category": cat, "price": price, "quantity": 1}
                    for item, cat, price in cart
                ]
                amount = round(sum(price for _, _, price in cart) * (1 - discount / 100.0), 2)
                yield {
                    **base,
                    "type": "purchase",
                    "order_id": f"o-{seed}-{order}",
                    "items": items,
                    "amount": amount,
                }
            else:
                yield {
                    **base,
                    "type": "browse",
                    "item_id": cart[-1][0],
                    "category": cart[-1][1],
                    "price": cart[-1][2],
                    "action": "view",
                }
            cart.clear()
            continue
        if roll < 0.25:
            event: dict[str, object] = {**base, "type": "search", "query": rng.choice(QUERIES)}
            if rng.random() < 0.6:
                event["category"] = category
            yield event
            continue
        item_id = f"i{rng.randrange(5000):05d}"
        price = round(math.exp(rng.gauss(3.2, 0.9)), 2)
        action_roll = rng.random()
        action = "cart" if action_roll < 0.18 else "favorite" if action_roll < 0.25 else "view"
        if action == "cart":
            cart.append((item_id, category, price))
        yield {
            **base,
            "type": "browse",
            "item_id": item_id,
            "category": category,
            "price": price,
            "action": action,
        }
