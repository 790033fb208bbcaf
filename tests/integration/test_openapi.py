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
from config import sample
from outbox import store
from tests.conftest import SourceDb, fresh_source_db, make_settings

schema = schemathesis.openapi.from_dict(openapi.document("test")).exclude(
    path_regex=r".*/events/stream$"  # an endless stream: covered by its own tests
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class Server:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, shutdown_timeout=1)
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
