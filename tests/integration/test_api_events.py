"""The events cursor over HTTP, in-process with aiohttp's test client and a real outbox."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api import keys
from api.app import BASE, create_app
from config.settings import Settings
from outbox import store
from tests.outbox_helpers import append_events


@pytest.fixture
async def setup(tmp_path: Path):
    settings = Settings(outbox={"path": str(tmp_path / "o.db")})
    append_events(
        settings.outbox.path,
        ["ct2"],
        [
            ("order.created", "order", 1),
            ("customer.created", "customer", 2),
            ("order.status_changed", "order", 1),
            ("review.created", "review", 3),
        ],
    )
    conn = store.open_outbox(settings.outbox.path)
    export = keys.create(conn, "export", [keys.EXPORT], [])
    hooks_only = keys.create(conn, "hooks", [keys.WEBHOOKS], [])
    fenced = keys.create(conn, "fenced", [keys.EXPORT], ["10.0.0.0/8"])
    revoked = keys.create(conn, "old", [keys.EXPORT], [])
    keys.revoke(conn, revoked.id)
    conn.close()
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield (
        client,
        {"export": export.key, "hooks": hooks_only.key, "fenced": fenced.key, "revoked": revoked.key},
    )
    await client.close()


async def test_events_page_by_cursor_and_filter_by_type(setup):
    client, k = setup
    auth = {"Authorization": f"Bearer {k['export']}"}
    resp = await client.get(f"{BASE}/events", params={"limit": "2"}, headers=auth)
    body = await resp.json()
    assert resp.status == 200 and body["success"] is True
    assert [e["id"] for e in body["data"]] == [1, 2]
    assert body["meta"]["last_event_id"] == 2
    resp = await client.get(
        f"{BASE}/events", params={"last_event_id": "2"}, headers={"X-API-Key": k["export"]}
    )
    assert [e["id"] for e in (await resp.json())["data"]] == [3, 4]
    resp = await client.get(
        f"{BASE}/events", params=[("event_types", "order.*"), ("event_types", "review.created")], headers=auth
    )
    assert [e["type"] for e in (await resp.json())["data"]] == [
        "order.created",
        "order.status_changed",
        "review.created",
    ]
    resp = await client.get(f"{BASE}/events", params={"last_event_id": "4"}, headers=auth)
    body = await resp.json()
    assert body["data"] == [] and body["meta"]["last_event_id"] == 4


@pytest.mark.parametrize(
    ("key", "status", "code"),
    [
        (None, 401, "unauthorized"),
        ("ct1_nonsense", 401, "unauthorized"),
        ("revoked", 401, "unauthorized"),
        ("hooks", 403, "forbidden"),
        ("fenced", 403, "forbidden"),
    ],
)
async def test_auth_matrix(setup, key, status, code):
    client, k = setup
    headers = {} if key is None else {"Authorization": f"Bearer {k.get(key, key)}"}
    resp = await client.get(f"{BASE}/events", headers=headers)
    body = await resp.json()
    assert resp.status == status and body == {"success": False, "error": body["error"]}
    assert body["error"]["code"] == code


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"last_event_id": "-1"}, "last_event_id"),
        ({"event_types": "order;drop"}, "event_types"),
    ],
)
async def test_bad_parameters_are_422_with_the_field(setup, params, field):
    client, k = setup
    resp = await client.get(
        f"{BASE}/events", params=params, headers={"Authorization": f"Bearer {k['export']}"}
    )
    body = await resp.json()
    assert resp.status == 422 and body["error"]["field"] == field


async def test_unknown_paths_and_methods_get_json_errors(setup):
    client, _ = setup
    resp = await client.get(f"{BASE}/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.post(f"{BASE}/events")
    assert resp.status == 405 and (await resp.json())["success"] is False
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
