"""The export lists: each one's SQL block (and path) and the model of its parameters,
from which its filters' SQL parameters, its paging and its format come."""

from __future__ import annotations

from dataclasses import dataclass

from api.models import (
    DEFAULT_PER_PAGE,
    MAX_PER_PAGE,
    CustomersQuery,
    ListQuery,
    OrdersQuery,
    ProductsQuery,
    ReviewsQuery,
    decode_cursor,
    encode_cursor,
)

__all__ = ["DEFAULT_PER_PAGE", "LISTS", "MAX_PER_PAGE", "ListSpec", "decode_cursor", "encode_cursor"]


@dataclass(frozen=True)
class ListSpec:
    name: str  # SQL block and path
    model: type[ListQuery]


LISTS = {
    "customers": ListSpec("customers", CustomersQuery),
    "orders": ListSpec("orders", OrdersQuery),
    "products": ListSpec("products", ProductsQuery),
    "reviews": ListSpec("reviews", ReviewsQuery),
}
