"""Campaigns: which events trigger a decision, with which policy, under which guardrails.

Campaigns are read from a TOML file (``DEALSTREAM_CAMPAIGNS``); see ``docs/campaigns.md``::

    [[campaign]]
    name = "cart-savers"
    policy = "profit"                 # threshold | linear | rules | profit
    ladder = [0, 5, 10, 15, 20]
    margin = 0.3
    epsilon = 0.1
    max_discount_pct = 20
    triggers = ["view", "cart"]
    categories = ["electronics"]      # eligibility: trigger category (empty = all)
    customers = "returning"           # all | new | returning
    cooldown_s = 3600
    max_offers_per_day = 3
    offer_ttl_s = 86400
    daily_budget = 500.0              # currency units per event-time day
    holdout = 0.1
    max_disparity = 3.0               # highest / lowest offer rate across segments
    stop_loss = { window_h = 24, min_decisions = 200, explore = 0.05 }
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.policies.base import Policy, entry_number
from engine.policies.registry import build_policy
from engine.policies.threshold import ThresholdPolicy
from engine.stop_loss import StopLoss

TRIGGER_KINDS = ("view", "cart", "favorite", "search")
CUSTOMER_SEGMENTS = ("all", "new", "returning")


class CampaignError(EngineError):
    """A campaigns file that cannot be used; the message names the campaign and the field."""


@dataclass(frozen=True, slots=True)
class Campaign:
    name: str
    policy: Policy
    triggers: tuple[str, ...] = TRIGGER_KINDS
    categories: tuple[str, ...] = ()
    """Eligible trigger categories; empty means every category."""
    customers: str = "all"
    """``new``: no purchase in the last 30 days; ``returning``: at least one."""
    max_discount_pct: float = 100.0
    offer_ttl_ms: int = 24 * 3600 * 1000
    decision_interval_ms: int = 10 * 60 * 1000
    """At most one decision per user and campaign per interval of event time."""
    cooldown_ms: int = 0
    """Minimum event time between two offers to the same user."""
    max_offers_per_day: int | None = None
    daily_budget_cents: int | None = None
    """Discount budget per event-time (UTC) day; None means unlimited."""
    holdout: float = 0.0
    """Fraction of users (by a hash of user id and campaign) who never get offers."""
    default_order_value: float = 50.0
    """Order value assumed when neither the trigger item's price nor history gives one."""
    seed: int = 0
    """Seeds the exploration draws, which are otherwise a function of the decision id."""
    max_disparity: float | None = None
    """Largest allowed ratio between the highest and the lowest offer rate across segments
    (new vs returning customers, trigger category, activity quintile); None: not checked."""
    margin: float = 0.3
    """Gross margin as a share of the undiscounted order value (the profit policy's too):
    what the stop-loss and the reports measure a purchase with."""
    stop_loss: StopLoss | None = None
    """Fall back to exploration only while the campaign loses against its holdout."""


def default_campaigns() -> tuple[Campaign, ...]:
    return (Campaign(name="default", policy=ThresholdPolicy()),)


def _number(
    name: str,
    entry: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float = 0.0,
    maximum: float = float("inf"),
) -> float:
    """A numeric field, checked, with an error that names the campaign and the field."""
    try:
        return entry_number(entry, key, default, minimum=minimum, maximum=maximum)
    except ValueError as exc:
        raise CampaignError(f"campaign {name!r}: {exc}") from None


def _optional_number(
    name: str, entry: Mapping[str, Any], key: str, *, minimum: float = 0.0
) -> float | None:
    return _number(name, entry, key, 0.0, minimum=minimum) if key in entry else None


def _strings(
    name: str, entry: Mapping[str, Any], key: str, default: tuple[str, ...]
) -> tuple[str, ...]:
    value = entry.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CampaignError(f"campaign {name!r}: {key!r} must be a list of non-empty strings")
    return tuple(value)


_STOP_LOSS_KEYS = ("window_h", "min_decisions", "explore", "min_users")


def _stop_loss(name: str, entry: Mapping[str, Any], holdout: float) -> StopLoss | None:
    raw = entry.get("stop_loss", False)
    if raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise CampaignError(
            f"campaign {name!r}: 'stop_loss' must be a table such as "
            "{ window_h = 24, min_decisions = 200, explore = 0.05 }, true or false"
        )
    unknown = sorted(set(raw) - set(_STOP_LOSS_KEYS))
    if unknown:
        raise CampaignError(
            f"campaign {name!r}: unknown stop_loss keys {unknown} (known: {list(_STOP_LOSS_KEYS)})"
        )
    if holdout <= 0:
        raise CampaignError(
            f"campaign {name!r}: a stop_loss compares the campaign with its holdout; set "
            "'holdout' (e.g. 0.1) or stop_loss = false"
        )
    fields = {f"stop_loss.{key}": value for key, value in raw.items()}
    defaults = StopLoss()
    window_h = _number(
        name, fields, "stop_loss.window_h", defaults.window_ms / 3_600_000, minimum=1 / 60
    )
    return StopLoss(
        window_ms=round(window_h * 3_600_000),
        min_decisions=int(_number(name, fields, "stop_loss.min_decisions", defaults.min_decisions)),
        explore=_number(name, fields, "stop_loss.explore", defaults.explore, maximum=1.0),
        min_users=int(_number(name, fields, "stop_loss.min_users", defaults.min_users, minimum=2)),
    )


def _build_policy(name: str, entry: Mapping[str, Any]) -> Policy:
    """The campaign's policy, from the registry; errors name the campaign."""
    try:
        return build_policy(entry)
    except ValueError as exc:
        raise CampaignError(f"campaign {name!r}: {exc}") from None


def _campaign(position: int, entry: object) -> Campaign:
    if not isinstance(entry, dict):
        raise CampaignError(f"campaign #{position}: must be a [[campaign]] table")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise CampaignError(f"campaign #{position}: 'name' must be a non-empty string")
    triggers = _strings(name, entry, "triggers", TRIGGER_KINDS)
    if not triggers:
        raise CampaignError(f"campaign {name!r}: 'triggers' must be a non-empty list")
    unknown = [t for t in triggers if t not in TRIGGER_KINDS]
    if unknown:
        raise CampaignError(
            f"campaign {name!r}: unknown triggers {unknown} (known: {list(TRIGGER_KINDS)})"
        )
    customers = entry.get("customers", "all")
    if customers not in CUSTOMER_SEGMENTS:
        raise CampaignError(
            f"campaign {name!r}: 'customers' must be one of {list(CUSTOMER_SEGMENTS)}"
        )
    max_offers = _optional_number(name, entry, "max_offers_per_day")
    budget = _optional_number(name, entry, "daily_budget")
    policy = _build_policy(name, entry)
    max_discount = _number(name, entry, "max_discount_pct", 100.0, maximum=100.0)
    levels = policy.discount_levels()
    if levels.is_ladder and max(levels.levels) > max_discount:
        raise CampaignError(
            f"campaign {name!r}: ladder level {max(levels.levels):g} exceeds "
            f"max_discount_pct {max_discount:g}"
        )
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CampaignError(f"campaign {name!r}: 'seed' must be an integer")
    holdout = _number(name, entry, "holdout", 0.0, maximum=1.0)
    return Campaign(
        name=name,
        policy=policy,
        triggers=triggers,
        categories=_strings(name, entry, "categories", ()),
        customers=customers,
        max_discount_pct=max_discount,
        offer_ttl_ms=int(_number(name, entry, "offer_ttl_s", 86400.0) * 1000),
        decision_interval_ms=int(_number(name, entry, "decision_interval_s", 600.0) * 1000),
        cooldown_ms=int(_number(name, entry, "cooldown_s", 0.0) * 1000),
        max_offers_per_day=int(max_offers) if max_offers is not None else None,
        daily_budget_cents=round(budget * 100) if budget is not None else None,
        holdout=holdout,
        default_order_value=_number(name, entry, "default_order_value", 50.0),
        seed=seed,
        max_disparity=_optional_number(name, entry, "max_disparity", minimum=1.0),
        margin=_number(name, entry, "margin", 0.3, maximum=1.0),
        stop_loss=_stop_loss(name, entry, holdout),
    )


def parse_campaigns(document: Mapping[str, Any]) -> tuple[Campaign, ...]:
    entries = document.get("campaign")
    if not isinstance(entries, list) or not entries:
        raise CampaignError("campaigns file needs at least one [[campaign]] table")
    campaigns = [_campaign(position, entry) for position, entry in enumerate(entries, start=1)]
    names = [c.name for c in campaigns]
    if len(set(names)) != len(names):
        raise CampaignError(f"campaign names must be unique, got {names}")
    return tuple(campaigns)


def load_campaigns(path: Path) -> tuple[Campaign, ...]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CampaignError(f"cannot read campaigns file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CampaignError(f"campaigns file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError(f"campaigns file {path} is not valid TOML: {exc}") from None
    return parse_campaigns(document)
