"""cart.abandoned inside the capture loop, driven by a recorded stream (no Postgres, no
SQLite): the stream's clock, the order of a sweep and a transaction's own changes, a lost
connection in between, and heartbeats that carry a time or pretend to."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cdc.capture import Capture
from cdc.mapping import parse_mapping
from config.settings import Settings
from tests.fakes import FakeClock, FakeSlot, FakeSource, MemoryOutbox, MemorySink, Wal


@pytest.fixture(autouse=True, params=[64, 1], ids=["batches", "a frame a read"])
def reads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test with the slot read as the native reader reads it (rows decoded, many a
    read) and as psycopg's path does (a frame a read, without a C compiler)."""
    monkeypatch.setattr(FakeSlot, "batch", request.param)


IDLE = 60.0
T0 = 1_764_083_273.0  # 2025-11-25T15:07:53Z
MAPPING = parse_mapping(
    f"""
[[rule]]
table = "public.users"
on = ["insert"]
emit = "customer.created"
object = "customer"
key = "id"

[cart_abandoned]
carts = "public.carts"
items = "public.cart_items"
customer = "user_id"
session = ""
status = ""
abandon_after = {IDLE}
"""
)
TABLES = {
    "public.users": ("id", "name"),
    "public.carts": ("id", "user_id"),
    "public.cart_items": ("id", "cart_id", "product_id", "quantity", "price"),
}


def at(seconds: float) -> str:
    """A commit time as wal2json prints it in a UTC session."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def cart(i: int) -> tuple[str, str, dict[str, Any]]:
    return ("insert", "public.carts", {"id": i, "user_id": 5})


def item(i: int, cart: int, quantity: int = 1) -> tuple[str, str, dict[str, Any]]:
    row = {"id": i, "cart_id": cart, "product_id": 7, "quantity": quantity, "price": "2.50"}
    return ("insert" if quantity == 1 else "update", "public.cart_items", row)


def user(i: int) -> tuple[str, str, dict[str, Any]]:
    return ("insert", "public.users", {"id": i, "name": f"u{i}"})


class Rig:
    def __init__(self) -> None:
        self.wal = Wal()
        self.outbox = MemoryOutbox()
        self.clock = FakeClock()
        self.slot = FakeSlot(self.wal, self.clock)
        self.source = FakeSource(TABLES)

    def run(self) -> Capture:
        settings = Settings(source={"dsn": "postgresql:///unused", "slot": "s"}, outbox={"path": "unused.db"})
        capture = Capture(
            settings,
            MAPPING,
            sink=MemorySink(self.outbox),
            frames=self.slot,
            source=self.source,
            clock=self.clock,
        )
        self.slot.at_end = capture.stop
        capture.run()
        return capture

    def abandoned(self) -> list[Any]:
        return [e for e in self.outbox.events if e.type == "cart.abandoned"]


def test_a_cart_fires_when_a_later_commit_passes_its_deadline_before_that_commits_changes():
    rig = Rig()
    rig.wal.transaction(cart(1), item(10, 1), commit_time=at(T0))
    rig.wal.transaction(user(1), commit_time=at(T0 + IDLE / 2))  # not yet
    # past the deadline, and touching the cart itself: it fired first, then is armed again
    rig.wal.transaction(item(10, 1, quantity=3), commit_time=at(T0 + IDLE + 5))
    rig.run()
    [event] = rig.abandoned()
    assert event.data["record"]["items"] == [{"product_id": 7, "quantity": 1, "price": "2.50"}]
    assert event.data["record"]["last_activity_at"] == "2025-11-25T15:07:53.000000Z"
    assert event.op == "derived" and event.xid is None


def test_heartbeats_move_the_clock_of_an_idle_database():
    rig = Rig()
    rig.wal.transaction(cart(1), item(10, 1), commit_time=at(T0))
    rig.wal.heartbeat(f"heartbeat {T0 + IDLE / 2}")
    rig.wal.heartbeat("heartbeat")  # one from an older version: no time, no harm
    rig.run()
    assert rig.abandoned() == []
    rig.wal.heartbeat(f"heartbeat {T0 + IDLE + 2}")
    rig.run()
    [event] = rig.abandoned()
    assert event.occurred_at == "2025-11-25T15:08:55.000000Z"


def test_a_heartbeat_that_lies_about_the_time_is_ignored():
    rig = Rig()
    rig.wal.transaction(cart(1), item(10, 1), commit_time=at(T0))
    for content in (
        "heartbeat inf",
        "heartbeat nan",
        "heartbeat 1e300",
        "heartbeat -5",
        "heartbeat x",
        "nonsense",
    ):
        rig.wal.heartbeat(content)
    rig.wal.heartbeat(f"heartbeat {T0 + 10 * 365 * 86400}")  # years ahead of any clock
    capture = rig.run()  # and capture goes on
    assert rig.abandoned() == [] and capture.stats.transactions == 1


def test_a_sweep_lost_with_a_dropped_connection_is_swept_again():
    """The abandonment fired at the start of a transaction whose group never committed
    (the connection dropped inside it); the replay must fire it again, not let that
    transaction's own activity arm the cart as if it had never been due."""
    rig = Rig()
    rig.wal.transaction(cart(1), item(10, 1), commit_time=at(T0))
    rig.wal.pause()  # committed and confirmed
    rig.wal.transaction(
        item(10, 1, quantity=2),
        user(2),
        commit_time=at(T0 + IDLE + 5),
        between=lambda i: i == 1 and rig.wal.disconnect(),
    )
    capture = rig.run()
    assert capture.stats.reconnects == 1
    assert len(rig.abandoned()) == 1
