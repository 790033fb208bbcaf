"""``ct1-cdc recover`` after Postgres invalidated the slot: a new slot, a ``ct1.gap`` event
for every endpoint naming the hole, capture going on from the new slot, and a backfill that
sends every row as it is now, so receivers converge past the hole."""

from __future__ import annotations

import json
import signal
import sqlite3

from tests.acceptance.helpers import cli, spawn, write_config
from tests.catalogue_check import problems
from tests.conftest import invalidate, read_events
from tests.waiting import wait_until


def test_recover_makes_a_new_slot_records_the_gap_and_capture_goes_on(source_db, tmp_path, small_wal_keep):
    outbox = tmp_path / "outbox.db"
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, outbox)
    assert cli("setup", config=config).returncode == 0
    refused = cli("recover", "--yes", config=config)
    assert refused.returncode == 1 and "is not lost" in refused.stderr  # a healthy slot is left alone
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('before', 'b@x', 'p')")
    log = tmp_path / "run.log"
    run = spawn("run", "--role", "capture", config=config, log=log)
    wait_until(lambda: any(e["type"] == "customer.created" for e in read_events(outbox)), timeout=60)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 0
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('lost', 'l@x', 'p')")
    invalidate(source_db)
    stopped = cli("run", "--role", "capture", config=config, timeout=60)
    assert stopped.returncode == 1 and "was lost" in stopped.stderr and "`ct1-cdc recover`" in stopped.stderr

    done = cli("recover", "--yes", "--json", config=config)
    assert done.returncode == 0, done.stderr
    gap = json.loads(done.stdout)
    assert gap.pop("backfill") == ["public.cart_items", "public.orders", "public.reviews", "public.users"]
    assert gap["reason"] == "invalidated" and gap["from_lsn"] and gap["to_lsn"] and gap["from_time"]
    [event] = [e for e in read_events(outbox) if e["type"] == "ct1.gap"]
    assert event["data"]["record"] == gap and problems(event) == []
    conn = sqlite3.connect(outbox)
    endpoints = {
        r[0] for r in conn.execute("SELECT endpoint FROM deliveries WHERE event_id = ?", (event["id"],))
    }
    conn.close()
    assert endpoints == {"ct2", "ct3"}  # every endpoint, whatever its events

    source_db.execute("INSERT INTO users (name, email, password) VALUES ('after', 'a@x', 'p')")
    run = spawn("run", "--role", "capture", config=config, log=log)
    try:
        names = wait_until(
            lambda: (
                [e["data"]["record"]["name"] for e in read_events(outbox) if e["type"] == "customer.created"]
                if any(
                    e["type"] == "customer.created" and e["data"]["record"]["name"] == "after"
                    for e in read_events(outbox)
                )
                else None
            ),
            timeout=60,
        )
        # ... and the backfill queued with the gap sends every user as it is now, 'lost' too
        wait_until(
            lambda: (
                {e["data"]["record"]["name"] for e in read_events(outbox) if e["type"] == "customer.snapshot"}
                >= {"before", "lost"}
            ),
            timeout=60,
            what="the backfill after recover",
        )
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=30)
    assert names == ["before", "after"]  # 'lost' fell in the gap, as the gap event says


def test_a_dropped_slot_is_not_silently_replaced_by_setup_or_run(source_db, tmp_path):
    """After a failover that did not carry the slot over, or a slot dropped by hand, `setup`
    and `run` say the history since the checkpoint is lost instead of starting afresh from
    now; `recover` makes the new slot and records the gap."""
    outbox = tmp_path / "outbox.db"
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, outbox)
    assert cli("setup", "--no-probe", config=config).returncode == 0
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('before', 'b@x', 'p')")
    log = tmp_path / "run.log"
    run = spawn("run", "--role", "capture", config=config, log=log)
    wait_until(lambda: any(e["type"] == "customer.created" for e in read_events(outbox)), timeout=60)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 0
    source_db.execute("SELECT pg_drop_replication_slot(%s)", source_db.slot)

    again = cli("setup", "--no-probe", config=config)
    assert again.returncode == 1
    assert (
        f"replication slot {source_db.slot} does not exist, but this outbox captured from it" in again.stderr
    )
    assert "`ct1-cdc recover --yes`" in again.stderr
    stopped = cli("run", "--role", "capture", config=config, timeout=60)
    assert stopped.returncode == 1 and "it no longer exists" in stopped.stderr
    (count,) = source_db.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", source_db.slot
    )[0]
    assert count == 0

    done = cli("recover", "--yes", "--json", config=config)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reason"] == "dropped"
    assert cli("setup", "--no-probe", config=config).returncode == 0  # attached again
