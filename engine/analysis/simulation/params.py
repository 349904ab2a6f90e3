"""The world's parameters: who the shoppers are and how they shop, and the TOML file that sets
them (``[world]``; every key in ``docs/simulator.md``).

The defaults are the world every figure in the docs was measured in; a world built with them
draws the same random numbers in the same order as before the parameters existed, so its
events are byte-identical."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engine.analysis.simulation.errors import WorldError, WorldParamError

Pair = tuple[float, float]

MIN_SESSION_END_P = 0.1
"""Sessions are cut at 60 steps and the event-rate maths ignores the cut; at 0.1 or more it
shortens sessions by under 0.2 %, below it the population's rate would drift off ``mean_gap_ms``."""


@dataclass(frozen=True, slots=True)
class WorldParams:
    """The parameters of a world's shoppers and sessions (the response rule is fixed).

    Time (``mean_gap_ms``) and the scoring margin belong to the run, not to the shoppers:
    they stay in ``World`` / ``ClosedLoopConfig``."""

    deal_seekers: float = 0.25
    """Share of shoppers who are deal seekers (each shopper: ``rng.random() < share``)."""
    deal_seeker_sensitivity: Pair = (1.5, 4.0)
    """A deal seeker's price sensitivity is U(low, high)."""
    sensitivity: Pair = (0.0, 1.0)
    """Every other shopper's price sensitivity is U(low, high)."""
    propensity_beta: Pair = (1.5, 6.0)
    """Base propensity = min(cap, Beta(a, b)): mean a / (a + b) before the cap."""
    propensity_cap: float = 0.9
    cart_p: float = 0.25
    """Chance that a browse step puts the item just viewed into the cart."""
    favorite_p: float = 0.08
    """Chance that a browse step marks the item just viewed as a favourite."""
    search_p: float = 0.25
    """Chance that a step is a search; otherwise it is a browse."""
    session_end_p: float = 1 / 6
    """Chance that a session ends after each step (1 / session_end_p steps on average)."""

    def check(self) -> None:
        """Raise ``WorldParamError`` naming the first parameter outside its allowed range."""
        _share("deal_seekers", self.deal_seekers)
        _pair("deal_seeker_sensitivity", self.deal_seeker_sensitivity)
        _pair("sensitivity", self.sensitivity)
        a, b = self.propensity_beta
        if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
            raise WorldParamError(
                ("propensity_beta",), "two finite numbers a:b, both above 0", _show(a, b)
            )
        if not 0.0 < self.propensity_cap <= 1.0:
            raise WorldParamError(("propensity_cap",), "within (0, 1]", self.propensity_cap)
        _share("cart_p", self.cart_p)
        _share("favorite_p", self.favorite_p)
        if self.cart_p + self.favorite_p > 1.0:
            raise WorldParamError(
                ("cart_p", "favorite_p"),
                "at most 1 (a browse step carts, favourites or views)",
                self.cart_p + self.favorite_p,
            )
        _share("search_p", self.search_p)
        if not MIN_SESSION_END_P <= self.session_end_p <= 1.0:
            raise WorldParamError(
                ("session_end_p",), f"within [{MIN_SESSION_END_P}, 1]", self.session_end_p
            )

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> WorldParams:
        """Parameters from a TOML ``[world]`` table: missing keys keep their defaults, unknown
        keys and values of the wrong type or range are ``WorldError``s naming the key."""
        unknown = sorted(set(table) - set(PARAM_KEYS))
        if unknown:
            raise WorldError(f"unknown key {unknown[0]!r} (known: {', '.join(PARAM_KEYS)})")
        values: dict[str, Any] = {}  # checked key by key: a float or a Pair
        for key, value in table.items():
            values[key] = _pair_value(key, value) if key in PAIR_KEYS else _number(key, value)
        params = cls(**values)
        params.check()
        return params

    def as_dict(self) -> dict[str, object]:
        """Every parameter by name (pairs as two-item lists): what a report records."""
        return {
            f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
            for f in fields(self)
        }


PARAM_KEYS: tuple[str, ...] = tuple(f.name for f in fields(WorldParams))
PAIR_KEYS: frozenset[str] = frozenset(
    f.name for f in fields(WorldParams) if isinstance(f.default, tuple)
)
RUN_KEYS: tuple[str, ...] = ("mean_gap_ms", "margin")
"""Keys a world file may also hold for the run that uses the world (not shopper parameters)."""


@dataclass(frozen=True, slots=True)
class WorldFile:
    """A world file: the shoppers' parameters and, when the file sets them, the run's mean
    event gap and scoring margin (None: the command's default)."""

    params: WorldParams
    mean_gap_ms: float | None = None
    margin: float | None = None


def parse_world_file(document: Mapping[str, object]) -> WorldFile:
    """A parsed world TOML document: one ``[world]`` table of ``PARAM_KEYS`` and ``RUN_KEYS``."""
    extra = sorted(set(document) - {"world"})
    if extra:
        raise WorldError(f"unknown table or key {extra[0]!r}: a world file has one [world] table")
    table = document.get("world")
    if not isinstance(table, Mapping):
        raise WorldError("no [world] table")
    unknown = sorted(set(table) - set(PARAM_KEYS) - set(RUN_KEYS))
    if unknown:
        known = ", ".join((*PARAM_KEYS, *RUN_KEYS))
        raise WorldError(f"unknown key {unknown[0]!r} in [world] (known: {known})")
    run = {key: _number(key, table[key]) for key in RUN_KEYS if key in table}
    params = WorldParams.from_table({k: v for k, v in table.items() if k not in RUN_KEYS})
    return WorldFile(params, run.get("mean_gap_ms"), run.get("margin"))


def load_world_file(path: Path) -> WorldFile:
    """Read a world TOML file; every error names the file and says what to change."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorldError(f"cannot read world file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WorldError(f"world file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise WorldError(f"world file {path} is not valid TOML: {exc}") from None
    try:
        return parse_world_file(document)
    except WorldError as exc:
        raise WorldError(f"world file {path}: {exc}") from None


def _show(low: float, high: float) -> str:
    return f"{low:g}:{high:g}"


def _share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise WorldParamError((name,), "within [0, 1]", value)


def _pair(name: str, pair: Pair) -> None:
    low, high = pair
    if not (math.isfinite(high) and 0.0 <= low <= high):
        raise WorldParamError(
            (name,), "two finite numbers low:high with 0 <= low <= high", _show(low, high)
        )


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WorldError(f"{key} must be a number, got {value!r}")
    return float(value)


def _pair_value(key: str, value: object) -> Pair:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise WorldError(f"{key} must be two numbers [low, high], got {value!r}")
    low, high = (_number(key, item) for item in value)
    return (low, high)
