"""Learning against a known ground truth: the model ranks buyers, and the profit policy earns
more incremental margin than the paper's threshold policy.

The synthetic world's true P(buy | x, d) is logistic in the model's own inputs: a base rate
driven by cart and purchase history, plus a discount effect that depends on the session
(persuadable users) — so the model can learn it, and who is worth a discount is knowable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from engine.model.inputs import model_inputs
from engine.model.prequential import PrequentialMetrics
from engine.model.purchase_model import PurchaseModel
from engine.policies.base import Policy, PolicyContext
from engine.policies.profit import ProfitPolicy
from engine.policies.threshold import ThresholdPolicy

MARGIN = 0.3
ORDER_VALUE = 40.0


@dataclass(frozen=True)
class World:
    """The known response rule."""

    def p_buy(self, features: dict[str, float], discount_pct: float) -> float:
        row = model_inputs(features, discount_pct)
        base = -2.6 + 1.3 * row["cart_count_24h"] + 0.9 * row["purchases_per_day"]
        # A cart in the making means a shopper on the fence: there a discount moves the needle.
        persuadable = 9.0 * row["discount"] * row["cart_count_1h"]
        return 1.0 / (1.0 + math.exp(-(base + persuadable)))


def sample_features(rng: random.Random) -> dict[str, float]:
    return {
        "cart_count_24h": float(rng.choice([0, 0, 1, 1, 2, 3, 5])),
        "purchase_count_30d": float(rng.choice([0, 0, 0, 1, 2, 4])),
        "session_events": float(rng.choice([1, 2, 3, 5, 8, 13, 20])),
        "cart_count_1h": float(rng.choice([0, 0, 1, 2, 3, 5, 8])),
        "view_count_24h": float(rng.randrange(0, 30)),
    }


def context(model: PurchaseModel, features: dict[str, float], draw: float) -> PolicyContext:
    return PolicyContext(
        features=features,
        predict=lambda d: model.predict_one(features, d),
        order_value=ORDER_VALUE,
        draw=draw,
    )


def realised_incremental_margin(
    world: World, features: dict[str, float], discount_pct: float, u: float
) -> float:
    """Margin with the offer minus margin without it, with common random numbers: the same
    shopper (``u``) faces both worlds."""
    bought_with = u < world.p_buy(features, discount_pct)
    bought_without = u < world.p_buy(features, 0.0)
    with_offer = ORDER_VALUE * (MARGIN - discount_pct / 100.0) if bought_with else 0.0
    without = ORDER_VALUE * MARGIN if bought_without else 0.0
    return with_offer - without


def train(
    world: World, steps: int, seed: int
) -> tuple[PurchaseModel, PrequentialMetrics, PrequentialMetrics]:
    """Decide with an exploring profit policy, observe the outcome, test then train; also
    score the same labels with the true probabilities (the best any model can do)."""
    rng = random.Random(seed)
    model = PurchaseModel()
    metrics = PrequentialMetrics(window=2000)
    truth = PrequentialMetrics(window=2000)
    policy = ProfitPolicy(margin=MARGIN, epsilon=0.3)
    for _ in range(steps):
        features = sample_features(rng)
        choice = policy.choose(context(model, features, rng.random()))
        p_true = world.p_buy(features, choice.discount_pct)
        label = int(rng.random() < p_true)
        metrics.update(model.predict_one(features, choice.discount_pct), label)
        truth.update(p_true, label)
        model.learn_one(features, choice.discount_pct, label)
    return model, metrics, truth


def evaluate(world: World, model: PurchaseModel, policy: Policy, seed: int) -> float:
    rng = random.Random(seed)
    total = 0.0
    for _ in range(4000):
        features = sample_features(rng)
        u = rng.random()
        choice = policy.choose(context(model, features, 0.99))
        total += realised_incremental_margin(world, features, choice.discount_pct, u)
    return total


def test_prequential_auc_nears_the_truths_and_profit_beats_threshold() -> None:
    world = World()
    model, metrics, truth = train(world, steps=15_000, seed=1)
    assert metrics.auc is not None and truth.auc is not None
    print(f"prequential AUC {metrics.auc:.3f}, true probabilities {truth.auc:.3f}")
    assert metrics.auc > 0.7 and metrics.auc > truth.auc - 0.03, metrics.as_dict()

    profit = evaluate(world, model, ProfitPolicy(margin=MARGIN, epsilon=0.0), seed=2)
    threshold = evaluate(world, model, ThresholdPolicy(threshold=0.5, discount_pct=10.0), seed=2)
    print(f"auc={metrics.auc:.3f} profit={profit:.0f} threshold={threshold:.0f}")
    assert profit > threshold
    assert profit > 0, "the profit policy should not lose money against no discount at all"
