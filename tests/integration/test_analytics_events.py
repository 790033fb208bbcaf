"""marketplace.analytics against a real Postgres and a real outbox: one event per period
with two emitters racing, missed periods caught up to a bound, and a source past its
statement timeout delaying the event while capture goes on."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from pathlib import Path

from api.app import excluded_columns
from cdc.analytics import KIND
from cdc.mapping import load_mapping
from common.formats import unix_to_iso
from sidecar.derived import LAST, AnalyticsRole
from sidecar.runner import router_for
from tests.catalogue_check import problems
from tests.conftest import MAPPING, SourceDb, make_settings, read_events

PERIOD = 1.0


def role(db: SourceDb, tmp_path: Path, **analytics: object) -> AnalyticsRole:
    settings = make_settings(
        db,
        tmp_path / "outbox.db",
        analytics={"period_seconds": PERIOD, "settle_seconds": 0.1, "retry_seconds": 0.2, **analytics},
    )
    return AnalyticsRole(settings, router_for(settings), excluded_columns(load_mapping(str(MAPPING))))


def analytics(path: Path) -> list[dict]:
    return [e for e in read_events(path) if e["type"] == "marketplace.analytics"]


async def run_for(seconds: float, *roles: AnalyticsRole) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in roles]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def test_two_processes_racing_emit_each_period_once(source_db, tmp_path):
    with source_db.connect() as conn:
        user = conn.execute("INSERT INTO users (name, email, password) VALUES ('a', 'a@x', 'p') RETURNING id")
        conn.execute("INSERT INTO orders (user_id, total) VALUES (%s, 12.50)", (user.fetchone()[0],))
    await run_for(4.5, role(source_db, tmp_path), role(source_db, tmp_path))
    events = analytics(tmp_path / "outbox.db")
    periods = Counter(e["data"]["id"] for e in events)
    assert len(periods) >= 3 and set(periods.values()) == {1}, periods
    starts = sorted(e["data"]["record"]["period_start"] for e in events)
    assert [e["data"]["record"]["period_start"] for e in events] == starts  # in order
    for event in events:
        assert problems(event) == []
        assert event["source"] == {"table": None, "op": "derived", "lsn": None, "xid": None}
    newest = max(e["data"]["record"]["period_start"] for e in events)
    marker = role(source_db, tmp_path)._writer().state.state_get(KIND, LAST)  # what a restart goes on from
    assert unix_to_iso(marker) == newest
    deliveries = store_deliveries(tmp_path / "outbox.db")
    assert deliveries and {endpoint for _, endpoint in deliveries} == {"ct3"}  # CT3 only by default


def store_deliveries(path: Path) -> list[tuple[int, str]]:
    """(event id, endpoint) of each delivery of a marketplace.analytics event, made or due."""
    from outbox import store

    conn = sqlite3.connect(path)
    try:
        ids = [r[0] for r in conn.execute("SELECT id FROM events WHERE type = 'marketplace.analytics'")]
        return [(i, d["endpoint"]) for i in ids for d in store.event_deliveries(conn, i)]
    finally:
        conn.close()


async def test_missed_periods_are_emitted_on_start_up_to_the_bound(source_db, tmp_path):
    now = int(time.time() // PERIOD)  # before the role exists: its own now is never earlier
    settled = int((time.time() - 0.1) // PERIOD)  # the newest period settled (settle_seconds 0.1) ends here
    first = role(source_db, tmp_path, catch_up_periods=3)
    writer = first._writer()
    writer.state.state_put(KIND, LAST, (now - 10) * PERIOD, None, None)  # last emitted ten periods ago
    writer.commit(None)
    await run_for(0.5, first)
    emitted = [e["data"]["record"]["period_start"] for e in analytics(tmp_path / "outbox.db")]
    oldest_kept = unix_to_iso((settled - 3) * PERIOD)  # of the missed, the newest three
    assert 3 <= len(emitted) <= 4 and min(emitted) >= oldest_kept, emitted  # (a fourth: a period ended since)


async def test_a_source_past_its_timeout_delays_the_event_and_capture_goes_on(
    source_db, tmp_path, run_capture, caplog
):
    slow = tmp_path / "sql"
    slow.mkdir()
    builtin = (Path(__file__).resolve().parents[2] / "api" / "sql" / "exports.sql").read_text()
    marker = "-- name: analytics_period\n"
    head, _, rest = builtin.partition(marker)
    comment, _, body = rest.partition("SELECT\n")
    slow_block = head + marker + comment + "SELECT (SELECT pg_sleep(5))::text IS NULL AS slept,\n" + body
    assert "pg_sleep" in slow_block
    (slow / "exports.sql").write_text(slow_block)
    settings = make_settings(
        source_db,
        tmp_path / "outbox.db",
        api={"sql_dir": str(slow), "statement_timeout_ms": 200},
        analytics={"retry_seconds": 0.2},
    )
    capture = run_capture(settings)
    capture.wait_caught_up()
    emitter = AnalyticsRole(settings, router_for(settings), frozenset())
    stop = asyncio.Event()
    task = asyncio.create_task(emitter.run(stop))
    for n in range(5):
        source_db.execute(
            "INSERT INTO users (name, email, password) VALUES (%s, %s, 'p')", f"u{n}", f"u{n}@x"
        )
        await asyncio.to_thread(capture.wait_caught_up, 10)
    await asyncio.sleep(1)
    stop.set()
    await asyncio.wait_for(task, 15)
    names = [
        e["data"]["record"]["name"]
        for e in read_events(settings.outbox.path)
        if e["type"] == "customer.created"
    ]
    assert names == [f"u{n}" for n in range(5)]  # captured while the figures could not be read
    assert analytics(settings.outbox.path) == []  # delayed, not emitted with wrong figures
    assert emitter.emitter.delayed >= 2 and emitter.emitter.emitted == 0  # and tried again
