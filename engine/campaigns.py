"""Campaigns: which events trigger a decision, with which policy, and the offer's terms.

Campaigns are read from a TOML file (``DEALSTREAM_CAMPAIGNS``)::

    [[campaign]]
    name = "welcome-back"
    policy = "threshold"
    threshold = 0.5
    discount_pct = 10
    triggers = ["view", "cart", "search"]
    offer_ttl_s = 86400
    decision_interval_s = 600
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.policy import Policy, ThresholdPolicy

TRIGGER_KINDS = ("view", "cart", "favorite", "search")


class CampaignError(EngineError):
    """A campaigns file that cannot be used; the message names the campaign and the field."""


@dataclass(frozen=True, slots=True)
class Campaign:
    name: str
    policy: Policy
    triggers: tuple[str, ...] = TRIGGER_KINDS
    offer_ttl_ms: int = 24 * 3600 * 1000
    decision_interval_ms: int = 10 * 60 * 1000
    """At most one decision per user and campaign per interval of event time."""


def default_campaigns() -> tuple[Campaign, ...]:
    return (Campaign(name="default", policy=ThresholdPolicy()),)


def _number(
    name: str, entry: Mapping[str, Any], key: str, default: float, *, minimum: float = 0.0
) -> float:
    """A numeric field, checked, with an error that names the campaign and the field."""
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise CampaignError(f"campaign {name!r}: {key!r} must be a number, got {value!r}")
    if value < minimum or value == float("inf"):
        raise CampaignError(f"campaign {name!r}: {key!r} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _build_policy(name: str, entry: Mapping[str, Any]) -> Policy:
    kind = entry.get("policy", "threshold")
    if kind == "threshold":
        try:
            return ThresholdPolicy(
                threshold=_number(name, entry, "threshold", 0.5),
                discount_pct=_number(name, entry, "discount_pct", 10.0),
            )
        except ValueError as exc:
            raise CampaignError(f"campaign {name!r}: {exc}") from None
    raise CampaignError(f"campaign {name!r}: unknown policy {kind!r} (known: threshold)")


def parse_campaigns(document: Mapping[str, Any]) -> tuple[Campaign, ...]:
    entries = document.get("campaign")
    if not isinstance(entries, list) or not entries:
        raise CampaignError("campaigns file needs at least one [[campaign]] table")
    campaigns: list[Campaign] = []
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise CampaignError(f"campaign #{position}: must be a [[campaign]] table")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise CampaignError(f"campaign #{position}: 'name' must be a non-empty string")
        raw_triggers = entry.get("triggers", list(TRIGGER_KINDS))
        if not isinstance(raw_triggers, list) or not raw_triggers:
            raise CampaignError(f"campaign {name!r}: 'triggers' must be a non-empty list")
        triggers = tuple(raw_triggers)
        unknown = [t for t in triggers if t not in TRIGGER_KINDS]
        if unknown:
            raise CampaignError(
                f"campaign {name!r}: unknown triggers {unknown} (known: {list(TRIGGER_KINDS)})"
            )
        campaigns.append(
            Campaign(
                name=name,
                policy=_build_policy(name, entry),
                triggers=triggers,
                offer_ttl_ms=int(_number(name, entry, "offer_ttl_s", 86400.0) * 1000),
                decision_interval_ms=int(_number(name, entry, "decision_interval_s", 600.0) * 1000),
            )
        )
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
