"""Model features never include protected attributes.

The feature catalogue (``engine.features.catalogue.FEATURE_NAMES``), the model's selected features
(``engine.model.inputs.MODEL_FEATURES``), the keys of the model's input row (``model_inputs``) and
the feature vectors the engine actually computes are checked against a deny-list of name fragments,
case-insensitively, as substrings. A fragment that ever clashes with a harmless new name
(say "age" in "page_views") should make that name change, not shrink the deny-list.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from engine.events import BrowseEvent, Event, PurchaseEvent, PurchaseItem, SearchEvent
from engine.features.catalogue import FEATURE_NAMES, compute_features
from engine.features.state import apply_ops, event_ops
from engine.model.inputs import INPUT_NAMES, INTERACTIONS, MODEL_FEATURES, model_inputs

PROTECTED_FRAGMENTS: tuple[str, ...] = (
    "age",
    "birth",
    "dob",
    "gender",
    "sex",
    "race",
    "racial",
    "ethnic",
    "religio",
    "faith",
    "caste",
    "national",
    "citizen",
    "immigra",
    "disab",
    "handicap",
    "health",
    "medical",
    "marital",
    "married",
    "spouse",
    "pregnan",
    "maternity",
    "orientation",
    "lgbt",
    "income",
    "salary",
    "wealth",
    "zip",
    "postcode",
    "postal",
    "address",
    "veteran",
    "genetic",
    "politic",
    "union",
    "language",
)
"""Name fragments of protected (or proxy) attributes: age, date of birth, gender/sex, race,
ethnicity, religion, nationality, disability, health, marital status, pregnancy, sexual
orientation, income, zip/postcode and address, veteran status, genetics, political opinion,
union membership, language."""


def protected_hits(names: Iterable[str]) -> dict[str, list[str]]:
    """Names that contain a protected fragment (case-insensitive), with the fragments found."""
    hits: dict[str, list[str]] = {}
    for name in names:
        lowered = name.lower()
        found = [fragment for fragment in PROTECTED_FRAGMENTS if fragment in lowered]
        if found:
            hits[name] = found
    return hits


def test_the_deny_list_is_lower_case_and_covers_the_required_attributes() -> None:
    assert all(fragment == fragment.lower() and fragment for fragment in PROTECTED_FRAGMENTS)
    required = (
        "age",
        "gender",
        "sex",
        "race",
        "ethnic",
        "religio",
        "national",
        "disab",
        "marital",
        "pregnan",
        "orientation",
        "income",
        "zip",
        "postcode",
        "birth",
    )
    assert set(required) <= set(PROTECTED_FRAGMENTS)


@pytest.mark.parametrize(
    "planted",
    [
        "age",
        "customer_Age_bucket",
        "GENDER",
        "is_female_sex",
        "race_code",
        "ethnicity",
        "religion",
        "nationality",
        "has_disability",
        "marital_status",
        "pregnancy_flag",
        "sexual_orientation",
        "household_income",
        "zip3",
        "ZipCode",
        "postcode_area",
        "date_of_birth",
        "dob_year",
        "birth_year",
    ],
)
def test_the_checker_catches_a_planted_protected_name(planted: str) -> None:
    assert planted in protected_hits([*FEATURE_NAMES, planted])
    assert list(protected_hits([planted])) == [planted]


def test_the_checker_passes_clean_names() -> None:
    clean = ["view_count_1h", "spend_30d", "recency_cart_s", "discount_x_session_events"]
    assert protected_hits(clean) == {}


def test_catalogue_has_no_protected_attribute() -> None:
    assert len(FEATURE_NAMES) >= 30
    assert protected_hits(FEATURE_NAMES) == {}


def test_model_features_have_no_protected_attribute() -> None:
    assert set(MODEL_FEATURES) <= set(FEATURE_NAMES)
    assert protected_hits(MODEL_FEATURES) == {}
    assert protected_hits(INPUT_NAMES) == {} and set(INTERACTIONS) <= set(INPUT_NAMES)


@pytest.mark.parametrize("discount", [0.0, 12.5])
def test_model_input_row_has_no_protected_attribute(discount: float) -> None:
    # Even a feature mapping that carries a protected attribute must not reach the model.
    polluted = dict.fromkeys(FEATURE_NAMES, 1.0) | {"age": 42.0, "gender": 1.0, "zip": 75001.0}
    for features in ({}, dict.fromkeys(FEATURE_NAMES, 1.0), polluted):
        row = model_inputs(features, discount)
        assert protected_hits(row) == {}
        assert tuple(row) == INPUT_NAMES


def test_computed_feature_vectors_have_no_protected_attribute() -> None:
    t0 = 1_767_225_600_000
    item = PurchaseItem(item_id="i1", category="books", price=12.0, quantity=2)
    events: list[Event] = [
        BrowseEvent("e1", "u1", t0, "i1", "books", 12.0, "cart"),
        SearchEvent("e2", "u1", t0 + 1000, "novel", "books"),
        PurchaseEvent("e3", "u1", t0 + 2000, "o1", (item,), 24.0, "offer-1"),
    ]
    state: dict[str, float] = {}
    for event in events:
        apply_ops(state, event_ops(event))
    vector = compute_features(state, category="books")
    assert list(vector) == list(FEATURE_NAMES)
    assert protected_hits(vector) == {}
