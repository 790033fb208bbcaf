"""The filters of the export lists, as DESIGN names them, validated into SQL parameters;
the keyset cursor; the output format.  Pure: a mapping of query parameters in, values out."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from api.errors import ApiError
from api.params import MAX_ID, Query

MAX_PER_PAGE = 500
DEFAULT_PER_PAGE = 50

ORDER_STATUSES = ("pending", "processing", "shipped", "delivered", "cancelled", "refunded")
PAYMENT_STATUSES = ("pending", "paid", "failed", "refunded")
PRODUCT_STATUSES = ("draft", "active", "inactive", "archived")
REVIEW_STATUSES = ("pending", "approved", "rejected")


# -- paging and format -------------------------------------------------------------------------------


def per_page(q: Query) -> int:
    value = q.integer("per_page", maximum=MAX_PER_PAGE)
    return DEFAULT_PER_PAGE if value is None else value


def cursor(q: Query) -> int:
    raw = q.params.get("cursor")
    return decode_cursor(raw) if raw else 0


def export_format(q: Query) -> str:
    return q.choice("format", ("json", "ndjson", "csv")) or "json"


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"after": last_id})).decode("ascii").rstrip("=")


def decode_cursor(raw: str) -> int:
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        after = doc["after"]
        if isinstance(after, int) and not isinstance(after, bool) and 0 <= after <= MAX_ID:
            return after
    except (binascii.Error, ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        pass
    raise ApiError(422, "invalid_parameter", "cursor is not one this API returned", "cursor")


# -- the lists -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListSpec:
    name: str  # SQL block and path
    filters: Callable[[Query], dict[str, Any]]


def _customer_filters(q: Query) -> dict[str, Any]:
    start, end = q.date_range()
    return {"date_from": start, "date_to": end, "has_orders": q.boolean("has_orders")}


def _order_filters(q: Query) -> dict[str, Any]:
    start, end = q.date_range()
    return {
        "customer_id": q.integer("customer_id"),
        "seller_id": q.integer("seller_id"),
        "status": q.choice("status", ORDER_STATUSES),
        "payment_status": q.choice("payment_status", PAYMENT_STATUSES),
        "date_from": start,
        "date_to": end,
    }


def _like(text: str | None) -> str | None:
    if text is None:
        return None
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _product_filters(q: Query) -> dict[str, Any]:
    return {
        "seller_id": q.integer("seller_id"),
        "category": q.text("category", max_length=100),
        "status": q.choice("status", PRODUCT_STATUSES),
        "in_stock": q.boolean("in_stock"),
        "search": _like(q.text("search")),
    }


def _review_filters(q: Query) -> dict[str, Any]:
    start, end = q.date_range()
    return {
        "product_id": q.integer("product_id"),
        "user_id": q.integer("user_id"),
        "rating": q.integer("rating", minimum=1, maximum=5),
        "status": q.choice("status", REVIEW_STATUSES),
        "date_from": start,
        "date_to": end,
    }


LISTS = {
    "customers": ListSpec("customers", _customer_filters),
    "orders": ListSpec("orders", _order_filters),
    "products": ListSpec("products", _product_filters),
    "reviews": ListSpec("reviews", _review_filters),
}
