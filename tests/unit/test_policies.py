"""Discount policies (engine/policies/), built directly and from a campaigns TOML.

Covers the paper's two worked cases exactly (case 1: P > 0.5 -> 10 %; case 2:
``purchase_frequency_30d`` > 3 -> 20 %), the linear policy's clipping, the rules policy's
first-match order and operators, and the profit policy's greedy choice, exploration and exact
propensities.
"""

from __future__ import annotations

import math
import random
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from engine.campaigns import Campaign, CampaignError, parse_campaigns
from engine.events import BrowseEvent, PurchaseEvent, PurchaseItem
from engine.features.state import DAY_MS, HOUR_MS
from engine.features.store import InMemoryFeatureStore
from engine.pipeline import DiscountEngine, Incoming
from engine.policies.base import PolicyChoice, PolicyContext
from engine.policies.linear import LinearPolicy
from engine.policies.profit import ProfitPolicy
from engine.policies.registry import policy_names
from engine.policies.rules import Rule, RulesPolicy
from engine.policies.threshold import ThresholdPolicy

T0 = 1_767_225_600_000
"""2026-01-01T00:00:00Z."""


def ctx(
    p: float | Callable[[float], float] = 0.5,
    *,
    features: Mapping[str, float] | None = None,
    order_value: float = 100.0,
    draw: float = 0.5,
) -> PolicyContext:
    """A context whose model predicts ``p`` (a constant, or a function of the discount)."""
    predict = p if callable(p) else (lambda d, p=p: p)
    return PolicyContext(
        features=features if features is not None else {},
        predict=predict,
        order_value=order_value,
        draw=draw,
    )


def campaigns_from(toml_text: str) -> tuple[Campaign, ...]:
    return parse_campaigns(tomllib.loads(toml_text))


def one_policy(toml_text: str) -> Any:
    (campaign,) = campaigns_from(toml_text)
    return campaign.policy


def test_policy_names_are_the_four_kinds() -> None:
    assert tuple(policy_names()) == ("threshold", "linear", "rules", "profit")


# -- paper case 1: threshold P > 0.5 -> 10 % ----------------------------------------------------

CASE_1_TOML = """
[[campaign]]
name = "paper-case-1"
policy = "threshold"
threshold = 0.5
discount_pct = 10
"""


def paper_case_1_policies() -> list[ThresholdPolicy]:
    return [ThresholdPolicy(threshold=0.5, discount_pct=10.0), one_policy(CASE_1_TOML)]


@pytest.mark.parametrize("source", ["direct", "toml"])
@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.0, 0.0), (0.3, 0.0), (0.5, 0.0), (0.5000001, 10.0), (0.51, 10.0), (0.9, 10.0), (1.0, 10.0)],
)
def test_paper_case_1_threshold(source: str, p: float, expected: float) -> None:
    direct, from_toml = paper_case_1_policies()
    assert direct == from_toml
    policy = direct if source == "direct" else from_toml
    choice = policy.choose(ctx(p))
    assert choice.discount_pct == expected
    assert choice.propensity == 1.0
    assert choice.explore is False
    assert choice.rules == (("p_purchase>0.5",) if expected else ())


def test_threshold_reads_the_prediction_without_discount() -> None:
    # P(buy | d=0) = 0.4 is at or below the threshold even though P(buy | 10 %) = 0.9.
    choice = ThresholdPolicy().choose(ctx(lambda d: 0.4 if d == 0 else 0.9))
    assert choice.discount_pct == 0.0


# -- paper case 2: rules purchase_frequency_30d > 3 -> 20 % --------------------------------------

CASE_2_TOML = """
[[campaign]]
name = "paper-case-2"
policy = "rules"
rules = [{ feature = "purchase_frequency_30d", op = ">", value = 3, discount_pct = 20 }]
"""


@pytest.mark.parametrize("source", ["direct", "toml"])
@pytest.mark.parametrize(
    ("frequency", "expected"), [(None, 0.0), (0.0, 0.0), (3.0, 0.0), (4.0, 20.0), (12.0, 20.0)]
)
def test_paper_case_2_rules(source: str, frequency: float | None, expected: float) -> None:
    direct = RulesPolicy((Rule("purchase_frequency_30d", ">", 3.0, 20.0),))
    from_toml = one_policy(CASE_2_TOML)
    assert direct == from_toml
    policy = direct if source == "direct" else from_toml
    features = {} if frequency is None else {"purchase_frequency_30d": frequency}
    choice = policy.choose(ctx(0.5, features=features))
    assert choice == PolicyChoice(
        expected, 1.0, rules=("purchase_frequency_30d>3",) if expected else ()
    )


def _purchase(event_id: str, ts: int) -> PurchaseEvent:
    item = PurchaseItem(item_id="i1", category="books", price=10.0, quantity=1)
    return PurchaseEvent(event_id, "u1", ts, f"o-{event_id}", (item,), 10.0)


@pytest.mark.parametrize(("purchase_days", "expected"), [(3, 0.0), (4, 20.0)])
async def test_paper_case_2_through_the_engine(purchase_days: int, expected: float) -> None:
    """Purchases on N distinct days give purchase_frequency_30d = N; only N > 3 gets 20 %."""
    engine = DiscountEngine(InMemoryFeatureStore(), campaigns=campaigns_from(CASE_2_TOML))
    events: list[Any] = [
        _purchase(f"p{day}", T0 + day * DAY_MS + HOUR_MS) for day in range(purchase_days)
    ]
    trigger_ts = T0 + purchase_days * DAY_MS + 2 * HOUR_MS
    events.append(BrowseEvent("b1", "u1", trigger_ts, "i1", "books", 10.0, "cart"))
    result = await engine.process([Incoming(event) for event in events])
    (decision,) = result.decisions
    assert decision.features["purchase_frequency_30d"] == float(purchase_days)
    assert decision.discount_pct == expected
    assert len(result.offers) == (1 if expected else 0)


# -- linear: D = a * P + b clipped to [0, max] ---------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "p", "expected"),
    [
        (20.0, 0.0, 0.5, 10.0),  # inside
        (20.0, 0.0, 0.0, 0.0),  # at 0
        (20.0, -15.0, 0.5, 0.0),  # below 0 -> 0
        (-40.0, 5.0, 0.9, 0.0),  # negative slope below 0 -> 0
        (100.0, 0.0, 0.6, 30.0),  # above max -> max
        (20.0, 25.0, 0.5, 30.0),  # above max via the intercept
        (20.0, 10.0, 1.0, 30.0),  # exactly max
        (10.0, 2.5, 0.25, 5.0),  # inside with an intercept
        (30.0, 0.0, 1.0 / 3.0, 10.0),  # rounded to 2 decimals
    ],
)
def test_linear_is_clipped_to_zero_and_max(a: float, b: float, p: float, expected: float) -> None:
    policy = LinearPolicy(a=a, b=b, max_discount_pct=30.0)
    choice = policy.choose(ctx(p))
    assert choice.discount_pct == pytest.approx(expected)
    assert 0.0 <= choice.discount_pct <= 30.0
    assert choice.propensity == 1.0
    assert choice.explore is False
    assert choice.rules == ((f"linear:{a:g}*p+{b:g}",) if expected > 0 else ())


def test_linear_from_toml() -> None:
    policy = one_policy(
        '[[campaign]]\nname = "lin"\npolicy = "linear"\na = 40\nb = -10\nmax_discount_pct = 25\n'
    )
    assert policy == LinearPolicy(a=40.0, b=-10.0, max_discount_pct=25.0)
    assert policy.choose(ctx(0.2)).discount_pct == 0.0  # -2 -> 0
    assert policy.choose(ctx(0.5)).discount_pct == 10.0
    assert policy.choose(ctx(0.95)).discount_pct == 25.0  # 28 -> 25


def test_linear_defaults_from_toml() -> None:
    policy = one_policy('[[campaign]]\nname = "lin"\npolicy = "linear"\n')
    assert policy == LinearPolicy(a=20.0, b=0.0, max_discount_pct=30.0)


@pytest.mark.parametrize("max_pct", [-1.0, 100.5, float("nan")])
def test_linear_rejects_an_invalid_max(max_pct: float) -> None:
    with pytest.raises(ValueError, match="max_discount_pct"):
        LinearPolicy(max_discount_pct=max_pct)


@pytest.mark.parametrize(
    ("a", "b"), [(float("nan"), 0.0), (0.0, float("nan")), (-math.inf, 0.0), (0.0, math.inf)]
)
def test_linear_rejects_non_finite_coefficients(a: float, b: float) -> None:
    """Regression (fixed in 2611f77): a NaN or infinite coefficient gave a NaN discount."""
    with pytest.raises(ValueError):
        LinearPolicy(a=a, b=b)


@pytest.mark.parametrize("key", ["a", "b"])
@pytest.mark.parametrize("value", ["-inf", "inf", "nan"])
def test_linear_toml_rejects_non_finite_coefficients(key: str, value: str) -> None:
    """Regression (fixed in 2611f77): '-inf' passed because only '+inf' was rejected."""
    with pytest.raises(CampaignError, match=f"'{key}'"):
        campaigns_from(f'[[campaign]]\nname = "lin"\npolicy = "linear"\n{key} = {value}\n')


# -- rules: first match, operators ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "value", "matches"),
    [
        (">", 2.0, True),
        (">", 3.0, False),
        (">", 4.0, False),
        (">=", 3.0, True),
        (">=", 4.0, False),
        (">=", 2.0, True),
        ("<", 4.0, True),
        ("<", 3.0, False),
        ("<", 2.0, False),
        ("<=", 3.0, True),
        ("<=", 2.0, False),
        ("<=", 4.0, True),
        ("==", 3.0, True),
        ("==", 3.5, False),
    ],
)
def test_every_operator(op: str, value: float, matches: bool) -> None:
    rule = Rule("cart_count_24h", op, value, 15.0)
    features = {"cart_count_24h": 3.0}
    assert rule.matches(features) is matches
    choice = RulesPolicy((rule,)).choose(ctx(features=features))
    assert choice.discount_pct == (15.0 if matches else 0.0)
    assert choice.rules == ((f"cart_count_24h{op}{value:g}",) if matches else ())


def test_missing_feature_reads_as_zero() -> None:
    assert Rule("absent", "==", 0.0, 5.0).matches({})
    assert not Rule("absent", ">", 0.0, 5.0).matches({})


RULES_TOML = """
[[campaign]]
name = "tiers"
policy = "rules"
rules = [
  { feature = "purchase_frequency_30d", op = ">=", value = 10, discount_pct = 5 },
  { feature = "purchase_frequency_30d", op = ">", value = 3, discount_pct = 20 },
  { feature = "cart_count_24h", op = ">=", value = 1, discount_pct = 8 },
  { feature = "recency_view_s", op = "<", value = 60, discount_pct = 3 },
  { feature = "session_events", op = "<=", value = 0, discount_pct = 1 },
  { feature = "distinct_categories_7d", op = "==", value = 2, discount_pct = 2 },
]
"""


@pytest.mark.parametrize(
    ("features", "expected", "fired"),
    [
        # Both the first and the second rule hold: the first one wins.
        (
            {"purchase_frequency_30d": 12.0, "cart_count_24h": 2.0},
            5.0,
            "purchase_frequency_30d>=10",
        ),
        ({"purchase_frequency_30d": 4.0, "cart_count_24h": 2.0}, 20.0, "purchase_frequency_30d>3"),
        ({"purchase_frequency_30d": 3.0, "cart_count_24h": 2.0}, 8.0, "cart_count_24h>=1"),
        ({"recency_view_s": 59.0, "session_events": 4.0}, 3.0, "recency_view_s<60"),
        ({"recency_view_s": 60.0, "session_events": 0.0}, 1.0, "session_events<=0"),
        (
            {"recency_view_s": 600.0, "session_events": 3.0, "distinct_categories_7d": 2.0},
            2.0,
            "distinct_categories_7d==2",
        ),
        ({"recency_view_s": 600.0, "session_events": 3.0}, 0.0, None),
    ],
)
def test_rules_first_match_wins(
    features: dict[str, float], expected: float, fired: str | None
) -> None:
    policy = one_policy(RULES_TOML)
    assert isinstance(policy, RulesPolicy)
    assert [r.op for r in policy.rules] == [">=", ">", ">=", "<", "<=", "=="]
    choice = policy.choose(ctx(features=features))
    assert choice.discount_pct == expected
    assert choice.propensity == 1.0
    assert choice.rules == ((fired,) if fired else ())


def test_rules_order_matters() -> None:
    low, high = Rule("f", ">", 0.0, 5.0), Rule("f", ">", 1.0, 20.0)
    features = {"f": 2.0}
    assert RulesPolicy((low, high)).choose(ctx(features=features)).discount_pct == 5.0
    assert RulesPolicy((high, low)).choose(ctx(features=features)).discount_pct == 20.0


@pytest.mark.parametrize("op", ["!=", "=", "gt", "=>", ""])
def test_unknown_operator_raises_value_error(op: str) -> None:
    with pytest.raises(ValueError, match="operator"):
        Rule("f", op, 1.0, 5.0)


@pytest.mark.parametrize("pct", [-0.1, 100.1, float("nan")])
def test_rule_discount_out_of_range_raises_value_error(pct: float) -> None:
    with pytest.raises(ValueError, match="discount_pct"):
        Rule("f", ">", 1.0, pct)


def test_rules_policy_needs_a_rule() -> None:
    with pytest.raises(ValueError, match="at least one rule"):
        RulesPolicy(())


# -- profit: greedy level, exploration, propensity ------------------------------------------------

LADDER = (0.0, 5.0, 10.0, 15.0, 20.0)


def incremental_margin(predict: Callable[[float], float], d: float, v: float, m: float) -> float:
    """The issue's objective: P(d) * v * (m - d/100) - P(0) * v * m."""
    return predict(d) * v * (m - d / 100.0) - predict(0.0) * v * m


def persuadable(d: float) -> float:
    """Buys at 10 % without a discount, much more with one (saturating)."""
    return min(0.1 + 0.04 * d, 0.95)


def sure_thing(d: float) -> float:
    """Buys anyway: the discount changes nothing."""
    return 0.8


def lost_cause(d: float) -> float:
    """Hardly responds to discounts."""
    return 0.02 + 0.0001 * d


def peaked(d: float) -> float:
    """Responds up to 10 % and not beyond."""
    return {0.0: 0.2, 5.0: 0.35, 10.0: 0.5, 15.0: 0.52, 20.0: 0.53}[d]


@pytest.mark.parametrize("predict", [persuadable, sure_thing, lost_cause, peaked])
@pytest.mark.parametrize("margin", [0.15, 0.3, 0.6])
@pytest.mark.parametrize("value", [20.0, 100.0])
def test_greedy_level_maximises_expected_incremental_margin(
    predict: Callable[[float], float], margin: float, value: float
) -> None:
    policy = ProfitPolicy(ladder=LADDER, margin=margin, epsilon=0.0)
    context = ctx(predict, order_value=value, draw=0.5)
    expected = [incremental_margin(predict, d, value, margin) for d in LADDER]
    assert policy.expected_margins(context) == pytest.approx(expected, abs=1e-9)
    best = max(expected)
    winners = [d for d, e in zip(LADDER, expected, strict=True) if math.isclose(e, best)]
    choice = policy.choose(context)
    assert choice.discount_pct == min(winners)
    assert choice.propensity == 1.0
    assert choice.explore is False
    assert choice.rules == (f"profit:argmax={min(winners):g}",)


def test_persuadable_user_gets_a_positive_discount() -> None:
    choice = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=0.0).choose(ctx(persuadable))
    assert choice.discount_pct > 0
    # P(d) = 0.1 + 0.04 d; base = 0.1 * 100 * 0.3 = 3. Margins: 5 %: 4.5, 10 %: 7.0,
    # 15 %: 0.7 * 100 * 0.15 - 3 = 7.5 (the best), 20 %: 6.0.
    assert choice.discount_pct == 15.0


def test_peaked_response_picks_the_interior_level() -> None:
    choice = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=0.0).choose(ctx(peaked))
    assert choice.discount_pct == 10.0


@pytest.mark.parametrize("predict", [sure_thing, lost_cause])
def test_sure_thing_and_lost_cause_get_no_discount(predict: Callable[[float], float]) -> None:
    choice = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=0.0).choose(ctx(predict))
    assert choice.discount_pct == 0.0
    assert choice.propensity == 1.0


def test_ties_go_to_the_smaller_discount() -> None:
    # margin 0.5, value 100, P(0) = 0.2 -> base 10. Level 10: 0.5 * 100 * 0.4 - 10 = 10;
    # level 20: 2/3 * 100 * 0.3 - 10 = 10 (within rounding); other levels are lower.
    probabilities = {0.0: 0.2, 5.0: 0.3, 10.0: 0.5, 15.0: 0.4, 20.0: 2.0 / 3.0}
    policy = ProfitPolicy(ladder=LADDER, margin=0.5, epsilon=0.0)
    context = ctx(probabilities.__getitem__, order_value=100.0)
    margins = policy.expected_margins(context)
    assert margins[2] == pytest.approx(margins[4])
    assert policy.choose(context).discount_pct == 10.0


def test_all_flat_ties_at_zero_give_no_discount() -> None:
    # P = 0 at every level: every expected margin is 0, so the tie goes to 0 %.
    choice = ProfitPolicy(ladder=LADDER, epsilon=0.0).choose(ctx(0.0))
    assert choice.discount_pct == 0.0


def test_ladder_order_does_not_change_the_choice() -> None:
    shuffled = (15.0, 0.0, 20.0, 5.0, 10.0)
    for predict in (persuadable, sure_thing, peaked):
        a = ProfitPolicy(ladder=LADDER, epsilon=0.0).choose(ctx(predict))
        b = ProfitPolicy(ladder=shuffled, epsilon=0.0).choose(ctx(predict))
        assert a.discount_pct == b.discount_pct


def _draw_choosing(policy: ProfitPolicy, index: int) -> float:
    """A draw that explores to ladder position ``index``."""
    return (index + 0.5) / len(policy.ladder) * policy.epsilon


@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("predict", [persuadable, sure_thing, peaked])
def test_propensities_sum_to_one_over_the_ladder(
    epsilon: float, predict: Callable[[float], float]
) -> None:
    policy = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=epsilon)
    greedy = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=0.0).choose(ctx(predict))
    k = len(LADDER)
    propensity: dict[float, float] = {}
    for index in range(k):
        choice = policy.choose(ctx(predict, draw=_draw_choosing(policy, index)))
        assert choice.explore is True
        assert choice.discount_pct == LADDER[index]
        propensity[choice.discount_pct] = choice.propensity
    if epsilon < 1.0:
        exploit = policy.choose(ctx(predict, draw=(1.0 + epsilon) / 2))
        assert exploit.explore is False
        assert exploit.discount_pct == greedy.discount_pct
        assert exploit.propensity == propensity[greedy.discount_pct]
    assert math.fsum(propensity.values()) == pytest.approx(1.0, abs=1e-12)
    for level, value in propensity.items():
        bonus = 1.0 - epsilon if level == greedy.discount_pct else 0.0
        assert value == pytest.approx(epsilon / k + bonus, abs=1e-12)


@pytest.mark.parametrize("epsilon", [0.1, 0.4])
def test_propensity_matches_the_empirical_frequency_of_uniform_draws(epsilon: float) -> None:
    policy = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=epsilon)
    rng = random.Random(20260101)
    n = 60_000
    chosen: Counter[float] = Counter()
    propensity: dict[float, float] = {}
    explored = 0
    for _ in range(n):
        draw = rng.random()
        choice = policy.choose(ctx(peaked, draw=draw))
        chosen[choice.discount_pct] += 1
        explored += choice.explore
        previous = propensity.setdefault(choice.discount_pct, choice.propensity)
        assert previous == choice.propensity  # the same level always reports the same number
    assert set(chosen) == set(LADDER)
    assert math.fsum(propensity.values()) == pytest.approx(1.0)
    for level in LADDER:
        p = propensity[level]
        tolerance = 4.0 * math.sqrt(p * (1.0 - p) / n) + 1e-9  # about 4 standard errors
        assert abs(chosen[level] / n - p) <= tolerance, (level, chosen[level] / n, p)
    assert abs(explored / n - epsilon) <= 4.0 * math.sqrt(epsilon * (1 - epsilon) / n)


@pytest.mark.parametrize("draw", [0.0, 1e-12, 0.05, 0.5, 0.999999])
@pytest.mark.parametrize("predict", [persuadable, sure_thing, peaked])
def test_epsilon_zero_is_always_greedy_with_propensity_one(
    draw: float, predict: Callable[[float], float]
) -> None:
    policy = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=0.0)
    choice = policy.choose(ctx(predict, draw=draw))
    expected = [incremental_margin(predict, d, 100.0, 0.3) for d in LADDER]
    assert choice.discount_pct == LADDER[expected.index(max(expected))]
    assert choice.propensity == 1.0
    assert choice.explore is False
    assert "explore" not in choice.rules


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.25, 1.0])
def test_explore_flag_is_set_iff_draw_below_epsilon(epsilon: float) -> None:
    policy = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=epsilon)
    draws = [0.0, 0.0999999, 0.1, 0.1000001, 0.2499999, 0.25, 0.5, 0.999999]
    for draw in draws:
        choice = policy.choose(ctx(persuadable, draw=draw))
        assert choice.explore is (draw < epsilon), draw
        assert ("explore" in choice.rules) is (draw < epsilon)
        assert choice.discount_pct in LADDER
        assert 0.0 < choice.propensity <= 1.0


def test_epsilon_one_is_uniform_over_the_ladder() -> None:
    policy = ProfitPolicy(ladder=LADDER, margin=0.3, epsilon=1.0)
    for index in range(len(LADDER)):
        choice = policy.choose(ctx(persuadable, draw=_draw_choosing(policy, index)))
        assert choice.discount_pct == LADDER[index]
        assert choice.propensity == pytest.approx(1.0 / len(LADDER))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ladder": ()}, "ladder"),
        ({"ladder": (5.0, 10.0)}, "include 0"),
        ({"ladder": (0.0, 5.0, 5.0)}, "distinct"),
        ({"ladder": (0.0, 101.0)}, "ladder level"),
        ({"ladder": (0.0, -5.0)}, "ladder level"),
        ({"ladder": (0.0, float("nan"))}, "ladder level"),
        ({"margin": 0.0}, "margin"),
        ({"margin": -0.1}, "margin"),
        ({"margin": 1.5}, "margin"),
        ({"margin": float("nan")}, "margin"),
        ({"epsilon": -0.01}, "epsilon"),
        ({"epsilon": 1.01}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
    ],
)
def test_profit_invalid_parameters_raise_value_error(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ProfitPolicy(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": -0.1},
        {"threshold": 1.1},
        {"threshold": float("nan")},
        {"discount_pct": -1.0},
        {"discount_pct": 100.01},
    ],
)
def test_threshold_invalid_parameters_raise_value_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ThresholdPolicy(**kwargs)  # type: ignore[arg-type]


# -- campaigns TOML for each policy ----------------------------------------------------------------

PROFIT_TOML = """
[[campaign]]
name = "cart-savers"
policy = "profit"
ladder = [0, 5, 10, 15, 20]
margin = 0.25
epsilon = 0.05
max_discount_pct = 20
"""


def test_profit_from_toml() -> None:
    (campaign,) = campaigns_from(PROFIT_TOML)
    assert campaign.policy == ProfitPolicy(ladder=LADDER, margin=0.25, epsilon=0.05)
    assert campaign.max_discount_pct == 20.0
    assert campaign.policy.name == "profit"


def test_profit_defaults_from_toml() -> None:
    (campaign,) = campaigns_from('[[campaign]]\nname = "p"\npolicy = "profit"\n')
    assert campaign.policy == ProfitPolicy()


def test_all_four_policies_in_one_file() -> None:
    text = "\n".join(
        (
            CASE_1_TOML,
            CASE_2_TOML,
            '[[campaign]]\nname = "lin"\npolicy = "linear"\na = 30\n',
            PROFIT_TOML,
        )
    )
    campaigns = campaigns_from(text)
    assert [c.policy.name for c in campaigns] == ["threshold", "rules", "linear", "profit"]


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        # ladder above the campaign's max discount
        ('policy = "profit"\nladder = [0, 10, 30]\nmax_discount_pct = 20\n', ["30", "20"]),
        ('policy = "profit"\nladder = [0, 5, 25]\nmax_discount_pct = 24.5\n', ["25"]),
        ('policy = "profit"\nladder = [5, 10]\n', ["include 0"]),
        ('policy = "profit"\nladder = [0, 5, 5]\n', ["distinct"]),
        ('policy = "profit"\nladder = [0, 150]\n', ["ladder level"]),
        ('policy = "profit"\nladder = "0,5,10"\n', ["ladder"]),
        ('policy = "profit"\nladder = [0, true]\n', ["ladder"]),
        ('policy = "profit"\nmargin = 0\n', ["margin"]),
        ('policy = "profit"\nepsilon = 1.5\n', ["epsilon"]),
        # rules: missing list, empty list, missing feature, bad types, unknown operator
        ('policy = "rules"\n', ["'rules'"]),
        ('policy = "rules"\nrules = []\n', ["'rules'"]),
        ('policy = "rules"\nrules = [{ op = ">", value = 3, discount_pct = 20 }]\n', ["#1"]),
        (
            'policy = "rules"\nrules = [{ feature = "f", op = ">", value = 1, discount_pct = 5 },'
            ' { feature = 7, op = ">", value = 3, discount_pct = 20 }]\n',
            ["#2"],
        ),
        ('policy = "rules"\nrules = ["purchase_frequency_30d > 3"]\n', ["#1"]),
        (
            'policy = "rules"\n'
            'rules = [{ feature = "f", op = "!=", value = 3, discount_pct = 20 }]\n',
            ["rule #1", "operator", "'!='"],
        ),
        (
            'policy = "rules"\n'
            'rules = [{ feature = "f", op = ">", value = 3, discount_pct = 120 }]\n',
            ["discount_pct"],
        ),
        (
            'policy = "rules"\n'
            'rules = [{ feature = "f", op = ">", value = "x", discount_pct = 5 }]\n',
            ["'value'"],
        ),
        # linear and threshold parameter errors
        ('policy = "linear"\nmax_discount_pct = 101\n', ["max_discount_pct"]),
        ('policy = "linear"\na = "steep"\n', ["'a'"]),
        ('policy = "threshold"\nthreshold = -0.5\n', ["threshold"]),
        ('policy = "bandit"\n', ["unknown policy", "'bandit'"]),
    ],
)
def test_campaign_toml_errors(body: str, fragments: list[str]) -> None:
    with pytest.raises(CampaignError) as info:
        campaigns_from(f'[[campaign]]\nname = "bad"\n{body}')
    message = str(info.value)
    assert "'bad'" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_ladder_equal_to_max_discount_is_accepted() -> None:
    (campaign,) = campaigns_from(
        '[[campaign]]\nname = "ok"\npolicy = "profit"\n'
        "ladder = [0, 10, 20]\nmax_discount_pct = 20\n"
    )
    assert campaign.policy == ProfitPolicy(ladder=(0.0, 10.0, 20.0))


@pytest.mark.parametrize("missing", ["value", "discount_pct"])
def test_rule_missing_value_or_discount_is_an_error(missing: str) -> None:
    """Regression (fixed in 2611f77): a missing field silently defaulted to 0."""
    rule: dict[str, Any] = {
        "feature": "purchase_frequency_30d",
        "op": ">",
        "value": 3,
        "discount_pct": 20,
    }
    del rule[missing]
    with pytest.raises(CampaignError, match="rule #1"):
        parse_campaigns({"campaign": [{"name": "bad", "policy": "rules", "rules": [rule]}]})


def test_rule_operator_defaults_to_greater_than() -> None:
    policy = one_policy(
        '[[campaign]]\nname = "r"\npolicy = "rules"\n'
        'rules = [{ feature = "purchase_frequency_30d", value = 3, discount_pct = 20 }]\n'
    )
    assert policy == RulesPolicy((Rule("purchase_frequency_30d", ">", 3.0, 20.0),))


# -- softmax exploration ------------------------------------------------------------------------


def test_softmax_exploration_has_exact_propensities_and_a_floor() -> None:
    policy = ProfitPolicy(epsilon=0.05, temperature=0.5)
    margins = {0.0: 0.0, 5.0: 0.4, 10.0: -0.2, 15.0: -1.5, 20.0: -6.0}
    value = 50.0

    def predict(discount: float) -> float:
        # Chosen so that expected_margins returns ``margins`` exactly (p(0) = 0).
        return margins[discount] / (value * (policy.margin - discount / 100.0)) if discount else 0.0

    counts: dict[float, int] = {}
    chosen: dict[float, float] = {}
    offer_probability = None
    draws = 20_000
    for k in range(draws):
        choice = policy.choose(PolicyContext({}, predict, value, (k + 0.5) / draws))
        counts[choice.discount_pct] = counts.get(choice.discount_pct, 0) + 1
        chosen[choice.discount_pct] = choice.propensity
        offer_probability = choice.offer_propensity
    assert set(chosen) == set(policy.ladder), "every level keeps some probability"
    assert math.fsum(chosen.values()) == pytest.approx(1.0)
    for level, propensity in chosen.items():
        assert counts[level] / draws == pytest.approx(propensity, abs=1e-3)
        assert propensity >= policy.epsilon / len(policy.ladder)
    assert offer_probability == pytest.approx(1.0 - chosen[0.0])
    # The clearly losing 20 % is (almost) only the floor; the best level is the most likely.
    assert chosen[20.0] == pytest.approx(policy.epsilon / 5, rel=1e-3)
    assert max(chosen, key=lambda level: chosen[level]) == 5.0
    # Off-policy evaluation targets the same distribution the policy samples from and logs.
    context = PolicyContext({}, predict, value, 0.5)
    target = {a.discount_pct: a.probability for a in policy.action_probabilities(context)}
    assert target == pytest.approx(chosen)
