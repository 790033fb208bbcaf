"""cart.abandoned from a real Postgres through real capture: once after the idle time,
again after new activity, never after a conversion in time — also when that conversion
waited in a backlog while capture was stopped, long past the deadline by the wall clock."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.catalogue_check import problems
from tests.conftest import MAPPING, SourceDb, make_settings, read_events
from tests.waiting import wait_until

IDLE = 2.0  # seconds: abandon_after in these tests


def mapping_file(tmp_path: Path) -> Path:
    path = tmp_path / "mapping.toml"
    path.write_text(MAPPING.read_text().replace('abandon_after = "1h"', f"abandon_after = {IDLE}"))
    return path


def settings_for(db: SourceDb, tmp_path: Path) -> Any:
    return make_settings(db, tmp_path / "outbox.db", mapping={"file": str(mapping_file(tmp_path))})


def customer(db: SourceDb) -> int:
    with db.connect() as conn:
        row = conn.execute(
            "INSERT INTO users (name, email, password) VALUES ('Ada', %s, 'x') RETURNING id",
            (f"ada{time.monotonic_ns()}@example.com",),
        ).fetchone()
    assert row is not None
    return int(row[0])


def product(db: SourceDb) -> int:
    with db.connect() as conn:
        shop = conn.execute(
            "INSERT INTO shops (user_id, name, slug) VALUES (%s, 'S', %s) RETURNING id",
            (customer(db), f"s{time.monotonic_ns()}"),
        ).fetchone()
        assert shop is not None
        row = conn.execute(
            "INSERT INTO products (shop_id, name, slug, price) VALUES (%s, 'Lamp', %s, 19.90) RETURNING id",
            (shop[0], f"p{time.monotonic_ns()}"),
        ).fetchone()
    assert row is not None
    return int(row[0])


def open_cart(db: SourceDb, user: int, item: int, quantity: int = 2) -> int:
    with db.connect() as conn, conn.transaction():
        cart = conn.execute("INSERT INTO carts (user_id) VALUES (%s) RETURNING id", (user,)).fetchone()
        assert cart is not None
        conn.execute(
            "INSERT INTO cart_items (cart_id, product_id, quantity, price) VALUES (%s, %s, %s, 19.90)",
            (cart[0], item, quantity),
        )
    return int(cart[0])


def abandoned(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(path) if e["type"] == "cart.abandoned"]


def test_an_idle_cart_is_abandoned_once_and_again_after_new_activity(source_db, tmp_path, run_capture):
    settings = settings_for(source_db, tmp_path)
    capture = run_capture(settings)
    capture.wait_caught_up()  # the slot exists: what follows is captured
    user, item = customer(source_db), product(source_db)
    cart = open_cart(source_db, user, item)
    [event] = wait_until(lambda: abandoned(settings.outbox.path), timeout=30, what="cart.abandoned")
    assert problems(event) == []
    record = event["data"]["record"]
    assert event["data"]["id"] == cart and record["cart_id"] == cart and record["customer_id"] == user
    assert record["items"] == [{"product_id": item, "quantity": 2, "price": "19.90"}]
    assert record["value"] == "39.80" and record["item_count"] == 2
    assert record["idle_seconds"] >= IDLE and event["source"] == {
        "table": "public.carts",
        "op": "derived",
        "lsn": event["source"]["lsn"],
        "xid": None,
    }
    time.sleep(3 * IDLE)
    assert len(abandoned(settings.outbox.path)) == 1  # once
    source_db.execute("UPDATE cart_items SET quantity = 5 WHERE cart_id = %s", cart)
    events = wait_until(lambda: e if len(e := abandoned(settings.outbox.path)) == 2 else None, timeout=30)
    assert events[1]["data"]["record"]["items"][0]["quantity"] == 5
    capture.stop()


def test_a_conversion_in_time_cancels_it_and_a_later_one_does_not(source_db, tmp_path, run_capture):
    settings = settings_for(source_db, tmp_path)
    run_capture(settings).wait_caught_up()
    user, other, item = customer(source_db), customer(source_db), product(source_db)
    by_status = open_cart(source_db, user, item)
    by_order = open_cart(source_db, other, item)
    left = open_cart(source_db, customer(source_db), item)
    source_db.execute("UPDATE carts SET status = 'converted' WHERE id = %s", by_status)
    source_db.execute("INSERT INTO orders (user_id, total) VALUES (%s, 39.80)", other)
    events = wait_until(lambda: abandoned(settings.outbox.path), timeout=30)
    time.sleep(3 * IDLE)
    assert [e["data"]["id"] for e in abandoned(settings.outbox.path)] == [left]
    assert events[0]["data"]["id"] not in (by_status, by_order)


def test_a_conversion_waiting_in_a_backlog_still_cancels_it(source_db, tmp_path, run_capture):
    """Capture is stopped while a cart is opened and, within its idle time, ordered; it
    starts again long after the deadline by the wall clock.  The stream says the order
    came in time: no abandonment.  A cart left alone in the same backlog is abandoned."""
    settings = settings_for(source_db, tmp_path)
    first = run_capture(settings)
    first.wait_caught_up()
    first.stop()  # the slot holds everything from here on
    user, item = customer(source_db), product(source_db)
    converted = open_cart(source_db, user, item)
    left = open_cart(source_db, customer(source_db), item)
    time.sleep(IDLE / 4)
    source_db.execute("INSERT INTO orders (user_id, total) VALUES (%s, 39.80)", user)
    time.sleep(3 * IDLE)  # by the wall clock both carts are long past their deadline
    assert abandoned(settings.outbox.path) == []
    run_capture(settings)
    events = wait_until(lambda: abandoned(settings.outbox.path), timeout=30)
    time.sleep(2 * IDLE)
    assert [e["data"]["id"] for e in abandoned(settings.outbox.path)] == [left]
    assert events[0]["data"]["record"]["customer_id"] != user and converted != left
