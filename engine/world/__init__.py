"""The closed-loop world: seeded shoppers in sessions who answer offers by a known rule.

Each shopper has latent traits (purchase propensity, price sensitivity, category tastes,
activity) and a random stream of their own, ``random.Random(f"{seed}:{user_id}")``. Shoppers
act in sessions planned when the session starts: views, searches, carts of the item just
viewed, favourites; a session whose cart is not empty ends in a checkout. Offers received
through ``World.receive`` change only the outcome of later checkouts (see ``docs/simulator.md``
for the exact rule), never a plan, an event time or an event already produced. So two copies
of the world with the same seed produce the same events in the same order, except that a
checkout may end in a purchase in one copy and not in the other: common random numbers, which
make the counterfactual comparison of policies nearly noise-free. ``WorldParams`` sets the
shoppers and their sessions (a ``[world]`` TOML table: ``load_world_file``).
"""

from engine.world.core import DEFAULT_MEAN_GAP_MS, World, open_loop
from engine.world.errors import WorldError, WorldParamError
from engine.world.params import WorldFile, WorldParams, load_world_file, parse_world_file
from engine.world.shoppers import Shopper, Truth, events_per_session, make_shopper

__all__ = [
    "DEFAULT_MEAN_GAP_MS",
    "Shopper",
    "Truth",
    "World",
    "WorldError",
    "WorldFile",
    "WorldParamError",
    "WorldParams",
    "events_per_session",
    "load_world_file",
    "make_shopper",
    "open_loop",
    "parse_world_file",
]
