"""The Dunnhumby Complete Journey importer: one purchase per basket, rejects, real data.

The inline fixture has a basket spread over non-adjacent rows, a void line, a conflicting row
and a product on two rows; the last section reads the real sample in ``../shared/data`` (and
skips, saying so, when it is absent) and checks the importer against a reference computed
here with the ``csv`` module.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from engine.events import event_to_dict, parse_event
from engine.importers import FORMATS, detect_format, import_events
from engine.importers.base import REJECT_REASONS, ImporterError
from engine.importers.dunnhumby import UNKNOWN_CATEGORY, import_dunnhumby, load_categories

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "dunnhumby-complete-journey"
TRANSACTIONS = DATA / "transactions_sample.csv.gz"
HEADER = (
    "household_id,store_id,basket_id,product_id,quantity,sales_value,retail_disc,coupon_disc,"
    "coupon_match_disc,week,transaction_timestamp"
)
LINES = [
    HEADER,
    "10,1,500,900,2.0,5.00,0.5,0.0,0.0,1,2017-03-01 10:00:00",  # 2  basket 500
    "11,1,501,901,1.0,2.50,0.0,0.0,0.0,1,2017-02-01 09:00:00",  # 3  basket 501 (earlier)
    "10,1,500,902,0.0,0.00,0.0,0.0,0.0,1,2017-03-01 10:00:00",  # 4  void line: bad_quantity
    "",  # 5 blank
    "10,1,500,903,3.0,1.00,0.0,0.0,0.0,1,2017-03-01 10:00:00",  # 6  basket 500 again
    "12,1,500,904,1.0,1.00,0.0,0.0,0.0,1,2017-03-01 10:00:00",  # 7  other household
    "10,1,500,900,1.0,2.50,0.0,0.0,0.0,1,2017-03-01 10:00:00",  # 8  product 900 again
    "13,1,4.0e+10,905,1.0,1.00,0.0,0.0,0.0,1,2017-03-01 10:00:00",  # 9  basket id as float
    "13,1,502,905,1.0,1.00,0.0,0.0,0.0,1,yesterday",  # 10 bad ts
    "13,1,502,905,1.0,-1.00,0.0,0.0,0.0,1,2017-03-01 10:00:00",  # 11 negative sales
    "13,1,502,905,1.0,1.00",  # 12 short row
]


@cache
def event_schema() -> Draft202012Validator:
    schema = json.loads((REPO / "schemas" / "event.v1.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema)


def assert_valid(event: dict[str, Any]) -> None:
    assert event_to_dict(parse_event(event)) == event, event
    assert not [e.message for e in event_schema().iter_errors(event)], event


def test_baskets_become_one_purchase_each_in_event_time_order() -> None:
    run = import_dunnhumby(LINES, products=False)
    events = list(run)
    assert [e["event_id"] for e in events] == ["dh-501", "dh-500"]
    first, second = events
    assert first == {
        "schema_version": 1,
        "event_id": "dh-501",
        "user_id": "dh-11",
        "type": "purchase",
        "ts": 1_485_939_600_000,  # 2017-02-01T09:00:00Z
        "order_id": "501",
        "items": [{"item_id": "901", "category": UNKNOWN_CATEGORY, "price": 2.5, "quantity": 1}],
        "amount": 2.5,
    }
    assert second["user_id"] == "dh-10" and second["order_id"] == "500"
    items = {i["item_id"]: i for i in second["items"]}
    assert set(items) == {"900", "903"}
    assert items["900"]["quantity"] == 3 and items["900"]["price"] == 2.5  # 7.50 / 3
    assert items["903"]["price"] == 0.3333  # 1.00 / 3, four decimals
    assert second["amount"] == 8.5
    for event in events:
        assert_valid(event)


def test_rejects_have_reasons_and_every_row_is_accounted_for() -> None:
    run = import_dunnhumby(LINES, products=False)
    list(run)
    stats = run.stats
    assert stats.records == 10 and stats.emitted == 2 and stats.merged == 2
    assert {r.line: r.reason for r in run.rejects} == {
        4: "bad_quantity",
        7: "basket_mismatch",
        9: "bad_id",
        10: "bad_ts",
        11: "bad_price",
        12: "field_count",
    }
    assert stats.balanced and stats.rejected == 6
    assert stats.skipped == Counter({"header": 1, "blank": 1})
    assert all(r.reason in REJECT_REASONS for r in run.rejects)
    assert "household 10" in next(r.detail for r in run.rejects if r.line == 7)


def test_rows_without_a_header_use_the_documented_column_order() -> None:
    run = import_dunnhumby(LINES[1:3], products=False)
    assert [e["event_id"] for e in run] == ["dh-501", "dh-500"]


def test_a_header_missing_needed_columns_is_an_error() -> None:
    with pytest.raises(ImporterError, match="lacks the column"):
        list(import_dunnhumby(["household_id,basket_id,product_id", "1,2,3"], products=False))


def test_categories_from_a_products_file_beside_the_transactions(tmp_path: Path) -> None:
    (tmp_path / "products.csv.gz").write_bytes(
        gzip.compress(
            b"product_id,manufacturer_id,department,brand,product_category,product_type,"
            b"package_size\n901,1,GROCERY,National,FRZN ICE,ICE,22 LB\n"
            b"900,1,DRUG GM,National,,,\n"
        )
    )
    path = tmp_path / "transactions.csv"
    path.write_text("\n".join(LINES[:4]) + "\n")
    assert detect_format(path) == "dunnhumby"
    by_id = {e["event_id"]: e for e in import_events(path)}
    assert by_id["dh-501"]["items"][0]["category"] == "FRZN ICE"
    assert by_id["dh-500"]["items"][0]["category"] == "DRUG GM"  # no category: department
    by_department = import_dunnhumby(path, category_field="department")
    assert {e["items"][0]["category"] for e in by_department} == {"GROCERY", "DRUG GM"}
    unknown = import_dunnhumby(path, products=False)
    assert {e["items"][0]["category"] for e in unknown} == {UNKNOWN_CATEGORY}
    with pytest.raises(FileNotFoundError, match="no such products file"):
        import_dunnhumby(path, products=tmp_path / "absent.csv")
    with pytest.raises(ImporterError, match="category field"):
        load_categories(tmp_path / "products.csv.gz", "brand")


def test_registered_as_a_format() -> None:
    assert FORMATS["dunnhumby"].importer is import_dunnhumby
    assert list(import_events(LINES, "dunnhumby")) == list(import_dunnhumby(LINES, products=False))


# -- the real sample ----------------------------------------------------------------------------


def reference(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Per basket, straight from the CSV: household, timestamp text, products, total sales;
    and how many rows cannot be used (quantity < 1 or a basket id that is not an integer)."""
    baskets: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"household": None, "stamp": None, "products": set(), "sales": 0.0}
    )
    unusable = 0
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if float(row["quantity"]) < 1 or not row["basket_id"].isdigit():
                unusable += 1
                continue
            basket = baskets[row["basket_id"]]
            basket["household"] = row["household_id"]
            basket["stamp"] = row["transaction_timestamp"]
            basket["products"].add(row["product_id"])
            basket["sales"] += float(row["sales_value"])
    return dict(baskets), unusable


def test_real_transactions_sample() -> None:
    if not TRANSACTIONS.exists():
        pytest.skip(
            f"the Dunnhumby sample is absent ({TRANSACTIONS}); see ../shared/data/README.md"
        )
    assert detect_format(TRANSACTIONS) == "dunnhumby"
    want, unusable = reference(TRANSACTIONS)
    run = import_events(TRANSACTIONS)
    events = list(run)
    stats = run.stats
    assert stats.records == 75_000 and stats.balanced, stats.summary()
    assert stats.rejected == unusable == 416, stats.summary()
    assert stats.emitted == len(want) == len(events), stats.summary()
    assert stats.merged == 75_000 - unusable - len(want)
    assert stats.out_of_order == 0, "purchases come out in event-time order"
    categories = Counter()
    for event in events:
        basket = want[event["order_id"]]
        assert event["user_id"] == f"dh-{basket['household']}"
        assert {i["item_id"] for i in event["items"]} == basket["products"]
        assert event["amount"] == pytest.approx(basket["sales"], abs=0.005)
        assert event["ts"] == parse_event(event).ts
        categories[event["items"][0]["category"] == UNKNOWN_CATEGORY] += 1
    for event in events[:: max(1, len(events) // 500)]:
        assert_valid(event)
    # products.csv.gz lies beside the sample: nearly every product has a category
    assert categories[False] > 0.99 * len(events), categories
