"""The OpenAPI 3.0 document served at ``/openapi.json`` (pure: built from plain values).

Parameters and request bodies are derived from the models of :mod:`api.models` (see
:mod:`api.params`); what is stated here is only what cannot be: the paths, their
summaries and their answers.  A schemathesis test drives the running API with it and
checks every answer against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api import models
from api.filters import LISTS
from api.params import body, parameters

BASE = "/api/core-transaction-1"

Obj = dict[str, Any]
SECURITY: list[Obj] = [{"bearer": []}, {"apiKey": []}]


def _ref(name: str) -> Obj:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> Obj:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


ERRORS: Obj = {
    "400": _error("the request is not well-formed HTTP (a bad Content-Length, a line over 8 KiB)"),
    "401": _error("missing, unknown or revoked API key"),
    "403": _error("the key lacks the permission, or the client address is not allowed"),
    "422": _error("a parameter is not valid (error.field names it)"),
    "429": {
        **_error("rate limit of the key reached"),
        "headers": {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
    },
}
SOURCE_ERRORS: Obj = {"503": _error("the marketplace database is unavailable or the query timed out")}
BODY_ERRORS: Obj = {
    "400": _error("the body is not a JSON object, or the request is not well-formed HTTP"),
    "409": _error("the endpoint has no secret yet"),
    "413": _error("the body is over 64 KiB"),
}
OBJECT: Obj = {"type": "object"}
ROWS: Obj = {"type": "array", "items": OBJECT}
EVENT_TYPE: Obj = {
    "type": "object",
    "required": ["type", "object", "description", "trigger", "default_endpoints", "url"],
    "properties": {
        "type": {"type": "string"},
        "object": {"type": "string"},
        "description": {"type": "string"},
        "trigger": {"type": "string"},
        "default_endpoints": {"type": "array", "items": {"type": "string"}},
        "url": {"type": "string"},
    },
}
STREAMED: Obj = {
    "application/x-ndjson": {"schema": {"type": "string"}},
    "text/csv": {"schema": {"type": "string"}},
}


EVENT_ID: Obj = {"type": "integer", "minimum": 0, "nullable": True}
LIST_META: Obj = {
    "type": "object",
    "required": ["per_page", "count", "next_cursor", "resume_event_id", "page_event_id"],
    "properties": {
        "per_page": {"type": "integer"},
        "count": {"type": "integer"},
        "next_cursor": {"type": "string", "nullable": True},
        "resume_event_id": {
            **EVENT_ID,
            "description": "the first page's position: read /events from here to follow every "
            "change after this export (null: capture is not caught up; retry to seed)",
        },
        "page_event_id": {
            **EVENT_ID,
            "description": "this page's position: a tail event of one of its rows with an id at or "
            "below it is already in the row",
        },
    },
}
RESUME_HEADERS: Obj = {
    "CT1-Resume-Event-Id": {
        "description": "ndjson and csv: read /events from this id to follow every change after the "
        "export (absent: capture is not caught up; retry to seed)",
        "schema": {"type": "integer", "minimum": 0},
    }
}


def _ok(data: Obj, extra: Obj | None = None, meta: Obj = OBJECT) -> Obj:
    schema = {
        "type": "object",
        "required": ["success", "data", "meta"],
        "properties": {"success": {"type": "boolean", "enum": [True]}, "data": data, "meta": meta},
    }
    return {"description": "success", "content": {"application/json": {"schema": schema}, **(extra or {})}}


def _plain(description: str, schema: Obj, media: str = "application/json") -> Obj:
    return {"description": description, "content": {media: {"schema": schema}}}


def _get(summary: str, responses: Obj, params: type[BaseModel] | None = None) -> Obj:
    op: Obj = {"summary": summary, "security": SECURITY, "responses": {**responses, **ERRORS}}
    if params is not None:
        op["parameters"] = parameters(params)
    return {"get": op}


def _post(summary: str, model: type[BaseModel], status: str = "200") -> Obj:
    return {
        "post": {
            "summary": summary,
            "security": SECURITY,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body(model)}}},
            "responses": {status: _ok(OBJECT), **ERRORS, **BODY_ERRORS},
        }
    }


def _open(summary: str, responses: Obj) -> Obj:
    return {"get": {"summary": summary, "responses": responses}}


def _detail(what: str, model: type[BaseModel]) -> Obj:
    responses = {"200": _ok(OBJECT), "404": _error(f"no such {what}"), **SOURCE_ERRORS}
    return _get(f"one {what} with its related data", responses, model)


# The model of each operation's parameters (or body), by path.
MODELS: dict[str, type[BaseModel]] = {
    f"{BASE}/events": models.EventsQuery,
    f"{BASE}/events/stream": models.StreamQuery,
    f"{BASE}/events/schemas/{{type}}": models.SchemaPath,
    **{f"{BASE}/{name}": spec.model for name, spec in LISTS.items()},
    f"{BASE}/customers/{{id}}": models.CustomerQuery,
    f"{BASE}/orders/{{id}}": models.Detail,
    f"{BASE}/products/{{id}}": models.Detail,
    f"{BASE}/analytics": models.AnalyticsQuery,
    f"{BASE}/webhooks/test": models.WebhookTest,
    f"{BASE}/webhooks/send": models.WebhookSend,
}


def paths() -> Obj:
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    lists = {
        f"{BASE}/{name}": _get(
            f"{name} export, keyset-paged",
            {"200": {**_ok(ROWS, STREAMED, LIST_META), "headers": RESUME_HEADERS}, **SOURCE_ERRORS},
            MODELS[f"{BASE}/{name}"],
        )
        for name in LISTS
    }
    return {
        "/healthz": _open("alive", {"200": _plain("ok", status)}),
        "/readyz": _open(
            "source reachable, slot healthy, outbox writable",
            {"200": _plain("ready", status), "503": _plain("not ready", status)},
        ),
        "/metrics": _open(
            "Prometheus metrics", {"200": _plain("text exposition", {"type": "string"}, "text/plain")}
        ),
        "/openapi.json": _open("this document", {"200": _plain("OpenAPI 3.0", OBJECT)}),
        f"{BASE}/events": _get(
            "events after a cursor, oldest first; wait long-polls",
            {"200": _ok({"type": "array", "items": _ref("Event")})},
            MODELS[f"{BASE}/events"],
        ),
        f"{BASE}/events/stream": _get(
            "Server-Sent Events from last_event_id or Last-Event-ID",
            {"200": _plain("event stream", {"type": "string"}, "text/event-stream")},
            MODELS[f"{BASE}/events/stream"],
        ),
        f"{BASE}/events/schemas": _get(
            "the event catalogue: every documented type, what makes it, who gets it, its JSON Schema",
            {"200": _ok({"type": "array", "items": EVENT_TYPE})},
        ),
        f"{BASE}/events/schemas/{{type}}": _get(
            "the JSON Schema (draft 2020-12) of one event type, or of manual events, or any envelope",
            {"200": _plain("the schema", OBJECT), "404": _error("no such event type")},
            MODELS[f"{BASE}/events/schemas/{{type}}"],
        ),
        **lists,
        f"{BASE}/customers/{{id}}": _detail("customer", MODELS[f"{BASE}/customers/{{id}}"]),
        f"{BASE}/orders/{{id}}": _detail("order", MODELS[f"{BASE}/orders/{{id}}"]),
        f"{BASE}/products/{{id}}": _detail("product", MODELS[f"{BASE}/products/{{id}}"]),
        f"{BASE}/analytics": _get(
            "GMV, orders, customers, conversion, top products, growth (default: last 30 days)",
            {"200": _ok(OBJECT), **SOURCE_ERRORS},
            MODELS[f"{BASE}/analytics"],
        ),
        f"{BASE}/webhooks/test": _post(
            "send webhook.test to one endpoint now", MODELS[f"{BASE}/webhooks/test"]
        ),
        f"{BASE}/webhooks/status": _get(
            "per endpoint: state, pending, dead, success rates, last attempt", {"200": _ok(ROWS)}
        ),
        f"{BASE}/webhooks/send": _post(
            "append an event to the outbox for the dispatcher to deliver",
            MODELS[f"{BASE}/webhooks/send"],
            "201",
        ),
        f"{BASE}/stats": _get("events by type, deliveries, capture lag, API usage", {"200": _ok(OBJECT)}),
    }


def document(version: str) -> Obj:
    error = {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "field": {"type": "string"},
        },
    }
    event = {
        "type": "object",
        "required": ["id", "type", "timestamp", "data", "source"],
        "properties": {
            "id": {"type": "integer"},
            "type": {"type": "string"},
            "timestamp": {"type": "string"},
            "data": OBJECT,
            "source": OBJECT,
        },
    }
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
                    "properties": {"success": {"type": "boolean", "enum": [False]}, "error": error},
                },
                "Event": event,
            },
        },
        "paths": paths(),
    }
