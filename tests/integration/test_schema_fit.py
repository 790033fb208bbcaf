"""Issue 9 on a real Postgres: mapping mistakes refused at run start, a rule broken by DDL
while running reported (never silent), TRUNCATE as an event, value conditions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import structlog

from common.errors import SetupError
from outbox import source_state, store
from tests.conftest import make_settings, read_events


def mapped(source_db, tmp_path, rules: str):
    path = tmp_path / "m.toml"
    path.write_text(rules)
    return make_settings(
        source_db, tmp_path / "o.db", mapping={"file": str(path)}, source={"slot_check_seconds": 0.3}
    )


def refused(run_capture, settings) -> str:
    capture = run_capture(settings)
    capture.thread.join(30)
    assert not capture.thread.is_alive(), "capture went on with a mapping that does not fit"
    assert isinstance(capture.error, SetupError)
    return str(capture.error)


RULE = '[[rule]]\ntable = "{table}"\non = {on}\nemit = "x.changed"\nobject = "x"\nkey = "{key}"\n{extra}\n'


def rule(table="public.orders", on='["insert", "update"]', key="id", extra=""):
    return RULE.format(table=table, on=on, key=key, extra=extra)


def test_run_refuses_a_missing_table_with_did_you_mean(source_db, tmp_path, run_capture):
    message = refused(run_capture, mapped(source_db, tmp_path, rule(table="public.orderss")))
    assert "mapped table public.orderss does not exist" in message
    assert "did you mean 'public.orders'" in message


def test_run_refuses_a_wrong_key_and_a_misspelled_when_changed(source_db, tmp_path, run_capture):
    message = refused(run_capture, mapped(source_db, tmp_path, rule(key="order_id")))
    assert "key column 'order_id' does not exist in public.orders" in message
    rules = rule(on='["update"]', extra='when_changed = ["statuss"]')
    message = refused(run_capture, mapped(source_db, tmp_path, rules))
    assert "when_changed column 'statuss'" in message and "did you mean 'status'" in message


def test_updates_and_deletes_of_a_table_without_key_are_refused_then_captured_once_fixed(
    source_db, tmp_path, run_capture
):
    """The report: with the default replica identity wal2json drops these updates and
    deletes (a WARNING in the server log only)."""
    source_db.execute("CREATE TABLE audit (user_id bigint, action text)")
    settings = mapped(
        source_db, tmp_path, rule(table="public.audit", on='["insert", "update", "delete"]', key="user_id")
    )
    message = refused(run_capture, settings)
    assert "updates and deletes of public.audit would be lost" in message
    assert "ALTER TABLE public.audit REPLICA IDENTITY FULL" in message
    source_db.execute("ALTER TABLE audit REPLICA IDENTITY FULL")
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("INSERT INTO audit VALUES (1, 'login')")
    source_db.execute("UPDATE audit SET action = 'logout'")
    source_db.execute("DELETE FROM audit")
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [(e["source"]["op"], e["data"]["id"], e["data"]["record"]["action"]) for e in events] == [
        ("insert", 1, "login"),
        ("update", 1, "logout"),
        ("delete", 1, "logout"),
    ]


def test_each_partition_is_checked(source_db, tmp_path, run_capture):
    source_db.execute("CREATE TABLE sales (id bigint, region text) PARTITION BY LIST (region)")
    source_db.execute("CREATE TABLE sales_eu PARTITION OF sales FOR VALUES IN ('eu')")
    source_db.execute("ALTER TABLE sales_eu REPLICA IDENTITY FULL")
    source_db.execute("CREATE TABLE sales_other PARTITION OF sales DEFAULT")
    message = refused(run_capture, mapped(source_db, tmp_path, rule(table="public.sales", on='["delete"]')))
    assert "partition public.sales_other of public.sales" in message
    assert "sales_eu" not in message


def test_a_rule_broken_by_ddl_while_running_is_reported_once_and_repaired(source_db, tmp_path, run_capture):
    settings = mapped(source_db, tmp_path, rule(on='["update"]', extra='when_changed = ["status"]'))
    with structlog.testing.capture_logs() as logs:
        capture = run_capture(settings)
        capture.wait_caught_up()
        source_db.execute("ALTER TABLE orders RENAME COLUMN status TO state")
        deadline = time.monotonic() + 20
        problems = []
        while time.monotonic() < deadline and not problems:
            time.sleep(0.2)
            with store.connect(settings.outbox.path, readonly=True) as conn:
                problems = source_state.problems_of(conn)
        assert [p["kind"] for p in problems] == ["missing_column"]
        assert "when_changed column 'status'" in problems[0]["message"]
        assert "did you mean 'state'" in problems[0]["message"]
        time.sleep(1)  # several more schema checks: still one error
        source_db.execute("ALTER TABLE orders RENAME COLUMN state TO status")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and problems:
            time.sleep(0.2)
            with store.connect(settings.outbox.path, readonly=True) as conn:
                problems = source_state.problems_of(conn)
        assert problems == []
        capture.stop()
    broken = [e for e in logs if e["event"] == "mapping_broken"]
    assert len(broken) == 1 and broken[0]["log_level"] == "error" and broken[0]["table"] == "public.orders"
    assert [e["event"] for e in logs if e["event"] == "mapping_repaired"] == ["mapping_repaired"]


TRUNCATE_RULES = (
    rule(table="public.sales", on='["insert"]')
    + '[[rule]]\ntable = "public.sales"\non = ["truncate"]\nemit = "sale.wiped"\nobject = "sale"\nkey = "id"\n'
)


def test_truncate_becomes_one_event_per_table_in_stream_order(source_db, tmp_path, run_capture):
    source_db.execute("CREATE TABLE sales (id bigint, region text) PARTITION BY LIST (region)")
    source_db.execute("CREATE TABLE sales_eu PARTITION OF sales FOR VALUES IN ('eu')")
    source_db.execute("CREATE TABLE sales_other PARTITION OF sales DEFAULT")
    settings = mapped(source_db, tmp_path, TRUNCATE_RULES)
    capture = run_capture(settings)
    capture.wait_caught_up()
    with source_db.connect() as conn, conn.transaction():
        conn.execute("INSERT INTO sales VALUES (1, 'eu'), (2, 'us')")
        conn.execute("TRUNCATE sales")
        conn.execute("INSERT INTO sales VALUES (3, 'eu')")
    source_db.execute("TRUNCATE sales_eu")
    source_db.execute("TRUNCATE product_views")  # not mapped for truncate: no event
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [(e["type"], e["source"]["op"], e["source"]["table"], e["data"]["id"]) for e in events] == [
        ("x.changed", "insert", "public.sales", 1),
        ("x.changed", "insert", "public.sales", 2),
        ("sale.wiped", "truncate", "public.sales", None),
        ("x.changed", "insert", "public.sales", 3),
        ("sale.wiped", "truncate", "public.sales", None),
    ]
    assert events[2]["data"]["record"] == {
        "truncated": ["public.sales", "public.sales_eu", "public.sales_other"]
    }
    assert events[4]["data"]["record"] == {"truncated": ["public.sales_eu"]}
    assert len({e["source"]["xid"] for e in events[:4]}) == 1


CONDITIONS = """
[[rule]]
table = "public.orders"
on = ["update"]
when_changed = ["status"]
when = [{ column = "status", new = "shipped" }]
emit = "order.shipped"
object = "order"
key = "id"

[[rule]]
table = "public.users"
on = ["update"]
when = [{ column = "email_verified_at", old_null = true, new_null = false }]
emit = "customer.verified"
object = "customer"
key = "id"
"""


@pytest.mark.parametrize("identity", ["shadow", "full"])
def test_value_conditions_on_a_real_stream(source_db, tmp_path, run_capture, identity):
    if identity == "full":
        source_db.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
        source_db.execute("ALTER TABLE users REPLICA IDENTITY FULL")
    user = source_db.execute(
        "INSERT INTO users (name, email, password) VALUES ('u', 'u@x', 'p') RETURNING id"
    )[0][0]
    order = source_db.execute(
        "INSERT INTO orders (user_id, status) VALUES (%s, 'pending') RETURNING id", user
    )[0][0]
    settings = mapped(source_db, tmp_path, CONDITIONS)
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("UPDATE orders SET status = 'processing' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET notes = 'x' WHERE id = %s", order)
    source_db.execute("UPDATE users SET name = 'v' WHERE id = %s", user)
    source_db.execute("UPDATE users SET email_verified_at = now() WHERE id = %s", user)
    source_db.execute("UPDATE users SET name = 'w' WHERE id = %s", user)
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [(e["type"], e["data"]["id"]) for e in events] == [
        ("order.shipped", order),
        ("customer.verified", user),
    ]
    assert events[0]["data"]["previous"]["status"] == "processing"


def test_an_unforeseen_error_names_the_change_and_one_transaction_can_be_skipped(
    source_db, settings, run_capture, monkeypatch
):
    """Should a change still break capture, it stops with one line naming table, key, LSN
    and transaction, stops again at the same place on restart (nothing after it is taken
    out of order), and `ct1-cdc slot skip XID` passes exactly that transaction."""
    import cdc.capture
    from tests.acceptance.helpers import cli, write_config

    real_apply = cdc.capture.apply

    def fragile(mapping, table, change, shadow=None):
        if change.new.get("name") == "poison":
            raise TypeError("a value nobody foresaw")
        return real_apply(mapping, table, change, shadow)

    monkeypatch.setattr(cdc.capture, "apply", fragile)
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('before', 'b@x', 'p')")
    with source_db.connect() as conn, conn.transaction():
        conn.execute("INSERT INTO users (name, email, password) VALUES ('neighbour', 'n@x', 'p')")
        conn.execute("INSERT INTO users (name, email, password) VALUES ('poison', 'p@x', 'p')")
        xid = conn.execute("SELECT txid_current()").fetchone()[0]
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('after', 'a@x', 'p')")
    capture.thread.join(30)
    message = str(capture.error)
    assert message.startswith("capture stopped in public.users (id=")
    assert f"transaction {xid}: TypeError: a value nobody foresaw" in message
    assert f"`ct1-cdc slot skip {xid}`" in message and " at lsn " in message

    again = run_capture(settings)  # the same place again: nothing after it is captured
    again.thread.join(30)
    assert f"transaction {xid}" in str(again.error)
    # nothing past the failing transaction was taken (what shared its group commit waits in the slot)
    assert "after" not in [e["data"]["record"]["name"] for e in read_events(settings.outbox.path)]

    outbox = Path(settings.outbox.path)
    config = write_config(outbox.with_suffix(".toml"), source_db.dsn, source_db.slot, outbox)
    skipped = cli("slot", "skip", str(xid), "--yes", config=config)
    assert skipped.returncode == 0, skipped.stderr
    third = run_capture(settings)
    third.wait_caught_up()
    third.stop()
    names = [e["data"]["record"]["name"] for e in read_events(settings.outbox.path)]
    assert names == ["before", "after"]  # the one transaction (both its rows) passed, nothing else
    status = json.loads(cli("slot", "status", "--json", config=config).stdout)
    (skip,) = status["skipped_transactions"]
    assert skip["xid"] == xid and skip["changes"] == 2 and skip["skipped_at"] is not None


def test_problems_stored_by_an_earlier_run_are_cleared_by_a_run_that_fits(source_db, settings, run_capture):
    """The usual repair: fix the mapping, restart. /readyz must not stay degraded."""
    conn = store.open_outbox(settings.outbox.path)
    stale = {"kind": "missing_column", "table": "public.orders", "rule": 1, "message": "old", "fix": "x"}
    source_state.set_problems(conn, [stale])
    conn.close()
    capture = run_capture(settings)
    capture.wait_caught_up()
    deadline = time.monotonic() + 20
    while True:
        with store.connect(settings.outbox.path, readonly=True) as conn:
            if source_state.problems_of(conn) == []:
                break
        assert time.monotonic() < deadline, "stale mapping problems were never cleared"
        time.sleep(0.1)
    capture.stop()


def test_a_mapped_sub_partitioned_table_gets_its_own_changes(source_db, tmp_path, run_capture):
    source_db.execute("CREATE TABLE sales (id bigint, region text, y int) PARTITION BY LIST (region)")
    source_db.execute("CREATE TABLE sales_eu PARTITION OF sales FOR VALUES IN ('eu') PARTITION BY RANGE (y)")
    source_db.execute("CREATE TABLE sales_eu_2026 PARTITION OF sales_eu FOR VALUES FROM (2026) TO (2027)")
    source_db.execute("CREATE TABLE sales_us PARTITION OF sales FOR VALUES IN ('us')")
    rules = rule(table="public.sales_eu", on='["insert"]') + rule(table="public.sales", on='["insert"]')
    settings = mapped(source_db, tmp_path, rules.replace('emit = "x.changed"', 'emit = "sale.added"', 1))
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("INSERT INTO sales VALUES (1, 'eu', 2026), (2, 'us', 2026)")
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [(e["type"], e["source"]["table"], e["data"]["id"]) for e in events] == [
        ("sale.added", "public.sales_eu", 1),  # the nearest mapped ancestor, not the root
        ("x.changed", "public.sales", 2),
    ]


def test_full_identity_on_a_partitioned_parent_alone_keeps_the_shadow(source_db, tmp_path, run_capture):
    """ALTER TABLE parent REPLICA IDENTITY FULL reaches no partition: the old values still
    come only from the shadow, so an unchanged status must not fire when_changed."""
    source_db.execute(
        "CREATE TABLE sales (id bigint PRIMARY KEY, status text, note text) PARTITION BY HASH (id)"
    )
    source_db.execute("CREATE TABLE sales_0 PARTITION OF sales FOR VALUES WITH (MODULUS 1, REMAINDER 0)")
    source_db.execute("ALTER TABLE sales REPLICA IDENTITY FULL")
    source_db.execute("INSERT INTO sales VALUES (1, 'open', 'a')")
    settings = mapped(
        source_db, tmp_path, rule(table="public.sales", on='["update"]', extra='when_changed = ["status"]')
    )
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("UPDATE sales SET note = 'b' WHERE id = 1")
    source_db.execute("UPDATE sales SET status = 'closed' WHERE id = 1")
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [(e["data"]["record"]["status"], e["data"]["previous"]) for e in events] == [
        ("closed", {"status": "open"})
    ]


def test_one_truncate_of_two_mapped_tables_is_one_event_each(source_db, tmp_path, run_capture):
    source_db.execute("CREATE TABLE a (id int PRIMARY KEY)")
    source_db.execute("CREATE TABLE b (id int PRIMARY KEY)")
    wipe = (
        '[[rule]]\ntable = "public.{t}"\non = ["truncate"]\nemit = "{t}.wiped"\nobject = "{t}"\nkey = "id"\n'
    )
    settings = mapped(source_db, tmp_path, wipe.format(t="a") + wipe.format(t="b"))
    capture = run_capture(settings)
    capture.wait_caught_up()
    source_db.execute("TRUNCATE a, b")
    capture.wait_caught_up()
    capture.stop()
    events = read_events(settings.outbox.path)
    assert [(e["type"], e["data"]["record"]) for e in events] == [
        ("a.wiped", {"truncated": ["public.a"]}),
        ("b.wiped", {"truncated": ["public.b"]}),
    ]
    assert events[0]["source"]["lsn"] == events[1]["source"]["lsn"]
