"""Every mapped event type, produced by real SQL against the sample schema, with exact
envelopes: ids in commit order, previous values, excluded columns absent, numeric text
exact, unicode intact, timestamps ISO 8601 UTC."""

from __future__ import annotations

import re
from typing import Any

from tests.conftest import read_events

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _seed(db: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    ids["seller"] = db.execute(
        "INSERT INTO users (name, email, password, role) VALUES ('Sella', 's@x.io', 'pw', 'seller') RETURNING id"
    )[0][0]
    ids["shop"] = db.execute(
        "INSERT INTO shops (user_id, name, slug) VALUES (%s, 'Shop', 'shop') RETURNING id", ids["seller"]
    )[0][0]
    ids["product"] = db.execute(
        "INSERT INTO products (shop_id, name, slug, price, stock) VALUES (%s, 'Lamp', 'lamp', 19.99, 5) RETURNING id",
        ids["shop"],
    )[0][0]
    return ids


def test_every_row_event_type_has_the_documented_envelope(source_db, settings, run_capture):
    ids = _seed(source_db)  # before the slot exists: not captured
    capture = run_capture(settings)
    capture.wait_caught_up()

    customer = source_db.execute(
        "INSERT INTO users (name, email, password, remember_token) "
        "VALUES ('Zoë Ångström 李', 'zoe@example.com', 'hunter2', 'tok') RETURNING id"
    )[0][0]
    source_db.execute("UPDATE users SET phone = '+351 912' WHERE id = %s", customer)
    order = source_db.execute(
        "INSERT INTO orders (user_id, seller_id, shop_id, subtotal, total, shipping_address) "
        'VALUES (%s, %s, %s, 1234567890.12, 1234567890.12, \'{"city": "Kraków"}\') RETURNING id',
        customer,
        ids["seller"],
        ids["shop"],
    )[0][0]
    source_db.execute("UPDATE orders SET status = 'processing', payment_status = 'paid' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET notes = 'gift' WHERE id = %s", order)
    source_db.execute(
        "INSERT INTO product_views (product_id, user_id) VALUES (%s, %s)", ids["product"], customer
    )
    cart = source_db.execute("INSERT INTO carts (user_id) VALUES (%s) RETURNING id", customer)[0][0]
    source_db.execute(
        "INSERT INTO cart_items (cart_id, product_id, quantity, price) VALUES (%s, %s, 2, 19.99)",
        cart,
        ids["product"],
    )
    review = source_db.execute(
        "INSERT INTO reviews (product_id, user_id, rating, comment) VALUES (%s, %s, 5, 'Très bien ★') RETURNING id",
        ids["product"],
        customer,
    )[0][0]
    source_db.execute("UPDATE reviews SET status = 'approved' WHERE id = %s", review)
    capture.wait_caught_up()
    capture.stop()

    events = read_events(settings.outbox.path)
    types = [e["type"] for e in events]
    assert types == [
        "customer.created",
        "customer.updated",
        "order.created",
        "order.updated",
        "order.status_changed",
        "payment.status_changed",
        "order.updated",
        "product.viewed",
        "product.added_to_cart",
        "review.created",
        "review.updated",
    ]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        assert ISO_UTC.match(e["timestamp"]), e["timestamp"]
        assert set(e) == {"id", "type", "timestamp", "data", "source"}
        assert set(e["data"]) == {"object", "id", "record", "previous"}
        assert e["source"]["table"].startswith("public.")
        assert re.match(r"^[0-9A-F]+/[0-9A-F]+$", e["source"]["lsn"])
        assert isinstance(e["source"]["xid"], int)
        assert "password" not in e["data"]["record"]
        assert "remember_token" not in e["data"]["record"]

    created = events[0]
    assert created["data"]["object"] == "customer"
    assert created["data"]["id"] == customer
    assert created["data"]["record"]["name"] == "Zoë Ångström 李"
    assert created["data"]["previous"] is None
    assert created["source"]["op"] == "insert"
    assert ISO_UTC.match(created["data"]["record"]["created_at"])

    updated = events[1]
    assert updated["data"]["record"]["phone"] == "+351 912"
    # users has no REPLICA IDENTITY FULL and no when_changed rule: nothing known of before
    assert "password" not in (updated["data"]["previous"] or {})

    order_created = events[2]
    rec = order_created["data"]["record"]
    assert rec["total"] == "1234567890.12" and rec["subtotal"] == "1234567890.12"
    assert rec["shipping_total"] == "0.00"
    assert rec["shipping_address"] == {"city": "Kraków"}

    status_changed = events[4]
    assert status_changed["data"]["record"]["status"] == "processing"
    assert status_changed["data"]["previous"]["status"] == "pending"
    payment = events[5]
    assert payment["data"]["object"] == "order" and payment["data"]["id"] == order
    assert payment["data"]["previous"]["payment_status"] == "pending"
    assert payment["data"]["record"]["payment_status"] == "paid"
    # the three events of one UPDATE share its commit and LSN
    assert events[3]["source"]["lsn"] == events[4]["source"]["lsn"] == events[5]["source"]["lsn"]

    notes_only = events[6]
    assert notes_only["type"] == "order.updated"
    # orders has no REPLICA IDENTITY FULL here: the shadow knows only the watched columns,
    # so a notes-only change reports no previous values and fires no status event
    assert notes_only["data"]["previous"] == {}

    assert events[8]["data"]["record"]["price"] == "19.99"
    assert events[9]["data"]["record"]["comment"] == "Très bien ★"
    assert events[10]["data"]["record"]["status"] == "approved"
    assert events[10]["data"]["previous"] == {}  # old values unknown without REPLICA IDENTITY FULL


def test_replica_identity_full_reports_every_changed_column(source_db, settings, run_capture):
    ids = _seed(source_db)
    uid = source_db.execute(
        "INSERT INTO users (name, email, password) VALUES ('C', 'c@x', 'pw') RETURNING id"
    )[0][0]
    oid = source_db.execute(
        "INSERT INTO orders (user_id, shop_id, total) VALUES (%s, %s, 10.50) RETURNING id", uid, ids["shop"]
    )[0][0]
    source_db.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute(
        "UPDATE orders SET notes = 'gift', total = 11.00, tracking_number = 'TRK1' WHERE id = %s", oid
    )
    source_db.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", oid)
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [e["type"] for e in events] == ["order.updated", "order.updated", "order.status_changed"]
    assert events[0]["data"]["previous"] == {"notes": None, "total": "10.50", "tracking_number": None}
    assert events[2]["data"]["previous"] == {"status": "pending"}


def test_custom_exclude_columns_never_leave(source_db, tmp_path, run_capture):
    from tests.conftest import make_settings

    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        '[defaults]\nexclude_columns = ["password"]\n'
        '[[rule]]\ntable = "public.users"\non = ["insert", "update", "delete"]\n'
        'emit = "customer.updated"\nobject = "customer"\nkey = "id"\nexclude_columns = ["phone", "email"]\n'
    )
    settings = make_settings(source_db, tmp_path / "o.db", mapping={"file": str(mapping)})
    capture = run_capture(settings)
    capture.wait_caught_up()
    uid = source_db.execute(
        "INSERT INTO users (name, email, password, phone) VALUES ('A', 'a@x', 'pw', '1') RETURNING id"
    )[0][0]
    source_db.execute("ALTER TABLE users REPLICA IDENTITY FULL")
    source_db.execute("UPDATE users SET phone = '2', email = 'b@x', name = 'B' WHERE id = %s", uid)
    source_db.execute("DELETE FROM users WHERE id = %s", uid)
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [e["source"]["op"] for e in events] == ["insert", "update", "delete"]
    for e in events:
        text = repr(e)
        assert "pw" not in text and "a@x" not in text and "b@x" not in text
        assert "phone" not in e["data"]["record"]
    assert events[1]["data"]["previous"] == {"name": "A"}
    assert events[2]["data"]["record"]["id"] == uid
