"""Setup refuses a mapping that would lose changes and prints the fix; --replica-identity-full
applies it; `slot status` shows the mapping against the live schema; `detach` drops the
slot and restores every replica identity setup changed."""

from __future__ import annotations

import json

from tests.acceptance.helpers import cli, write_config

RULES = """
[[rule]]
table = "public.audit"
on = ["insert", "update", "delete"]
emit = "audit.changed"
object = "audit"
key = "user_id"

[[rule]]
table = "public.orders"
on = ["update"]
when_changed = ["status"]
emit = "order.status_changed"
object = "order"
key = "id"
"""


def identities(db) -> dict[str, str]:
    rows = db.execute(
        "SELECT relname, relreplident::text FROM pg_class WHERE relname IN ('audit', 'orders') AND relkind = 'r'"
    )
    return dict(rows)


def config_with(tmp_path, db, rules: str):
    return write_config(tmp_path / "c.toml", db.dsn, db.slot, tmp_path / "o.db", mapping=rules)


def test_setup_refuses_lost_deletes_fixes_them_on_request_and_detach_restores(source_db, tmp_path):
    source_db.execute("CREATE TABLE audit (user_id bigint, action text)")
    config = config_with(tmp_path, source_db, RULES)

    refused = cli("setup", "--no-probe", config=config)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "ct1-cdc: error: mapping does not fit the source: updates and deletes of public.audit"
    )
    assert "fix: ALTER TABLE public.audit REPLICA IDENTITY FULL" in last
    assert "[FAIL] mapping: updates and deletes of public.audit would be lost" in refused.stdout
    assert source_db.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", source_db.slot
    ) == [(0,)]

    fixed = cli("setup", "--no-probe", "--replica-identity-full", config=config)
    assert fixed.returncode == 0, fixed.stderr
    assert "set REPLICA IDENTITY FULL on public.audit" in fixed.stderr
    assert "set REPLICA IDENTITY FULL on public.orders" in fixed.stderr
    assert identities(source_db) == {"audit": "f", "orders": "f"}
    assert "[ok  ] mapping: 2 tables" in fixed.stdout

    status = json.loads(cli("slot", "status", "--json", config=config).stdout)
    assert status["mapping_problems"] == [] and status["skipped_transactions"] == []

    detached = cli("detach", "--yes", config=config)
    assert detached.returncode == 0, detached.stderr
    assert f"slot_dropped: slot {source_db.slot}" in detached.stdout
    assert "replica_identity_restored: table public.audit, identity DEFAULT" in detached.stdout
    assert "replica_identity_restored: table public.orders, identity DEFAULT" in detached.stdout
    assert identities(source_db) == {"audit": "d", "orders": "d"}
    assert source_db.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", source_db.slot
    ) == [(0,)]

    again = cli("detach", "--yes", "--json", config=config)
    assert [json.loads(line) for line in again.stdout.splitlines()] == [
        {"action": "slot_absent", "slot": source_db.slot}
    ]
    assert "--yes" in cli("detach", config=config).stderr


def test_setup_names_typos_with_did_you_mean_and_slot_status_shows_ddl_breakage(source_db, tmp_path):
    typo = RULES.replace("public.audit", "public.orderz").replace("user_id", "id")
    config = config_with(tmp_path, source_db, typo)
    refused = cli("setup", "--no-probe", "--json", config=config)
    assert refused.returncode == 1
    checks = [json.loads(line) for line in refused.stdout.splitlines()]
    failed = [c for c in checks if c.get("check") == "mapping"]
    assert failed == [
        {
            "check": "mapping",
            "ok": False,
            "detail": "mapped table public.orderz does not exist in the source (did you mean 'public.orders'?)",
            "fix": "correct table = in rule 1 of the mapping, or create the table",
        }
    ]

    config = config_with(
        tmp_path, source_db, RULES.split("[[rule]]")[0] + "[[rule]]" + RULES.split("[[rule]]")[2]
    )
    assert cli("setup", "--no-probe", config=config).returncode == 0
    source_db.execute("ALTER TABLE orders RENAME COLUMN status TO state")
    status = cli("slot", "status", config=config)
    assert status.returncode == 0
    assert (
        "mapping              BROKEN: rule 1 (order.status_changed): when_changed column 'status'"
        in status.stdout
    )
    assert "did you mean 'state'" in status.stdout


def test_detach_and_skip_refuse_a_missing_outbox_before_touching_anything(source_db, tmp_path):
    config = config_with(
        tmp_path, source_db, RULES.split("[[rule]]")[0] + "[[rule]]" + RULES.split("[[rule]]")[2]
    )
    assert cli("setup", "--no-probe", config=config).returncode == 0
    (tmp_path / "o.db").rename(tmp_path / "moved.db")
    refused = cli("detach", "--yes", config=config)
    assert refused.returncode == 1 and "outbox" in refused.stderr and "does not exist" in refused.stderr
    slots = source_db.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", source_db.slot
    )
    assert slots == [(1,)]  # the slot is still there: nothing was done half
    assert not (tmp_path / "o.db").exists()  # and no empty outbox was made
    skip = cli("slot", "skip", "731", "--yes", config=config)
    assert skip.returncode == 1 and "does not exist" in skip.stderr
    assert "4294967296" in cli("slot", "skip", "4294967296", "--yes", config=config).stderr


def test_skip_refuses_a_transaction_that_has_not_begun(source_db, tmp_path):
    """Only a transaction that exists can be the one capture stopped on: a skip named
    ahead would pass by whichever healthy transaction later gets that id."""
    config = config_with(
        tmp_path, source_db, RULES.split("[[rule]]")[0] + "[[rule]]" + RULES.split("[[rule]]")[2]
    )
    assert cli("setup", "--no-probe", config=config).returncode == 0
    ((upcoming,),) = source_db.execute("SELECT txid_snapshot_xmax(txid_current_snapshot()) + 3")
    refused = cli("slot", "skip", str(upcoming % 2**32), "--yes", config=config)
    assert refused.returncode == 1 and "has not begun on the source" in refused.stderr
    status = cli("slot", "status", "--json", config=config)
    assert status.returncode == 0 and json.loads(status.stdout)["skipped_transactions"] == []
    ((past,),) = source_db.execute("SELECT txid_current()")  # one that has begun (and ended)
    taken = cli("slot", "skip", str(past % 2**32), "--yes", config=config)
    assert taken.returncode == 0, taken.stderr
