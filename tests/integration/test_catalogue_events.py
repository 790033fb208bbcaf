"""The event catalogue against what ct1-cdc really produces and serves: the sample
marketplace's traffic through real capture on Postgres, GET /analytics, and the schema
routes of the API."""

from __future__ import annotations

import json
from datetime import datetime

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api import keys
from api.app import BASE, create_app
from config import catalogue
from config.settings import Settings
from ct1_client.models import RECORDS, Event, parse_event
from outbox import store
from sidecar import sample
from tests.catalogue_check import CheckedReceiver, problems
from tests.conftest import read_events

ROW_TYPES = {e.type for e in catalogue.CATALOGUE if e.op in ("insert", "update")}
SMALL = sample.Volume(customers=6, sellers=2, products=6, orders=6, reviews=4, views=6, carts=3)


def documented_columns(event_type: str) -> set[str]:
    """The record columns the schema documents (those it forbids left out)."""
    schema = catalogue.schema(event_type)
    record = schema["$defs"][catalogue.BY_TYPE[event_type].object]
    return {name for name, rule in record["properties"].items() if rule is not False}


def test_sample_traffic_gives_every_row_type_and_every_event_fits_its_schema(
    source_db, settings, run_capture
):
    capture = run_capture(settings)
    capture.wait_caught_up()
    with source_db.connect() as conn:
        sample.generate(conn, seed=11, volume=SMALL)
        traffic = sample.Traffic(conn, seed=5)
        seen: set[str] = set()
        for step in range(1, 601):
            traffic.step()
            if step % 25 == 0:
                capture.wait_caught_up()
                seen = {e["type"] for e in read_events(settings.outbox.path)}
                if seen >= ROW_TYPES:
                    break
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert {e["type"] for e in events} == ROW_TYPES  # each of the ten, and nothing else

    assert [p for e in events for p in problems(e)] == []

    # The schemas document exactly the sample's columns: an insert carries every one,
    # an update never one more (unchanged TOAST may leave one out), and each documented
    # column shows up.
    for event_type in sorted(ROW_TYPES):
        columns = documented_columns(event_type)
        of_type = [e for e in events if e["type"] == event_type]
        carried = set().union(*(e["data"]["record"].keys() for e in of_type))
        assert carried == columns, event_type
        if catalogue.BY_TYPE[event_type].op == "insert":
            assert all(e["data"]["record"].keys() == columns for e in of_type), event_type
        for e in of_type:
            assert e["data"]["id"] == e["data"]["record"]["id"]
            assert set(e["data"]["previous"] or {}) <= columns
    changed = [e for e in events if e["type"] == "order.status_changed"]
    assert all("status" in e["data"]["previous"] for e in changed)  # known from the shadow

    # the client's typed models read every real event, with each value as it was sent
    for e in events:
        typed = parse_event(e)
        assert isinstance(typed, Event) and type(typed.data.record) is RECORDS[e["type"]]
        record = typed.data.record.model_dump(mode="json", exclude_none=True)
        for column, value in e["data"]["record"].items():
            if value is None:
                continue
            got = record[column]
            if isinstance(value, str) and value.endswith("Z"):  # a time: the same instant
                assert datetime.fromisoformat(got) == datetime.fromisoformat(value), (e["type"], column)
            else:
                assert got == value, (e["type"], column)


async def _client(settings: Settings) -> tuple[TestClient, dict[str, str]]:
    conn = store.open_outbox(settings.outbox.path)
    export = keys.create(conn, "export", [keys.EXPORT], [])
    hooks = keys.create(conn, "hooks", [keys.WEBHOOKS], [])
    conn.close()
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client, {"export": export.key, "hooks": hooks.key}


async def test_the_analytics_record_is_exactly_what_get_analytics_answers(source_db, tmp_path):
    """marketplace.analytics carries GET /analytics's figures: its ``data`` with
    ``period`` as ``period_start``/``period_end`` fits the record's schema, which requires
    every one of those keys and allows no other."""
    with source_db.connect() as conn:
        sample.generate(conn, seed=4, volume=SMALL)
    settings = Settings(
        source={"dsn": source_db.dsn, "slot": source_db.slot},
        outbox={"path": str(tmp_path / "o.db")},
        api={"cache_ttl_analytics": 0},
    )
    client, k = await _client(settings)
    try:
        answers = []
        for params in ({}, {"date_from": "2020-01-01"}, {"date_from": "2020-01-01", "date_to": "2020-01-31"}):
            resp = await client.get(f"{BASE}/analytics", params=params, headers={"X-API-Key": k["export"]})
            assert resp.status == 200, await resp.text()
            answers.append((await resp.json())["data"])
    finally:
        await client.close()
    schema = catalogue.schema("marketplace.analytics")
    required = set(schema["$defs"]["analytics"]["required"])
    for data in answers:
        period = data.pop("period")
        record = {"period_start": period["date_from"], "period_end": period["date_to"], **data}
        assert set(record) == required
        envelope = {
            "id": 9,
            "type": "marketplace.analytics",
            "timestamp": "2026-11-25T14:00:00.000000Z",
            "data": {"object": "analytics", "id": record["period_start"], "record": record, "previous": None},
            "source": {"table": None, "op": "derived", "lsn": None, "xid": None},
        }
        assert problems(envelope) == []
    assert answers[0]["top_products"], "the default period (the last 30 days) has orders"


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


async def test_a_receiver_fails_its_test_on_an_event_that_does_not_fit():
    """The receivers of the integration and acceptance tests answer 200 (so delivery goes
    on as it would) and fail the test when they close."""
    envelope = {"id": 1, "type": "order.created", "timestamp": "2026-11-25T14:00:00Z", "data": {}}
    rx = CheckedReceiver(lambda body, headers: json.loads(body))
    with pytest.raises(AssertionError, match="6 schema failures in 1 events"):
        async with rx, aiohttp.ClientSession() as session:
            resp = await session.post(rx.url, data=json.dumps(envelope))
            assert resp.status == 200
    assert len(rx.received) == 1
