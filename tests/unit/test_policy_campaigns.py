"""The threshold policy (engine/policies/threshold.py) and the campaigns file
(engine/campaigns.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from engine.campaigns import (
    TRIGGER_KINDS,
    Campaign,
    CampaignError,
    default_campaigns,
    load_campaigns,
    parse_campaigns,
)
from engine.errors import EngineError
from engine.policies.base import PolicyChoice, PolicyContext
from engine.policies.threshold import ThresholdPolicy

NO_FEATURES: dict[str, float] = {}


def ctx(p: float) -> PolicyContext:
    """A context whose model predicts ``p`` at any discount."""
    return PolicyContext(features=NO_FEATURES, predict=lambda d: p, order_value=50.0, draw=0.5)


# -- ThresholdPolicy ----------------------------------------------------------------------------


def test_paper_case_1_above_half_gives_ten_percent() -> None:
    policy = ThresholdPolicy()
    choice = policy.choose(ctx(0.51))
    assert choice.discount_pct == 10.0
    assert choice.propensity == 1.0
    assert choice.explore is False
    assert choice.rules == ("p_purchase>0.5",)
    assert policy.name == "threshold"


@pytest.mark.parametrize("p", [0.0, 0.25, 0.49999, 0.5])
def test_at_or_below_the_threshold_gives_no_discount(p: float) -> None:
    assert ThresholdPolicy().choose(ctx(p)) == PolicyChoice(0.0, 1.0)


def test_threshold_is_a_strict_inequality() -> None:
    policy = ThresholdPolicy(threshold=0.5, discount_pct=10.0)
    assert policy.choose(ctx(0.5)).discount_pct == 0.0
    assert policy.choose(ctx(0.5000001)).discount_pct == 10.0


def test_custom_threshold_and_discount() -> None:
    policy = ThresholdPolicy(threshold=0.2, discount_pct=25.0)
    assert policy.choose(ctx(0.3)).discount_pct == 25.0
    assert policy.choose(ctx(0.2)).discount_pct == 0.0


def test_threshold_one_never_gives_a_discount() -> None:
    policy = ThresholdPolicy(threshold=1.0)
    assert policy.choose(ctx(1.0)).discount_pct == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": -0.01}, "threshold"),
        ({"threshold": 1.01}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"discount_pct": -1.0}, "discount_pct"),
        ({"discount_pct": 100.5}, "discount_pct"),
        ({"discount_pct": float("nan")}, "discount_pct"),
    ],
)
def test_invalid_parameters_raise_value_error(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ThresholdPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"threshold": 0.0}, {"threshold": 1.0}, {"discount_pct": 0.0}])
def test_boundary_parameters_are_valid(kwargs: dict[str, float]) -> None:
    policy = ThresholdPolicy(**kwargs)  # type: ignore[arg-type]
    for name, value in kwargs.items():
        assert getattr(policy, name) == value


# -- parse_campaigns ----------------------------------------------------------------------------

VALID_TOML = """
[[campaign]]
name = "welcome-back"
policy = "threshold"
threshold = 0.4
discount_pct = 15
triggers = ["cart", "search"]
offer_ttl_s = 3600
decision_interval_s = 30

[[campaign]]
name = "defaults"
"""


def parse_toml(text: str) -> tuple[Campaign, ...]:
    return parse_campaigns(tomllib.loads(text))


def test_valid_toml_is_parsed() -> None:
    first, second = parse_toml(VALID_TOML)
    assert first.name == "welcome-back"
    assert first.policy == ThresholdPolicy(threshold=0.4, discount_pct=15.0)
    assert first.triggers == ("cart", "search")
    assert first.offer_ttl_ms == 3_600_000
    assert first.decision_interval_ms == 30_000
    assert second.name == "defaults"


def test_defaults_apply_to_missing_fields() -> None:
    (campaign,) = parse_toml('[[campaign]]\nname = "plain"\n')
    assert campaign.policy == ThresholdPolicy(threshold=0.5, discount_pct=10.0)
    assert campaign.triggers == TRIGGER_KINDS
    assert campaign.offer_ttl_ms == 24 * 3600 * 1000
    assert campaign.decision_interval_ms == 600 * 1000


def test_fractional_seconds_become_milliseconds() -> None:
    (campaign,) = parse_toml('[[campaign]]\nname = "x"\noffer_ttl_s = 1.5\n')
    assert campaign.offer_ttl_ms == 1500


def test_default_campaigns_are_one_threshold_campaign() -> None:
    (campaign,) = default_campaigns()
    assert campaign.name == "default"
    assert isinstance(campaign.policy, ThresholdPolicy)


def test_campaign_error_is_an_engine_error() -> None:
    assert issubclass(CampaignError, EngineError)


@pytest.mark.parametrize(
    ("document", "fragments"),
    [
        ({}, ["[[campaign]]"]),
        ({"campaign": []}, ["[[campaign]]"]),
        ({"campaign": [{"policy": "threshold"}]}, ["#1", "'name'"]),
        ({"campaign": [{"name": "a"}, {"name": ""}]}, ["#2", "'name'"]),
        ({"campaign": [{"name": 7}]}, ["#1", "'name'"]),
        ({"campaign": [{"name": "x", "policy": "bandit"}]}, ["'x'", "policy", "'bandit'"]),
        (
            {"campaign": [{"name": "x", "triggers": ["view", "click"]}]},
            ["'x'", "triggers", "click"],
        ),
        ({"campaign": [{"name": "x", "threshold": 1.5}]}, ["'x'", "threshold"]),
        ({"campaign": [{"name": "x", "discount_pct": 120}]}, ["'x'", "discount_pct"]),
        ({"campaign": [{"name": "dup"}, {"name": "other"}, {"name": "dup"}]}, ["unique", "'dup'"]),
    ],
)
def test_invalid_documents_raise_campaign_error_naming_the_problem(
    document: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(CampaignError) as info:
        parse_campaigns(document)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", "high"),
        ("discount_pct", "lots"),
        ("offer_ttl_s", "soon"),
        ("decision_interval_s", [1]),
    ],
)
def test_non_numeric_field_gives_campaign_error_naming_campaign_and_field(
    field: str, value: object
) -> None:
    with pytest.raises(CampaignError) as info:
        parse_campaigns({"campaign": [{"name": "spring", field: value}]})
    assert "'spring'" in str(info.value)
    assert field in str(info.value)


@pytest.mark.parametrize("field", ["offer_ttl_s", "decision_interval_s"])
def test_negative_durations_are_rejected(field: str) -> None:
    with pytest.raises(CampaignError, match=field):
        parse_campaigns({"campaign": [{"name": "spring", field: -5}]})


def test_campaign_entry_that_is_not_a_table_gives_campaign_error() -> None:
    with pytest.raises(CampaignError, match="#1"):
        parse_toml("campaign = [1]\n")


# -- load_campaigns -----------------------------------------------------------------------------


def test_load_campaigns_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "campaigns.toml"
    path.write_text(VALID_TOML, encoding="utf-8")
    assert [c.name for c in load_campaigns(path)] == ["welcome-back", "defaults"]


def test_missing_file_gives_campaign_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(CampaignError) as info:
        load_campaigns(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_directory_gives_campaign_error(tmp_path: Path) -> None:
    with pytest.raises(CampaignError, match="cannot read"):
        load_campaigns(tmp_path)


def test_invalid_toml_gives_campaign_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[[campaign]\nname = "x"\n', encoding="utf-8")
    with pytest.raises(CampaignError) as info:
        load_campaigns(path)
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)


def test_semantic_errors_in_a_file_are_campaign_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[campaign]]\nname = "x"\npolicy = "bandit"\n', encoding="utf-8")
    with pytest.raises(CampaignError, match="unknown policy 'bandit'"):
        load_campaigns(path)


def test_non_utf8_file_gives_campaign_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[campaign]]\nname = "caf\xe9"\n')
    with pytest.raises(CampaignError, match=re.escape(str(path))):
        load_campaigns(path)
