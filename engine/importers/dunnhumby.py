"""Dunnhumby "The Complete Journey" transactions CSV to event v1.

Each row is one product line of a basket (``household_id, store_id, basket_id, product_id,
quantity, sales_value, retail_disc, coupon_disc, coupon_match_disc, week,
transaction_timestamp``, with a header). A basket becomes **one** purchase event: the user is
the household, the order is the basket, one item per product with ``price = sales_value /
quantity``, and ``amount`` the basket's total ``sales_value``. The rows of one basket are not
contiguous in the data (a third of the sample's multi-line baskets are spread out), so the
whole file is read and grouped before the first event is emitted; purchases then come out in
event-time order. Categories come from ``products.csv.gz`` beside the file when present.

>>> lines = ["household_id,store_id,basket_id,product_id,quantity,sales_value,retail_disc,"
...          "coupon_disc,coupon_match_disc,week,transaction_timestamp",
...          "7,1,900,11,2.0,3.00,0,0,0,1,2017-01-02 10:00:00",
...          "8,1,901,12,1.0,1.50,0,0,0,1,2017-01-01 09:00:00",
...          "7,1,900,13,1.0,0.99,0,0,0,1,2017-01-02 10:00:00"]
>>> run = import_dunnhumby(lines, products=False)
>>> [(e["event_id"], e["user_id"], e["amount"], len(e["items"])) for e in run]
[('dh-901', 'dh-8', 1.5, 1), ('dh-900', 'dh-7', 3.99, 2)]
>>> run.stats.records, run.stats.emitted, run.stats.merged, run.stats.rejected
(3, 2, 1, 0)
"""

from __future__ import annotations

import csv
import gzip
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from engine.event_fields import MAX_PURCHASE_ITEMS
from engine.events import SCHEMA_VERSION
from engine.importers.base import (
    DEFAULT_KEEP_REJECTS,
    PLAUSIBLE_WINDOW,
    ImporterError,
    ImportRun,
    ImportStats,
    Line,
    Parsed,
    Reject,
    RejectHandler,
    Source,
    TimeWindow,
    check_source,
    describe_ts,
    excerpt,
    source_name,
    source_parser,
)

__all__ = [
    "CATEGORY_FIELDS",
    "COLUMNS",
    "PRODUCTS_FILE",
    "UNKNOWN_CATEGORY",
    "import_dunnhumby",
    "load_categories",
    "parse_dunnhumby",
]

#: The transactions columns, in the order of the data set's files (used when a file has no header).
COLUMNS: Final = (
    "household_id",
    "store_id",
    "basket_id",
    "product_id",
    "quantity",
    "sales_value",
    "retail_disc",
    "coupon_disc",
    "coupon_match_disc",
    "week",
    "transaction_timestamp",
)
_NEEDED: Final = (
    "household_id",
    "basket_id",
    "product_id",
    "quantity",
    "sales_value",
    "transaction_timestamp",
)
#: The product table looked for beside the transactions file.
PRODUCTS_FILE: Final = "products.csv.gz"
#: Product columns usable as the category, the finer first.
CATEGORY_FIELDS: Final = ("product_category", "department")
#: The category of a product the product table does not describe (or when there is none).
UNKNOWN_CATEGORY: Final = "unknown"
_MAX_DIGITS: Final = 32
_MAX_MONEY: Final = 1e12
_PRICE_DECIMALS: Final = 4
"""Unit prices keep 4 decimals: fuel is sold by the thousandth of a gallon (cents would be 0)."""


@dataclass(slots=True)
class _Basket:
    first_line: int
    household: str
    ts: int
    stamp: str
    items: dict[str, list[float]] = field(default_factory=dict)
    """product_id -> [quantity, sales_value] (a product on two rows is summed)."""
    lines: list[int] = field(default_factory=list)


def load_categories(
    path: str | os.PathLike[str], field_name: str = "product_category"
) -> dict[str, str]:
    """``product_id -> category`` from a products CSV (plain or gzip).

    ``field_name`` is ``product_category`` (304 values; falls back to the department when
    empty) or ``department`` (32 values).
    """
    if field_name not in CATEGORY_FIELDS:
        raise ImporterError(f"category field must be one of {', '.join(CATEGORY_FIELDS)}")
    with open(path, "rb") as raw:
        gz = raw.peek(2)[:2] == b"\x1f\x8b"
    opener: Any = gzip.open if gz else open
    out: dict[str, str] = {}
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "product_id" not in reader.fieldnames:
            raise ImporterError(f"{os.fspath(path)} has no product_id column: not a products file")
        for row in reader:
            value = (row.get(field_name) or "").strip() or (row.get("department") or "").strip()
            if value:
                out[row["product_id"].strip()] = value[:128]
    return out


def _is_id(value: str) -> bool:
    return 0 < len(value) <= _MAX_DIGITS and value.isdigit() and value.isascii()


def _parse_ts(text: str) -> int | None:
    """Epoch ms of ``YYYY-MM-DD HH:MM:SS`` read as UTC (the data set names no zone)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_dunnhumby(
    lines: Iterable[Line],
    stats: ImportStats,
    *,
    categories: Mapping[str, str] | None = None,
    window: TimeWindow | None = PLAUSIBLE_WINDOW,
) -> Iterator[Parsed]:
    """Yield a :class:`Reject` for each unusable row as it is read, then one
    ``(first_line, purchase)`` per basket, in event-time order (ties by first line)."""
    baskets: dict[str, _Basket] = {}
    by_kind = stats.records_by_kind
    index = {name: i for i, name in enumerate(COLUMNS)}
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):
            if isinstance(raw, bytes):
                try:
                    text = raw.decode()
                except UnicodeDecodeError as exc:
                    stats.records += 1
                    by_kind["other"] += 1
                    yield Reject(lineno, "not_utf8", f"the row is not UTF-8: {exc}", excerpt(raw))
                    continue
            else:
                text = raw
            text = text.strip()
            if not text:
                stats.skipped["blank"] += 1
                continue
            parts = [p.strip() for p in text.split(",")]
            if lineno == 1 and "household_id" in parts:
                missing = [name for name in _NEEDED if name not in parts]
                if missing:
                    raise ImporterError(f"the header lacks the column(s) {', '.join(missing)}")
                index = {name: i for i, name in enumerate(parts)}
                stats.skipped["header"] += 1
                continue
            stats.records += 1
            by_kind["transaction"] += 1
            if len(parts) != len(index):
                detail = f"expected {len(index)} comma-separated fields, got {len(parts)}"
                yield Reject(lineno, "field_count", detail, excerpt(raw))
                continue
            reject = _add_row(baskets, lineno, parts, index, window)
            if reject is not None:
                yield Reject(lineno, reject[0], reject[1], excerpt(raw))
    finally:
        stats.lines += lineno
    for basket_id, basket in sorted(baskets.items(), key=lambda kv: (kv[1].ts, kv[1].first_line)):
        if len(basket.items) > MAX_PURCHASE_ITEMS:
            detail = (
                f"basket {basket_id} has {len(basket.items)} distinct products; "
                f"event v1 allows at most {MAX_PURCHASE_ITEMS} items per purchase"
            )
            for line in basket.lines:
                yield Reject(line, "order_too_large", detail, "")
            continue
        stats.merged += len(basket.lines) - 1
        yield basket.first_line, _purchase(basket_id, basket, categories or {})


def _add_row(
    baskets: dict[str, _Basket],
    lineno: int,
    parts: list[str],
    index: Mapping[str, int],
    window: TimeWindow | None,
) -> tuple[str, str] | None:
    """Add one row to its basket; the (reason, detail) of a reject when it cannot be used."""
    household, basket_id, product = (parts[index[n]] for n in _NEEDED[:3])
    for name, value in (("household_id", household), ("basket_id", basket_id)):
        if not _is_id(value):
            return "bad_id", f"{name} {value[:40]!r} is not a decimal integer of 1 to 32 digits"
    if not _is_id(product):
        return "bad_id", f"product_id {product[:40]!r} is not a decimal integer of 1 to 32 digits"
    quantity = _number(parts[index["quantity"]])
    if quantity is None or quantity < 1 or not quantity.is_integer():
        detail = (
            f"quantity {parts[index['quantity']][:20]!r} is not a whole number >= 1 "
            "(the data's voids and coupon-only lines have quantity 0)"
        )
        return "bad_quantity", detail
    sales = _number(parts[index["sales_value"]])
    if sales is None or not 0 <= sales <= _MAX_MONEY:
        return "bad_price", f"sales_value {parts[index['sales_value']][:20]!r} is not 0 to 1e12"
    stamp = parts[index["transaction_timestamp"]]
    ts = _parse_ts(stamp)
    if ts is None or ts < 0:
        return "bad_ts", f"transaction_timestamp {stamp[:30]!r} is not YYYY-MM-DD HH:MM:SS"
    if window is not None and ts not in window:
        return "ts_out_of_range", f"{stamp} ({describe_ts(ts)}) is outside {window}"
    basket = baskets.get(basket_id)
    if basket is None:
        basket = baskets[basket_id] = _Basket(lineno, household, ts, stamp)
    elif basket.household != household or basket.ts != ts:
        return "basket_mismatch", (
            f"basket {basket_id} began on line {basket.first_line} with household "
            f"{basket.household} at {basket.stamp}; this row says {household} at {stamp}"
        )
    line = basket.items.setdefault(product, [0.0, 0.0])
    line[0] += quantity
    line[1] += sales
    basket.lines.append(lineno)
    return None


def _purchase(basket_id: str, basket: _Basket, categories: Mapping[str, str]) -> dict[str, Any]:
    items = [
        {
            "item_id": product,
            "category": categories.get(product, UNKNOWN_CATEGORY),
            "price": round(sales / quantity, _PRICE_DECIMALS),
            "quantity": int(quantity),
        }
        for product, (quantity, sales) in basket.items.items()
    ]
    amount = round(sum(sales for _, sales in basket.items.values()), 2)
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": f"dh-{basket_id}",
        "user_id": f"dh-{basket.household}",
        "type": "purchase",
        "ts": basket.ts,
        "order_id": basket_id,
        "items": items,
        "amount": float(amount),
    }


def _products_for(source: Source, products: str | os.PathLike[str] | bool) -> Path | None:
    if products is False:
        return None
    if products is True:
        if not isinstance(source, str | os.PathLike):
            return None
        beside = Path(source).parent / PRODUCTS_FILE
        return beside if beside.is_file() else None
    path = Path(products)
    if not path.is_file():
        raise FileNotFoundError(f"no such products file: {path}")
    return path


def import_dunnhumby(
    source: Source,
    *,
    products: str | os.PathLike[str] | bool = True,
    category_field: str = "product_category",
    window: TimeWindow | None = PLAUSIBLE_WINDOW,
    on_reject: RejectHandler | None = None,
    keep_rejects: int = DEFAULT_KEEP_REJECTS,
) -> ImportRun:
    """Import Dunnhumby Complete Journey transactions from a path (plain or gzip) or lines.

    ``products``: ``True`` reads ``products.csv.gz`` beside a path source when present, a path
    reads that file, ``False`` uses none (every category is ``"unknown"``). ``category_field``
    picks ``product_category`` (falling back to the department) or ``department``.
    ``window`` bounds accepted event times (default: years 2000 to 2100).
    """
    check_source(source)
    table = _products_for(source, products)
    categories = load_categories(table, category_field) if table is not None else None
    return ImportRun(
        "dunnhumby",
        source_name(source),
        source_parser(
            source,
            lambda lines, stats: parse_dunnhumby(
                lines, stats, categories=categories, window=window
            ),
        ),
        on_reject=on_reject,
        keep_rejects=keep_rejects,
    )
