"""Typed views of what ct1-cdc sends: the event envelope, each event type's ``data`` (the
event catalogue, ``GET /events/schemas``) and every export's rows.

Values keep the sidecar's promises: money and other numeric values are
:class:`~decimal.Decimal` parsed from their exact text (never a binary float), times are
timezone-aware UTC :class:`~datetime.datetime`.

Models are lenient where the database is the user's: every column of a record is optional
(an update's ``previous`` holds only the columns that changed, and a mapping of one's own
schema carries other columns) and columns beyond the sample marketplace's are kept as
extra fields (``row.model_extra``). Unknown event types parse as :class:`Event` with a
:class:`Record` of whatever columns came.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    """Extra columns kept; values converted by pydantic's usual (lax) rules: a numeric
    text becomes a ``Decimal``, an ISO time a ``datetime``, and what cannot be converted
    (``"lots"`` as a total) raises ``ValidationError``."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class Record(Model):
    """A row of any table: its columns as extra fields."""


# -- records: the rows events carry (config/schemas, the sample marketplace's columns) ---------


class Customer(Record):
    id: int | None = None
    name: str | None = None
    email: str | None = None
    role: str | None = None
    phone: str | None = None
    status: str | None = None
    email_verified_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Order(Record):
    id: int | None = None
    order_number: str | None = None
    user_id: int | None = None
    seller_id: int | None = None
    shop_id: int | None = None
    status: str | None = None
    payment_status: str | None = None
    payment_method: str | None = None
    subtotal: Decimal | None = None
    shipping_total: Decimal | None = None
    tax_total: Decimal | None = None
    discount_total: Decimal | None = None
    total: Decimal | None = None
    currency: str | None = None
    tracking_number: str | None = None
    shipping_carrier: str | None = None
    shipping_address: dict[str, Any] | None = None
    notes: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class CartItem(Record):
    id: int | None = None
    cart_id: int | None = None
    product_id: int | None = None
    quantity: int | None = None
    price: Decimal | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ProductView(Record):
    id: int | None = None
    product_id: int | None = None
    user_id: int | None = None
    session_id: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    viewed_at: datetime | None = None


class Review(Record):
    id: int | None = None
    product_id: int | None = None
    user_id: int | None = None
    order_id: int | None = None
    rating: int | None = None
    title: str | None = None
    comment: str | None = None
    status: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class AbandonedItem(Model):
    product_id: int
    quantity: int
    price: Decimal


class Cart(Record):
    """``cart.abandoned``: the cart as capture last saw it."""

    cart_id: int
    customer_id: int | None = None
    session_id: str | None = None
    items: list[AbandonedItem] = []
    value: Decimal
    item_count: int
    last_activity_at: datetime
    idle_seconds: float
    abandon_after_seconds: float


class TopProduct(Model):
    product_id: int
    name: str | None = None
    quantity: int
    revenue: Decimal


class Period(Model):
    date_from: datetime | None = None
    date_to: datetime | None = None


class Figures(Model):
    gmv: Decimal
    orders: int
    average_order_value: Decimal
    new_customers: int
    returning_customers: int
    product_views: int
    conversion_rate: float | None = None


class PreviousFigures(Figures):
    date_from: datetime | None = None
    date_to: datetime | None = None


class Growth(Model):
    """Growth in percent against the previous period (``None`` when it had nothing)."""

    gmv: float | None = None
    orders: float | None = None
    average_order_value: float | None = None
    new_customers: float | None = None


class Analytics(Figures):
    """The figures of a period: ``GET /analytics`` and the ``marketplace.analytics`` event
    (which gives ``period_start``/``period_end``; the export gives ``period``)."""

    period: Period | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    top_products: list[TopProduct] = []
    rating_distribution: dict[str, int] = {}
    previous_period: PreviousFigures | None = None
    growth: Growth | None = None


class Gap(Model):
    """``ct1.gap``: history lost with a replication slot (see the record for what)."""


# -- the envelope --------------------------------------------------------------------------------

R = TypeVar("R", bound=BaseModel)


class Source(Model):
    table: str | None = None
    op: str
    lsn: str | None = None
    xid: int | None = None


class Data(Model, Generic[R]):
    object: str
    id: int | str | None = None
    record: R
    previous: R | None = None


class Event(Model, Generic[R]):
    """An event as ``/events``, ``/events/stream`` and a webhook body carry it."""

    id: int
    type: str
    timestamp: datetime
    data: Data[R]
    source: Source


class ManualEvent(Model):
    """An event sent through ``POST /webhooks/send``: ``data`` as its sender gave it."""

    id: int
    type: str
    timestamp: datetime
    data: dict[str, Any]
    source: Source


class WebhookTestData(Model):
    object: str
    system: str | None = None
    message: str | None = None


class WebhookTestEvent(Model):
    """``webhook.test``, sent by ``POST /webhooks/test`` (never through ``/events``)."""

    id: int | str | None = None
    type: str
    timestamp: datetime
    data: WebhookTestData


AnyEvent = Event[Any] | ManualEvent | WebhookTestEvent

# each type of the catalogue (and the backfill's snapshot types): the record its data carries
RECORDS: dict[str, type[Model]] = {
    "customer.created": Customer,
    "customer.updated": Customer,
    "customer.snapshot": Customer,
    "order.created": Order,
    "order.updated": Order,
    "order.status_changed": Order,
    "payment.status_changed": Order,
    "order.snapshot": Order,
    "product.viewed": ProductView,
    "product.added_to_cart": CartItem,
    "cart_item.snapshot": CartItem,
    "review.created": Review,
    "review.updated": Review,
    "review.snapshot": Review,
    "cart.abandoned": Cart,
    "marketplace.analytics": Analytics,
    "ct1.gap": Gap,
}
# a type of one's own mapping (order.cancelled, say) is typed by its data.object
OBJECTS: dict[str, type[Model]] = {
    "customer": Customer,
    "order": Order,
    "cart_item": CartItem,
    "product_view": ProductView,
    "review": Review,
    "cart": Cart,
    "analytics": Analytics,
}
_EVENT_MODELS: dict[type[Model], type[Event[Any]]] = {}
_records: list[type[Model]] = [*RECORDS.values(), Record]
for _record in _records:
    _EVENT_MODELS[_record] = Event[_record]  # type: ignore[valid-type]


def parse_event(raw: dict[str, Any]) -> AnyEvent:
    """The typed event of an envelope (``dict`` from ``/events`` or a webhook body): by its
    type for the catalogue's (``Event[Order]`` for ``order.status_changed``), else by its
    ``data.object`` (``Event[Order]`` for a mapping's own ``order.cancelled``);
    :class:`ManualEvent` for ``source.op = "manual"``; ``Event[Record]`` for anything else."""
    kind = raw.get("type")
    if kind == "webhook.test":
        return WebhookTestEvent.model_validate(raw)
    source = raw.get("source")
    if isinstance(source, dict) and source.get("op") == "manual":
        return ManualEvent.model_validate(raw)
    data = raw.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    record = (RECORDS.get(kind) if isinstance(kind, str) else None) or OBJECTS.get(str(obj)) or Record
    return _EVENT_MODELS[record].model_validate(raw)


# -- export rows ---------------------------------------------------------------------------------


class CustomerRow(Customer):
    """A row of ``GET /customers``."""

    orders_count: int | None = None


class Address(Record):
    id: int | None = None
    type: str | None = None
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None
    is_default: bool | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class CustomerStatistics(Model):
    orders_count: int
    total_spent: Decimal
    average_order_value: Decimal
    first_order_at: datetime | None = None
    last_order_at: datetime | None = None


class OrderSummary(Model):
    id: int
    order_number: str | None = None
    status: str | None = None
    payment_status: str | None = None
    total: Decimal | None = None
    currency: str | None = None
    created_at: datetime | None = None


class CustomerDetail(Customer):
    """``GET /customers/{id}``."""

    addresses: list[Address] = []
    period: Period | None = None
    statistics: CustomerStatistics | None = None
    order_history: list[OrderSummary] = []


class OrderRow(Order):
    """A row of ``GET /orders``."""

    items_count: int | None = None


class OrderItem(Record):
    id: int | None = None
    product_id: int | None = None
    product_name: str | None = None
    sku: str | None = None
    quantity: int | None = None
    price: Decimal | None = None
    total: Decimal | None = None


class Party(Model):
    id: int | None = None
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    slug: str | None = None


class Payment(Model):
    status: str | None = None
    method: str | None = None
    currency: str | None = None
    subtotal: Decimal | None = None
    shipping_total: Decimal | None = None
    tax_total: Decimal | None = None
    discount_total: Decimal | None = None
    total: Decimal | None = None


class Shipping(Model):
    address: dict[str, Any] | None = None
    carrier: str | None = None
    tracking_number: str | None = None


class StatusChange(Model):
    event_id: int
    changed_at: datetime
    status: str | None = None
    previous_status: str | None = None


class OrderDetail(Order):
    """``GET /orders/{id}``."""

    items: list[OrderItem] = []
    customer: Party | None = None
    seller: Party | None = None
    shop: Party | None = None
    payment: Payment | None = None
    shipping: Shipping | None = None
    status_history: list[StatusChange] = []


class Product(Record):
    id: int | None = None
    shop_id: int | None = None
    seller_id: int | None = None
    category_id: int | None = None
    name: str | None = None
    slug: str | None = None
    sku: str | None = None
    description: str | None = None
    price: Decimal | None = None
    compare_at_price: Decimal | None = None
    stock: int | None = None
    status: str | None = None
    meta_title: str | None = None
    meta_description: str | None = None
    meta_keywords: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ProductRow(Product):
    """A row of ``GET /products`` (``category`` is the category's slug)."""

    category: str | None = None


class Seller(Model):
    id: int | None = None
    name: str | None = None


class Shop(Model):
    id: int | None = None
    name: str | None = None
    slug: str | None = None
    seller: Seller | None = None


class Category(Model):
    id: int | None = None
    name: str | None = None
    slug: str | None = None


class Rating(Model):
    average: Decimal | None = None
    count: int = 0
    distribution: dict[str, int] = {}


class Seo(Model):
    slug: str | None = None
    meta_title: str | None = None
    meta_description: str | None = None
    meta_keywords: str | None = None


class Performance(Model):
    period: Period | None = None
    views: int
    orders: int
    units_sold: int
    revenue: Decimal
    conversion_rate: float | None = None


class ProductDetail(Product):
    """``GET /products/{id}``."""

    shop: Shop | None = None
    category: Category | None = None
    rating: Rating | None = None
    stock_status: str | None = None
    seo: Seo | None = None
    performance: Performance | None = None


class ReviewRow(Review):
    """A row of ``GET /reviews``: the review, its product and shop, its votes."""

    product_name: str | None = None
    product_slug: str | None = None
    shop_id: int | None = None
    shop_name: str | None = None
    shop_slug: str | None = None
    helpful_votes: int | None = None
    not_helpful_votes: int | None = None


class Page(Model):
    """``meta`` of a list page."""

    per_page: int | None = None
    count: int | None = None
    next_cursor: str | None = None
    resume_event_id: int | None = None
    page_event_id: int | None = None


__all__ = [
    "AbandonedItem",
    "Address",
    "Analytics",
    "AnyEvent",
    "Cart",
    "CartItem",
    "Category",
    "Customer",
    "CustomerDetail",
    "CustomerRow",
    "CustomerStatistics",
    "Data",
    "Event",
    "Gap",
    "ManualEvent",
    "Order",
    "OrderDetail",
    "OrderItem",
    "OrderRow",
    "OrderSummary",
    "Page",
    "Product",
    "ProductDetail",
    "ProductRow",
    "ProductView",
    "Record",
    "Review",
    "ReviewRow",
    "Source",
    "StatusChange",
    "WebhookTestEvent",
    "parse_event",
]
