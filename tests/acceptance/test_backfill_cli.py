"""``ct1-cdc backfill`` as a user runs it: clear refusals, ``--no-wait`` and ``status``,
``--json`` progress until done, ``--rate``, ``cancel``."""

from __future__ import annotations

import json
import signal
import sqlite3

from tests.acceptance.helpers import cli, spawn, write_config
from tests.conftest import read_events
from tests.waiting import wait_until


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_backfill_refuses_what_it_cannot_do_with_one_line(source_db, tmp_path):
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db")
    unknown = cli("backfill", "--table", "public.order", "--no-wait", config=config)
    assert unknown.returncode == 1
    assert "not a table the mapping snapshots (did you mean public.orders?)" in unknown.stderr
    views = cli("backfill", "--table", "public.product_views", "--no-wait", config=config)
    assert views.returncode == 1 and "public.product_views" in views.stderr  # enabled = false
    two = cli("backfill", "--where", "true; DROP TABLE users", "--no-wait", config=config)
    assert two.returncode == 1 and "one SQL condition" in two.stderr
    assert cli("backfill", "status", config=config).stdout.strip() == "no backfill has been requested"
    # what capture would refuse later is refused now, by Postgres itself (planned, not run)
    bad = cli("backfill", "--table", "users", "--where", "no_such_column = 1", "--no-wait", config=config)
    assert bad.returncode == 1 and 'column "no_such_column" does not exist' in bad.stderr
    assert cli("backfill", "status", config=config).stdout.strip() == "no backfill has been requested"


def test_ctrl_c_while_waiting_for_capture_cancels_what_it_queued(source_db, tmp_path):
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db")
    log = tmp_path / "backfill.log"
    waiting = spawn("backfill", "--table", "users", config=config, log=log)  # no capture runs
    wait_until(
        lambda: "waiting for capture" in log.read_text(),
        timeout=30,
        what="the hint that capture is not running",
    )
    waiting.send_signal(signal.SIGINT)
    assert waiting.wait(timeout=30) == 130
    assert "asked capture to cancel 1 backfill job(s)" in log.read_text()
    [job] = lines(cli("backfill", "status", "--json", config=config).stdout)
    assert job["state"] == "cancelled"  # never started: ended at once, nothing stays queued
    assert cli("backfill", "--table", "users", "--no-wait", config=config).returncode == 0  # not "busy"


def test_queue_watch_rate_and_cancel(source_db, tmp_path):
    source_db.execute(
        "INSERT INTO users (name, email, password) SELECT 'u' || i, 'u' || i || '@x', 'p' FROM generate_series(1, 300) i"
    )
    outbox = tmp_path / "o.db"
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, outbox)
    with open(config, "a") as fh:
        fh.write("[backfill]\nchunk_size = 50\n")
    assert cli("setup", "--no-probe", config=config).returncode == 0
    queued = cli("backfill", "--table", "users", "--rate", "400", "--no-wait", "--json", config=config)
    assert queued.returncode == 0, queued.stderr
    [job] = lines(queued.stdout)
    assert (job["table"], job["state"], job["rows"]) == ("public.users", "queued", 0)
    again = cli("backfill", "--table", "public.users", "--no-wait", config=config)
    assert again.returncode == 1 and "already running" in again.stderr
    log = tmp_path / "run.log"
    run = spawn("run", "--role", "capture", config=config, log=log)
    try:
        watched = cli("backfill", "--table", "public.orders", "--json", config=config, timeout=120)
        assert watched.returncode == 0, watched.stderr
        assert lines(watched.stdout)[-1]["state"] == "done"  # an empty table is done at once
        latest = lines(cli("backfill", "status", "--json", config=config).stdout)
        assert [j["table"] for j in latest] == ["public.orders"]  # status shows the latest request
        every = lines(cli("backfill", "status", "--all", "--json", config=config).stdout)
        assert [j["table"] for j in every] == ["public.users", "public.orders"]  # --all: each, oldest first
        reads = wait_until(
            lambda: len([e for e in read_events(outbox) if e["type"] == "customer.snapshot"]) >= 300,
            timeout=60,
            what="the users' backfill",
        )
        assert reads
        conn_rows = {e["data"]["id"] for e in read_events(outbox) if e["type"] == "customer.snapshot"}
        assert len(conn_rows) == 300
        # the throttle held: never faster than --rate (a bound noise cannot break)
        first = lines(queued.stdout)[0]["id"]
        db = sqlite3.connect(outbox)
        started, finished = db.execute(
            "SELECT started_at, finished_at FROM backfills WHERE id = ?", (first,)
        ).fetchone()
        db.close()
        assert 300 / (finished - started) <= 400 * 1.1

        # a long one, cancelled from another command
        source_db.execute(
            "INSERT INTO users (name, email, password) SELECT 'v' || i, 'v' || i || '@x', 'p' FROM generate_series(1, 2000) i"
        )
        assert (
            cli("backfill", "--table", "users", "--rate", "100", "--no-wait", config=config).returncode == 0
        )
        wait_until(
            lambda: lines(cli("backfill", "status", "--json", config=config).stdout)[0]["rows"] > 0,
            timeout=30,
            what="the slow backfill to start",
        )
        cancelled = cli("backfill", "cancel", "--json", config=config)
        assert json.loads(cancelled.stdout) == {"cancel_requested": 1}
        [job] = wait_until(
            lambda: [
                j
                for j in lines(cli("backfill", "status", "--json", config=config).stdout)
                if j["state"] == "cancelled"
            ],
            timeout=30,
            what="the cancel",
        )
        assert 0 < job["rows"] < 2300
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 0
