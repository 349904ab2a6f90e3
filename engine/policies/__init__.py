"""Discount policies: one module each, one registry.

- ``base``: the ``Policy`` base class, ``PolicyContext`` (what a policy sees),
  ``PolicyChoice`` (what it returns) and the helpers the policies share.
- ``threshold``, ``linear``, ``rules``, ``profit``: the policies, each with ``from_entry`` to
  build it from a campaign's TOML entry.
- ``registry``: policy names -> builders (``build_policy``, ``policy_names``,
  ``register_policy``).

Import names from the module that defines them (this package re-exports nothing).
"""
