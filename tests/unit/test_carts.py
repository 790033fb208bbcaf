"""cart.abandoned's logic with plain values: row changes in stream order, the stream's
clock, and the state in memory (the same store contract as the outbox's)."""

from __future__ import annotations

from typing import Any

import pytest

from cdc.carts import CLOCK_MARGIN, CartRule, CartStore, CartTracker, parse_cart_rule, parse_duration
from cdc.decode import RowChange
from cdc.mapping import parse_table
from common.errors import ConfigError
from common.formats import unix_to_iso
from outbox.state import MemoryState

IDLE = 3600.0
RULE = CartRule(
    carts="public.carts",
    items="public.cart_items",
    orders="public.orders",
    abandon_after=IDLE,
    customer="user_id",
    order_customer="user_id",
)


def change(
    op: str, table: str, new: dict[str, Any] | None = None, old: dict[str, Any] | None = None
) -> RowChange:
    return RowChange(op, table, 1, "0/1", new or {}, old, ("id",))


def cart(tracker: CartTracker, at: float, id: Any = 1, op: str = "insert", **cols: Any) -> None:
    tracker.change("public.carts", change(op, "public.carts", {"id": id, "user_id": 5, **cols}), at)


def item(
    tracker: CartTracker, at: float, id: Any = 10, cart: Any = 1, op: str = "insert", **cols: Any
) -> None:
    if op == "delete":
        tracker.change("public.cart_items", change("delete", "public.cart_items", old={"id": id}), at)
        return
    row = {"id": id, "cart_id": cart, "product_id": 7, "quantity": 2, "price": "19.90", **cols}
    tracker.change("public.cart_items", change(op, "public.cart_items", row), at)


def order(tracker: CartTracker, at: float, user: Any = 5) -> None:
    tracker.change("public.orders", change("insert", "public.orders", {"id": 99, "user_id": user}), at)


@pytest.fixture
def tracker() -> CartTracker:
    return CartTracker(RULE, CartStore(MemoryState()))


def fired(tracker: CartTracker, clock: float) -> list[dict[str, Any]]:
    return [a.record(unix_to_iso) for a in tracker.due(clock)]


def test_a_cart_with_items_fires_once_after_its_idle_time(tracker):
    cart(tracker, 1000.0, session_id="s-1")
    item(tracker, 1000.0)
    item(tracker, 1200.0, id=11, product_id=8, quantity=1, price="5.05")
    assert fired(tracker, 1200.0 + IDLE) == []  # not past the deadline by the margin yet
    [record] = fired(tracker, 1200.0 + IDLE + CLOCK_MARGIN)
    assert record == {
        "cart_id": 1,
        "customer_id": 5,
        "session_id": "s-1",
        "items": [
            {"product_id": 7, "quantity": 2, "price": "19.90"},
            {"product_id": 8, "quantity": 1, "price": "5.05"},
        ],
        "value": "44.85",
        "item_count": 3,
        "last_activity_at": unix_to_iso(1200.0),
        "idle_seconds": IDLE + CLOCK_MARGIN,
        "abandon_after_seconds": IDLE,
    }
    assert fired(tracker, 1e9) == []  # once


def test_new_activity_after_an_abandonment_arms_it_again(tracker):
    cart(tracker, 0.0)
    item(tracker, 0.0)
    assert len(fired(tracker, IDLE + 5)) == 1
    item(tracker, 10_000.0, quantity=3)
    assert fired(tracker, 10_000.0 + IDLE / 2) == []
    [again] = fired(tracker, 10_000.0 + IDLE + 5)
    assert again["items"][0]["quantity"] == 3


def test_activity_moves_the_deadline(tracker):
    cart(tracker, 0.0)
    item(tracker, 0.0)
    item(tracker, 3000.0, quantity=4)
    assert fired(tracker, IDLE + 5) == []
    assert len(fired(tracker, 3000.0 + IDLE + 5)) == 1


def test_a_cart_without_items_never_fires(tracker):
    cart(tracker, 0.0)
    assert fired(tracker, 10 * IDLE) == []
    item(tracker, 100.0)
    item(tracker, 200.0, op="delete")  # the delete carries only the key
    assert fired(tracker, 10 * IDLE) == []


def test_a_status_conversion_before_the_deadline_cancels_it(tracker):
    cart(tracker, 0.0)
    item(tracker, 0.0)
    cart(tracker, 1800.0, op="update", status="converted")
    assert fired(tracker, 10 * IDLE) == []
    item(tracker, 5000.0, id=12)  # a converted cart stays converted
    assert fired(tracker, 20 * IDLE) == []
    cart(tracker, 30 * IDLE, op="update", status="active")  # until it is active again
    assert len(fired(tracker, 31 * IDLE + 5)) == 1


def test_an_order_of_the_customer_after_the_last_activity_cancels_it(tracker):
    cart(tracker, 0.0)
    item(tracker, 100.0)
    order(tracker, 50.0)  # before the last activity: not this cart's conversion
    order(tracker, 200.0, user=6)  # someone else's order
    assert len(fired(tracker, 100.0 + IDLE + 5)) == 1
    item(tracker, 10_000.0, quantity=5)
    order(tracker, 10_500.0)
    assert fired(tracker, 10 * IDLE) == []


def test_an_order_after_the_deadline_does_not_undo_an_abandonment_not_yet_swept(tracker):
    cart(tracker, 0.0)
    item(tracker, 0.0)
    order(tracker, IDLE + 100)  # the stream read it before the next sweep
    assert len(fired(tracker, IDLE + 200)) == 1


def test_keys_keep_their_type_and_session_carts_fire_without_a_customer(tracker):
    tracker.change("public.carts", change("insert", "public.carts", {"id": "7", "session_id": "anon"}), 0.0)
    cart(tracker, 0.0, id=7)
    item(tracker, 0.0, id=1, cart="7")
    item(tracker, 0.0, id=2, cart=7, quantity=1)
    records = sorted(fired(tracker, IDLE + 5), key=lambda r: r["item_count"])
    assert [(r["cart_id"], r["customer_id"], r["item_count"]) for r in records] == [(7, 5, 1), ("7", None, 2)]


def test_a_deleted_cart_is_forgotten(tracker):
    cart(tracker, 0.0)
    item(tracker, 0.0)
    tracker.change("public.carts", change("delete", "public.carts", old={"id": 1}), 10.0)
    assert fired(tracker, 10 * IDLE) == []


def test_many_due_carts_fire_over_several_sweeps_each_once(tracker):
    for n in range(2500):
        cart(tracker, float(n), id=n)
        item(tracker, float(n), id=n, cart=n)
    seen = []
    for _ in range(4):
        seen += [r["cart_id"] for r in fired(tracker, 10 * IDLE)]
    assert sorted(seen) == list(range(2500))


def test_a_tracker_that_forgets_asks_the_store_again():
    store = CartStore(MemoryState())
    first = CartTracker(RULE, store)
    cart(first, 0.0)
    item(first, 0.0)
    assert first.due(10.0) == []  # now it knows the next deadline
    second = CartTracker(RULE, store)  # e.g. after a restart, the same stored state
    assert len(second.due(IDLE + 5)) == 1


# -- the rule in the mapping ----------------------------------------------------------------


def table(text: str) -> str:
    schema, name = parse_table(text)
    return f"{schema}.{name}"


def test_the_rule_parses_with_defaults_and_durations():
    rule = parse_cart_rule({"carts": "public.carts", "items": "public.cart_items"}, "m", table)
    assert rule.abandon_after == 3600 and rule.orders is None and rule.customer == "customer_id"
    assert parse_duration("90s", "x") == 90 and parse_duration("15m", "x") == 900
    assert parse_duration("1h", "x") == 3600 and parse_duration(2.5, "x") == 2.5
    rule = parse_cart_rule(
        {"carts": "public.carts", "items": "public.cart_items", "orders": "public.orders", "session": ""},
        "m",
        table,
    )
    assert rule.session is None and rule.tables == ("public.carts", "public.cart_items", "public.orders")


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"items": "public.i"}, "missing 'carts'"),
        ({"carts": "public.c", "items": "public.i", "idle": 5}, "unknown key 'idle'"),
        ({"carts": "public.c", "items": "public.c"}, "three different tables"),
        ({"carts": "carts", "items": "public.i"}, "not a schema-qualified table"),
        ({"carts": "public.c", "items": "public.i", "abandon_after": "soon"}, "positive number of seconds"),
        ({"carts": "public.c", "items": "public.i", "abandon_after": -1}, "positive number of seconds"),
        ({"carts": "public.c", "items": "public.i", "abandon_after": True}, "positive number of seconds"),
        (
            {"carts": "public.c", "items": "public.i", "converted_statuses": "done"},
            "list of non-empty strings",
        ),
        ({"carts": "public.c", "items": "public.i", "customer": "", "session": ""}, "cannot both be empty"),
        ({"carts": "public.c", "items": "public.i", "price": 3}, "must be a column name"),
    ],
)
def test_a_wrong_rule_is_refused_with_what_to_write(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_cart_rule(raw, "m", table)


def test_the_mapping_file_declares_it():
    from cdc.mapping import parse_mapping

    text = """
[[rule]]
table = "public.orders"
on = ["insert"]
emit = "order.created"
object = "order"
key = "id"

[cart_abandoned]
carts = "public.carts"
items = "public.cart_items"
orders = "public.orders"
customer = "user_id"
order_customer = "user_id"
abandon_after = "30m"
"""
    mapping = parse_mapping(text)
    assert mapping.carts is not None and mapping.carts.abandon_after == 1800
    assert mapping.event_types == ["cart.abandoned", "order.created"]
    with pytest.raises(ConfigError, match=r"\[cart_abandoned\]\.abandon_after"):
        parse_mapping(text.replace('"30m"', '"later"'))
    with pytest.raises(ConfigError, match="expected defaults, rule, snapshot, cart_abandoned"):
        parse_mapping(text.replace("[cart_abandoned]", "[cart_abandon]"))


def test_a_checkout_writing_the_order_then_the_cart_in_one_transaction_converts_it(tracker):
    cart(tracker, 0.0)
    item(tracker, 0.0)
    order(tracker, 100.0)
    cart(tracker, 100.0, op="update", status="checked_out")  # not a converted status: activity
    assert fired(tracker, 10 * IDLE) == []
    item(tracker, 5000.0, id=11)  # the customer shops again later: a new idle spell
    assert len(fired(tracker, 5000.0 + IDLE + 5)) == 1


def test_a_cart_known_only_from_its_items_is_not_judged(tracker):
    """Its own row never came through the stream (it is older than the slot): whose it is
    and whether it was converted are unknown, so it never fires, until its row changes."""
    item(tracker, 0.0, id=1, cart=42)
    assert fired(tracker, 10 * IDLE) == []
    cart(tracker, 20 * IDLE, id=42, op="update")
    assert len(fired(tracker, 21 * IDLE + 5)) == 1


def test_an_order_reads_only_the_armed_carts_of_its_customer():
    store = CartStore(MemoryState())
    tracker = CartTracker(RULE, store)
    for n in range(50):
        cart(tracker, 0.0, id=n)
        item(tracker, 0.0, id=n, cart=n)
    assert len(store.armed_carts_of("n:5")) == 50
    order(tracker, 10.0)
    assert store.armed_carts_of("n:5") == []  # a second order has nothing to read
    assert fired(tracker, 10 * IDLE) == []


def test_orders_of_customers_without_an_open_cart_ask_the_store_nothing():
    class Counting(MemoryState):
        asked = 0

        def state_by_ref(self, kind: str, ref: str) -> list[Any]:
            if kind == "cart":
                Counting.asked += 1
            return super().state_by_ref(kind, ref)

    tracker = CartTracker(RULE, CartStore(Counting()))
    cart(tracker, 0.0)  # customer 5
    item(tracker, 0.0)
    for user in range(100, 200):
        order(tracker, 10.0, user=user)
    assert Counting.asked == 0
    order(tracker, 20.0)  # customer 5's order: read, and it converts
    assert Counting.asked == 1 and fired(tracker, 10 * IDLE) == []
