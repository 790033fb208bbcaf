"""Exports: customers, orders, products, reviews and analytics, read straight from the
marketplace database.

Every read runs on a psycopg 3 async pool whose sessions are read-only
(``default_transaction_read_only``) with a statement timeout; the SQL lives in
``api/sql/exports.sql`` (or the folder of ``api.sql_dir``).  Lists page by keyset: the
opaque ``cursor`` carries the last id, so paging to the end while rows are inserted
never skips or repeats one.  ``format=ndjson`` or ``csv`` streams a whole export page by
page in constant memory, in one snapshot.  Columns the mapping excludes never appear, at
any depth.  Every list answer says where it hands over to ``/events`` (``resume_event_id``,
the ``CT1-Resume-Event-Id`` header of a stream; :mod:`api.handover`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from aiohttp import web
from psycopg.rows import dict_row

from api.cache import ExportCache
from api.errors import ApiError
from api.filters import LISTS, ListSpec, encode_cursor
from api.handover import Handover
from api.models import AnalyticsQuery, CustomerQuery, Detail, PageCursor, ProductQuery
from api.params import parse
from common import sqlfile
from common.errors import ConfigError
from common.formats import normalize
from common.jsontext import dumps as json_bytes
from config.settings import Settings
from outbox import store

STREAM_PAGE = 1000  # rows per query while streaming a whole export
RESUME_HEADER = "CT1-Resume-Event-Id"  # a stream's resume_event_id (absent: none)

LOW_STOCK = 5  # at or below: "low_stock"
STATUS_HISTORY = 100  # the most recent status changes an order answer carries
CENT = Decimal("0.01")


# -- values -------------------------------------------------------------------------------------


def clean(value: Any, excluded: frozenset[str]) -> Any:
    """JSON-ready values (numeric as exact text, times as ISO 8601 UTC, as in events)
    without any excluded column, at any depth."""
    if isinstance(value, dict):
        return {k: clean(v, excluded) for k, v in value.items() if k not in excluded}
    if isinstance(value, list):
        return [clean(v, excluded) for v in value]
    return normalize(value)


# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json_bytes(value).decode()
    if isinstance(value, str):
        return _spreadsheet_safe(value)
    return value


def _spreadsheet_safe(text: str) -> str:
    """Text a spreadsheet would run as a formula, with a leading ``'`` so it shows as
    text; a number (numeric values are exact text here: ``-5.00``) stays as it is."""
    if text.startswith(FORMULA_START) and not NUMBER.fullmatch(text):
        return "'" + text
    return text


BLOCKS = (
    *LISTS,
    "customer",
    "customer_addresses",
    "customer_statistics",
    "customer_orders",
    "order",
    "order_items",
    "order_parties",
    "product",
    "product_ratings",
    "product_performance",
    "analytics_period",
    "analytics_top_products",
    "analytics_ratings",
)


def load_sql(sql_dir: str | None) -> dict[str, str]:
    """The export queries: ``exports.sql`` of ``api.sql_dir``, or the built-in one (a
    resource of this package); a missing file or block is a configuration error at start."""
    if not sql_dir:
        blocks, where = sqlfile.load("api", "exports.sql"), "the built-in exports.sql"
    else:
        path = Path(sql_dir) / "exports.sql"
        where = f"api.sql_dir: {path}"
        try:
            blocks = sqlfile.parse_blocks(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"api.sql_dir: cannot read {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    missing = [b for b in BLOCKS if b not in blocks]
    if missing:
        raise ConfigError(f"{where} lacks the SQL block {missing[0]!r} (-- name: {missing[0]})")
    return blocks


# The tables each cached export reads (the built-in SQL).  With a replaced SQL folder any
# captured change drops every cached answer ("*").
CACHED_TABLES = {
    "customers": frozenset({"public.users", "public.orders", "public.addresses"}),
    "products": frozenset(
        {"public.products", "public.shops", "public.categories", "public.reviews", "public.users"}
    ),
    # one product: also its views and the orders holding it (its performance)
    "product": frozenset(
        {
            "public.products",
            "public.shops",
            "public.categories",
            "public.reviews",
            "public.users",
            "public.product_views",
            "public.orders",
            "public.order_items",
        }
    ),
    "analytics": frozenset(
        {
            "public.orders",
            "public.order_items",
            "public.users",
            "public.product_views",
            "public.reviews",
            "public.products",
        }
    ),
}


Offload = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]
Conn = psycopg.AsyncConnection[Any]
T = TypeVar("T")


class Exports:
    """The export handlers; one pool on the marketplace database.  Outbox reads (an
    order's status history) go through ``offload``, which runs them on the API's read
    thread, never on the event loop (set by :func:`api.app.create_app`)."""

    def __init__(
        self, settings: Settings, excluded: frozenset[str], cache: ExportCache | None = None
    ) -> None:
        cfg = settings.api
        self.excluded = excluded
        self.cache = cache
        self.offload: Offload | None = None
        self.ttls = {
            "customers": cfg.cache_ttl_customers,
            "products": cfg.cache_ttl_products,
            "product": cfg.cache_ttl_products,
            "analytics": cfg.cache_ttl_analytics,
        }
        self.any_table = bool(cfg.sql_dir)
        self.sql = load_sql(cfg.sql_dir)
        self.pool_timeout = cfg.pool_timeout_seconds
        self.handover = Handover(settings.source.slot, cfg.resume_wait_seconds)
        options = (
            f"-c default_transaction_read_only=on -c statement_timeout={cfg.statement_timeout_ms}"
            " -c TimeZone=UTC"
        )
        self.pool = psycopg_pool.AsyncConnectionPool(
            cfg.export_dsn or settings.source.dsn,
            min_size=0,
            max_size=cfg.pool_size,
            kwargs={"options": options, "application_name": "ct1-cdc-api"},
            configure=self._configure,
            open=False,
            name="ct1-cdc-exports",
        )

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_read_only(True)  # and the session default: nothing here can write

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    # -- reading ----------------------------------------------------------------------------------

    async def _rows(
        self, conn: psycopg.AsyncConnection[Any], block: str, params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self.sql[block], params)
            rows = await cur.fetchall()
        return [clean(r, self.excluded) for r in rows]

    async def read(self, reads: Callable[[Conn], Any]) -> Any:
        """Run ``reads`` in one read-only transaction; source trouble becomes a clear 503."""
        async with self._transaction() as conn:
            return await reads(conn)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Conn]:
        """A pool connection in a read-only transaction; source trouble becomes a clear 503."""
        try:
            async with self.pool.connection(timeout=self.pool_timeout) as conn, conn.transaction():
                yield conn
        except psycopg.errors.QueryCanceled:
            raise ApiError(
                503,
                "export_timeout",
                "the export query ran past api.statement_timeout_ms; narrow the filters",
            ) from None
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            raise ApiError(
                503, "source_unavailable", f"the marketplace database is unavailable: {exc}"
            ) from None
        except psycopg.Error as exc:  # e.g. a replaced exports.sql that tries to write
            message = exc.diag.message_primary or str(exc)
            raise ApiError(503, "export_failed", f"the export query failed: {message}") from None

    async def read_handing_over(self, reads: Callable[[Conn, int | None], Awaitable[T]]) -> T:
        """``reads(conn, resume)`` in one repeatable-read, read-only transaction, given the
        id of the last event its snapshot holds (None: capture did not pass it in time)."""
        return await self.handover.read(self._transaction, self._outbox(), reads)

    def _outbox(self) -> Offload:
        if self.offload is None:
            raise RuntimeError("Exports.offload is not set: create_app wires it")
        return self.offload

    # -- caching ------------------------------------------------------------------------------------

    async def cached(
        self, request: web.Request, group: str, answer: Callable[[], Awaitable[web.Response]]
    ) -> web.Response:
        """``answer()``, or the same bytes from the cache while no captured change to the
        tables of ``group`` has reached the outbox (and the TTL runs)."""
        ttl = self.ttls.get(group, 0)
        if self.cache is None or ttl <= 0:
            return await answer()
        key = request.path_qs
        body = self.cache.get(key)
        if body is not None:
            return _json_bytes(body, "hit")
        response = await answer()
        assert isinstance(response.body, bytes)
        if response.headers.get("Cache-Control") != "no-store":
            tables = frozenset({"*"}) if self.any_table else CACHED_TABLES[group]
            self.cache.put(key, tables, ttl, response.body)
        response.headers["X-Cache"] = "miss"
        return response

    # -- lists --------------------------------------------------------------------------------------

    async def listing(self, request: web.Request, spec: ListSpec) -> web.StreamResponse:
        q = parse(spec.model, request)
        filters, fmt, cursor, size = q.filters(), q.format, q.cursor, q.per_page
        if fmt != "json":
            return await self._stream(request, spec, filters, q.after, fmt)
        # A cached page keeps the resume_event_id of its snapshot, and that stays right: rows
        # as of a snapshot plus every event after it is the present, whenever it is served
        # (the cache only keeps it fresh).  A page without one is not cached: it says "retry".
        return await self.cached(request, spec.name, lambda: self._page(spec, filters, cursor, size))

    async def _page(
        self, spec: ListSpec, filters: dict[str, Any], cursor: PageCursor | None, per_page: int
    ) -> web.Response:
        """One page, in its own snapshot.  ``resume_event_id`` is the first page's position
        (carried in the cursor), where a client tails ``/events`` from; ``page_event_id``
        this page's own: a tail event of one of its rows at or before it is already in it."""
        params = {**filters, "after": cursor.after if cursor else 0, "limit": per_page + 1}

        async def reads(conn: Conn, position: int | None) -> tuple[list[dict[str, Any]], int | None]:
            return await self._rows(conn, spec.name, params), position

        rows, position = await self.read_handing_over(reads)
        resume = position if cursor is None else cursor.resume
        more = len(rows) > per_page
        rows = rows[:per_page]
        meta = {
            "per_page": per_page,
            "count": len(rows),
            "next_cursor": encode_cursor(rows[-1]["id"], resume) if more else None,
            "resume_event_id": resume,
            "page_event_id": position,
        }
        response = _json_response({"success": True, "data": rows, "meta": meta})
        if resume is None or position is None:
            response.headers["Cache-Control"] = "no-store"
        return response

    async def _stream(
        self, request: web.Request, spec: ListSpec, filters: dict[str, Any], after: int, fmt: str
    ) -> web.StreamResponse:
        """The whole export in one snapshot, whose position goes in a header, before the
        first byte; pages of :data:`STREAM_PAGE` rows, each query within the timeout."""

        async def reads(conn: Conn, resume: int | None) -> web.StreamResponse:
            pages = self._pages(conn, spec, filters, after)
            first = await anext(pages, None)  # errors before the first byte are still JSON errors
            headers = {
                "Content-Type": "application/x-ndjson" if fmt == "ndjson" else "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="{spec.name}.{fmt}"',
            }
            if resume is not None:
                headers[RESUME_HEADER] = str(resume)
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            header: list[str] | None = None
            page = first
            while page:
                if fmt == "ndjson":
                    await response.write(b"".join(json_bytes(r) + b"\n" for r in page))
                else:
                    buf = io.StringIO()
                    out = csv.writer(buf)  # RFC 4180: CRLF, and a field holding CR or LF is quoted
                    if header is None:
                        header = list(page[0])
                        out.writerow(header)
                    for row in page:
                        out.writerow([_csv_cell(row.get(c)) for c in header])
                    await response.write(buf.getvalue().encode("utf-8"))
                page = await anext(pages, None)
            await response.write_eof()
            return response

        return await self.read_handing_over(reads)

    async def _pages(
        self, conn: Conn, spec: ListSpec, filters: dict[str, Any], after: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of rows, keyset by keyset, all in the transaction of ``conn``."""
        while True:
            params = {**filters, "after": after, "limit": STREAM_PAGE}
            rows = await self._rows(conn, spec.name, params)
            if not rows:
                return
            yield rows
            if len(rows) < STREAM_PAGE:
                return
            after = rows[-1]["id"]

    # -- detail views -------------------------------------------------------------------------------

    async def customer(self, request: web.Request) -> web.Response:
        """The customer with addresses; the statistics and the order history (the
        ``per_page`` most recent orders) cover the orders created in the period."""
        q = parse(CustomerQuery, request)
        ident = {"id": q.id}
        period = {**ident, "date_from": q.date_from, "date_to": q.date_to}
        history = {**period, "limit": q.per_page}

        async def reads(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
            rows = await self._rows(conn, "customer", ident)
            if not rows:
                return None
            customer = rows[0]
            customer["addresses"] = await self._rows(conn, "customer_addresses", ident)
            customer["period"] = {"date_from": normalize(q.date_from), "date_to": normalize(q.date_to)}
            (customer["statistics"],) = await self._rows(conn, "customer_statistics", period)
            customer["order_history"] = await self._rows(conn, "customer_orders", history)
            return customer

        return await self.cached(request, "customers", lambda: self._detail(reads, "customer"))

    async def order(self, request: web.Request) -> web.Response:
        ident = {"id": parse(Detail, request).id}

        async def reads(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
            rows = await self._rows(conn, "order", ident)
            if not rows:
                return None
            order = rows[0]
            order["items"] = await self._rows(conn, "order_items", ident)
            parties = (await self._rows(conn, "order_parties", ident) or [{}])[0]
            order["customer"] = _prefixed(parties, "customer_")
            order["seller"] = _prefixed(parties, "seller_")
            order["shop"] = _prefixed(parties, "shop_")
            order["payment"] = {
                "status": order.get("payment_status"),
                "method": order.get("payment_method"),
                "currency": order.get("currency"),
                "subtotal": order.get("subtotal"),
                "shipping_total": order.get("shipping_total"),
                "tax_total": order.get("tax_total"),
                "discount_total": order.get("discount_total"),
                "total": order.get("total"),
            }
            order["shipping"] = {
                "address": order.get("shipping_address"),
                "carrier": order.get("shipping_carrier"),
                "tracking_number": order.get("tracking_number"),
            }
            return order

        order = await self.read(reads)
        if order is not None:
            order["status_history"] = await self._status_history(ident["id"])
        return self._found(order, "order")

    async def _status_history(self, order_id: int) -> list[dict[str, Any]]:
        """The order's captured status changes, from the outbox (off the event loop)."""
        history: list[dict[str, Any]] = await self._outbox()(
            functools.partial(store.status_history, order_key=str(order_id), limit=STATUS_HISTORY)
        )
        return history

    async def product(self, request: web.Request) -> web.Response:
        """The product with shop, category, ratings and stock; its performance (views,
        orders, units, revenue, conversion) over the period, by default the last 30 days."""
        q = parse(ProductQuery, request)
        ident = {"id": q.id}
        _, start, end = q.period(datetime.now(UTC).date())
        period = {**ident, "start": start, "end": end}

        async def reads(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
            rows = await self._rows(conn, "product", ident)
            if not rows:
                return None
            p = rows[0]
            (performance,) = await self._rows(conn, "product_performance", period)
            ratings = {
                int(r["rating"]): int(r["reviews"]) for r in await self._rows(conn, "product_ratings", ident)
            }
            count = sum(ratings.values())
            stock = int(p.get("stock") or 0)
            shop = {
                "id": p.pop("shop_id", None),
                "name": p.pop("shop_name", None),
                "slug": p.pop("shop_slug", None),
                "seller": {"id": p.pop("seller_id", None), "name": p.pop("seller_name", None)},
            }
            category_id = p.pop("category_id", None)
            category = {
                "id": category_id,
                "name": p.pop("category_name", None),
                "slug": p.pop("category_slug", None),
            }
            return {
                **p,
                "shop": shop,
                "category": category if category_id is not None else None,
                "rating": {
                    "average": f"{sum(k * v for k, v in ratings.items()) / count:.2f}" if count else None,
                    "count": count,
                    "distribution": {str(k): ratings.get(k, 0) for k in range(1, 6)},
                },
                "performance": _performance(performance, period),
                "stock_status": "out_of_stock"
                if stock <= 0
                else "low_stock"
                if stock <= LOW_STOCK
                else "in_stock",
                "seo": {
                    "slug": p.get("slug"),
                    "meta_title": p.get("meta_title"),
                    "meta_description": p.get("meta_description"),
                    "meta_keywords": p.get("meta_keywords"),
                },
            }

        return await self.cached(request, "product", lambda: self._detail(reads, "product"))

    # -- analytics ----------------------------------------------------------------------------------

    async def analytics(self, request: web.Request) -> web.Response:
        before_start, start, end = parse(AnalyticsQuery, request).period(datetime.now(UTC).date())

        async def answer() -> web.Response:
            return self._found(await self.analytics_figures(start, end, before_start), "analytics")

        return await self.cached(request, "analytics", answer)

    async def analytics_figures(self, start: Any, end: Any, before_start: Any) -> dict[str, Any]:
        """The figures of ``GET /analytics`` for the period [start, end), compared with
        [before_start, start): also what a ``marketplace.analytics`` event carries."""
        previous = {"start": before_start, "end": start}
        period = {"start": start, "end": end}

        async def reads(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
            (now,) = await self._rows(conn, "analytics_period", period)
            (before,) = await self._rows(conn, "analytics_period", previous)
            top = await self._rows(conn, "analytics_top_products", period)
            ratings = {
                int(r["rating"]): int(r["reviews"])
                for r in await self._rows(conn, "analytics_ratings", period)
            }
            return {
                "period": {"date_from": normalize(start), "date_to": normalize(end)},
                **_figures(now),
                "top_products": top,
                "rating_distribution": {str(k): ratings.get(k, 0) for k in range(1, 6)},
                "previous_period": {
                    "date_from": normalize(previous["start"]),
                    "date_to": normalize(previous["end"]),
                    **_figures(before),
                },
                "growth": _growth(_figures(now), _figures(before)),
            }

        figures: dict[str, Any] = clean(await self.read(reads), self.excluded)
        return figures

    async def _detail(self, reads: Callable[[psycopg.AsyncConnection[Any]], Any], what: str) -> web.Response:
        return self._found(await self.read(reads), what)

    def _found(self, data: dict[str, Any] | None, what: str) -> web.Response:
        """A detail answer; cleaned once more as a whole, since it is composed here."""
        if data is None:
            raise ApiError(404, "not_found", f"no such {what}")
        return _json_response({"success": True, "data": clean(data, self.excluded), "meta": {}})


def _performance(row: dict[str, Any], period: dict[str, Any]) -> dict[str, Any]:
    """A product's figures over a period; conversion is orders per view, as /analytics."""
    views, orders = int(row["views"]), int(row["orders"])
    return {
        "period": {"date_from": normalize(period["start"]), "date_to": normalize(period["end"])},
        "views": views,
        "orders": orders,
        "units_sold": int(row["units_sold"]),
        "revenue": str(Decimal(row["revenue"]).quantize(CENT)),
        "conversion_rate": round(orders / views, 4) if views else None,
    }


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    orders = int(row["orders"])
    gmv = Decimal(row["gmv"])
    views = int(row["product_views"])
    return {
        "gmv": str(gmv.quantize(CENT)),
        "orders": orders,
        "average_order_value": str((gmv / orders).quantize(CENT)) if orders else "0.00",
        "new_customers": int(row["new_customers"]),
        "returning_customers": int(row["returning_customers"]),
        "product_views": views,
        "conversion_rate": round(orders / views, 4) if views else None,
    }


def _growth(now: dict[str, Any], before: dict[str, Any]) -> dict[str, float | None]:
    """Change against the previous period in percent (None when it had nothing)."""
    out: dict[str, float | None] = {}
    for key in ("gmv", "orders", "average_order_value", "new_customers"):
        old, new = float(before[key]), float(now[key])
        out[key] = round((new - old) / old * 100, 2) if old else None
    return out


def _prefixed(row: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    picked = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
    return picked if picked.get("id") is not None else None


def _json_response(body: Any) -> web.Response:
    return web.Response(body=json_bytes(body), content_type="application/json")


def _json_bytes(body: bytes, cache: str) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers={"X-Cache": cache})
