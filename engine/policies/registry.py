"""The policy registry: each ``policy = "..."`` name of a campaigns file and how to build it.

Adding a policy is one module in ``engine/policies/`` (a ``Policy`` subclass with a
``from_entry`` classmethod) plus one line in ``_BUILDERS``; see docs/architecture.md.
``register_policy`` adds one at run time (tests, plugins).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from engine.policies.base import Policy
from engine.policies.linear import LinearPolicy
from engine.policies.profit import ProfitPolicy
from engine.policies.rules import RulesPolicy
from engine.policies.threshold import ThresholdPolicy

PolicyBuilder = Callable[[Mapping[str, Any]], Policy]
"""Builds a policy from its campaign's TOML entry; a ValueError names the bad field."""

DEFAULT_POLICY = "threshold"
"""The policy of a campaign that names none."""

_BUILDERS: dict[str, PolicyBuilder] = {
    "threshold": ThresholdPolicy.from_entry,
    "linear": LinearPolicy.from_entry,
    "rules": RulesPolicy.from_entry,
    "profit": ProfitPolicy.from_entry,
}


def policy_names() -> tuple[str, ...]:
    """The registered policy names, in registration order."""
    return tuple(_BUILDERS)


def build_policy(entry: Mapping[str, Any]) -> Policy:
    """The policy a campaign's TOML entry names (``policy``, default ``threshold``), built
    from the entry; a ValueError says what is wrong (the caller adds which campaign)."""
    kind = entry.get("policy", DEFAULT_POLICY)
    builder = _BUILDERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        raise ValueError(f"unknown policy {kind!r} (known: {', '.join(policy_names())})")
    return builder(entry)


def register_policy(name: str, builder: PolicyBuilder) -> None:
    """Make ``policy = "<name>"`` build a policy with ``builder``; names are never replaced."""
    if name in _BUILDERS:
        raise ValueError(f"policy {name!r} is already registered")
    _BUILDERS[name] = builder


def unregister_policy(name: str) -> None:
    """Undo ``register_policy``."""
    if name not in _BUILDERS:
        raise ValueError(f"policy {name!r} is not registered")
    del _BUILDERS[name]
