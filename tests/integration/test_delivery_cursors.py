"""Capture writes events only (docs/design-delivery-cursors.md, phase A): the dispatcher
makes each endpoint's delivery rows from its cursor. An outbox of the previous release
migrates without touching a pending or dead delivery; every view counts the deliveries
whose rows are not made yet; an endpoint added later starts at the newest event; prune
never removes an event an endpoint has not made its row for."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from outbox import retention, store
from outbox.deliveries import DeliveryStore
from outbox.store import Route, Router
from outbox.writer import OutboxWriter


def append(path: Path, endpoints: list[str], types: list[str]) -> None:
    """Events appended the way capture does (routed by globs; no delivery row)."""
    writer = OutboxWriter(store.open_outbox(path), Router([Route(e, ("*",)) for e in endpoints]))
    try:
        for n, event_type in enumerate(types):
            writer.add(
                event_type,
                "order",
                n,
                {"object": "order", "id": n},
                "2026-11-25T00:00:00.000000Z",
                "public.orders",
                "insert",
                "0/1",
                1,
            )
        writer.commit("s", 1)
    finally:
        writer.close()


def previous_release_outbox(path: Path) -> None:
    """An outbox as the release before cursors left it (schema 8): every event has its
    delivery rows, written by capture: ct2 delivered, pending and dead; ct3 pending."""
    conn = sqlite3.connect(path, isolation_level=None)
    for version in range(1, 9):
        for statement in store._statements(store.MIGRATIONS[str(version)]):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={version}")
    for n in (1, 2, 3):
        conn.execute(
            "INSERT INTO events (type, object, entity_key, occurred_at, data, source_table, op, lsn, xid,"
            " created_at) VALUES ('order.created', 'order', ?, '2026-11-25T00:00:00.000000Z', '{}',"
            " 'public.orders', 'insert', '0/1', 1, 0)",
            (str(n),),
        )
    for name in ("ct2", "ct3"):
        conn.execute("INSERT INTO endpoints (name, updated_at) VALUES (?, 0)", (name,))
    for event_id, status in ((1, "delivered"), (2, "pending"), (3, "dead")):
        conn.execute(
            "INSERT INTO deliveries (event_id, endpoint, entity, status, attempts) VALUES (?, 'ct2', ?, ?, 1)",
            (event_id, f"order:{event_id}", status),
        )
        conn.execute(
            "INSERT INTO deliveries (event_id, endpoint, entity) VALUES (?, 'ct3', ?)",
            (event_id, f"order:{event_id}"),
        )
    conn.close()


def counts(path: Path) -> dict[str, dict[str, int]]:
    with store.connect(path, readonly=True) as conn:
        deliveries: dict[str, dict[str, int]] = store.stats(conn)["deliveries"]
        return deliveries


def test_an_outbox_of_the_previous_release_keeps_every_delivery_and_goes_on(tmp_path):
    path = tmp_path / "o.db"
    previous_release_outbox(path)
    before = {"ct2": {"delivered": 1, "pending": 1, "dead": 1}, "ct3": {"pending": 3}}
    store.open_outbox(path).close()  # migrates
    assert counts(path) == before  # nothing made twice, nothing lost
    append(path, ["ct2", "ct3"], ["order.created"])  # capture of this release: event 4
    assert counts(path) == {"ct2": {"delivered": 1, "pending": 2, "dead": 1}, "ct3": {"pending": 4}}
    deliveries = DeliveryStore(path)
    try:
        deliveries.materialize("ct2")
        assert [d.event_id for d in deliveries.claim("ct2", 1e12, 10, ())] == [2, 4]  # dead 3 stays dead
    finally:
        deliveries.close()
    assert counts(path) == {"ct2": {"delivered": 1, "pending": 2, "dead": 1}, "ct3": {"pending": 4}}


def test_capture_writes_no_delivery_row_and_every_view_still_counts_them(tmp_path):
    path = tmp_path / "o.db"
    append(path, ["ct2", "ct3"], ["order.created", "order.updated"])
    with store.connect(path, readonly=True) as conn:
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
        assert [d["endpoint"] for d in store.event_deliveries(conn, 2)] == ["ct2", "ct3"]
        assert {
            s["name"]: s["pending"] for s in store.endpoint_status(conn, ["ct2", "ct3"], time.time())
        } == {
            "ct2": 2,
            "ct3": 2,
        }
    assert counts(path) == {"ct2": {"pending": 2}, "ct3": {"pending": 2}}
    deliveries = DeliveryStore(path)
    try:
        deliveries.materialize("ct3")
        with store.connect(path, readonly=True) as conn:
            assert conn.execute("SELECT endpoint, count(*) FROM deliveries GROUP BY 1").fetchall() == [
                ("ct3", 2)
            ]
    finally:
        deliveries.close()
    assert counts(path) == {"ct2": {"pending": 2}, "ct3": {"pending": 2}}  # the same, rows or not


def test_an_endpoint_added_later_starts_at_the_newest_event(tmp_path):
    path = tmp_path / "o.db"
    append(path, ["ct2"], ["order.created"] * 3)
    append(path, ["ct2", "ct9"], ["order.updated"])
    assert counts(path) == {"ct2": {"pending": 4}, "ct9": {"pending": 1}}


def test_prune_never_removes_an_event_an_endpoint_has_no_row_for_yet(tmp_path):
    path = tmp_path / "o.db"
    append(path, ["ct2"], ["order.created"] * 2)
    conn = store.open_outbox(path)
    try:
        assert retention.prune(conn, cutoff=time.time() + 60) == 0  # no row made: not settled
        deliveries = DeliveryStore(path)
        deliveries.materialize("ct2")
        deliveries.close()
        conn.execute("UPDATE deliveries SET status = 'delivered'")
        assert retention.prune(conn, cutoff=time.time() + 60) == 2
    finally:
        conn.close()
