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

``World`` and ``open_loop`` live in ``engine.analysis.simulation.world``, ``WorldParams`` and
``load_world_file`` in ``engine.analysis.simulation.params``, ``Shopper`` and ``Truth`` in
``engine.analysis.simulation.shoppers``, the errors in ``engine.analysis.simulation.errors``.
"""
