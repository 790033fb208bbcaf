"""The parameters of every endpoint, declared once: :func:`api.params.parse` validates a
request into these models and :mod:`api.openapi` documents them from the same fields.
Names are the public ones documented in docs/api.md: clients depend on them."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal, NamedTuple, get_args

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from api.errors import ApiError
from api.params import (
    EARLIEST,
    HEADER,
    MAX_ID,
    NO_NUL,
    PATH,
    Boolean,
    End,
    Id,
    Integer,
    Number,
    Start,
    Text,
    date_range,
    refuse,
)
from common.formats import EVENT_TYPE

MAX_LIMIT = 1000
MAX_WAIT_SECONDS = 30.0
MAX_PER_PAGE = 500
DEFAULT_PER_PAGE = 50

OrderStatus = Literal["pending", "processing", "shipped", "delivered", "cancelled", "refunded"]
PaymentStatus = Literal["pending", "paid", "failed", "refunded"]
ProductStatus = Literal["draft", "active", "inactive", "archived"]
ReviewStatus = Literal["pending", "approved", "rejected"]
ORDER_STATUSES: tuple[str, ...] = get_args(OrderStatus)
PAYMENT_STATUSES: tuple[str, ...] = get_args(PaymentStatus)
PRODUCT_STATUSES: tuple[str, ...] = get_args(ProductStatus)
REVIEW_STATUSES: tuple[str, ...] = get_args(ReviewStatus)

MAX_TYPES = 50  # patterns in one event_types, read by index each (outbox.store.read_events)
# One value of event_types: types or globs (order.*), comma-separated, spaces around them.
_TYPE = r"[A-Za-z0-9._*?\[\]-]{1,100}"
EVENT_TYPES = rf"^ *(?:{_TYPE})? *(?:, *(?:{_TYPE})? *)*$"


class Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


# -- the events cursor -----------------------------------------------------------------------------


def _split_types(values: list[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


TypeList = Annotated[
    list[Annotated[str, StringConstraints(pattern=EVENT_TYPES)]],
    Field(
        description=f"types or globs (order.*), at most {MAX_TYPES}: a comma list, or the parameter repeated",
        json_schema_extra={"explain": "must be event types or globs of letters, digits and . _ * ? [ ] -"},
    ),
]


class EventsFrom(Params):
    last_event_id: Annotated[int, Field(ge=0, le=MAX_ID), Integer] = Field(
        0, description="events after this id"
    )
    event_types: TypeList = []

    def types(self) -> list[str]:
        types = _split_types(self.event_types)
        if len(types) > MAX_TYPES:
            raise ApiError(422, "invalid_parameter", f"at most {MAX_TYPES} event types", "event_types")
        return types


class EventsQuery(EventsFrom):
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT), Integer] = Field(100, description="events per page")
    wait: Annotated[float, Field(ge=0, le=MAX_WAIT_SECONDS), Number] = Field(
        0.0, description="seconds to wait for a match (long poll)"
    )


class StreamQuery(EventsFrom):
    resume_after: Annotated[int | None, Field(ge=0, le=MAX_ID), Integer, HEADER] = Field(
        None,
        alias="Last-Event-ID",
        description="resume after this id (sent by reconnecting clients; wins over last_event_id)",
        json_schema_extra={"explain": "must be an event id"},
    )

    @property
    def after(self) -> int:
        return self.last_event_id if self.resume_after is None else self.resume_after


class SchemaPath(Params):
    """``/events/schemas/{type}``: a type of the event catalogue, ``manual`` or ``envelope``."""

    type: Annotated[str, PATH] = Field(
        description="an event type of GET /events/schemas, or manual, or envelope",
        json_schema_extra={"example": "order.created"},
    )


# -- exports ---------------------------------------------------------------------------------------


class PageCursor(NamedTuple):
    """What ``cursor`` carries: the last id of the previous page, and the first page's
    ``resume_event_id``, so every page of one paging run gives the same one."""

    after: int
    resume: int | None  # None: the first page had none, or the cursor predates it


def encode_cursor(last_id: int, resume: int | None = None) -> str:
    doc = {"after": last_id, "resume": resume}
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode("ascii").rstrip("=")


def read_cursor(raw: Any) -> PageCursor:
    """A cursor this API returned (one without ``resume``, from before it carried one,
    reads as resume None); anything else is refused."""
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        after, resume = doc["after"], doc.get("resume")
        if _event_id(after) and (resume is None or _event_id(resume)):
            return PageCursor(after, resume)
    except (binascii.Error, ValueError, TypeError, KeyError, AttributeError, orjson.JSONDecodeError):
        pass
    raise refuse("is not one this API returned")


def decode_cursor(raw: Any) -> int:
    """The last id of the previous page."""
    return read_cursor(raw).after


def _event_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


Cursor = Annotated[PageCursor, PlainValidator(read_cursor), WithJsonSchema({"type": "string"})]
PAGING = frozenset({"per_page", "cursor", "format"})


class Dated(Params):
    """``date_from`` and ``date_to`` (a day is included whole: ``date_to`` is the exclusive end)."""

    date_from: Start | None = Field(None, description="from this day (YYYY-MM-DD) or time (ISO 8601)")
    date_to: End | None = Field(None, description="up to and including this day, or up to this time")

    @model_validator(mode="after")
    def _ordered(self) -> Dated:
        date_range(self.date_from, self.date_to)
        return self


class ListQuery(Params):
    """Paging and format, common to every export list."""

    per_page: Annotated[int, Field(ge=1, le=MAX_PER_PAGE), Integer] = Field(
        DEFAULT_PER_PAGE, description="rows per page"
    )
    cursor: Cursor | None = Field(None, description="meta.next_cursor of the previous page")
    format: Literal["json", "ndjson", "csv"] = Field(
        "json", description="ndjson and csv stream the whole export"
    )

    def filters(self) -> dict[str, Any]:
        """The SQL parameters of the filters."""
        return self.model_dump(exclude=set(PAGING))

    @property
    def after(self) -> int:
        """The last id of the previous page (0: from the start)."""
        return self.cursor.after if self.cursor is not None else 0


class CustomersQuery(ListQuery, Dated):
    has_orders: Boolean | None = Field(None, description="with or without orders")


class OrdersQuery(ListQuery, Dated):
    customer_id: Id | None = Field(None, description="orders of this customer")
    status: OrderStatus | None = Field(None, description="order status")
    payment_status: PaymentStatus | None = Field(None, description="payment status")
    seller_id: Id | None = Field(None, description="orders of this seller")


class ProductsQuery(ListQuery):
    seller_id: Id | None = Field(None, description="products of this seller")
    category: Annotated[str | None, Field(max_length=100, pattern=NO_NUL), Text] = Field(
        None, description="category slug or id"
    )
    status: ProductStatus | None = Field(None, description="product status")
    in_stock: Boolean | None = Field(None, description="stock above zero")
    search: Annotated[str | None, Field(max_length=200, pattern=NO_NUL), Text] = Field(
        None, description="in name, SKU and description"
    )

    def filters(self) -> dict[str, Any]:
        return {**super().filters(), "search": _like(self.search)}


class ReviewsQuery(ListQuery, Dated):
    product_id: Id | None = Field(None, description="reviews of this product")
    user_id: Id | None = Field(None, description="reviews by this customer")
    rating: Annotated[int | None, Field(ge=1, le=5), Integer] = Field(None, description="stars")
    status: ReviewStatus | None = Field(None, description="moderation status")


def _like(text: str | None) -> str | None:
    if text is None:
        return None
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Detail(Params):
    id: Annotated[Id, PATH] = Field(description="id")


class CustomerQuery(Dated, Detail):
    """``/customers/{id}``: the customer's statistics and order history within
    ``date_from``/``date_to``."""

    per_page: Annotated[int, Field(ge=1, le=MAX_PER_PAGE), Integer] = Field(
        DEFAULT_PER_PAGE, description="orders in the order history (the most recent)"
    )


class AnalyticsQuery(Dated):
    """``/analytics``: the period (default: the last 30 days up to today)."""

    def period(self, today: date) -> tuple[datetime, datetime, datetime]:
        """(start of the previous period, start, exclusive end): the period asked for, or
        its defaults (ending with ``today``, 30 days long), and the previous period of the
        same length before it, which stops at the earliest time there is."""
        end = self.date_to
        if end is None:
            end = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)
            if self.date_from is not None and self.date_from >= end:
                raise ApiError(
                    422,
                    "invalid_parameter",
                    "date_from must not be after date_to (the end of today when date_to is not given)",
                    "date_from",
                )
        start = self.date_from if self.date_from is not None else _back(end, timedelta(days=30))
        if end - start > MAX_PERIOD:
            raise ApiError(422, "invalid_parameter", "the period may span at most ten years", "date_from")
        return _back(start, end - start), start, end


class ProductQuery(AnalyticsQuery, Detail):
    """``/products/{id}``: the product's performance over the period (default: the last 30
    days up to today)."""


MAX_PERIOD = timedelta(days=3660)


def _back(moment: datetime, span: timedelta) -> datetime:
    return EARLIEST if moment - EARLIEST < span else moment - span


# -- webhook management ----------------------------------------------------------------------------


class WebhookTest(Params):
    system: str = Field(
        description="the endpoint to test", json_schema_extra={"explain": "must name a configured endpoint"}
    )


class WebhookSend(Params):
    event: Annotated[str, StringConstraints(pattern=EVENT_TYPE, max_length=100)] = Field(
        description="the event type, like order.note_added",
        json_schema_extra={"explain": "must be a type like order.note_added"},
    )
    data: dict[str, Any] = Field(
        description="the event's data, delivered as given",
        json_schema_extra={"explain": "must be a JSON object"},
    )
    systems: Annotated[list[str] | None, Field(min_length=1)] = Field(
        None,
        description="endpoint names (default: every endpoint whose events match)",
        json_schema_extra={"explain": "must be a non-empty list of endpoint names"},
    )
