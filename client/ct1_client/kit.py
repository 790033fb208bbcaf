"""The receiver kit for CT2/CT3: an aiohttp handler that takes ct1-cdc's webhooks the way
a receiver should, and a framework-free :func:`accept` for any other server.

    seen = SqliteSeen("var/webhooks.db")
    app.router.add_post("/webhooks/ct1", webhook_handler(["whsec_new", "whsec_old"], handle, seen))

For every request it:

* verifies the Standard Webhooks signature against each secret given (the current and,
  while either side rotates, the previous one) and refuses a timestamp further than
  ``tolerance`` seconds from now: 401, and ct1-cdc keeps the delivery for a retry;
* answers a ``webhook-id`` already handled with 200 without calling ``handle`` again
  (ct1-cdc delivers at least once: after a timeout, a restart or a replay the same event
  comes again with the same id), remembered in a durable store;
* calls ``handle(event)`` (a function or a coroutine; the typed event of
  :mod:`ct1_client.models`) and answers 200 only once it returned; if it raises, 500,
  nothing is remembered, and ct1-cdc retries with backoff.

Keep ``handle`` short (store the event, queue the work): ct1-cdc waits for the answer up to
its ``dispatcher.timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from ct1_client.webhooks import InvalidWebhook, WebhookVerifier

Handle = Callable[[Any], Awaitable[None] | None]

log = logging.getLogger("ct1_client")


class Seen(Protocol):
    """Which webhook ids were handled already."""

    def seen(self, webhook_id: str) -> bool: ...

    def mark(self, webhook_id: str) -> None: ...


class SqliteSeen:
    """Handled webhook ids in a SQLite file (kept ``keep_days``, then forgotten: ct1-cdc
    gives up on a delivery after about three days)."""

    def __init__(self, path: str | Path, keep_days: float = 7.0) -> None:
        self.keep = keep_days * 86400
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID"
        )
        self._marks = 0

    def seen(self, webhook_id: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM seen WHERE id = ?", (webhook_id,)).fetchone() is not None

    def mark(self, webhook_id: str) -> None:
        now = time.time()
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO seen (id, at) VALUES (?, ?)", (webhook_id, now))
            self._marks += 1
            if self._marks % 1000 == 0:
                self._conn.execute("DELETE FROM seen WHERE at < ?", (now - self.keep,))

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True, slots=True)
class Answer:
    """What to answer a webhook request: ``status`` and a short ``text``."""

    status: int
    text: str
    envelope: dict[str, Any] | None = None  # the verified event, when there is one to handle


def accept(
    verifiers: Sequence[WebhookVerifier], seen: Seen | None, body: bytes, headers: Mapping[str, str]
) -> Answer:
    """The framework-free part: verify ``body`` with ``headers`` and say whether to handle
    it (``envelope`` set, status 200 once handled), answer it as a duplicate (200) or refuse
    it (401).  After handling, call ``seen.mark(headers["webhook-id"])``."""
    reason = "no secret"
    for verifier in verifiers:
        try:
            envelope = verifier.verify(body, headers)
        except InvalidWebhook as exc:
            reason = str(exc)
            continue
        webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        if seen is not None and seen.seen(webhook_id):
            return Answer(200, "duplicate")
        return Answer(200, "ok", envelope)
    return Answer(401, f"invalid webhook: {reason}")


def webhook_handler(
    secrets: str | Sequence[str],
    handle: Handle,
    seen: Seen | None = None,
    *,
    tolerance: float = 300.0,
    typed: bool = True,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler for ct1-cdc's webhooks (see the module's docstring). ``handle``
    gets the typed event (:func:`ct1_client.models.parse_event`: ``event.data.record`` is an
    ``Order`` for ``order.*``), or the envelope as a ``dict`` with ``typed=False``."""
    from ct1_client.models import parse_event

    verifiers = [WebhookVerifier(s, tolerance) for s in ([secrets] if isinstance(secrets, str) else secrets)]
    in_flight: set[str] = set()  # ids being handled right now: a second copy waits its turn

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        answer = accept(verifiers, seen, body, request.headers)
        if answer.envelope is None:
            return web.Response(status=answer.status, text=answer.text)
        webhook_id = request.headers["webhook-id"]
        if webhook_id in in_flight:
            return web.Response(status=409, text="the same webhook is being handled: retry")
        in_flight.add(webhook_id)
        try:  # in flight until it is marked: a copy arriving meanwhile gets 409, not handled
            try:
                result = handle(parse_event(answer.envelope) if typed else answer.envelope)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # the sidecar retries: nothing is marked
                log.exception("ct1_client_handler_failed webhook_id=%s", webhook_id)
                return web.Response(status=500, text=f"handler failed: {type(exc).__name__}")
            if seen is not None:
                await asyncio.to_thread(seen.mark, webhook_id)  # a durable write: off the loop
        finally:
            in_flight.discard(webhook_id)
        return web.Response(text="ok")

    return handler
