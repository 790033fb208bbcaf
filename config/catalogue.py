"""The event catalogue: every documented event type, declared once (pure: no I/O but
reading this package's own files).

Each type's JSON Schema (draft 2020-12) is a file of this package,
``config/schemas/<type>.json``; the API serves them (``GET /events/schemas``), docs/events.md
describes them, and the tests validate every event they see against them.  Two schemas
belong to no one type: ``manual`` (any event sent through ``POST /webhooks/send``, which
carries ``source.op`` ``"manual"`` and whatever ``data`` the sender gave) and
``envelope`` (a captured event of a type outside the catalogue, as a mapping of one's own
emits).  :func:`schema_name` picks the one an envelope answers to.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MANUAL = "manual"  # the schema of manual events, whatever their type
ENVELOPE = "envelope"  # the schema of a captured event of a type outside the catalogue
BOTH = ("ct2", "ct3")


@dataclass(frozen=True, slots=True)
class EventType:
    type: str
    object: str  # data.object
    op: str | None  # source.op of its events (None: it has no source)
    trigger: str  # what makes it, with the default mapping (config/mapping.toml)
    endpoints: tuple[str, ...]  # the default endpoints that receive it
    routed: bool = True  # False: not routed by the endpoints' events globs

    @property
    def derived(self) -> bool:
        return self.op == "derived"


CATALOGUE: tuple[EventType, ...] = (
    EventType("customer.created", "customer", "insert", "a row inserted into public.users", BOTH),
    EventType("customer.updated", "customer", "update", "a row of public.users updated", BOTH),
    EventType("order.created", "order", "insert", "a row inserted into public.orders", BOTH),
    EventType("order.updated", "order", "update", "a row of public.orders updated (any column)", BOTH),
    EventType(
        "order.status_changed", "order", "update", "an update of public.orders that changed status", BOTH
    ),
    EventType(
        "payment.status_changed",
        "order",
        "update",
        "an update of public.orders that changed payment_status",
        BOTH,
    ),
    EventType("product.viewed", "product_view", "insert", "a row inserted into public.product_views", BOTH),
    EventType("product.added_to_cart", "cart_item", "insert", "a row inserted into public.cart_items", BOTH),
    EventType("review.created", "review", "insert", "a row inserted into public.reviews", BOTH),
    EventType("review.updated", "review", "update", "a row of public.reviews updated", BOTH),
    EventType(
        "cart.abandoned",
        "cart",
        "derived",
        "a cart with items, idle past abandon_after, with no order since",
        BOTH,
    ),
    EventType(
        "marketplace.analytics",
        "analytics",
        "derived",
        "a periodic snapshot of the marketplace's figures (those of GET /analytics)",
        ("ct3",),
    ),
    EventType(
        "webhook.test",
        "webhook_test",
        None,
        "POST /webhooks/test (and ct1-cdc setup's probe): sent at once, never stored in the outbox",
        (),
        routed=False,
    ),
    EventType(
        "ct1.gap",
        "gap",
        "derived",
        "ct1-cdc recover, after the slot was lost: the changes between the two positions were not captured",
        BOTH,
        routed=False,
    ),
)
# Backfill's types (source.op "read"): an existing row as its insert type carries one, so
# each one's schema is derived from that type's (see :func:`schema_text`).
SNAPSHOTS: dict[str, str] = {
    "customer.snapshot": "customer.created",
    "order.snapshot": "order.created",
    "cart_item.snapshot": "product.added_to_cart",
    "review.snapshot": "review.created",
}
CATALOGUE += tuple(
    EventType(
        snapshot,
        snapshot.split(".")[0],
        "read",
        f"ct1-cdc backfill (or setup --backfill, recover): an existing row, as {created} carries a new one",
        BOTH,
    )
    for snapshot, created in SNAPSHOTS.items()
)
BY_TYPE: dict[str, EventType] = {e.type: e for e in CATALOGUE}
TYPES: tuple[str, ...] = tuple(BY_TYPE)
SCHEMAS: tuple[str, ...] = (*TYPES, MANUAL, ENVELOPE)  # every schema there is, by name


@functools.cache
def schema_text(name: str) -> bytes:
    """The schema file of ``name`` (a type of the catalogue, :data:`MANUAL` or
    :data:`ENVELOPE`) as published; KeyError for any other name."""
    if name not in SCHEMAS:
        raise KeyError(name)
    if name in SNAPSHOTS:
        return _snapshot_schema(name, SNAPSHOTS[name])
    return importlib.resources.files("config").joinpath("schemas", f"{name}.json").read_bytes()


def _snapshot_schema(name: str, created: str) -> bytes:
    """A backfill type's schema: its insert type's, read at a snapshot (``source.op``
    ``read``, no source transaction, the timestamp of the chunk's read)."""
    doc = json.loads(schema_text(created))
    doc["$id"] = f"urn:ct1-cdc:event:{name}"
    doc["title"] = name
    doc["description"] = (
        f"An existing row, sent by a backfill (ct1-cdc backfill, setup --backfill, recover): "
        f"the record {created} would carry for it, read at a snapshot."
    )
    props = doc["properties"]
    props["type"] = {"const": name}
    props["timestamp"] = {
        "$ref": "#/$defs/timestamp",
        "description": "when the chunk holding the row was read",
    }
    props["data"]["properties"]["record"]["description"] = "the row as read, minus excluded columns"
    props["data"]["properties"]["previous"] = {
        "type": "null",
        "description": "null: a read has no old values",
    }
    source = props["source"]["properties"]
    source["op"] = {"const": "read"}
    source["lsn"] = {"$ref": "#/$defs/lsn", "description": "the position of the chunk's watermark in the WAL"}
    source["xid"] = {"type": "null", "description": "null: a read belongs to no source transaction"}
    return json.dumps(doc, indent=2).encode()


@functools.cache
def _schema(name: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(schema_text(name))
    return parsed


def schema(name: str) -> dict[str, Any]:
    """The schema of ``name`` as a JSON value (a copy: callers may change it)."""
    copied: dict[str, Any] = json.loads(json.dumps(_schema(name)))
    return copied


def description(name: str) -> str:
    return str(_schema(name)["description"])


def schema_name(envelope: Mapping[str, Any]) -> str:
    """The schema an envelope answers to: :data:`MANUAL` for a manual event (whatever its
    type), the type's own for a type of the catalogue, else :data:`ENVELOPE`."""
    source = envelope.get("source")
    if isinstance(source, Mapping) and source.get("op") == "manual":
        return MANUAL
    event_type = envelope.get("type")
    if isinstance(event_type, str) and event_type in BY_TYPE:
        return event_type
    return ENVELOPE
