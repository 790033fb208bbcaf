"""Exports hand over to /events without a gap or an overlap: orders written at random by
concurrent writers while a paged export and an ndjson export run, with capture running;
the export's rows plus the events after its resume position are exactly the final table,
and no event after it repeats a change the export already holds.

Each write to an order bumps its ``tracking_number`` (a version: '0' when inserted), which
both the export and every order event carry, so a gap or an overlap shows per order.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from aiohttp.test_utils import TestClient
from psycopg.conninfo import make_conninfo

from api.app import BASE
from api.exports import RESUME_HEADER
from cdc.stream import ReplicationStream
from sidecar import sample
from tests.conftest import RunningCapture, SourceDb, make_settings
from tests.integration.test_api_exports import start

VOLUME = sample.Volume(customers=30, sellers=3, products=20, orders=100, reviews=10, views=10, carts=0)
STATUSES = ("pending", "processing", "shipped", "delivered", "cancelled")
PAYMENTS = ("pending", "paid", "failed")
Row = tuple[str, str, str, int]  # status, payment_status, total, version
FINAL = "SELECT id, status, payment_status, total::text, tracking_number::int FROM orders"


@pytest.fixture
def orders_db(source_db: SourceDb) -> SourceDb:
    with source_db.connect() as conn:
        sample.generate(conn, seed=11, volume=VOLUME)
        conn.execute("UPDATE orders SET tracking_number = '0'")
    return source_db


class Writers:
    """Threads writing orders at random, each change in its own transaction, some held
    open a moment so that exports take their snapshots while others are in flight."""

    def __init__(self, db: SourceDb, threads: int = 4) -> None:
        self.db = db
        self.stop = threading.Event()
        self.customers = [r[0] for r in db.execute("SELECT id FROM users WHERE role = 'customer'")]
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        self.errors: list[BaseException] = []
        self.writes = 0

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors

    def _run(self, n: int) -> None:
        rnd = random.Random(n)
        try:
            with psycopg.connect(self.db.dsn) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        self._write(conn, rnd)
                    self.writes += 1
                    time.sleep(rnd.uniform(0.002, 0.01))
        except BaseException as exc:
            self.errors.append(exc)

    def _write(self, conn: psycopg.Connection[Any], rnd: random.Random) -> None:
        if rnd.random() < 0.1:
            conn.execute(
                "INSERT INTO orders (user_id, status, payment_status, total, tracking_number)"
                " VALUES (%s, %s, %s, %s, '0')",
                (rnd.choice(self.customers), rnd.choice(STATUSES), rnd.choice(PAYMENTS), rnd.randint(1, 999)),
            )
            return
        newest = conn.execute("SELECT max(id) FROM orders").fetchone()[0]  # type: ignore[index]
        for order in sorted(rnd.sample(range(1, newest + 1), rnd.randint(1, 3))):  # one lock order
            conn.execute(
                "UPDATE orders SET tracking_number = (tracking_number::int + 1)::text,"
                " status = %s, payment_status = %s, total = total + %s WHERE id = %s",
                (rnd.choice(STATUSES), rnd.choice(PAYMENTS), rnd.randint(1, 9), order),
            )
            if rnd.random() < 0.3:
                time.sleep(rnd.uniform(0, 0.01))  # in flight while a snapshot is taken


def row_of(record: dict[str, Any]) -> Row:
    return (record["status"], record["payment_status"], record["total"], int(record["tracking_number"]))


Get = Callable[..., Any]


@pytest.fixture
async def handing_over(
    orders_db: SourceDb, tmp_path: Path, run_capture: Callable[..., RunningCapture]
) -> AsyncIterator[tuple[TestClient, Get, RunningCapture]]:
    settings = make_settings(orders_db, tmp_path / "outbox.db")
    capture = run_capture(settings)
    capture.wait_caught_up()
    client, k = await start(settings)

    async def get(path: str, **params: Any) -> Any:
        resp = await client.get(
            f"{BASE}{path}", params={n: str(v) for n, v in params.items()}, headers={"X-API-Key": k["export"]}
        )
        assert resp.status == 200, await resp.text()
        return resp

    yield client, get, capture
    await client.close()


async def order_events_after(get: Get, after: int) -> list[dict[str, Any]]:
    """Every order event after ``after``, read from /events as a client tails it."""
    events: list[dict[str, Any]] = []
    while True:
        body = await (await get("/events", last_event_id=after, limit=1000)).json()
        events += [e for e in body["data"] if e["data"]["object"] == "order"]
        if not body["data"]:
            return events
        after = body["meta"]["last_event_id"]


def versions_of(events: list[dict[str, Any]], order: int) -> list[int]:
    """The versions of one order the events carry, once each, oldest first."""
    return sorted({row_of(e["data"]["record"])[3] for e in events if e["data"]["id"] == order})


async def test_an_export_then_the_events_after_its_resume_id_is_the_table_exactly(handing_over, orders_db):
    _, get, capture = handing_over
    pages: list[tuple[list[dict[str, Any]], int]] = []
    first_resume: list[int] = []

    async def paged() -> None:
        cursor = None
        while True:
            body = await (await get("/orders", per_page=10, **({"cursor": cursor} if cursor else {}))).json()
            meta = body["meta"]
            assert meta["resume_event_id"] is not None and meta["page_event_id"] is not None
            first_resume.append(meta["resume_event_id"])
            pages.append((body["data"], meta["page_event_id"]))
            cursor = meta["next_cursor"]
            if cursor is None:
                return
            await asyncio.sleep(0.03)  # writers go on between pages

    async def streamed() -> tuple[list[dict[str, Any]], int]:
        await asyncio.sleep(0.2)
        resp = await get("/orders", format="ndjson")
        resume = int(resp.headers[RESUME_HEADER])
        return [json.loads(line) for line in (await resp.read()).splitlines()], resume

    with Writers(orders_db) as writers:
        await asyncio.sleep(0.3)
        _, (stream_rows, stream_resume) = await asyncio.wait_for(asyncio.gather(paged(), streamed()), 120)
        await asyncio.sleep(0.2)
    assert writers.writes > 100 and len(pages) > 10
    capture.wait_caught_up()
    final = {r[0]: (r[1], r[2], r[3], r[4]) for r in orders_db.execute(FINAL)}

    # ndjson: one snapshot; every tail event is newer than the exported row, none missing
    resume = stream_resume
    tail = await order_events_after(get, resume)
    exported = {r["id"]: row_of(r) for r in stream_rows}
    state = dict(exported)
    for event in tail:
        order = event["data"]["id"]
        if order in exported:
            assert row_of(event["data"]["record"])[3] > exported[order][3], ("overlap", event["id"], resume)
        state[order] = row_of(event["data"]["record"])
    assert state == final
    for order, row in final.items():
        start_at = exported[order][3] + 1 if order in exported else 0
        assert versions_of(tail, order) == list(range(start_at, row[3] + 1)), ("gap", order)

    # paged: one position for every page; the page rule leaves neither gap nor overlap
    assert len(set(first_resume)) == 1
    resume = first_resume[0]
    tail = await order_events_after(get, resume)
    page_of = {r["id"]: (row_of(r), page_event_id) for rows, page_event_id in pages for r in rows}
    assert len(page_of) == sum(len(rows) for rows, _ in pages)  # keyset: no row twice
    state = {order: row for order, (row, _) in page_of.items()}
    kept: list[dict[str, Any]] = []
    for event in tail:
        order, version = event["data"]["id"], row_of(event["data"]["record"])[3]
        if order in page_of:
            row, page_event_id = page_of[order]
            if event["id"] <= page_event_id:
                assert version <= row[3], ("page_event_id", event["id"], page_event_id)
                continue  # already in the row
            assert version > row[3], ("overlap", event["id"], page_event_id)
        state[order] = row_of(event["data"]["record"])
        kept.append(event)
    assert state == final
    for order, row in final.items():
        start_at = page_of[order][0][3] + 1 if order in page_of else 0
        assert versions_of(kept, order) == list(range(start_at, row[3] + 1)), ("gap", order)


async def test_a_stopped_capture_gives_no_position_and_a_running_one_gives_it_again(orders_db, tmp_path):
    settings = make_settings(orders_db, tmp_path / "outbox.db", api={"resume_wait_seconds": 0.5})
    capture = RunningCapture(settings, orders_db).start()
    capture.wait_caught_up()
    capture.stop()
    orders_db.execute("UPDATE orders SET status = 'shipped' WHERE id = 1")
    client, k = await start(settings)
    auth = {"X-API-Key": k["export"]}
    try:
        resp = await client.get(f"{BASE}/orders", params={"per_page": "5"}, headers=auth)
        meta = (await resp.json())["meta"]
        assert meta["resume_event_id"] is None and meta["page_event_id"] is None
        assert resp.headers["Cache-Control"] == "no-store"
        resp = await client.get(f"{BASE}/customers", params={"format": "ndjson"}, headers=auth)
        assert resp.status == 200 and RESUME_HEADER not in resp.headers and await resp.read()

        # a reader holds the slot but confirms nothing: the wait runs out
        held = ReplicationStream(orders_db.dsn, orders_db.slot, {"format-version": "2"})
        held.start(0)
        try:
            with structlog.testing.capture_logs() as logs:
                resp = await client.get(f"{BASE}/customers", params={"per_page": "5"}, headers=auth)
            assert (await resp.json())["meta"]["resume_event_id"] is None
            assert resp.headers["X-Cache"] == "miss"
            assert [e["slot"] for e in logs if e["event"] == "export_resume_unknown"] == [orders_db.slot]
            resp = await client.get(f"{BASE}/customers", params={"per_page": "5"}, headers=auth)
            assert resp.headers["X-Cache"] == "miss"  # an answer without a position is not kept
        finally:
            held.close()

        capture = RunningCapture(settings, orders_db).start()
        try:
            capture.wait_caught_up()  # reading the slot again
            resp = await client.get(f"{BASE}/orders", params={"per_page": "5"}, headers=auth)
            meta = (await resp.json())["meta"]
            newest = await (await client.get(f"{BASE}/events", params={"limit": "1000"}, headers=auth)).json()
            assert meta["resume_event_id"] == meta["page_event_id"] is not None
            assert meta["resume_event_id"] <= newest["meta"]["last_event_id"]
            resp = await client.get(f"{BASE}/orders", params={"format": "csv"}, headers=auth)
            assert int(resp.headers[RESUME_HEADER]) >= meta["resume_event_id"]
        finally:
            capture.stop()
    finally:
        await client.close()


async def test_a_role_that_may_not_emit_the_heartbeat_still_gets_a_position(orders_db, tmp_path, run_capture):
    role = f"r_{orders_db.name}"
    orders_db.execute(f'CREATE ROLE "{role}" LOGIN')
    orders_db.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
    orders_db.execute("REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC")
    try:
        reader = make_conninfo(orders_db.dsn, user=role)
        settings = make_settings(orders_db, tmp_path / "outbox.db", api={"export_dsn": reader})
        capture = run_capture(settings)  # its own heartbeats (every 0.2 s here) move the slot
        capture.wait_caught_up()
        client, k = await start(settings)
        try:
            with structlog.testing.capture_logs() as logs:
                resp = await client.get(
                    f"{BASE}/orders", params={"format": "ndjson"}, headers={"X-API-Key": k["export"]}
                )
                assert resp.status == 200 and int(resp.headers[RESUME_HEADER]) >= 0
            refused = [e for e in logs if e["event"] == "export_seam_refused"]
            assert refused and "permission denied" in refused[0]["error"]
        finally:
            await client.close()
    finally:
        orders_db.execute("GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO PUBLIC")
        orders_db.execute(f'DROP OWNED BY "{role}"')
        orders_db.execute(f'DROP ROLE "{role}"')


async def test_a_malformed_cursor_answers_422_naming_it(orders_db, tmp_path):
    client, k = await start(make_settings(orders_db, tmp_path / "outbox.db"))
    try:
        forged = base64.urlsafe_b64encode(b'{"after": 1, "resume": "x"}').decode()
        for cursor in ("not-a-cursor", forged):
            resp = await client.get(
                f"{BASE}/orders", params={"cursor": cursor}, headers={"X-API-Key": k["export"]}
            )
            body = await resp.json()
            assert resp.status == 422 and body["success"] is False
            assert body["error"]["code"] == "invalid_parameter" and body["error"]["field"] == "cursor"
    finally:
        await client.close()
