"""A slot Postgres invalidated (its WAL went past ``max_slot_wal_keep_size``) while capture
was stopped: capture does not retry forever nor start again from "now" in silence; it
stops with one line saying the slot was lost, from which position, and how to go on."""

from __future__ import annotations

import psycopg
import pytest

from common.errors import SlotLost
from tests.waiting import wait_until


@pytest.fixture
def small_wal_keep(pg_cluster, pg_server):
    if pg_cluster is None:
        pytest.skip("needs the suite's own throwaway cluster (CT1_TEST_DSN is set)")
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
    yield
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        conn.execute("SELECT pg_reload_conf()")


def invalidate(db) -> None:
    """Write and checkpoint more WAL than the slot may keep, until Postgres gives it up."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (x text)")

        def lost() -> bool:
            conn.execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            row = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (db.slot,))
            return row.fetchone()[0] == "lost"

        wait_until(lost, timeout=60, interval=0, what="the slot invalidated")


def test_capture_stops_with_one_line_when_its_slot_was_invalidated(
    source_db, settings, run_capture, small_wal_keep
):
    first = run_capture(settings)
    first.wait_caught_up()
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('a', 'a@x', 'p')")
    first.wait_caught_up()
    first.stop()
    invalidate(source_db)
    again = run_capture(settings)
    wait_until(lambda: not again.thread.is_alive(), timeout=60, what="capture to stop")
    error = again.error
    assert isinstance(error, SlotLost), error
    line = str(error)
    assert "\n" not in line
    assert f"replication slot {settings.source.slot} was lost" in line and "invalidated" in line
    assert "the outbox holds every change up to LSN " in line
    assert "`ct1-cdc slot drop --yes`, then `ct1-cdc setup`" in line
    again.error = None  # seen: the fixture need not raise it again


async def test_readyz_and_metrics_show_a_lost_slot(source_db, settings, small_wal_keep):
    from tests.integration.test_api_exports import start

    source_db.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", source_db.slot)
    client, _ = await start(settings)
    try:
        assert (await client.get("/readyz")).status == 200
        assert "ct1_cdc_slot_lost 0.0" in await (await client.get("/metrics")).text()
        invalidate(source_db)
        resp = await client.get("/readyz")
        body = await resp.json()
        assert resp.status == 503 and body["checks"]["slot"]["wal_status"] == "lost"
        assert (
            "invalidated" in body["checks"]["slot"]["error"]
            and "ct1-cdc slot drop" in body["checks"]["slot"]["error"]
        )
        assert "ct1_cdc_slot_lost 1.0" in await (await client.get("/metrics")).text()
    finally:
        await client.close()
