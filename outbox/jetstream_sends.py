"""Manual events (``POST /webhooks/send``) on the JetStream backend: asked for on any API
node, appended by capture, the stream's one writer (docs/jetstream.md).

* **Asked:** the API node makes the request in the key-value bucket ``<stream>_SENDS``
  under an id of its own (:func:`ask`): the event's type, data, time and endpoints,
  state ``asked``, and ``take_by``, the time past which no capture may take it.
* **Taken:** the server beside the capture streaming the slot (``sidecar/sends.py``)
  takes it by updating it to ``taken`` at the revision the API node made (:func:`take`).
  Until then the API node may withdraw it, by updating it to ``withdrawn`` at that
  revision (:func:`withdraw`): exactly one of the two wins, and a reply lost and asked
  again is told apart by reading the request back, so an answer of "not sent" is true.
* **Appended:** capture appends the event in one of its group commits, named
  ``send:<request>``, with a mark of the request in its state (kind :data:`SERVED`),
  then the server deletes the request (:func:`done`), then the mark.  A capture serving
  a request again (after a crash) appends nothing when the mark is there, and passes an
  event a crash left in the stream over by its name.
* **Answered:** every node's copy notes which event id the request got (:func:`record`,
  kind :data:`SENT`); the asking API node answers once its own copy holds the event, so
  a read on that node right after finds it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError

from common.jsontext import dumps, loads
from outbox.jetstream import JetStreamError, JetStreamLog
from outbox.jetstream_sink import SEND_PREFIX
from outbox.state import S
from outbox.writer import OutboxWriter

SENDS = "SENDS"  # the bucket: <stream>_SENDS
SENT = "manual_send"  # a node's copy (derived_state): request -> [request, event id]
SERVED = "manual_send_served"  # capture's state: request -> request, appended
KEEP_SECONDS = 86_400.0  # how long a node's copy keeps a request's event id
FIELDS = ("type", "data", "endpoints", "occurred_at", "take_by")  # what a request holds
T = TypeVar("T")


def bucket_of(events: JetStreamLog) -> str:
    return f"{events.stream}_{SENDS}"


async def ask(events: JetStreamLog, request: str, event: dict[str, Any], within: float) -> int:
    """Make request ``request`` for ``event`` (``type``, ``data``, ``endpoints``,
    ``occurred_at``), to be taken within ``within`` seconds; the revision to withdraw it
    at."""
    bucket = await events.bucket(bucket_of(events))
    value = dumps({**event, "take_by": time.time() + within, "state": "asked"})
    try:
        return int(await _kv(events, bucket.create, request, value))
    except KeyWrongLastSequenceError:  # made by a first try whose reply was lost
        entry = await _kv(events, bucket.get, request)
        return int(entry.revision)


async def state_of(events: JetStreamLog, request: str) -> str | None:
    """The request's state (``asked``, ``taken``, ``withdrawn``); None once it is done."""
    bucket = await events.bucket(bucket_of(events))
    try:
        entry = await _kv(events, bucket.get, request)
    except (KeyNotFoundError, KeyDeletedError):
        return None
    return str(loads(entry.value)["state"]) if entry.value else None


async def withdraw(events: JetStreamLog, request: str, revision: int) -> bool:
    """Withdraw request ``request`` unless capture has taken it (it is no longer at
    ``revision``): True when withdrawn (nothing is sent, then or later)."""
    return await _move(events, request, revision, {"state": "withdrawn"}, "withdrawn")


async def take(events: JetStreamLog, request: str, row: dict[str, Any], revision: int) -> bool:
    """Capture's side of :func:`withdraw`: take the request, at ``revision``; False when
    the API node withdrew it meanwhile."""
    return await _move(events, request, revision, {**row, "state": "taken"}, "taken")


async def _move(events: JetStreamLog, request: str, revision: int, value: dict[str, Any], state: str) -> bool:
    bucket = await events.bucket(bucket_of(events))
    try:
        await _kv(events, bucket.update, request, dumps(value), revision)
    except KeyWrongLastSequenceError:  # the other side won, or our first try did (its reply lost)
        return await state_of(events, request) == state
    return True


async def done(events: JetStreamLog, request: str) -> None:
    """The request's event is in the stream, its mark in capture's state: delete it."""
    bucket = await events.bucket(bucket_of(events))
    await _kv(events, bucket.delete, request)


async def forget(events: JetStreamLog, request: str, revision: int) -> None:
    """Delete a withdrawn request (if it is still as read)."""
    bucket = await events.bucket(bucket_of(events))
    with contextlib.suppress(KeyWrongLastSequenceError):
        await _kv(events, bucket.delete, request, revision)


async def purge_deleted(events: JetStreamLog, older_than: float) -> None:
    """Drop the markers of requests done or withdrawn more than ``older_than`` s ago (one
    per request: the bucket would grow with every manual event)."""
    bucket = await events.bucket(bucket_of(events))
    await _kv(events, bucket.purge_deletes, int(older_than))


async def _kv(events: JetStreamLog, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """A key-value request, asked again while the cluster cannot answer; its other
    errors as :class:`JetStreamError` (a wrong revision, a missing key stay theirs)."""
    try:
        result: T = await events.retrying(call, *args)
        return result
    except (KeyWrongLastSequenceError, KeyNotFoundError, KeyDeletedError):
        raise
    except nats.errors.Error as exc:
        if getattr(exc, "err_code", None) in (10071, 10164):  # wrong last sequence, as an API error
            raise KeyWrongLastSequenceError() from exc
        raise JetStreamError(f"bucket {bucket_of(events)}: {type(exc).__name__}: {exc}") from exc


def malformed(row: Any) -> str | None:
    """Why a request's value cannot be appended (None: it can)."""
    if not isinstance(row, dict):
        return "not an object"
    missing = [f for f in FIELDS if f not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(row["type"], str) or not isinstance(row["endpoints"], list):
        return "type or endpoints of the wrong kind"
    return None


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
    row = conn.execute(S["get"], {"kind": SENT, "key": request}).fetchone()
    return None if row is None else int(loads(row[0])[1])
