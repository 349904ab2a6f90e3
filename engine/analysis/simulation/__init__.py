"""The simulated world, the one source of synthetic traffic: seeded shoppers in sessions who
answer offers by a known rule. Open loop (``open_loop``: no offers) it feeds the CLI, tests and
benchmarks; closed loop (the ``closed_loop`` module) it answers each campaign's offers.

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

``World``, ``open_loop`` and ``DEFAULT_START_MS`` live in ``engine.analysis.simulation.world``,
``WorldParams`` and ``load_world_file`` in ``engine.analysis.simulation.params``, ``Shopper``,
``Truth``, the response rule ``purchase_probability`` and the shop's ``CATEGORIES`` and
``QUERIES`` in ``engine.analysis.simulation.shoppers``, the errors in
``engine.analysis.simulation.errors``.
"""
