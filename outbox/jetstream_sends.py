"""Manual events (``POST /webhooks/send``) on the JetStream backend: asked for on any API
node, appended by capture, the stream's one writer (docs/jetstream.md).

* **Asked:** the API node puts the request into the key-value bucket ``<stream>_SENDS``
  under an id of its own (:func:`ask`): the event's type, data, time and endpoints,
  state ``asked``.
* **Taken:** the capture host's server (``sidecar/sends.py``) takes it by updating it to
  ``taken`` at the revision the API node put.  Until then the API node may withdraw it,
  by deleting it at that revision (:func:`withdraw`): exactly one of the two wins, so an
  answer of "not sent" is true.
* **Appended:** capture appends the event in one of its group commits, named
  ``send:<request>``, with a mark of the request in its state (kind :data:`SERVED`),
  then the server deletes the request, then the mark.  A capture that serves a request
  again (after a crash, or a standby that took over) appends nothing when the mark is
  there or the request is gone, and passes over an event a crash left in the stream by
  its name.
* **Answered:** every node's copy notes which event id the request got (:func:`record`,
  kind :data:`SENT`); the asking API node answers once its own copy holds the event, so
  a read on that node right after finds it.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError

from common.jsontext import dumps, loads
from outbox.jetstream import JetStreamLog
from outbox.jetstream_sink import SEND_PREFIX
from outbox.writer import OutboxWriter

SENDS = "SENDS"  # the bucket: <stream>_SENDS
SENT = "manual_send"  # a node's copy (derived_state): request -> [request, event id]
SERVED = "manual_send_served"  # capture's state: request -> request, appended
KEEP_SECONDS = 86_400.0  # how long a node's copy keeps a request's event id
WRONG_LAST = (10071, 10164)  # JetStream's "wrong last sequence" error codes


def bucket_of(events: JetStreamLog) -> str:
    return f"{events.stream}_{SENDS}"


async def ask(events: JetStreamLog, request: str, event: dict[str, Any]) -> int:
    """Put request ``request`` for ``event`` (``type``, ``data``, ``endpoints``,
    ``occurred_at``); the revision to withdraw it at."""
    bucket = await events.bucket(bucket_of(events))
    value = dumps({**event, "asked_at": time.time(), "state": "asked"})
    return int(await events.retrying(bucket.put, request, value))


async def withdraw(events: JetStreamLog, request: str, revision: int) -> bool:
    """Delete request ``request`` if capture has not taken it (it is still at
    ``revision``); False when it has."""
    bucket = await events.bucket(bucket_of(events))
    try:
        await events.retrying(bucket.delete, request, revision)
    except KeyWrongLastSequenceError:
        return False
    except APIError as exc:
        if exc.err_code in WRONG_LAST:
            return False
        raise
    return True


async def take(events: JetStreamLog, request: str, row: dict[str, Any], revision: int) -> bool:
    """Capture's side of :func:`withdraw`: mark the request taken, at ``revision``; False
    when the API node withdrew it (or it changed) meanwhile."""
    bucket = await events.bucket(bucket_of(events))
    try:
        await events.retrying(bucket.update, request, dumps({**row, "state": "taken"}), revision)
    except KeyWrongLastSequenceError:
        return False
    except APIError as exc:
        if exc.err_code in WRONG_LAST:
            return False
        raise
    return True


async def asked(events: JetStreamLog, request: str) -> bool:
    """Whether request ``request`` is still in the bucket (not yet done, nor withdrawn)."""
    bucket = await events.bucket(bucket_of(events))
    try:
        entry = await events.retrying(bucket.get, request)
    except (KeyNotFoundError, KeyDeletedError):
        return False
    return bool(entry.value)


async def done(events: JetStreamLog, request: str) -> None:
    """The request's event is in the stream, its mark in capture's state: delete it."""
    bucket = await events.bucket(bucket_of(events))
    await events.retrying(bucket.delete, request)


def name_of(request: str) -> str:
    """The event's name in the stream (its key there starts with it)."""
    return f"{SEND_PREFIX}{request}"


def request_of(name: Any) -> str | None:
    """The request a stored event was appended for, if it was one."""
    if isinstance(name, str) and name.startswith(SEND_PREFIX):
        return name[len(SEND_PREFIX) :]
    return None


def record(writer: OutboxWriter, sent: list[tuple[str, int]]) -> None:
    """In a node's copy, in the commit that appends them: the event id each request got;
    those kept longer than :data:`KEEP_SECONDS` go."""
    now = time.time()
    for request, event_id in sent:
        writer.state.state_put(SENT, request, [request, event_id], None, now)
    for request, _ in writer.state.state_due(SENT, now - KEEP_SECONDS, 100):
        writer.state.state_delete(SENT, request)


def sent_event(conn: sqlite3.Connection, request: str) -> int | None:
    """The event id request ``request`` got, once this node's copy holds it."""
    row = conn.execute(
        "SELECT value FROM derived_state WHERE kind = ? AND key = ?", (SENT, request)
    ).fetchone()
    return None if row is None else int(loads(row[0])[1])
