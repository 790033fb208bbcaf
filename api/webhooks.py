"""Webhook management and statistics: ``POST /webhooks/test``, ``GET /webhooks/status``,
``POST /webhooks/send`` and ``GET /stats`` (permission ``core_transaction_1_webhooks``)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web

from api.errors import ApiError
from api.health import SourceHealth
from api.keys import SEND_CAPTURED_TYPES
from api.limits import Usage
from api.models import WebhookSend, WebhookTest
from api.params import validate
from api.writer import ApiWriter
from common import jsontext
from common.errors import ConfigError
from common.formats import format_lsn, optional_iso, unix_to_iso
from common.version import version
from config import catalogue
from config.settings import EndpointSettings, Settings
from dispatcher.probe import send_test
from dispatcher.sender import Sender, check_url
from outbox import store
from outbox.endpoints import stored_secret
from outbox.keys import usage_per_route
from outbox.store import Router

if TYPE_CHECKING:  # (the cluster's client is imported by the JetStream backend alone)
    from outbox.jetstream import JetStreamLog

log = structlog.get_logger("ct1_cdc.api")

# JetStream: how long a manual event may wait for a capture to take it, in
# [outbox.jetstream] timeout_seconds (then it is withdrawn and refused), then for this
# node's copy to hold it once taken; how often it looks.
SEND_WITHIN_TIMEOUTS = 2
TAKEN_WITHIN = 20.0
SEND_POLL = 0.05

# Types that only the sidecar produces (the twelve documented event types, the test
# message and the gap marker; the loaded mapping's types are added): receivers trust them
# to mirror the source, so a manual one needs SEND_CAPTURED_TYPES.
CAPTURED_TYPES = frozenset(catalogue.TYPES) | {"ct1.gap"}
# The caller's permissions, set by the API's auth guard before a handler runs.
GRANTED: web.RequestKey[frozenset[str]] = web.RequestKey("granted", frozenset)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, parsed exactly: an integer of any size stays that integer
    (orjson would round one past 64 bits to a float) and goes out to receivers as sent."""
    raw = await request.read()  # over client_max_size: 413 from aiohttp
    try:
        body = jsontext.loads(raw)
    except RecursionError:
        raise ApiError(400, "bad_json", "the request body is nested too deeply") from None
    except ValueError:  # also bad UTF-8
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the request body must be a JSON object")
    return body


def _rate(ok: int, total: int) -> float | None:
    return round(ok / total, 4) if total else None


class Webhooks:
    def __init__(
        self,
        settings: Settings,
        db: Callable[[], sqlite3.Connection],
        offload: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        writer: ApiWriter,
        usage: Usage,
        health: SourceHealth,
        mapped_types: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self.db = db
        self.offload = offload  # runs a read that walks whole tables off the event loop
        self.writer = writer  # the app's one outbox writer: manual events
        self.usage = usage
        self.health = health
        self.endpoints = {e.name: e for e in settings.endpoints}
        self.sender: Sender | None = None
        self.captured_types = CAPTURED_TYPES | frozenset(mapped_types)
        self.router = Router(writer.routes)  # a manual event is routed as a captured one
        self._events: JetStreamLog | None = None  # JetStream: the cluster, for manual events
        self._connecting = asyncio.Lock()
        self._pending: set[asyncio.Future[Any]] = set()

    async def close(self) -> None:
        if self.sender is not None:
            await self.sender.close()
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)
        if self._events is not None:
            await self._events.close()

    def _endpoint(self, name: Any, field: str) -> EndpointSettings:
        if not isinstance(name, str) or name not in self.endpoints:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise ApiError(
                422, "invalid_parameter", f"{field} must name a configured endpoint ({known})", field
            )
        return self.endpoints[name]

    # -- POST /webhooks/test ---------------------------------------------------------------------

    async def test(self, request: web.Request) -> web.Response:
        body = validate(WebhookTest, await json_body(request))
        endpoint = self._endpoint(body.system, "system")
        cfg = self.settings.dispatcher
        try:
            check_url(endpoint.name, endpoint.url, cfg.require_https, cfg.refuse_private_networks)
        except ConfigError as exc:
            raise ApiError(422, "invalid_endpoint", str(exc), "system") from None
        secret = endpoint.secret or stored_secret(self.db(), endpoint.name)
        if not secret:
            raise ApiError(
                409, "no_secret", f"endpoint {endpoint.name} has no secret yet: run `ct1-cdc setup`", "system"
            )
        if self.sender is None:
            self.sender = Sender(
                cfg.timeout_seconds, concurrency=4, refuse_private=cfg.refuse_private_networks
            )
        probe = await send_test(self.sender, endpoint, secret, version())
        return _ok(probe.as_dict())

    # -- GET /webhooks/status --------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        reported = await self._reported()
        return _ok(await self.offload(lambda conn: self._status(conn, reported)))

    async def _reported(self) -> dict[str, list[dict[str, Any]]] | None:
        """JetStream: what the dispatch nodes report of each endpoint (this node's copy
        does not move the cursors); None on SQLite."""
        if self.settings.outbox.backend != "jetstream":
            return None
        from outbox import jetstream_health as health
        from outbox.jetstream import JetStreamError

        try:
            return await health.reports(await self._cluster())
        except JetStreamError as exc:
            raise ApiError(503, "outbox_unavailable", f"the cluster cannot be read now: {exc}") from exc

    def _status(
        self, conn: sqlite3.Connection, reported: dict[str, list[dict[str, Any]]] | None = None
    ) -> list[dict[str, Any]]:
        data = []
        for row in store.endpoint_status(conn, self.endpoints, time.time()):
            if reported is not None:  # (JetStream: the deliveries as the dispatch nodes tell them)
                from outbox.jetstream_health import merged

                row = merged(row, reported.get(row["name"], []))
            cfg = self.endpoints.get(row["name"])
            (n1, ok1), (n24, ok24), last = row["attempts_1h"], row["attempts_24h"], row["last_attempt"]
            data.append(
                {
                    "system": row["name"],
                    "url": cfg.url if cfg else None,
                    "enabled": bool(cfg and cfg.enabled),
                    "events": cfg.events if cfg else [],
                    "state": row["state"],
                    "consecutive_failures": row["failures"],
                    "paused_until": optional_iso(row["paused_until"]) if row["state"] == "paused" else None,
                    "pending": row["pending"],
                    "dead": row["dead"],
                    "delivered": row["delivered"],
                    "success_rate_1h": _rate(ok1, n1),
                    "success_rate_24h": _rate(ok24, n24),
                    "attempts_1h": n1,
                    "attempts_24h": n24,
                    "last_attempt": None
                    if last is None
                    else {
                        "at": optional_iso(last[0]),
                        "event_id": last[1],
                        "status": last[2],
                        "duration_ms": last[3],
                        "error": last[4],
                    },
                }
            )
            if reported is not None:
                data[-1]["dispatch_nodes"] = row["dispatch_nodes"]
        return data

    # -- POST /webhooks/send ---------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        body = validate(WebhookSend, await json_body(request))
        event_type, data, systems = body.event, body.data, body.systems
        self._may_send(event_type, request.get(GRANTED, frozenset()))
        names = self._route(event_type, systems)
        if self.settings.outbox.backend == "jetstream":
            event_id = await self._through_capture(event_type, data, names)
            return _ok({"id": event_id, "event": event_type, "systems": names}, status=201)
        try:
            event_id = await self.writer.append(event_type, data, names, unix_to_iso(time.time()))
        except (sqlite3.Error, store.OutboxError) as exc:
            raise ApiError(503, "outbox_unavailable", f"the outbox cannot be written now: {exc}") from exc
        return _ok({"id": event_id, "event": event_type, "systems": names}, status=201)

    async def _through_capture(self, event_type: str, data: Any, names: list[str]) -> int:
        """JetStream: the stream has one writer, capture.  Ask it for the event through the
        cluster (outbox/jetstream_sends.py) and answer once this node's copy holds it;
        withdrawn, and refused, when no capture takes it in time."""
        from outbox import jetstream_sends as sends
        from outbox.jetstream import JetStreamError

        request = os.urandom(12).hex()
        event = {
            "type": event_type,
            "data": data,
            "endpoints": names,
            "occurred_at": unix_to_iso(time.time()),
        }
        within = SEND_WITHIN_TIMEOUTS * self.settings.outbox.jetstream.timeout_seconds
        try:
            events = await self._cluster()
            revision = await sends.ask(events, request, event, within)
        except JetStreamError as exc:
            raise ApiError(
                503, "outbox_unavailable", f"the cluster cannot take the event now: {exc}"
            ) from exc
        try:
            event_id = await self._sent(request, within)
        except asyncio.CancelledError:  # the client went: the event is not sent later either
            self._later(sends.withdraw(events, request, revision))
            raise
        if event_id is None:
            try:
                withdrawn = await sends.withdraw(events, request, revision)
            except JetStreamError as exc:
                raise ApiError(
                    503,
                    "outbox_unavailable",
                    f"the cluster did not say whether capture took the event (request {request}): {exc};"
                    " it is sent once or not at all (its request expired), and /events lists it if it was",
                ) from exc
            if withdrawn:
                raise ApiError(
                    503,
                    "capture_unavailable",
                    f"no capture took the event within {within:g} s, so it was not sent:"
                    " is `ct1-cdc run --role capture` running? (docs/jetstream.md)",
                )
            event_id = await self._sent(request, TAKEN_WITHIN)  # taken: capture appends it
        if event_id is None:
            raise ApiError(
                503,
                "outbox_unavailable",
                f"capture took the event (request {request}) but this node's copy does not hold it"
                f" after {TAKEN_WITHIN:g} s more: it will be sent once, and /events lists it",
            )
        return event_id

    async def _cluster(self) -> JetStreamLog:
        """This node's connection to the cluster, for manual events (made at the first)."""
        from outbox.jetstream import events_log

        async with self._connecting:
            if self._events is None:
                events = events_log(self.settings)
                await events.connect()
                self._events = events
            return self._events

    def _later(self, work: Coroutine[Any, Any, Any]) -> None:
        """``work`` on its own (a withdrawal for a client that went); waited for at close."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("manual_event_not_withdrawn", error=str(task.exception()))

    async def _sent(self, request: str, within: float) -> int | None:
        """The id of request ``request``'s event once this node's copy holds it."""
        from outbox import jetstream_sends as sends

        deadline = time.monotonic() + within
        while True:
            found: int | None = await self.offload(lambda conn: sends.sent_event(conn, request))
            if found is not None or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(SEND_POLL)

    def _may_send(self, event_type: str, granted: frozenset[str]) -> None:
        """A type capture produces is sent by hand only with the permission made for it."""
        if event_type in self.captured_types and SEND_CAPTURED_TYPES not in granted:
            raise ApiError(
                403,
                "forbidden",
                f"{event_type} is a type capture produces: sending it needs the "
                f"{SEND_CAPTURED_TYPES} permission",
                "event",
            )

    def _route(self, event_type: str, systems: list[Any] | None) -> list[str]:
        """The endpoints a manual event goes to: the same routing as a captured one (enabled
        endpoints whose ``events`` globs accept the type); ``systems`` narrows it, and naming
        an endpoint that would not receive the type is an error, never a silent skip."""
        accepting = set(self.router.endpoints(event_type))
        if systems is None:
            if not accepting:
                raise ApiError(
                    422, "invalid_parameter", f"no enabled endpoint receives {event_type}", "event"
                )
            return sorted(accepting)
        names = sorted({self._endpoint(s, "systems").name for s in systems})
        for name in names:
            if name not in accepting:
                why = (
                    "is disabled"
                    if not self.endpoints[name].enabled
                    else f"does not receive {event_type} (its events filter refuses it)"
                )
                raise ApiError(422, "invalid_parameter", f"systems: endpoint {name} {why}", "systems")
        return names

    # -- GET /stats ------------------------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        await self.usage.flush()
        reported = await self._reported()
        data = await self.offload(lambda conn: self._stats(conn, reported))
        data["capture"].update(await self._slot())
        return _ok(data)

    def _stats(
        self, conn: sqlite3.Connection, reported: dict[str, list[dict[str, Any]]] | None = None
    ) -> dict[str, Any]:
        totals = store.stats(conn)
        if reported is not None:  # (JetStream: the deliveries as the dispatch nodes tell them)
            from outbox.jetstream_health import merged

            for name, counts in list(totals["deliveries"].items()) + [
                (n, {}) for n in reported if n not in totals["deliveries"]
            ]:
                row = merged({"dead": counts.get("dead", 0)}, reported.get(name, []))
                totals["deliveries"][name] = {k: row[k] for k in ("pending", "delivered", "dead") if row[k]}
        checkpoint = store.checkpoint_of(conn, self.settings.source.slot)
        usage: dict[str, Any] = {}
        for row in usage_per_route(conn):
            entry = usage.setdefault(row["key_id"], {"name": row["name"], "requests": 0, "routes": {}})
            entry["requests"] += row["requests"]
            entry["routes"][row["route"]] = {
                "requests": row["requests"],
                "last_used_at": optional_iso(row["last_used_at"]),
            }
        capture: dict[str, Any] = {
            "slot": self.settings.source.slot,
            "checkpoint_lsn": None if checkpoint is None else format_lsn(checkpoint[0]),
            "checkpoint_at": None if checkpoint is None else optional_iso(checkpoint[1]),
        }
        return {
            "events": {
                "total": totals["events"],
                "last_event_id": totals["last_event_id"],
                "by_type": totals["events_by_type"],
            },
            "deliveries": totals["deliveries"],
            "capture": capture,
            "api_usage": usage,
        }

    async def _slot(self) -> dict[str, Any]:
        """The slot's lag; unknown (with the cause) when the source is away."""
        status = await self.health.slot_status()
        status.pop("ok", None)
        return status


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps({"success": True, "data": data, "meta": {}}),
        status=status,
        content_type="application/json",
    )
