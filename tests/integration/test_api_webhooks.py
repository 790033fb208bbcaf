"""Webhook management and statistics over HTTP, with real receivers on loopback that
verify every signature with the official standardwebhooks package."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api import keys
from api.app import BASE, create_app
from cdc.mapping import parse_mapping
from config.settings import CT2_EVENTS, Settings
from dispatcher.worker import Dispatcher
from outbox import store
from tests.integration.test_dispatch import FAST, SECRET, Receiver, run_until
from tests.outbox_helpers import append_events


def settings_for(tmp_path: Path, ct2: str, ct3: str) -> Settings:
    return Settings(
        outbox={"path": str(tmp_path / "o.db")},
        source={"dsn": "host=127.0.0.1 port=1 dbname=none connect_timeout=1"},
        api={"pool_timeout_seconds": 1},
        dispatcher={"retry_schedule": FAST, "timeout_seconds": 2},
        endpoints=[
            {"name": "ct2", "url": ct2, "secret": SECRET, "events": ["*"]},
            {"name": "ct3", "url": ct3, "secret": SECRET, "events": ["*"]},
        ],
    )


async def client_for(settings: Settings) -> tuple[TestClient, dict[str, str]]:
    conn = store.open_outbox(settings.outbox.path)
    hooks = keys.create(conn, "ops", [keys.WEBHOOKS], [])
    export = keys.create(conn, "reader", [keys.EXPORT], [])
    conn.close()
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client, {"X-API-Key": hooks.key, "export": export.key}


async def failing(_: web.Request, __: int) -> web.StreamResponse:
    return web.Response(status=500, text="down for maintenance")


async def test_test_webhook_reports_the_receivers_answer(tmp_path):
    async with Receiver() as ok, Receiver(failing) as down:
        client, auth = await client_for(settings_for(tmp_path, ok.url, down.url))
        try:
            resp = await client.post(f"{BASE}/webhooks/test", json={"system": "ct2"}, headers=auth)
            body = await resp.json()
            assert resp.status == 200 and body["data"]["delivered"] is True and body["data"]["status"] == 200
            assert body["data"]["latency_ms"] >= 0
            (got,) = ok.received  # verified with the standardwebhooks package
            assert got.envelope["type"] == "webhook.test" and got.envelope["data"]["system"] == "ct2"
            assert got.headers["webhook-id"] == body["data"]["webhook_id"]
            resp = await client.post(f"{BASE}/webhooks/test", json={"system": "ct3"}, headers=auth)
            body = await resp.json()
            assert body["data"]["delivered"] is False and body["data"]["status"] == 500
            assert body["data"]["error"] == "HTTP 500"
        finally:
            await client.close()


async def test_management_input_errors_are_clear_4xx(tmp_path):
    client, auth = await client_for(settings_for(tmp_path, "http://127.0.0.1:1/a", "http://127.0.0.1:1/b"))
    api_key = {"X-API-Key": auth["X-API-Key"]}
    try:
        cases: list[tuple[str, Any, int, str | None]] = [
            ("/webhooks/test", b"{not json", 400, None),
            ("/webhooks/test", b"[1, 2]", 400, None),
            ("/webhooks/test", {}, 422, "system"),
            ("/webhooks/test", {"system": "ct9"}, 422, "system"),
            ("/webhooks/send", {"event": "Bad Type", "data": {}}, 422, "event"),
            ("/webhooks/send", {"event": "note.added", "data": [1]}, 422, "data"),
            ("/webhooks/send", {"event": "note.added", "data": {}, "systems": []}, 422, "systems"),
            ("/webhooks/send", {"event": "note.added", "data": {}, "systems": ["ct9"]}, 422, "systems"),
        ]
        for path, payload, status, field in cases:
            if isinstance(payload, bytes):
                resp = await client.post(f"{BASE}{path}", data=payload, headers=api_key)
            else:
                resp = await client.post(f"{BASE}{path}", json=payload, headers=api_key)
            body = await resp.json()
            assert resp.status == status and body["success"] is False, (path, payload, body)
            assert body["error"].get("field") == field
        resp = await client.post(
            f"{BASE}/webhooks/send",
            json={"event": "note.added", "data": {"blob": "x" * 70_000}},
            headers=api_key,
        )
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"
        resp = await client.get(f"{BASE}/webhooks/status", headers={"X-API-Key": auth["export"]})
        assert resp.status == 403
        # the source is unreachable: stats still answer, with the slot's lag unknown
        resp = await client.get(f"{BASE}/stats", headers=api_key)
        body = await resp.json()
        assert resp.status == 200 and body["data"]["capture"]["lag_bytes"] is None
        assert "unavailable" in body["data"]["capture"]["error"]
    finally:
        await client.close()


async def test_sent_events_are_delivered_and_show_in_status_and_stats(tmp_path):
    async with Receiver() as ct2, Receiver(failing) as ct3:
        settings = settings_for(tmp_path, ct2.url, ct3.url)
        append_events(settings.outbox.path, ["ct2", "ct3"], [("order.created", "order", 1)])
        client, auth = await client_for(settings)
        api_key = {"X-API-Key": auth["X-API-Key"]}
        try:
            resp = await client.post(
                f"{BASE}/webhooks/send",
                json={
                    "event": "seller.note_added",
                    "data": {"note": "Zoë ✓", "amount": "1.10"},
                    "systems": ["ct2"],
                },
                headers=api_key,
            )
            body = await resp.json()
            assert resp.status == 201 and body["data"] == {
                "id": 2,
                "event": "seller.note_added",
                "systems": ["ct2"],
            }
            await run_until(Dispatcher(settings), lambda: len(ct2.received) == 2 and ct3.calls >= 2)
            manual = ct2.received[1].envelope
            assert manual["id"] == 2 and manual["type"] == "seller.note_added"
            assert manual["data"] == {"note": "Zoë ✓", "amount": "1.10"}
            assert ct2.received[1].headers["webhook-id"] == "evt_2"

            resp = await client.get(f"{BASE}/webhooks/status", headers=api_key)
            status = {s["system"]: s for s in (await resp.json())["data"]}
            assert status["ct2"]["delivered"] == 2 and status["ct2"]["pending"] == 0
            assert status["ct2"]["success_rate_1h"] == 1.0 and status["ct2"]["last_attempt"]["status"] == 200
            assert status["ct3"]["pending"] + status["ct3"]["dead"] == 1  # the manual event went to ct2 only
            assert status["ct3"]["success_rate_24h"] == 0.0 and status["ct3"]["last_attempt"]["status"] == 500
            assert "secret" not in str(status)

            resp = await client.get(f"{BASE}/stats", headers=api_key)
            stats = (await resp.json())["data"]
            assert stats["events"]["by_type"] == {"order.created": 1, "seller.note_added": 1}
            assert stats["deliveries"]["ct2"] == {"delivered": 2}
            routes = next(iter(stats["api_usage"].values()))["routes"]
            assert routes[f"{BASE}/webhooks/send"]["requests"] == 1
            assert routes[f"{BASE}/webhooks/status"]["requests"] == 1
        finally:
            await client.close()


async def test_the_api_writes_through_one_connection(tmp_path, monkeypatch):
    """Manual events, usage counters and the readiness check share the app's one outbox
    writer: one write connection for the API's life, opened at start, closed at cleanup."""
    settings = settings_for(tmp_path, "http://127.0.0.1:1/a", "http://127.0.0.1:1/b")
    client, api_key = await client_for(settings)  # the keys are made before the spy
    opened: list[Any] = []
    real_connect = store.connect

    def connect(path: Any, *, readonly: bool = False) -> Any:
        conn = real_connect(path, readonly=readonly)
        if not readonly:
            opened.append(conn)
        return conn

    monkeypatch.setattr(store, "connect", connect)
    await client.close()
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        assert len(opened) == 1  # opened when the app starts
        for n in (1, 2):
            body = {"event": "seller.note_added", "data": {"n": n}, "systems": ["ct2"]}
            resp = await client.post(f"{BASE}/webhooks/send", json=body, headers=api_key)
            assert resp.status == 201 and (await resp.json())["data"]["id"] == n
        assert (await (await client.get("/readyz")).json())["checks"]["outbox"] == {"ok": True}
        stats = (await (await client.get(f"{BASE}/stats", headers=api_key)).json())["data"]
        assert next(iter(stats["api_usage"].values()))["routes"][f"{BASE}/webhooks/send"]["requests"] == 2
    finally:
        await client.close()
    assert len(opened) == 1
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].execute("SELECT 1")  # closed at cleanup


async def test_readyz_names_what_is_not_ready_when_the_source_is_away(tmp_path):
    client, _ = await client_for(settings_for(tmp_path, "http://127.0.0.1:1/a", "http://127.0.0.1:1/b"))
    try:
        resp = await client.get("/readyz")
        body = await resp.json()
        assert resp.status == 503 and body["status"] == "not_ready"
        assert body["checks"]["source"]["ok"] is False and "unavailable" in body["checks"]["source"]["error"]
        assert body["checks"]["outbox"] == {"ok": True}
    finally:
        await client.close()


async def test_metrics_count_deliveries_and_attempts(tmp_path):
    async with Receiver() as ct2, Receiver(failing) as ct3:
        settings = settings_for(tmp_path, ct2.url, ct3.url)
        append_events(
            settings.outbox.path,
            ["ct2", "ct3"],
            [("order.created", "order", 1), ("order.updated", "order", 1)],
        )
        await run_until(Dispatcher(settings), lambda: len(ct2.received) == 2 and ct3.calls >= 1)
        client, _ = await client_for(settings)
        try:
            text = await (await client.get("/metrics")).text()
            assert 'ct1_cdc_deliveries{endpoint="ct2",status="delivered"} 2.0' in text
            assert 'ct1_cdc_outbox_events{type="order.created"} 1.0' in text
            assert 'ct1_cdc_delivery_attempts_total{endpoint="ct2",outcome="delivered"}' in text
            assert 'ct1_cdc_delivery_attempt_seconds_bucket{endpoint="ct3"' in text
            assert 'ct1_cdc_events_appended_total{type="order.updated"}' in text
        finally:
            await client.close()


def routed_settings(tmp_path: Path) -> Settings:
    """The default routing: ct2 gets every documented type but marketplace.analytics."""
    return Settings(
        outbox={"path": str(tmp_path / "o.db")},
        source={"dsn": "host=127.0.0.1 port=1 dbname=none connect_timeout=1"},
        endpoints=[
            {"name": "ct2", "url": "http://127.0.0.1:1/a", "secret": SECRET, "events": CT2_EVENTS},
            {"name": "ct3", "url": "http://127.0.0.1:1/b", "secret": SECRET, "events": ["*"]},
            {"name": "off", "url": "http://127.0.0.1:1/c", "secret": SECRET, "enabled": False},
        ],
    )


async def test_sent_events_obey_the_endpoints_event_filters(tmp_path):
    settings = routed_settings(tmp_path)
    conn = store.open_outbox(settings.outbox.path)
    plain = keys.create(conn, "ops", [keys.WEBHOOKS], [])
    captured = keys.create(conn, "ops+", [keys.WEBHOOKS, keys.SEND_CAPTURED_TYPES], [])
    conn.close()
    mapping = parse_mapping(
        '[[rule]]\ntable = "public.audit"\non = ["insert"]\nemit = "audit.logged"\nobject = "audit"\nkey = "id"\n'
    )
    client = TestClient(TestServer(create_app(settings, mapping)))
    await client.start_server()

    async def send(key: keys.NewKey, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        resp = await client.post(f"{BASE}/webhooks/send", json=body, headers={"X-API-Key": key.key})
        return resp.status, await resp.json()

    def routed(event_id: int) -> list[str]:
        conn = store.connect(settings.outbox.path, readonly=True)
        try:
            return sorted(d["endpoint"] for d in store.event_deliveries(conn, event_id))
        finally:
            conn.close()

    try:
        # without systems: every enabled endpoint whose filter accepts the type
        status, body = await send(plain, {"event": "cart.note_added", "data": {}})
        assert status == 201 and body["data"]["systems"] == ["ct2", "ct3"]
        assert routed(body["data"]["id"]) == ["ct2", "ct3"]
        status, body = await send(plain, {"event": "seller.note_added", "data": {}})
        assert status == 201 and body["data"]["systems"] == ["ct3"]
        assert routed(body["data"]["id"]) == ["ct3"]
        # the fault: marketplace.analytics reached ct2 (with the permission a key may send it)
        status, body = await send(captured, {"event": "marketplace.analytics", "data": {}})
        assert status == 201 and body["data"]["systems"] == ["ct3"]
        assert routed(body["data"]["id"]) == ["ct3"]
        # naming a system whose filter refuses the type, or a disabled one, is a 422
        for systems in (["ct2"], ["ct2", "ct3"], ["off"]):
            status, body = await send(
                captured, {"event": "marketplace.analytics", "data": {}, "systems": systems}
            )
            assert status == 422 and body["error"]["field"] == "systems", systems
        status, body = await send(plain, {"event": "seller.note_added", "data": {}, "systems": ["ct3"]})
        assert status == 201 and routed(body["data"]["id"]) == ["ct3"]
        # types only capture produces need a permission made for it
        for event in ("order.created", "marketplace.analytics", "webhook.test", "audit.logged"):
            status, body = await send(plain, {"event": event, "data": {}})
            assert status == 403 and body["error"]["field"] == "event", event
            assert keys.SEND_CAPTURED_TYPES in body["error"]["message"]
        status, body = await send(captured, {"event": "order.created", "data": {}, "systems": ["ct2"]})
        assert status == 201 and routed(body["data"]["id"]) == ["ct2"]
        # the envelope tells a manual event apart: source.op is "manual"
        conn = store.connect(settings.outbox.path, readonly=True)
        try:
            row = store.get_event(conn, body["data"]["id"])
            assert row is not None
            envelope = json.loads(store.envelope_json(row))
        finally:
            conn.close()
        assert envelope["source"] == {"table": None, "op": "manual", "lsn": None, "xid": None}
    finally:
        await client.close()


async def test_sent_events_share_one_outbox_connection(tmp_path, monkeypatch):
    settings = routed_settings(tmp_path)
    client, auth = await client_for(settings)
    migrations = []
    real = store.migrate
    monkeypatch.setattr(store, "migrate", lambda conn: migrations.append(1) or real(conn))
    try:
        for n in range(5):
            resp = await client.post(
                f"{BASE}/webhooks/send",
                json={"event": "seller.note_added", "data": {"n": n}},
                headers={"X-API-Key": auth["X-API-Key"]},
            )
            assert resp.status == 201
        assert len(migrations) <= 1  # opened (and migrated) once, not per request
    finally:
        await client.close()
    conn = store.connect(settings.outbox.path, readonly=True)
    try:
        assert [r[0] for r in conn.execute("SELECT id FROM events ORDER BY id")] == [1, 2, 3, 4, 5]
    finally:
        conn.close()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A loopback port that accepts TCP connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()


@pytest.mark.parametrize("how", ["refused", "silent"])
async def test_health_answers_within_a_second_or_so_while_the_source_is_down(tmp_path, silent_port, how):
    port = 1 if how == "refused" else silent_port
    settings = Settings(
        outbox={"path": str(tmp_path / "o.db")},
        source={"dsn": f"host=127.0.0.1 port={port} dbname=none user=none"},  # pool_timeout 5 s
        endpoints=[{"name": "ct2", "url": "http://127.0.0.1:1/a", "secret": SECRET}],
    )
    client, auth = await client_for(settings)
    try:
        for path in ("/readyz", "/metrics", f"{BASE}/stats", "/readyz"):
            started = time.monotonic()
            resp = await client.get(path, headers={"X-API-Key": auth["X-API-Key"]})
            elapsed = time.monotonic() - started
            assert elapsed < 3, (path, elapsed)  # 10 s (readyz) and 5 s before: generous bound
            if path == "/readyz":
                body = await resp.json()
                assert resp.status == 503 and body["checks"]["source"]["ok"] is False
                assert "unavailable" in body["checks"]["source"]["error"]
                assert body["checks"]["slot"]["ok"] is False and body["checks"]["slot"]["error"]
            elif path.endswith("/stats"):
                capture = (await resp.json())["data"]["capture"]
                assert resp.status == 200 and capture["lag_bytes"] is None and capture["error"]
            else:
                assert resp.status == 200
    finally:
        await client.close()
