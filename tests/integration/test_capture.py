"""Capture against a real Postgres: TOAST, tables without a key, truncate, partitions,
the shadow, restarts without duplicates, group commit, big transactions, slot health."""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from cdc import source
from common.formats import parse_lsn
from outbox import store
from tests.conftest import MAPPING as ROOT_MAPPING
from tests.conftest import make_settings, read_events


def test_unchanged_toast_column_is_absent_not_null(source_db, tmp_path, run_capture):
    mapping = tmp_path / "m.toml"
    mapping.write_text(
        '[[rule]]\ntable = "public.products"\non = ["insert", "update"]\n'
        'emit = "product.changed"\nobject = "product"\nkey = "id"\n'
    )
    settings = make_settings(source_db, tmp_path / "o.db", mapping={"file": str(mapping)})
    seller = source_db.execute(
        "INSERT INTO users (name, email, password) VALUES ('s', 's@x', 'p') RETURNING id"
    )[0][0]
    shop = source_db.execute(
        "INSERT INTO shops (user_id, name, slug) VALUES (%s, 'S', 's') RETURNING id", seller
    )[0][0]
    # a description big and random enough to be stored out of line, uncompressed
    source_db.execute("ALTER TABLE products ALTER description SET STORAGE EXTERNAL")
    capture = run_capture(settings)
    capture.wait_caught_up()
    pid = source_db.execute(
        "INSERT INTO products (shop_id, name, slug, description) "
        "VALUES (%s, 'P', 'p', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 500) i)) RETURNING id",
        shop,
    )[0][0]
    source_db.execute("UPDATE products SET stock = 7 WHERE id = %s", pid)
    capture.wait_caught_up()
    capture.stop()
    inserted, updated = read_events(settings.outbox.path)
    assert len(inserted["data"]["record"]["description"]) == 16000
    assert "description" not in updated["data"]["record"]
    assert updated["data"]["record"]["stock"] == 7
    assert "description" not in (updated["data"]["previous"] or {})


def test_table_without_primary_key_insert_only_warns_once_and_never_crashes(source_db, tmp_path, run_capture):
    """Inserts of a table without a key are captured (updates and deletes would need a
    replica identity: test_schema_fit.py shows run refusing those)."""
    source_db.execute("CREATE TABLE audit (user_id bigint, action text)")
    mapping = tmp_path / "m.toml"
    mapping.write_text(
        '[[rule]]\ntable = "public.audit"\non = ["insert"]\n'
        'emit = "audit.logged"\nobject = "audit"\nkey = "user_id"\n'
        '[[rule]]\ntable = "public.users"\non = ["insert"]\nemit = "customer.created"\nobject = "customer"\nkey = "id"\n'
    )
    settings = make_settings(source_db, tmp_path / "o.db", mapping={"file": str(mapping)})
    with structlog.testing.capture_logs() as logs:
        capture = run_capture(settings)
        capture.wait_caught_up()
        source_db.execute("INSERT INTO audit VALUES (1, 'login'), (2, 'logout')")
        source_db.execute("UPDATE audit SET action = 'x'")  # no identity: logged by wal2json, not mapped
        source_db.execute("DELETE FROM audit")
        source_db.execute("INSERT INTO users (name, email, password) VALUES ('after', 'a@x', 'p')")
        capture.wait_caught_up()
        capture.stop()
    events = read_events(settings.outbox.path)
    assert [e["type"] for e in events] == ["audit.logged", "audit.logged", "customer.created"]
    assert events[0]["data"]["id"] == 1 and events[1]["data"]["id"] == 2
    warnings = [entry for entry in logs if entry["event"] == "table_without_primary_key"]
    assert len(warnings) == 1 and warnings[0]["table"] == "public.audit"


def test_truncate_is_logged_without_event_and_capture_continues(source_db, settings, run_capture):
    with structlog.testing.capture_logs() as logs:
        capture = run_capture(settings)
        capture.wait_caught_up()
        source_db.execute("INSERT INTO users (name, email, password) VALUES ('a', 'a@x', 'p')")
        source_db.execute("TRUNCATE product_views")
        source_db.execute("INSERT INTO users (name, email, password) VALUES ('b', 'b@x', 'p')")
        capture.wait_caught_up()
        capture.stop()
    assert [e["data"]["record"]["name"] for e in read_events(settings.outbox.path)] == ["a", "b"]
    assert any(e["event"] == "truncate_seen" and e["table"] == "public.product_views" for e in logs)


def test_partition_changes_are_reported_as_the_parent_table(source_db, tmp_path, run_capture):
    source_db.execute(
        "CREATE TABLE events_p (id bigint, region text, amount numeric, PRIMARY KEY (id, region)) "
        "PARTITION BY LIST (region)"
    )
    source_db.execute("CREATE TABLE events_p_eu PARTITION OF events_p FOR VALUES IN ('eu')")
    mapping = tmp_path / "m.toml"
    mapping.write_text(
        '[[rule]]\ntable = "public.events_p"\non = ["insert"]\n'
        'emit = "sale.recorded"\nobject = "sale"\nkey = "id"\n'
    )
    settings = make_settings(source_db, tmp_path / "o.db", mapping={"file": str(mapping)})
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("INSERT INTO events_p VALUES (1, 'eu', 10.10)")
    # a partition created while capture runs is picked up too
    source_db.execute("CREATE TABLE events_p_us PARTITION OF events_p FOR VALUES IN ('us')")
    source_db.execute("INSERT INTO events_p VALUES (2, 'us', 20.20)")
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [(e["source"]["table"], e["data"]["id"], e["data"]["record"]["amount"]) for e in events] == [
        ("public.events_p", 1, "10.10"),
        ("public.events_p", 2, "20.20"),
    ]


def test_shadow_is_seeded_from_the_slot_snapshot(source_db, settings, run_capture):
    user = source_db.execute(
        "INSERT INTO users (name, email, password) VALUES ('u', 'u@x', 'p') RETURNING id"
    )[0][0]
    order = source_db.execute(
        "INSERT INTO orders (user_id, status, payment_status) VALUES (%s, 'processing', 'paid') RETURNING id",
        user,
    )[0][0]
    capture = run_capture(settings)  # creates the slot; orders has default replica identity
    capture.wait_caught_up()
    source_db.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET notes = 'n' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET payment_status = 'refunded' WHERE id = %s", order)
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [e["type"] for e in events] == [
        "order.updated",
        "order.status_changed",
        "order.updated",
        "order.updated",
        "payment.status_changed",
    ]
    assert events[1]["data"]["previous"] == {"status": "processing"}
    assert events[4]["data"]["previous"] == {"payment_status": "paid"}


def test_restart_resumes_without_loss_or_duplicates(source_db, settings, run_capture):
    capture = run_capture(settings)
    capture.wait_caught_up()
    for i in range(20):
        source_db.execute(
            "INSERT INTO users (name, email, password) VALUES (%s, %s, 'p')", f"a{i}", f"a{i}@x"
        )
    capture.wait_caught_up()
    capture.stop()
    # changes while capture is down stay in the slot
    for i in range(20):
        source_db.execute(
            "INSERT INTO users (name, email, password) VALUES (%s, %s, 'p')", f"b{i}", f"b{i}@x"
        )
    second = run_capture(settings)
    second.wait_caught_up()
    second.stop()
    names = [e["data"]["record"]["name"] for e in read_events(settings.outbox.path)]
    assert names == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]


def test_transactions_resent_after_a_lost_confirmation_are_skipped(source_db, settings, run_capture):
    """The crash window: events committed in the outbox, their LSN never confirmed."""
    capture = run_capture(settings)
    capture.wait_caught_up()
    capture.stop()
    slot = settings.source.slot
    # remember the slot as it is now, before the writes
    source_db.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", slot, slot + "_bak")
    for i in range(5):
        source_db.execute(
            "INSERT INTO users (name, email, password) VALUES (%s, %s, 'p')", f"c{i}", f"c{i}@x"
        )
    again = run_capture(settings)
    again.wait_caught_up()
    again.stop()
    assert len(read_events(settings.outbox.path)) == 5
    # put the old slot back: Postgres now believes none of the five were received
    source_db.execute("SELECT pg_drop_replication_slot(%s)", slot)
    source_db.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", slot + "_bak", slot)
    third = run_capture(settings)
    third.wait_caught_up()
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('d', 'd@x', 'p')")
    third.wait_caught_up()
    third.stop()
    names = [e["data"]["record"]["name"] for e in read_events(settings.outbox.path)]
    assert names == ["c0", "c1", "c2", "c3", "c4", "d"]


def test_many_small_transactions_share_commits(source_db, settings, run_capture):
    capture = run_capture(settings)
    capture.wait_caught_up()
    commits_before = capture.capture.stats.commits
    with source_db.connect() as conn:
        for i in range(2000):
            conn.execute("INSERT INTO product_views (product_id) SELECT id FROM products LIMIT 0")
            conn.execute(
                "INSERT INTO users (name, email, password) VALUES (%s, %s, 'p')", (f"g{i}", f"g{i}@x")
            )
    capture.wait_caught_up()
    capture.stop()
    stats = capture.capture.stats
    assert stats.events == 2000
    assert stats.commits - commits_before < 2000
    assert [e["id"] for e in read_events(settings.outbox.path)] == list(range(1, 2001))


def test_big_transaction_streams_through_in_one_piece(source_db, settings, run_capture):
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute(
        "INSERT INTO users (name, email, password) "
        "SELECT 'bulk ' || i, 'bulk' || i || '@x', 'p' FROM generate_series(1, 30000) i"
    )
    capture.wait_caught_up(timeout=120)
    capture.stop()
    events = read_events(settings.outbox.path)
    assert len(events) == 30000
    assert events[0]["data"]["record"]["name"] == "bulk 1"
    assert events[-1]["data"]["record"]["name"] == "bulk 30000"
    assert len({e["source"]["xid"] for e in events}) == 1


def test_heartbeats_advance_the_slot_when_only_uncaptured_tables_change(source_db, settings, run_capture):
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("CREATE TABLE noise (id serial PRIMARY KEY, payload text)")
    for _ in range(5):
        source_db.execute("INSERT INTO noise (payload) SELECT repeat('x', 1000) FROM generate_series(1, 200)")
    target = source_db.current_lsn()
    capture.wait_caught_up()
    deadline = time.monotonic() + 20
    while True:
        with source_db.connect() as conn:
            status = source.slot_status(conn, settings.source.slot)
        assert status is not None
        if parse_lsn(status["confirmed_flush_lsn"]) >= target:
            break
        assert time.monotonic() < deadline, f"slot stuck at {status['confirmed_flush_lsn']}"
        time.sleep(0.1)
    capture.stop()
    assert read_events(settings.outbox.path) == []


def active_pid(db, slot: str) -> int | None:
    rows = db.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", slot)
    return rows[0][0] if rows else None


def terminate_walsender(db, slot: str, timeout: float = 30) -> None:
    """Kill the walsender serving ``slot`` and wait until capture has reconnected."""
    deadline = time.monotonic() + timeout
    while (pid := active_pid(db, slot)) is None:
        assert time.monotonic() < deadline, "capture never connected"
        time.sleep(0.05)
    db.execute("SELECT pg_terminate_backend(%s)", pid)
    while active_pid(db, slot) in (None, pid):
        assert time.monotonic() < deadline, "capture did not reconnect"
        time.sleep(0.05)


def test_walsender_terminated_mid_stream_resumes_without_loss(source_db, settings, run_capture):
    capture = run_capture(settings)
    capture.wait_caught_up()
    with source_db.connect() as writer:
        for i in range(300):
            writer.execute(
                "INSERT INTO users (name, email, password) VALUES (%s, %s, 'p')", (f"t{i}", f"t{i}@x")
            )
            if i in (100, 200):
                terminate_walsender(source_db, settings.source.slot)
    capture.wait_caught_up(timeout=60)
    capture.stop()
    names = [e["data"]["record"]["name"] for e in read_events(settings.outbox.path)]
    assert names == [f"t{i}" for i in range(300)]
    assert capture.capture.stats.reconnects >= 2


def test_outbox_survives_reopen_and_migrations_are_idempotent(tmp_path: Path):
    path = tmp_path / "o.db"
    conn = store.open_outbox(path)
    assert store.migrate(conn) == store.SCHEMA_VERSION
    conn.execute("PRAGMA user_version=99")
    conn.close()
    try:
        store.open_outbox(path)
    except store.OutboxError as exc:
        assert "newer" in str(exc)
    else:
        raise AssertionError("a newer schema must be refused")


def test_source_errors_are_translated(tmp_path):
    try:
        source.connect("host=127.0.0.1 port=1 user=postgres connect_timeout=2")
    except Exception as exc:
        assert "cannot connect to the source" in str(exc) and "CT1_SOURCE__DSN" in str(exc)
        assert "Connection refused" in str(exc)  # libpq's reason, not its hint line
    else:
        raise AssertionError("unreachable source must fail")


def test_a_source_unreachable_at_the_first_session_fails_capture_instead_of_waiting(tmp_path):
    from cdc.mapping import load_mapping
    from common.errors import SourceUnavailable
    from config.settings import Settings
    from outbox.store import Router
    from outbox.writer import OutboxWriter
    from sidecar.runner import build_capture

    settings = Settings(
        source={"dsn": "host=127.0.0.1 port=1 user=postgres connect_timeout=2", "reconnect_max_seconds": 1},
        outbox={"path": str(tmp_path / "o.db")},
    )
    writer = OutboxWriter(store.open_outbox(settings.outbox.path), Router([]))
    capture = build_capture(settings, writer, load_mapping(str(ROOT_MAPPING)))
    started = time.monotonic()
    try:
        capture.run()
    except SourceUnavailable as exc:
        assert "Connection refused" in str(exc)
    else:
        raise AssertionError("capture must not wait for a source it never reached")
    finally:
        writer.close()
    assert capture.stats.reconnects == 0 and time.monotonic() - started < 30


def test_slot_lag_past_the_threshold_is_a_warning(source_db, tmp_path, run_capture):
    settings = make_settings(
        source_db, tmp_path / "o.db", source={"slot_check_seconds": 0.05, "lag_warning_bytes": 1}
    )
    with structlog.testing.capture_logs() as logs:
        capture = run_capture(settings)
        capture.wait_caught_up()
        # while a big transaction streams in, the slot's confirmed position lags behind
        source_db.execute(
            "INSERT INTO users (name, email, password) "
            "SELECT 'lag ' || i, 'lag' || i || '@x', 'p' FROM generate_series(1, 60000) i"
        )
        capture.wait_caught_up(timeout=120)
        capture.stop()
    warnings = [e for e in logs if e["event"] == "slot_lag" and e["log_level"] == "warning"]
    assert warnings, "no slot_lag warning while the slot lagged"
    assert warnings[0]["slot"] == settings.source.slot
    assert warnings[0]["lag_bytes"] >= 1 and warnings[0]["wal_status"] in ("reserved", "extended")
