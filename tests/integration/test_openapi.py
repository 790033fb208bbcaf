"""The OpenAPI document against the running API: schemathesis generates requests from
it (with a valid key) against a real server on loopback, over a real Postgres holding
the sample marketplace; no answer may be a 5xx, and every answer must conform."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import keys, openapi
from api.app import create_app
from api.server import ApiRunner
from outbox import store
from sidecar import sample
from tests.conftest import SourceDb, fresh_source_db, make_settings

STREAM = r".*/events/stream$"  # endless: driven by its own test, which reads its first bytes
whole = schemathesis.openapi.from_dict(openapi.document("test"))
schema = whole.exclude(path_regex=STREAM)
stream_schema = whole.include(path_regex=STREAM)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class Server:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.runner = ApiRunner(app, shutdown_timeout=1)  # as `ct1-cdc run` serves it
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with fresh_source_db(pg_server) as db:
        with db.connect() as conn:
            sample.generate(
                conn, seed=5, volume=sample.Volume(customers=30, products=20, orders=60, reviews=30)
            )
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (db.slot,))
        yield from serve_api(db, tmp_path_factory)


def serve_api(db: SourceDb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp: Path = tmp_path_factory.mktemp("openapi")
    settings = make_settings(db, tmp / "outbox.db", api={"rate_limit_per_minute": 0})
    conn = store.open_outbox(settings.outbox.path)
    key = keys.create(conn, "schemathesis", [keys.EXPORT, keys.WEBHOOKS], []).key
    conn.close()
    server = Server(create_app(settings))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", key
    finally:
        server.stop()


def test_the_served_document_is_the_one_tested(served):
    base, _ = served
    served_doc = requests.get(f"{base}/openapi.json", timeout=10).json()
    assert served_doc["paths"].keys() == openapi.document("x")["paths"].keys()


def test_every_route_is_documented(tmp_path):
    from config.settings import Settings

    app = create_app(Settings(outbox={"path": str(tmp_path / "o.db")}))
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(m, p) for p, ops in openapi.document("x")["paths"].items() for m in ops}
    assert routes == documented


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case: Any, served: tuple[str, str]) -> None:
    base, key = served
    if case.query and "wait" in case.query:
        case.query["wait"] = 0  # a long poll is covered elsewhere; here only its answer
    case.call_and_validate(base_url=base, headers={"X-API-Key": key}, checks=CHECKS, timeout=30)


@stream_schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_event_stream_answers_every_generated_request(case: Any, served: tuple[str, str]) -> None:
    """The SSE stream under generated parameters: never a 5xx; a 200 is an event stream
    that opens with its retry hint; anything else is the documented JSON error."""
    base, key = served
    kwargs = case.as_transport_kwargs(base_url=base, headers={"X-API-Key": key})
    with requests.request(**kwargs, stream=True, timeout=30) as response:
        assert response.status_code < 500, response.text
        if response.status_code == 200:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert response.raw.read(6) == b"retry:"
        else:
            assert response.json()["error"]["code"]


def operations() -> list[tuple[str, str]]:
    return [(m.upper(), p) for p, ops in openapi.document("x")["paths"].items() for m in ops]


def labels(s: Any) -> set[str]:
    return {result.ok().label for result in s.get_all_operations()}


def test_every_documented_operation_is_driven():
    """No operation escapes generated requests: each is in the conformance run or the
    stream run, and the hostile-header run walks the same list."""
    documented = {f"{m} {p}" for m, p in operations()}
    assert len(documented) >= 18
    assert labels(schema) | labels(stream_schema) == documented
    assert not labels(schema) & labels(stream_schema)


# Headers a scanner or a broken proxy sends. Raw bytes, since an HTTP library would refuse
# most of them; each is sent alone and beside a valid key, so both the unauthenticated
# path and the handlers behind authentication see it.
HOSTILE: list[tuple[str, list[bytes]]] = [
    ("non-UTF-8 Authorization", [b"Authorization: Bearer \xff\xfe\xc3\x28"]),
    ("non-UTF-8 X-API-Key", [b"X-API-Key: ct1_\xff\xfe\x80"]),
    ("8 KB X-API-Key", [b"X-API-Key: " + b"k" * 8192]),
    ("8 KB Authorization", [b"Authorization: Bearer " + b"a" * 8192]),
    ("control characters", [b"X-API-Key: ct1\x01\x02\x1b[31m\x7f", b"Authorization: \x00\x08Bearer"]),
    ("50 X-API-Key headers", [b"X-API-Key: ct1_" + str(i).encode() for i in range(50)]),
    ("garbage X-Forwarded-For", [b"X-Forwarded-For: ::::, 999.1.1.1, \xff, <script>, , 127.0.0.1\x00"]),
    ("8 KB X-Forwarded-For", [b"X-Forwarded-For: " + b"1.2.3.4, " * 900]),
    ("negative Last-Event-ID", [b"Last-Event-ID: -1"]),
    ("huge Last-Event-ID", [b"Last-Event-ID: " + b"9" * 60]),
    ("non-UTF-8 Last-Event-ID", [b"Last-Event-ID: \xff\xfe"]),
    ("text Last-Event-ID", [b"Last-Event-ID: 1; DROP TABLE events --"]),
    ("8 KB Last-Event-ID", [b"Last-Event-ID: " + b"1" * 8192]),
]


def raw_request(port: int, method: str, path: str, headers: list[bytes], body: bytes) -> tuple[int, bytes]:
    """One request over a plain socket; the status and the first bytes of the body (an
    open stream is cut after its first chunk)."""
    head = [f"{method} {path} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode(), b"Connection: close"]
    if body:
        head += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"\r\n".join(head + headers) + b"\r\n\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < 6:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1."), received[:200]  # 1.0 for what aiohttp refuses
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("name,headers", HOSTILE, ids=[name for name, _ in HOSTILE])
def test_hostile_headers_never_answer_5xx(served, name, headers):
    base, key = served
    port = int(base.rsplit(":", 1)[1])
    seen: dict[str, int] = {}
    for method, path in operations():
        target = path.replace("{id}", "1")
        body = b'{"event_type": "order.created", "data": {}}' if method == "POST" else b""
        for extra in ([], [f"X-API-Key: {key}".encode()]):
            if extra and any(h.lower().startswith((b"x-api-key", b"authorization")) for h in headers):
                extra = []  # the hostile header is itself the credential
            status, first = raw_request(port, method, target, extra + headers, body)
            assert status < 500, (name, method, path, status, first[:300])
            if status >= 400:
                assert first.lstrip().startswith(b"{"), (name, method, path, status, first[:300])
            seen[f"{method} {path}"] = status
    assert len(seen) == len(operations())
    status, _ = raw_request(port, "GET", "/healthz", [], b"")
    assert status == 200
