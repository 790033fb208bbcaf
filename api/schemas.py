"""The event catalogue over HTTP (permission ``core_transaction_1_export``, as ``/events``):

* ``GET /events/schemas`` — every documented type: what makes it, its ``data.object``,
  the default endpoints that receive it, and where its JSON Schema is;
* ``GET /events/schemas/{type}`` — that JSON Schema (draft 2020-12) exactly as shipped in
  ``config/schemas``; also ``manual`` (any event sent through ``POST /webhooks/send``) and
  ``envelope`` (a captured event of a type outside the catalogue).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.errors import ApiError
from api.models import SchemaPath
from api.openapi import BASE
from api.params import parse
from common.jsontext import dumps as json_bytes
from config import catalogue

SCHEMAS_PATH = f"{BASE}/events/schemas"


def url(name: str) -> str:
    return f"{SCHEMAS_PATH}/{name}"


def listing_body() -> dict[str, Any]:
    data = [
        {
            "type": entry.type,
            "object": entry.object,
            "description": catalogue.description(entry.type),
            "trigger": entry.trigger,
            "default_endpoints": list(entry.endpoints),
            "url": url(entry.type),
        }
        for entry in catalogue.CATALOGUE
    ]
    meta = {
        "count": len(data),
        "manual": url(catalogue.MANUAL),
        "envelope": url(catalogue.ENVELOPE),
    }
    return {"success": True, "data": data, "meta": meta}


class Schemas:
    def __init__(self) -> None:
        self._listing = json_bytes(listing_body())

    async def listing(self, request: web.Request) -> web.Response:
        return web.Response(body=self._listing, content_type="application/json")

    async def one(self, request: web.Request) -> web.Response:
        name = parse(SchemaPath, request).type
        try:
            text = catalogue.schema_text(name)
        except KeyError:
            raise ApiError(
                404,
                "not_found",
                f"no schema for {name!r}: GET {SCHEMAS_PATH} lists the event types",
                "type",
            ) from None
        return web.Response(body=text, content_type="application/json")
