"""The HTTP API: key authentication and limits, the routes (events, exports, webhooks,
stats), health and metrics, and what the app owns while it runs (the outbox readers, its
one outbox writer, the source health check).

One middleware turns every error into the JSON error body; handlers raise
:class:`ApiError` (or aiohttp's HTTP exceptions) and never format errors themselves.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api import openapi
from api.cache import ExportCache
from api.errors import ApiError
from api.events import Events, Feed
from api.exports import Exports
from api.filters import LISTS
from api.health import SourceHealth
from api.keys import EXPORT, WEBHOOKS, hash_key
from api.limits import RateLimiter, Usage
from api.openapi import BASE
from api.reads import Reads
from api.schemas import Schemas
from api.webhooks import GRANTED, Webhooks
from api.writer import ApiWriter
from cdc.mapping import Mapping, load_mapping
from common.jsontext import dumps as json_bytes
from common.metrics import API_REQUESTS, CAPTURE_LAG, REGISTRY, SLOT_LOST, OutboxCollector
from common.version import version
from config.settings import Settings
from outbox import keys, source_state, store
from outbox.figures import figures

FEED: web.AppKey[Feed] = web.AppKey("feed", Feed)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
EVENT_READ_THREADS = 2
KEY_CACHE_SECONDS = 1.0  # a key is looked up at most this often; revocation takes this long


@dataclass(frozen=True, slots=True)
class Caller:
    key_id: str
    permissions: frozenset[str]
    key: str = field(repr=False)  # kept to check the key again while a stream is open
    permission: str  # the one this request needed


CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)
MAX_KEY_LENGTH = 256  # ours are 47 characters


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json_bytes(body), status=status, content_type="application/json")


def _error_body(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    return _json(ApiError(status, code, message, field).body(), status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await _answer(request, handler)
    resource = request.match_info.route.resource
    API_REQUESTS.labels(resource.canonical if resource is not None else "unmatched", response.status).inc()
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = _error_body(exc.status, exc.code, exc.message, exc.field)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status, "bad_request"
        )
        return _error_body(exc.status, code, exc.reason)
    except Exception:  # a bug: logged by aiohttp, never a stack trace in the response
        request.app.logger.exception("unhandled error")
        return _error_body(500, "internal_error", "internal error")


class Api:
    def __init__(self, settings: Settings, exports: Exports) -> None:
        self.settings = settings
        self.conn: sqlite3.Connection | None = None
        cfg = settings.api
        self.limiter = RateLimiter(cfg.rate_limit_per_minute, cfg.rate_limit_burst)
        # requests without a valid key, per client address: guessing and log floods end in 429s
        self.failures = RateLimiter(cfg.rate_limit_per_minute, cfg.rate_limit_burst)
        self.writer = ApiWriter(settings)  # the process's one outbox writer
        self.usage = Usage(self.writer.record_usage)
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in cfg.trusted_proxies]
        self._keys: dict[str, tuple[float, tuple[str, frozenset[str], list[IPNetwork]] | None]] = {}
        self.exports = exports
        self.health = SourceHealth(cfg.export_dsn or settings.source.dsn, settings.source.slot)
        # reads that walk whole tables (status, stats, metrics) run here, off the loop
        self._slow = Reads(settings.outbox.path, 1, "api-read")
        # the events cursor's reads: a thread each for a few at once, none on the loop
        self.event_reads = Reads(settings.outbox.path, EVENT_READ_THREADS, "api-events")
        self.scraped = CollectorRegistry(auto_describe=False)
        slot = settings.source.slot
        self.scraped.register(OutboxCollector(lambda: figures(self._slow.conn(), slot)))

    def db(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = store.connect(self.settings.outbox.path, readonly=True)
        return self.conn

    async def offload(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` with a connection of its own on the API's read thread."""
        return await self._slow.run(fn)

    async def close(self) -> None:
        await asyncio.to_thread(self._slow.close)
        await asyncio.to_thread(self.event_reads.close)
        await self.health.close()
        if self.conn is not None:
            self.conn.close()

    # -- auth --------------------------------------------------------------------------------

    def authenticate(self, request: web.Request, permission: str) -> Caller:
        """The caller of ``request``, allowed ``permission``, within its rate limit; kept
        on the request for :meth:`recheck`.  Failed attempts are limited per address."""
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("X-API-Key")
        try:
            caller = self._authorize(request, key, permission)
        except ApiError as exc:
            if exc.status == 401:
                wait = self.failures.allow(str(self.client_address(request)))
                if wait:
                    raise ApiError(
                        429, "rate_limited", f"too many failed attempts; retry in {wait} s", retry_after=wait
                    ) from None
            raise
        wait = self.limiter.allow(caller.key_id)
        if wait:
            raise ApiError(
                429, "rate_limited", f"rate limit of this key reached; retry in {wait} s", retry_after=wait
            )
        resource = request.match_info.route.resource
        self.usage.count(caller.key_id, resource.canonical if resource is not None else request.path)
        request[CALLER] = caller
        return caller

    def recheck(self, request: web.Request) -> None:
        """Raise the error a new request of this caller would get now: open streams and
        long polls end within :data:`KEY_CACHE_SECONDS` of a revocation or a change of the
        key's permissions or addresses."""
        caller: Caller = request[CALLER]
        self._authorize(request, caller.key, caller.permission)

    def _authorize(self, request: web.Request, key: str | None, permission: str) -> Caller:
        if not key:
            raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer <key>)")
        if len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            raise ApiError(401, "unauthorized", "the API key is malformed")
        known = self._known_key(key)
        if known is None:
            raise ApiError(401, "unauthorized", "unknown or revoked API key")
        key_id, granted, networks = known
        if permission not in granted:
            raise ApiError(403, "forbidden", f"this key lacks the {permission} permission")
        if networks:
            address = self.client_address(request)
            if address is None or not any(address in n for n in networks):
                raise ApiError(403, "forbidden", "client address not allowed for this key")
        return Caller(key_id, granted, key, permission)

    def _known_key(self, key: str) -> tuple[str, frozenset[str], list[IPNetwork]] | None:
        """The key's id, permissions and networks; None for an unknown or revoked key.
        Looked up at most once a second per key: a revocation takes effect within
        :data:`KEY_CACHE_SECONDS`."""
        now = time.monotonic()
        hit = self._keys.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        stored = keys.find(self.db(), hash_key(key))
        known = None
        if stored is not None and stored.revoked_at is None:
            networks = [ipaddress.ip_network(n, strict=False) for n in stored.allow_ips]
            known = (stored.id, frozenset(stored.permissions), networks)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key] = (now + KEY_CACHE_SECONDS, known)
        return known

    def client_address(self, request: web.Request) -> IPAddress | None:
        """The socket's peer; behind a trusted proxy, the last address in X-Forwarded-For
        that is not itself a trusted proxy."""
        try:
            address: IPAddress = ipaddress.ip_address(request.remote or "")
        except ValueError:
            return None
        if not self.proxies or not any(address in p for p in self.proxies):
            return address
        hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
        for hop in reversed(hops):
            try:
                address = ipaddress.ip_address(hop)
            except ValueError:
                return None  # a malformed chain proves nothing
            if not any(address in p for p in self.proxies):
                return address
        return address

    # -- handlers ----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when the source answers, the slot is healthy and the outbox is writable;
        ``degraded`` (still 200) while capture reports mapping rules broken by DDL.
        Answers within about a second whatever the source does (:mod:`api.health`)."""
        (source, slot), outbox = await asyncio.gather(self.health.check(), self.writer.check())
        checks = {"source": dict(source), "slot": dict(slot), "outbox": outbox}
        ready = all(c["ok"] for c in checks.values())
        # Rules that capture found broken (DDL while running): the process still serves and
        # captures everything else, so it stays ready, but says so ("degraded").
        problems = await asyncio.to_thread(self._mapping_problems)
        checks["mapping"] = {"ok": not problems, "problems": problems}
        status = "not_ready" if not ready else "degraded" if problems else "ready"
        return _json({"status": status, "checks": checks}, 200 if ready else 503)

    def _mapping_problems(self) -> list[dict[str, Any]]:
        """What capture stored (a connection of its own: never queued behind /metrics)."""
        try:
            conn = store.connect(self.settings.outbox.path, readonly=True)
        except store.OutboxError:
            return []
        try:
            return source_state.problems_of(conn)
        finally:
            conn.close()

    async def metrics(self, request: web.Request) -> web.Response:
        slot = await self.health.slot_status()
        if slot.get("lag_bytes") is not None:
            CAPTURE_LAG.set(slot["lag_bytes"])
        SLOT_LOST.set(1 if slot.get("wal_status") == "lost" else 0)
        body = await self.offload(lambda _: generate_latest(REGISTRY) + generate_latest(self.scraped))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def excluded_columns(mapping: Mapping) -> frozenset[str]:
    """Every column any rule excludes: none of them appears in any export, at any depth."""
    return frozenset().union(*(rule.exclude for rule in mapping.rules))


def create_app(settings: Settings, mapping: Mapping | None = None) -> web.Application:
    mapping = mapping or load_mapping(settings.mapping.file)
    exports = Exports(settings, excluded_columns(mapping))
    api = Api(settings, exports)
    exports.cache = ExportCache(api.db)
    exports.offload = api.offload  # the status history of an order, read off the loop
    feed = Feed(api.db)
    webhooks = Webhooks(settings, api.db, api.offload, api.writer, api.usage, api.health, mapping.event_types)
    events = Events(api.db, api.event_reads, feed, api.recheck)
    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app[FEED] = feed

    def guarded(handler: Handler, permission: str) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            request[GRANTED] = api.authenticate(request, permission).permissions
            return await handler(request)

        return checked

    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    document = orjson.dumps(openapi.document(version()))

    async def openapi_json(_: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get(f"{BASE}/events", guarded(events.events, EXPORT))
    app.router.add_get(f"{BASE}/events/stream", guarded(events.stream, EXPORT))
    schemas = Schemas()
    app.router.add_get(f"{BASE}/events/schemas", guarded(schemas.listing, EXPORT))
    app.router.add_get(f"{BASE}/events/schemas/{{type}}", guarded(schemas.one, EXPORT))
    for name, spec in LISTS.items():
        app.router.add_get(f"{BASE}/{name}", guarded(functools.partial(exports.listing, spec=spec), EXPORT))
    app.router.add_get(f"{BASE}/customers/{{id}}", guarded(exports.customer, EXPORT))
    app.router.add_get(f"{BASE}/orders/{{id}}", guarded(exports.order, EXPORT))
    app.router.add_get(f"{BASE}/products/{{id}}", guarded(exports.product, EXPORT))
    app.router.add_get(f"{BASE}/analytics", guarded(exports.analytics, EXPORT))
    app.router.add_post(f"{BASE}/webhooks/test", guarded(webhooks.test, WEBHOOKS))
    app.router.add_get(f"{BASE}/webhooks/status", guarded(webhooks.status, WEBHOOKS))
    app.router.add_post(f"{BASE}/webhooks/send", guarded(webhooks.send, WEBHOOKS))
    app.router.add_get(f"{BASE}/stats", guarded(webhooks.stats, WEBHOOKS))

    async def start(_: web.Application) -> None:
        feed.bind()
        await api.writer.open()
        api.usage.start()
        await exports.open()

    async def shutdown(_: web.Application) -> None:
        await feed.close()  # ends long polls and event streams

    async def close(_: web.Application) -> None:
        await webhooks.close()
        await exports.close()
        await api.usage.close()  # the last counters, through the writer
        await api.writer.close()
        await api.close()

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(close)
    return app
