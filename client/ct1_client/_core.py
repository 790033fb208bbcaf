"""What the sync and async clients share, with no I/O: the calls of the API, the
encoding of filters, reading answers into typed values or errors, keyset paging, the
Server-Sent Events format, the handover from an export to ``/events``, and backoff.

Each client only sends the requests this module describes and feeds back the answers.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Generic, TypedDict, TypeVar

from pydantic import BaseModel

from ct1_client.errors import Ct1Error, RateLimited, Unavailable, error_for
from ct1_client.models import (
    Analytics,
    AnyEvent,
    CustomerDetail,
    CustomerRow,
    OrderDetail,
    OrderRow,
    ProductDetail,
    ProductRow,
    ReviewRow,
    parse_event,
)

BASE = "/api/core-transaction-1"
MAX_PER_PAGE = 500
MAX_WAIT = 30.0
RESUME_HEADER = "ct1-resume-event-id"
SEED_PAGE_RETRIES = 20  # a page of a seed is tried this often (backoff up to 30 s) before it starts over

T = TypeVar("T", bound=BaseModel)

DateLike = date | datetime | str


# -- filters: the design's, per export --------------------------------------------------------


class CustomerFilters(TypedDict, total=False):
    date_from: DateLike
    date_to: DateLike
    has_orders: bool


class OrderFilters(TypedDict, total=False):
    customer_id: int
    status: str
    payment_status: str
    date_from: DateLike
    date_to: DateLike
    seller_id: int


class ProductFilters(TypedDict, total=False):
    seller_id: int
    category: str | int
    status: str
    in_stock: bool
    search: str


class ReviewFilters(TypedDict, total=False):
    product_id: int
    user_id: int
    rating: int
    status: str
    date_from: DateLike
    date_to: DateLike


@dataclass(frozen=True)
class ExportKind(Generic[T]):
    """A list export: its path, row model, filters, the ``data.object`` of the events
    that change its rows, and the event types a consumer seeded from it follows."""

    name: str
    path: str
    row: type[T]
    filters: frozenset[str]
    object: str | None
    event_types: tuple[str, ...] | None


EXPORTS: dict[str, ExportKind[Any]] = {
    kind.name: kind
    for kind in (
        ExportKind(
            "customers",
            "/customers",
            CustomerRow,
            frozenset(CustomerFilters.__annotations__),
            "customer",
            ("customer.*",),
        ),
        ExportKind(
            "orders",
            "/orders",
            OrderRow,
            frozenset(OrderFilters.__annotations__),
            "order",
            ("order.*", "payment.status_changed"),
        ),
        ExportKind(
            "products", "/products", ProductRow, frozenset(ProductFilters.__annotations__), None, None
        ),
        ExportKind(
            "reviews",
            "/reviews",
            ReviewRow,
            frozenset(ReviewFilters.__annotations__),
            "review",
            ("review.*",),
        ),
    )
}

DETAILS: dict[str, tuple[str, type[BaseModel]]] = {
    "customer": ("/customers/{id}", CustomerDetail),
    "order": ("/orders/{id}", OrderDetail),
    "product": ("/products/{id}", ProductDetail),
    "analytics": ("/analytics", Analytics),
}


def export_kind(name: str) -> ExportKind[Any]:
    try:
        return EXPORTS[name]
    except KeyError:
        raise ValueError(f"no export {name!r}: one of {', '.join(EXPORTS)}") from None


def encode(value: Any) -> str:
    """A filter value as the API reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(encode(v) for v in value)
    if isinstance(value, (int, str, Decimal)):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    raise TypeError(f"cannot send {type(value).__name__} as a filter value")


def query(allowed: Iterable[str] | None = None, **params: Any) -> dict[str, str]:
    """The query string of these parameters (``None`` left out); a name outside
    ``allowed`` is a mistake of the caller, said at once rather than ignored."""
    if allowed is not None:
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise TypeError(f"unknown filter {', '.join(unknown)}: expected {', '.join(sorted(allowed))}")
    return {name: encode(value) for name, value in params.items() if value is not None}


def event_types(types: str | Iterable[str] | None) -> str | None:
    if types is None:
        return None
    if isinstance(types, str):
        return types
    return ",".join(types) or None


@dataclass(frozen=True)
class Call:
    """One GET of the API."""

    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None

    @property
    def url(self) -> str:
        return BASE + self.path


def unwrap(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The body of a success; the typed error of anything else."""
    if not 200 <= status < 300:
        raise error_for(status, body, headers)
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise Ct1Error(f"the answer is not JSON: {body[:100]!r}", status=status) from exc
    if not isinstance(parsed, dict) or parsed.get("success") is not True:
        raise error_for(500 if status < 400 else status, body, headers)
    return parsed


# -- keyset paging --------------------------------------------------------------------------------


class Pager(Generic[T]):
    """The pages of a list export, each from ``meta.next_cursor``; it also keeps where
    each page ends and its ``page_event_id`` for :class:`Overlap`."""

    def __init__(self, kind: ExportKind[T], params: Mapping[str, str], per_page: int) -> None:
        if not 1 <= per_page <= MAX_PER_PAGE:
            raise ValueError(f"per_page must be between 1 and {MAX_PER_PAGE}")
        self.kind = kind
        self.params = {**params, "per_page": str(per_page)}
        self.cursor: str | None = None
        self.done = False
        self.pages = 0
        self.resume_event_id: int | None = None
        self.ends: list[int] = []  # the last key of each page
        self.positions: list[int | None] = []  # each page's page_event_id

    def call(self) -> Call | None:
        if self.done:
            return None
        params = dict(self.params)
        if self.cursor is not None:
            params["cursor"] = self.cursor
        return Call(self.kind.path, params)

    def feed(self, body: Mapping[str, Any]) -> list[T]:
        meta = body.get("meta") or {}
        rows = [self.kind.row.model_validate(raw) for raw in body.get("data") or []]
        if self.pages == 0:
            self.resume_event_id = meta.get("resume_event_id")
        self.pages += 1
        last = getattr(rows[-1], "id", None) if rows else None
        if isinstance(last, int):
            self.ends.append(last)
            self.positions.append(meta.get("page_event_id"))
        self.cursor = meta.get("next_cursor")
        self.done = self.cursor is None
        return rows

    def overlap(self) -> Overlap:
        return Overlap(self.kind.object, self.resume_event_id, list(self.ends), list(self.positions))


@dataclass(frozen=True)
class Overlap:
    """The skip rule of a paged export's handover (docs/api.md, "Seed a new consumer"):
    an event of a row that came on a later page, with an id at or below that page's
    ``page_event_id``, is already in the row."""

    object: str | None
    resume_event_id: int | None
    ends: list[int]
    positions: list[int | None]

    def already_in(self, event: AnyEvent) -> bool:
        data = getattr(event, "data", None)
        key = getattr(data, "id", None)
        if self.object is None or getattr(data, "object", None) != self.object or not isinstance(key, int):
            return False
        page = bisect.bisect_left(self.ends, key)
        if page == len(self.ends):
            return False  # past the last row exported: a row inserted after
        position = self.positions[page]
        return position is not None and event.id is not None and int(event.id) <= position


class Default:
    """The default of an argument whose ``None`` means something."""


DEFAULT = Default()


def tail_types(kind: ExportKind[Any], types: str | Iterable[str] | Default | None) -> str | None:
    """The event types a consumer seeded from ``kind`` follows."""
    if isinstance(types, Default):
        return event_types(kind.event_types)
    return event_types(types)


def no_position(kind: ExportKind[Any]) -> Ct1Error:
    return Unavailable(
        f"the {kind.name} export gave no resume position: capture is stopped or far behind"
        " (api.resume_wait_seconds); seed again later"
    )


# -- events ---------------------------------------------------------------------------------------


def events_call(after: int, types: str | None, limit: int, wait: float) -> Call:
    if not 0 <= wait <= MAX_WAIT:
        raise ValueError(f"wait must be between 0 and {MAX_WAIT:g} seconds")
    params = query(last_event_id=after, event_types=types, limit=limit, wait=(wait or None))
    return Call("/events", params, timeout=wait + 15.0)


def events_page(body: Mapping[str, Any]) -> tuple[list[AnyEvent], int]:
    """The events of a ``/events`` answer and ``meta.last_event_id``: where to go on from."""
    events = [parse_event(raw) for raw in body.get("data") or []]
    got_to = (body.get("meta") or {}).get("last_event_id")
    if not isinstance(got_to, int):
        raise Ct1Error("an /events answer without meta.last_event_id")
    return events, got_to


def stream_call(after: int, types: str | None) -> Call:
    # keep-alives come every 15 s: a read waiting longer than that is a dead connection
    return Call(
        "/events/stream",
        query(last_event_id=after, event_types=types),
        {"Last-Event-ID": str(after), "Accept": "text/event-stream"},
        timeout=40.0,
    )


@dataclass(frozen=True)
class Message:
    """One Server-Sent Event."""

    id: str | None
    event: str
    data: str


class SseParser:
    """The ``text/event-stream`` format, fed bytes as they come."""

    def __init__(self) -> None:
        self._buffer = b""
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Message]:
        self._buffer += chunk
        messages: list[Message] = []
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data:
                    messages.append(Message(self._id, self._event or "message", "\n".join(self._data)))
                self._id, self._event, self._data = None, "", []
                continue
            if line.startswith(":"):
                continue  # a comment: the keep-alive
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value
        return messages


def stream_error(message: Message) -> Ct1Error:
    """``event: error`` ends a stream (the key was revoked or lost its permission)."""
    try:
        body = json.loads(message.data)
        status = {"unauthorized": 401, "forbidden": 403}.get(body.get("error", {}).get("code"), 401)
    except (ValueError, AttributeError):
        status = 401
    return error_for(status, message.data.encode(), {})


# -- the user's handler --------------------------------------------------------------------------


class HandlerFailed(Exception):
    """The user's handler raised (its exception is the cause): a consumer stops with that
    exception as it was, never retries it as if the API had failed."""


@contextlib.contextmanager
def reraise_handler_errors() -> Iterator[None]:
    try:
        yield
    except HandlerFailed as failed:
        assert failed.__cause__ is not None
        raise failed.__cause__ from None


# -- backoff --------------------------------------------------------------------------------------


class Backoff:
    """Exponential delays with full jitter between ``first`` and ``most`` seconds; a 429's
    ``Retry-After`` is waited for as asked (up to ``most_retry_after``)."""

    def __init__(self, first: float = 0.5, most: float = 30.0, most_retry_after: float = 300.0) -> None:
        self.first, self.most, self.most_retry_after = first, most, most_retry_after
        self.failures = 0

    def delay(self, error: Exception) -> float:
        self.failures += 1
        if isinstance(error, RateLimited):
            return min(error.retry_after, self.most_retry_after)
        ceiling = min(self.most, self.first * 2 ** (self.failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
