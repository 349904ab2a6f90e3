"""The closed-loop world: seeded shoppers in sessions who answer offers by a known rule.

Each shopper has latent traits (purchase propensity, price sensitivity, category tastes,
activity) and a random stream of their own, ``random.Random(f"{seed}:{user_id}")``. Shoppers
act in sessions planned when the session starts: views, searches, carts of the item just
viewed, favourites; a session whose cart is not empty ends in a checkout. Offers received
through ``World.receive`` change only the outcome of later checkouts (see ``docs/simulator.md``
for the exact rule), never a plan, an event time or an event already produced. So two copies
of the world with the same seed produce the same events in the same order, except that a
checkout may end in a purchase in one copy and not in the other: common random numbers, which
make the counterfactual comparison of policies nearly noise-free.
"""

from engine.world.core import World, open_loop
from engine.world.shoppers import Shopper, Truth, WorldError, events_per_session, make_shopper

__all__ = [
    "Shopper",
    "Truth",
    "World",
    "WorldError",
    "events_per_session",
    "make_shopper",
    "open_loop",
]
