"""The OpenAPI 3.0 document served at ``/openapi.json`` (pure: built from plain values).

It describes what the server does, parameter by parameter; a schemathesis test drives
the running API with it and checks every answer against it.
"""

from __future__ import annotations

from typing import Any

from api.filters import (
    MAX_PER_PAGE,
    ORDER_STATUSES,
    PAYMENT_STATUSES,
    PRODUCT_STATUSES,
    REVIEW_STATUSES,
)

BASE = "/api/core-transaction-1"
DATE = "^\\d{4}-\\d{2}-\\d{2}$"

Obj = dict[str, Any]


def _ref(name: str) -> Obj:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, schema: Obj, description: str, where: str = "query", required: bool = False) -> Obj:
    return {"name": name, "in": where, "required": required, "description": description, "schema": schema}


def _id(name: str, description: str) -> Obj:
    return _param(name, {"type": "integer", "minimum": 1, "maximum": 999_999_999_999}, description)


def _enum(name: str, values: tuple[str, ...], description: str) -> Obj:
    return _param(name, {"type": "string", "enum": list(values)}, description)


DATE_FROM = _param(
    "date_from", {"type": "string", "pattern": DATE}, "from this day (YYYY-MM-DD; ISO 8601 times too)"
)
DATE_TO = _param("date_to", {"type": "string", "pattern": DATE}, "up to and including this day")
PER_PAGE = _param(
    "per_page", {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE}, "rows per page (50)"
)
CURSOR = _param("cursor", {"type": "string"}, "meta.next_cursor of the previous page")
FORMAT = _param(
    "format", {"type": "string", "enum": ["json", "ndjson", "csv"]}, "ndjson/csv stream the whole export"
)
PATH_ID = _param("id", {"type": "integer", "minimum": 1, "maximum": 999_999_999_999}, "id", "path", True)


def _error(description: str) -> Obj:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


ERRORS: Obj = {
    "401": _error("missing, unknown or revoked API key"),
    "403": _error("the key lacks the permission, or the client address is not allowed"),
    "422": _error("a parameter is not valid (error.field names it)"),
    "429": {
        **_error("rate limit of the key reached"),
        "headers": {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
    },
}
SOURCE_ERRORS: Obj = {"503": _error("the marketplace database is unavailable or the query timed out")}


def _ok(data: Obj, description: str = "success", extra: Obj | None = None) -> Obj:
    schema = {
        "type": "object",
        "required": ["success", "data", "meta"],
        "properties": {
            "success": {"type": "boolean", "enum": [True]},
            "data": data,
            "meta": {"type": "object"},
        },
    }
    content: Obj = {"application/json": {"schema": schema}}
    if extra:
        content.update(extra)
    return {"description": description, "content": content}


def _list(row: str, params: list[Obj]) -> Obj:
    return {
        "get": {
            "summary": f"{row} export, keyset-paged",
            "security": [{"bearer": []}, {"apiKey": []}],
            "parameters": [*params, PER_PAGE, CURSOR, FORMAT],
            "responses": {
                "200": _ok(
                    {"type": "array", "items": {"type": "object"}},
                    extra={
                        "application/x-ndjson": {"schema": {"type": "string"}},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                ),
                **ERRORS,
                **SOURCE_ERRORS,
            },
        }
    }


def _detail(what: str) -> Obj:
    return {
        "get": {
            "summary": f"one {what} with its related data",
            "security": [{"bearer": []}, {"apiKey": []}],
            "parameters": [PATH_ID],
            "responses": {
                "200": _ok({"type": "object"}),
                "404": _error(f"no such {what}"),
                **ERRORS,
                **SOURCE_ERRORS,
            },
        }
    }


def _post(summary: str, body: Obj, status: str = "200") -> Obj:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {"apiKey": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                status: _ok({"type": "object"}),
                "400": _error("the body is not a JSON object"),
                "409": _error("the endpoint has no secret yet"),
                "413": _error("the body is over 64 KiB"),
                **ERRORS,
            },
        }
    }


def document(version: str) -> Obj:
    events_params = [
        _param(
            "last_event_id", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, "events after this id"
        ),
        _param(
            "event_types",
            {"type": "string", "pattern": "^[A-Za-z0-9._*?\\[\\],-]*$"},
            "comma list of types or globs (order.*); may repeat",
        ),
    ]
    plain = {"type": "object", "properties": {"status": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "ct1-cdc",
            "version": version,
            "description": "Change data of Core Transaction 1: events cursor, exports, webhook management.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["success", "error"],
                    "properties": {
                        "success": {"type": "boolean", "enum": [False]},
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "field": {"type": "string"},
                            },
                        },
                    },
                },
                "Event": {
                    "type": "object",
                    "required": ["id", "type", "timestamp", "data", "source"],
                    "properties": {
                        "id": {"type": "integer"},
                        "type": {"type": "string"},
                        "timestamp": {"type": "string"},
                        "data": {"type": "object"},
                        "source": {"type": "object"},
                    },
                },
            },
        },
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "alive",
                    "responses": {
                        "200": {"description": "ok", "content": {"application/json": {"schema": plain}}}
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "source reachable, slot healthy, outbox writable",
                    "responses": {
                        "200": {"description": "ready", "content": {"application/json": {"schema": plain}}},
                        "503": {
                            "description": "not ready",
                            "content": {"application/json": {"schema": plain}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.0",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            f"{BASE}/events": {
                "get": {
                    "summary": "events after a cursor, oldest first; wait long-polls",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "parameters": [
                        *events_params,
                        _param(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": 1000},
                            "events per page (100)",
                        ),
                        _param(
                            "wait",
                            {"type": "number", "minimum": 0, "maximum": 30},
                            "seconds to wait for a match",
                        ),
                    ],
                    "responses": {"200": _ok({"type": "array", "items": _ref("Event")}), **ERRORS},
                }
            },
            f"{BASE}/events/stream": {
                "get": {
                    "summary": "Server-Sent Events from last_event_id or Last-Event-ID",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "parameters": [
                        *events_params,
                        _param(
                            "Last-Event-ID",
                            {"type": "string", "pattern": "^[0-9]{1,15}$"},
                            "resume after",
                            "header",
                        ),
                    ],
                    "responses": {
                        "200": {
                            "description": "event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **ERRORS,
                    },
                }
            },
            f"{BASE}/customers": _list(
                "customers",
                [DATE_FROM, DATE_TO, _param("has_orders", {"type": "boolean"}, "with or without orders")],
            ),
            f"{BASE}/customers/{{id}}": _detail("customer"),
            f"{BASE}/orders": _list(
                "orders",
                [
                    _id("customer_id", "orders of this customer"),
                    _enum("status", ORDER_STATUSES, "order status"),
                    _enum("payment_status", PAYMENT_STATUSES, "payment status"),
                    DATE_FROM,
                    DATE_TO,
                    _id("seller_id", "orders of this seller"),
                ],
            ),
            f"{BASE}/orders/{{id}}": _detail("order"),
            f"{BASE}/products": _list(
                "products",
                [
                    _id("seller_id", "products of this seller"),
                    _param("category", {"type": "string", "maxLength": 100}, "category slug or id"),
                    _enum("status", PRODUCT_STATUSES, "product status"),
                    _param("in_stock", {"type": "boolean"}, "stock above zero"),
                    _param("search", {"type": "string", "maxLength": 200}, "in name, SKU and description"),
                ],
            ),
            f"{BASE}/products/{{id}}": _detail("product"),
            f"{BASE}/reviews": _list(
                "reviews",
                [
                    _id("product_id", "reviews of this product"),
                    _id("user_id", "reviews by this customer"),
                    _param("rating", {"type": "integer", "minimum": 1, "maximum": 5}, "stars"),
                    _enum("status", REVIEW_STATUSES, "moderation status"),
                    DATE_FROM,
                    DATE_TO,
                ],
            ),
            f"{BASE}/analytics": {
                "get": {
                    "summary": "GMV, orders, customers, conversion, top products, growth (default: last 30 days)",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "parameters": [DATE_FROM, DATE_TO],
                    "responses": {"200": _ok({"type": "object"}), **ERRORS, **SOURCE_ERRORS},
                }
            },
            f"{BASE}/webhooks/test": _post(
                "send webhook.test to one endpoint now",
                {"type": "object", "required": ["system"], "properties": {"system": {"type": "string"}}},
            ),
            f"{BASE}/webhooks/status": {
                "get": {
                    "summary": "per endpoint: state, pending, dead, success rates, last attempt",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "responses": {"200": _ok({"type": "array", "items": {"type": "object"}}), **ERRORS},
                }
            },
            f"{BASE}/webhooks/send": _post(
                "append an event to the outbox for the dispatcher to deliver",
                {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string"},
                        "data": {"type": "object"},
                        "systems": {"type": "array", "items": {"type": "string"}},
                    },
                },
                status="201",
            ),
            f"{BASE}/stats": {
                "get": {
                    "summary": "events by type, deliveries, capture lag, API usage",
                    "security": [{"bearer": []}, {"apiKey": []}],
                    "responses": {"200": _ok({"type": "object"}), **ERRORS},
                }
            },
        },
    }
