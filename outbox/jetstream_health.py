"""What the dispatch nodes report of each endpoint on the JetStream backend, so that every
API node's ``GET /webhooks/status`` and ``GET /stats`` tell the deliveries of the whole
cluster, not of its own copy (where no dispatcher moves the cursors).

Each dispatch node puts, every :data:`EVERY` seconds, what its file says of each endpoint
(deliveries pending and delivered, attempts over the last hour and day, its last attempt)
into the key-value bucket ``<stream>_HEALTH`` under ``<endpoint>.<node>`` (the node
by its file, so a restart reports over its own); the bucket forgets a node's report
:data:`TTL` seconds after its last put, so a node gone stops counting.  An API node adds up the live reports; states and dead deliveries it reads
from its own copy (they are shared: outbox/jetstream_shared.py).
"""

from __future__ import annotations

import time
from typing import Any

from common.jsontext import dumps, loads
from outbox.jetstream import JetStreamLog

HEALTH = "HEALTH"  # the bucket: <stream>_HEALTH
EVERY = 5.0  # how often a dispatch node reports
TTL = 30.0  # a report not put again within this is gone
SUMMED = ("pending", "delivered")


def bucket_of(events: JetStreamLog) -> str:
    return f"{events.stream}_{HEALTH}"


async def report(events: JetStreamLog, node: str, rows: list[dict[str, Any]]) -> None:
    """This dispatch node's rows of ``store.endpoint_status``."""
    bucket = await events.bucket(bucket_of(events), ttl=TTL)
    for row in rows:
        value = {k: row[k] for k in ("name", *SUMMED, "attempts_1h", "attempts_24h", "last_attempt")}
        await events.put(bucket, f"{row['name']}.{node}", dumps({**value, "at": time.time()}))


async def reports(events: JetStreamLog) -> dict[str, list[dict[str, Any]]]:
    """The live reports, by endpoint."""
    bucket = await events.bucket(bucket_of(events), ttl=TTL)
    found: dict[str, list[dict[str, Any]]] = {}
    for key in await events.keys(bucket):
        entry = await events.retrying(bucket.get, key)
        if entry.value:
            row = loads(entry.value)
            found.setdefault(str(row["name"]), []).append(row)
    return found


def merged(local: dict[str, Any], reported: list[dict[str, Any]]) -> dict[str, Any]:
    """An endpoint's status as an API node gives it: its state and dead deliveries from
    its copy, the rest added up over the dispatch nodes' reports."""
    out = dict(local)
    for key in SUMMED:
        out[key] = sum(int(r[key]) for r in reported)
    for key in ("attempts_1h", "attempts_24h"):
        out[key] = (sum(int(r[key][0]) for r in reported), sum(int(r[key][1]) for r in reported))
    last: list[Any] | None = None  # (attempted_at, event id, status, duration, error)
    for row in reported:
        attempt = row["last_attempt"]
        if attempt and (last is None or float(attempt[0]) > float(last[0])):
            last = attempt
    out["last_attempt"] = None if last is None else tuple(last)
    out["dispatch_nodes"] = len(reported)
    return out
