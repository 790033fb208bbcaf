"""Backfill on a real Postgres while orders change under it: every existing row reaches the
outbox as a read event, no chunk row is older than a change already streamed for it, and
the view a receiver builds from the events equals the table at the end."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg
import pytest

from outbox import backfills, store
from sidecar import sample
from tests.catalogue_check import problems
from tests.conftest import SourceDb, make_settings, read_events
from tests.waiting import wait_until

VOLUME = sample.Volume(customers=40, sellers=3, products=20, orders=600, reviews=30, views=10, carts=0)


def seed(db: SourceDb) -> None:
    with db.connect() as conn:
        sample.generate(conn, seed=7, volume=VOLUME)
        conn.execute("UPDATE orders SET notes = '0'")  # a version: each change adds one


def request(path: str, *tables: str, condition: str | None = None) -> list[dict[str, Any]]:
    conn = store.open_outbox(path)
    try:
        return backfills.add(conn, list(tables), condition, 0, "cli")
    finally:
        conn.close()


def jobs(path: str) -> list[dict[str, Any]]:
    conn = store.connect(path, readonly=True)
    try:
        return backfills.jobs(conn)
    finally:
        conn.close()


class Writers:
    """Threads changing orders at random (updates that bump the version, new orders), each
    change in its own transaction, until stopped."""

    def __init__(self, db: SourceDb, threads: int = 3) -> None:
        self.db = db
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.count = 0
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        try:
            with psycopg.connect(self.db.dsn, autocommit=True) as conn:
                top = conn.execute("SELECT max(id) FROM orders").fetchone()[0]
                while not self.stop.is_set():
                    if rng.random() < 0.15:
                        conn.execute(
                            "INSERT INTO orders (user_id, total, notes) "
                            "SELECT id, 10.00, '0' FROM users ORDER BY id LIMIT 1"
                        )
                    else:
                        conn.execute(
                            "UPDATE orders SET notes = (notes::int + 1)::text, status = %s, updated_at = now() "
                            "WHERE id = %s",
                            (rng.choice(["processing", "shipped", "delivered"]), rng.randint(1, top)),
                        )
                    self.count += 1
                    time.sleep(0.003)  # a busy marketplace, not a flood capture cannot keep up with
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not self.errors, self.errors


def receiver_view(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """What a receiver holds of orders after applying every event in order (as a receiver
    does: the last record of each entity wins), with each entity's versions as seen."""
    view: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["data"]["object"] == "order" and e["data"]["record"] is not None:
            view[e["data"]["id"]] = e["data"]["record"]
    return view


def versions_never_go_back(events: list[dict[str, Any]]) -> None:
    seen: dict[int, tuple[int, int, str]] = {}
    for e in events:
        if e["data"]["object"] != "order":
            continue
        version = int(e["data"]["record"]["notes"])
        key = e["data"]["id"]
        if key in seen:
            before = seen[key]
            assert version >= before[0], (
                f"order {key}: event {e['id']} ({e['source']['op']}) carries version {version} "
                f"after event {before[1]} ({before[2]}) carried {before[0]}"
            )
        seen[key] = (version, e["id"], e["source"]["op"])


def test_backfill_under_concurrent_writes_converges_on_the_table(source_db, tmp_path, run_capture):
    seed(source_db)
    settings = make_settings(source_db, tmp_path / "outbox.db", backfill={"chunk_size": 37})
    capture = run_capture(settings)
    capture.wait_caught_up()
    [job] = request(settings.outbox.path, "public.orders")
    with Writers(source_db) as writers:
        wait_until(lambda: jobs(settings.outbox.path)[0]["state"] == "done", timeout=120, what="the backfill")
        time.sleep(0.3)
    capture.wait_caught_up()
    events = read_events(settings.outbox.path)
    assert writers.count > 100  # the writes really raced the chunks
    reads = [e for e in events if e["source"]["op"] == "read"]
    assert reads and {e["type"] for e in reads} == {"order.snapshot"}
    assert all(problems(e) == [] for e in reads[:50])  # the published schema holds
    assert all(e["source"]["xid"] is None and e["data"]["previous"] is None for e in reads)
    versions_never_go_back(events)
    table = {r[0]: (r[1], r[2]) for r in source_db.execute("SELECT id, notes, status FROM orders")}
    view = receiver_view(events)
    assert {k: (v["notes"], v["status"]) for k, v in view.items()} == table
    [done] = jobs(settings.outbox.path)
    assert done["id"] == job["id"] and done["state"] == "done" and done["total"] >= VOLUME.orders
    assert done["rows_done"] >= VOLUME.orders


def test_a_condition_and_the_excluded_columns_apply_to_read_events(source_db, tmp_path, run_capture):
    seed(source_db)
    settings = make_settings(source_db, tmp_path / "outbox.db")
    capture = run_capture(settings)
    capture.wait_caught_up()
    request(settings.outbox.path, "public.users", condition="id <= 5")
    wait_until(lambda: jobs(settings.outbox.path)[0]["state"] == "done", timeout=60, what="the backfill")
    capture.wait_caught_up()
    reads = [e for e in read_events(settings.outbox.path) if e["source"]["op"] == "read"]
    assert sorted(e["data"]["id"] for e in reads) == [1, 2, 3, 4, 5]
    assert all(e["type"] == "customer.snapshot" for e in reads)
    assert all(
        "password" not in e["data"]["record"] and "remember_token" not in e["data"]["record"] for e in reads
    )


@pytest.mark.parametrize(
    ("condition", "error"),
    [("no_such_column = 1", "no_such_column"), ("1 = 1; DROP TABLE users", "one SQL expression")],
)
def test_a_bad_condition_fails_the_job_with_its_reason_and_capture_goes_on(
    source_db, tmp_path, run_capture, condition, error
):
    settings = make_settings(source_db, tmp_path / "outbox.db")
    capture = run_capture(settings)
    capture.wait_caught_up()
    request(settings.outbox.path, "public.users", condition=condition)
    [job] = wait_until(
        lambda: [j for j in jobs(settings.outbox.path) if j["state"] == "failed"],
        timeout=30,
        what="the failure",
    )
    assert error in job["error"]
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('still', 's@x', 'p')")
    capture.wait_caught_up()
    assert capture.thread.is_alive() and capture.error is None
    assert source_db.execute("SELECT count(*) FROM users")[0][0] == 1  # nothing was dropped
