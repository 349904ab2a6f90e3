"""World variants (engine/analysis/simulation/params.py): the defaults keep today's streams, each
parameter changes what it says, bad values and files are errors that name the key."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from engine.analysis.simulation.closed_loop import ClosedLoopConfig, simulate_closed_loop
from engine.analysis.simulation.errors import WorldError, WorldParamError
from engine.analysis.simulation.params import WorldParams, load_world_file, parse_world_file
from engine.analysis.simulation.shoppers import events_per_session
from engine.analysis.simulation.world import World, open_loop
from engine.campaigns import load_campaigns

ROOT = Path(__file__).resolve().parents[2]
WORLDS = ROOT / "deploy" / "worlds"
PAPER = ROOT / "deploy" / "campaigns" / "paper.toml"


def digest(value: object) -> str:
    return hashlib.sha256(orjson.dumps(value)).hexdigest()


# -- the defaults are the world as it was -------------------------------------------------------

# Recorded from the world before it had parameters (module constants), commit 28984a7.
OPEN_LOOP_DIGEST = "ca5e1a90bc1edf2cd004d69c1442c913e6dd5c8c45bc23a3088aca73e49743a8"
CLOSED_LOOP_DIGEST = "e6781f85a3d3ce9592e9b51076f298750fd994be156381c8448086cdade5259c"


def offered_run(world: World) -> list[object]:
    """8,000 events of a world that is asked for the truth and handed an offer every 50."""
    out: list[object] = []
    stream = world.events()
    for index in range(8000):
        event = next(stream)
        out.append(event)
        if index % 50 == 0:
            user_id = str(event["user_id"])
            truth = world.truth(user_id, before_ms=world.clock + 3_600_000)
            out.append(
                None
                if truth is None
                else [truth.ts, truth.items, truth.value, truth.held_pct, list(truth.later)]
            )
            offer = {
                "offer_id": f"o{index}",
                "user_id": user_id,
                "discount_pct": 15,
                "issued_at": world.clock,
                "expires_at": world.clock + 3_600_000,
            }
            world.receive([offer])
    out.append(
        [
            world.purchases,
            world.redeemed,
            world.gross_cents,
            world.paid_cents,
            world.expected_incremental_margin(0.3),
            world.incremental_margin_variance(0.3),
        ]
    )
    return out


@pytest.mark.parametrize("params", [None, WorldParams()])
def test_the_default_world_produces_the_events_it_produced_before_parameters(
    params: WorldParams | None,
) -> None:
    events = list(open_loop(users=200, events=20_000, seed=11, params=params))
    assert digest(events) == OPEN_LOOP_DIGEST
    world = World(users=100, seed=5, mean_gap_ms=3000.0, params=params)
    assert digest(offered_run(world)) == CLOSED_LOOP_DIGEST
    assert events_per_session(params) == 6.4584040747028855


def test_a_parameter_changes_values_never_which_draw_feeds_which_trait() -> None:
    """Propensity, tastes and activity of each shopper are the same in every sensitivity
    variant: the deal-seeker coin and the sensitivity draw consume one number each."""
    plain = World(users=300, seed=2).shoppers
    seekers = World(users=300, seed=2, params=WorldParams(deal_seekers=0.6)).shoppers
    assert [(s.propensity, s.tastes, s.activity) for s in plain] == [
        (s.propensity, s.tastes, s.activity) for s in seekers
    ]


def test_without_offers_sensitivity_variants_are_the_same_world() -> None:
    """Sensitivity only matters once a discount is offered (P(buy | 0) is the base), so the
    no-offer events of every sensitivity variant are identical: common random numbers
    across variants, not only across copies."""
    plain = orjson.dumps(list(open_loop(users=100, events=10_000, seed=1)))
    for params in (
        WorldParams(deal_seekers=0.6),
        WorldParams(deal_seekers=0.0, sensitivity=(0.0, 0.05)),
        WorldParams(deal_seeker_sensitivity=(3.0, 9.0)),
    ):
        assert (
            orjson.dumps(list(open_loop(users=100, events=10_000, seed=1, params=params))) == plain
        )


# -- each parameter does what it says -----------------------------------------------------------


def test_without_deal_seekers_no_shopper_is_more_sensitive_than_the_others_range() -> None:
    params = WorldParams(deal_seekers=0.0, sensitivity=(0.0, 0.05))
    sensitivities = [s.price_sensitivity for s in World(users=2000, seed=3, params=params).shoppers]
    assert max(sensitivities) <= 0.05
    assert max(sensitivities) > 0.04  # the range is used, not collapsed


def test_the_deal_seeker_share_is_the_share_of_shoppers_in_the_seeker_range() -> None:
    for share in (0.25, 0.6, 1.0):
        shoppers = World(users=3000, seed=4, params=WorldParams(deal_seekers=share)).shoppers
        seekers = sum(1.5 <= s.price_sensitivity <= 4.0 for s in shoppers) / len(shoppers)
        assert abs(seekers - share) < 0.03, (share, seekers)


def test_sensitivity_ranges_bound_each_group() -> None:
    params = WorldParams(deal_seekers=0.5, deal_seeker_sensitivity=(5.0, 6.0), sensitivity=(2, 3))
    values = [s.price_sensitivity for s in World(users=1000, seed=5, params=params).shoppers]
    assert all(2.0 <= v <= 3.0 or 5.0 <= v <= 6.0 for v in values)
    assert 0.4 < sum(v >= 5.0 for v in values) / len(values) < 0.6


def test_the_propensity_follows_beta_and_its_cap() -> None:
    capped = World(users=1000, seed=6, params=WorldParams(propensity_cap=0.1)).shoppers
    assert max(s.propensity for s in capped) == 0.1
    keen = WorldParams(propensity_beta=(8.0, 2.0), propensity_cap=1.0)
    shoppers = World(users=2000, seed=6, params=keen).shoppers
    mean = sum(s.propensity for s in shoppers) / len(shoppers)
    assert abs(mean - 0.8) < 0.02


def actions(params: WorldParams, events: int = 6000) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in open_loop(users=50, events=events, seed=7, params=params):
        kind = str(event["action"]) if event["type"] == "browse" else str(event["type"])
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def test_without_carts_there_are_no_checkouts_and_no_purchases() -> None:
    counts = actions(WorldParams(cart_p=0.0))
    assert "cart" not in counts and "purchase" not in counts
    assert counts["view"] and counts["favorite"] and counts["search"]


def test_step_probabilities_shape_the_stream() -> None:
    base = actions(WorldParams())
    assert "favorite" not in actions(WorldParams(favorite_p=0.0))
    assert "search" not in actions(WorldParams(search_p=0.0))
    assert set(actions(WorldParams(search_p=1.0))) == {"search"}
    more_carts = actions(WorldParams(cart_p=0.6))
    assert more_carts["cart"] > 1.5 * base["cart"]
    assert more_carts["purchase"] > base["purchase"]


def test_session_length_follows_the_end_chance_and_the_rate_still_follows_mean_gap_ms() -> None:
    long_sessions = WorldParams(session_end_p=0.1, cart_p=0.5, search_p=0.1)
    assert events_per_session(long_sessions) > 10 > events_per_session() + 3
    events = list(
        open_loop(users=300, events=60_000, seed=2, mean_gap_ms=250.0, params=long_sessions)
    )
    span = int(events[-1]["ts"]) - int(events[0]["ts"])  # type: ignore[call-overload]
    assert 0.9 < span / len(events) / 250.0 < 1.1


def test_one_step_sessions_never_cart() -> None:
    """Carting or favouriting needs an item viewed earlier in the session."""
    counts = actions(WorldParams(session_end_p=1.0))
    assert "cart" not in counts and "favorite" not in counts


# -- checks, tables, files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"deal_seekers": 1.5}, "deal_seekers must be within [0, 1], got 1.5"),
        ({"deal_seekers": float("nan")}, "deal_seekers must be within [0, 1]"),
        ({"sensitivity": (1.0, 0.5)}, "sensitivity must be two finite numbers low:high"),
        ({"deal_seeker_sensitivity": (-1.0, 2.0)}, "deal_seeker_sensitivity must be"),
        ({"deal_seeker_sensitivity": (1.0, float("inf"))}, "got 1:inf"),
        ({"propensity_beta": (0.0, 6.0)}, "propensity_beta must be two finite numbers a:b"),
        ({"propensity_cap": 0.0}, "propensity_cap must be within (0, 1]"),
        ({"cart_p": -0.1}, "cart_p must be within [0, 1]"),
        ({"favorite_p": 2.0}, "favorite_p must be within [0, 1]"),
        ({"cart_p": 0.7, "favorite_p": 0.4}, "cart_p + favorite_p must be at most 1"),
        ({"search_p": 1.01}, "search_p must be within [0, 1]"),
        ({"session_end_p": 0.05}, "session_end_p must be within [0.1, 1], got 0.05"),
    ],
)
def test_bad_parameters_name_the_field_and_the_allowed_range(
    change: dict[str, object], says: str
) -> None:
    params = replace(WorldParams(), **change)  # type: ignore[arg-type]
    with pytest.raises(WorldParamError) as caught:
        params.check()
    assert says in str(caught.value)
    assert set(caught.value.fields) == set(change)
    with pytest.raises(WorldError, match=says.split()[0]):
        World(users=1, seed=1, params=params)


def test_a_table_sets_the_keys_it_names_and_keeps_the_other_defaults() -> None:
    params = WorldParams.from_table(
        {"deal_seekers": 0, "sensitivity": [0, 0.05], "propensity_beta": [2, 5], "cart_p": 0.3}
    )
    assert params == WorldParams(
        deal_seekers=0.0, sensitivity=(0.0, 0.05), propensity_beta=(2.0, 5.0), cart_p=0.3
    )
    assert params.as_dict()["sensitivity"] == [0.0, 0.05]
    assert WorldParams.from_table(WorldParams().as_dict()) == WorldParams()


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"deal_seeker": 0.5}, "unknown key 'deal_seeker'"),
        ({"cart_p": "high"}, "cart_p must be a number, got 'high'"),
        ({"cart_p": True}, "cart_p must be a number"),
        ({"sensitivity": 0.5}, "sensitivity must be two numbers [low, high]"),
        ({"sensitivity": [0, 1, 2]}, "sensitivity must be two numbers"),
        ({"sensitivity": [0, "x"]}, "sensitivity must be a number"),
        ({"search_p": 3}, "search_p must be within [0, 1], got 3.0"),
    ],
)
def test_bad_tables_are_world_errors(table: dict[str, object], says: str) -> None:
    with pytest.raises(WorldError) as caught:
        WorldParams.from_table(table)
    assert says in str(caught.value)


def test_a_world_file_holds_the_params_and_the_run_keys() -> None:
    document = tomllib.loads("[world]\ndeal_seekers = 0.6\nmean_gap_ms = 500\nmargin = 0.4\n")
    world = parse_world_file(document)
    assert world.params == WorldParams(deal_seekers=0.6)
    assert (world.mean_gap_ms, world.margin) == (500.0, 0.4)
    assert parse_world_file({"world": {}}).mean_gap_ms is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("deal_seekers = 0.6\n", "unknown table or key 'deal_seekers'"),
        ("[other]\n", "unknown table or key 'other'"),
        ("", "no [world] table"),
        ("[world]\nspeed = 2\n", "unknown key 'speed' in [world] (known: deal_seekers,"),
        ("[world]\nmargin = 'a'\n", "margin must be a number"),
        ("[world]\ncart_p = 2\n", "cart_p must be within [0, 1], got 2.0"),
        ("[world\n", "is not valid TOML"),
    ],
)
def test_bad_world_files_name_the_file_and_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "w.toml"
    path.write_text(text, "utf-8")
    with pytest.raises(WorldError) as caught:
        load_world_file(path)
    message = str(caught.value)
    assert str(path) in message and says in message, message
    assert "\n" not in message


def test_a_missing_world_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(WorldError, match="cannot read world file"):
        load_world_file(tmp_path / "none.toml")


def test_the_shipped_worlds_are_what_their_names_say() -> None:
    quiet = load_world_file(WORLDS / "no-deal-seekers.toml").params
    shoppers = World(users=1000, seed=1, params=quiet).shoppers
    assert max(s.price_sensitivity for s in shoppers) <= 0.05
    seekers = load_world_file(WORLDS / "deal-seekers-60.toml").params
    assert seekers == WorldParams(deal_seekers=0.6)


# -- the closed loop runs in the world it is given and says which -------------------------------


def test_the_simulation_records_its_world_and_a_deaf_world_gives_nothing_back() -> None:
    """Shoppers whom no discount moves: the oracle never offers, and every offer a policy
    makes is a discount given away."""
    deaf = WorldParams(deal_seekers=0.0, sensitivity=(0.0, 0.0))
    config = ClosedLoopConfig(users=60, events=3000, seed=3, batch_size=200, world=deaf)
    simulation = simulate_closed_loop(load_campaigns(PAPER)[:2], config)
    assert simulation["world"] == deaf.as_dict()
    assert simulation["oracle_incremental_margin"] == 0.0
    oracles = simulation["oracles"]
    policies = simulation["policies"]
    assert isinstance(oracles, list) and isinstance(policies, list)
    assert all(row["offers"] == 0 for row in oracles)
    assert all(row["incremental_margin"] <= 0.0 for row in policies)
    assert any(row["offers"] > 0 for row in policies)
    default = simulate_closed_loop(load_campaigns(PAPER)[:1], replace(config, world=WorldParams()))
    assert default["world"] == WorldParams().as_dict()
