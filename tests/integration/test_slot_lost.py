"""A slot Postgres invalidated (its WAL went past ``max_slot_wal_keep_size``) while capture
was stopped: capture does not retry forever nor start again from "now" in silence; it
stops with one line saying the slot was lost, from which position, and how to go on."""

from __future__ import annotations

from common.errors import SlotLost
from tests.conftest import invalidate
from tests.waiting import wait_until


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
    assert "To capture again from now: `ct1-cdc recover`" in line
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
            and "ct1-cdc recover" in body["checks"]["slot"]["error"]
        )
        assert "ct1_cdc_slot_lost 1.0" in await (await client.get("/metrics")).text()
    finally:
        await client.close()


def test_with_on_slot_lost_recover_capture_records_the_gap_and_goes_on(
    source_db, tmp_path, run_capture, small_wal_keep
):
    from tests.catalogue_check import problems
    from tests.conftest import make_settings, read_events

    settings = make_settings(source_db, tmp_path / "outbox.db", source={"on_slot_lost": "recover"})
    first = run_capture(settings)
    first.wait_caught_up()
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('before', 'b@x', 'p')")
    first.wait_caught_up()
    first.stop()
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('lost', 'l@x', 'p')")
    invalidate(source_db)
    again = run_capture(settings)
    [gap] = wait_until(
        lambda: [e for e in read_events(settings.outbox.path) if e["type"] == "ct1.gap"], timeout=60
    )
    assert problems(gap) == [] and gap["data"]["record"]["reason"] == "invalidated"
    assert gap["data"]["record"]["from_lsn"] and gap["data"]["record"]["to_lsn"]
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('after', 'a@x', 'p')")
    again.wait_caught_up()
    names = [
        e["data"]["record"]["name"]
        for e in read_events(settings.outbox.path)
        if e["type"] == "customer.created"
    ]
    assert names == ["before", "after"] and again.error is None and again.thread.is_alive()

    # the backfill recorded with the gap sends every user as it is when it reads the table:
    # 'lost' too; 'after' as well only if it read the table after that insert (it may not)
    def backfilled() -> set[str]:
        return {
            e["data"]["record"]["name"]
            for e in read_events(settings.outbox.path)
            if e["source"]["op"] == "read"
        }

    read = wait_until(
        lambda: (names := backfilled()) >= {"before", "lost"} and names,
        timeout=60,
        what="the backfill after the recovery",
    )
    assert read <= {"before", "lost", "after"}


def drop_slot(db) -> None:
    db.execute("SELECT pg_drop_replication_slot(%s)", db.slot)


def test_a_slot_dropped_while_capture_was_away_is_a_lost_slot_not_a_fresh_start(
    source_db, settings, run_capture
):
    """Dropped by hand, by a provider near a full disk, or missing on a new primary after a
    failover: capture had read from it, so what changed since is lost; it must say so
    rather than make a new slot and go on from now in silence."""
    first = run_capture(settings)
    first.wait_caught_up()
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('a', 'a@x', 'p')")
    first.wait_caught_up()
    first.stop()
    drop_slot(source_db)
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('unseen', 'u@x', 'p')")
    again = run_capture(settings)
    wait_until(lambda: not again.thread.is_alive(), timeout=60, what="capture to stop")
    assert isinstance(again.error, SlotLost), again.error
    line = str(again.error)
    assert f"replication slot {settings.source.slot} was lost (it no longer exists" in line
    assert "ct1-cdc recover" in line
    again.error = None
    (slot,) = source_db.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", source_db.slot
    )[0]
    assert slot == 0  # no slot made behind the user's back


def test_with_recover_a_dropped_slot_is_recovered_with_the_gap(source_db, tmp_path, run_capture):
    from tests.conftest import make_settings, read_events

    settings = make_settings(source_db, tmp_path / "outbox.db", source={"on_slot_lost": "recover"})
    first = run_capture(settings)
    first.wait_caught_up()
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('before', 'b@x', 'p')")
    first.wait_caught_up()
    first.stop()
    drop_slot(source_db)
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('lost', 'l@x', 'p')")
    again = run_capture(settings)
    [gap] = wait_until(
        lambda: [e for e in read_events(settings.outbox.path) if e["type"] == "ct1.gap"], timeout=60
    )
    assert gap["data"]["record"]["reason"] == "dropped"
    wait_until(
        lambda: (
            "lost"
            in {
                e["data"]["record"]["name"]
                for e in read_events(settings.outbox.path)
                if e["source"]["op"] == "read"
            }
        ),
        timeout=60,
        what="the backfill after the recovery",
    )
    assert again.error is None and again.thread.is_alive()
