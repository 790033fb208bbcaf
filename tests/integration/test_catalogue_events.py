"""The event catalogue as the API serves it: the schema routes."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from api import keys
from api.app import BASE, create_app
from cdc import catalogue
from config.settings import Settings
from outbox import store


async def _client(settings: Settings) -> tuple[TestClient, dict[str, str]]:
    conn = store.open_outbox(settings.outbox.path)
    export = keys.create(conn, "export", [keys.EXPORT], [])
    hooks = keys.create(conn, "hooks", [keys.WEBHOOKS], [])
    conn.close()
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client, {"export": export.key, "hooks": hooks.key}


async def test_schemas_are_served_to_export_keys(tmp_path):
    settings = Settings(outbox={"path": str(tmp_path / "o.db")})
    client, k = await _client(settings)
    try:
        export = {"Authorization": f"Bearer {k['export']}"}
        resp = await client.get(f"{BASE}/events/schemas", headers=export)
        body = await resp.json()
        assert resp.status == 200 and body["success"] is True
        assert [t["type"] for t in body["data"]] == list(catalogue.TYPES)
        analytics = next(t for t in body["data"] if t["type"] == "marketplace.analytics")
        assert analytics["default_endpoints"] == ["ct3"] and analytics["object"] == "analytics"
        assert body["meta"]["manual"] == f"{BASE}/events/schemas/manual"
        for entry in body["data"]:
            resp = await client.get(entry["url"], headers=export)
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.json() == catalogue.schema(entry["type"])
            assert entry["description"] == catalogue.schema(entry["type"])["description"]
        resp = await client.get(body["meta"]["envelope"], headers=export)
        assert (await resp.json())["title"] == "captured event"

        resp = await client.get(f"{BASE}/events/schemas/order.shipped", headers=export)
        body = await resp.json()
        assert resp.status == 404 and body["success"] is False
        assert body["error"]["code"] == "not_found" and body["error"]["field"] == "type"

        for path in ("/events/schemas", "/events/schemas/order.created"):
            resp = await client.get(f"{BASE}{path}")
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
            resp = await client.get(f"{BASE}{path}", headers={"X-API-Key": k["hooks"]})
            assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    finally:
        await client.close()
