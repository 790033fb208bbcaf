"""Issue 9's acceptance: ct1-cdc attached to a schema that looks nothing like the marketplace
(several schemas, quoted identifiers with capitals and spaces, a keyword column, a table
without a primary key, domains, an enum, arrays, jsonb with huge numbers, a generated column,
a partitioned table with a default partition, TOAST), mapped with conditions and a truncate
rule, with DML and DDL while capturing and a kill -9 in between.  Every event is asserted."""

from __future__ import annotations

import json
import signal

from tests.acceptance.helpers import cli, spawn, write_config
from tests.waiting import wait_until

SCHEMA = """
CREATE SCHEMA "Sales Ops";
CREATE SCHEMA inventory;
CREATE TYPE "Sales Ops".stage AS ENUM ('draft', 'won', 'lost');
CREATE DOMAIN inventory.qty AS integer CHECK (VALUE >= 0);
CREATE DOMAIN inventory.price AS numeric(12, 2);
CREATE TABLE "Sales Ops"."Deal Lines" (
    "Deal ID"  bigint PRIMARY KEY,
    "select"   text,
    stage      "Sales Ops".stage NOT NULL DEFAULT 'draft',
    tags       text[],
    meta       jsonb,
    amount     numeric(30, 4),
    doubled    numeric GENERATED ALWAYS AS (amount * 2) STORED,
    notes      text
);
ALTER TABLE "Sales Ops"."Deal Lines" ALTER notes SET STORAGE EXTERNAL;
CREATE TABLE inventory.stock_moves (sku text, qty inventory.qty, price inventory.price);
ALTER TABLE inventory.stock_moves REPLICA IDENTITY FULL;
CREATE TABLE inventory.readings (id bigint, region text, value double precision, PRIMARY KEY (id, region))
    PARTITION BY LIST (region);
CREATE TABLE inventory.readings_eu PARTITION OF inventory.readings FOR VALUES IN ('eu');
CREATE TABLE inventory.readings_other PARTITION OF inventory.readings DEFAULT;
"""

MAPPING = """
[defaults]
exclude_columns = ["password"]

[[rule]]
table = '"Sales Ops"."Deal Lines"'
on = ["insert", "delete"]
emit = "deal.changed"
object = "deal"
key = "Deal ID"

[[rule]]
table = '"Sales Ops"."Deal Lines"'
on = ["update"]
when_changed = ["stage"]
when = [{ column = "stage", old_in = ["draft"], new = "won" }]
emit = "deal.won"
object = "deal"
key = "Deal ID"
exclude_columns = ["notes"]

[[rule]]
table = "inventory.stock_moves"
on = ["insert", "delete"]
emit = "stock.moved"
object = "stock"
key = "sku"

[[rule]]
table = "inventory.readings"
on = ["insert", "update"]
emit = "reading.changed"
object = "reading"
key = "id"

[[rule]]
table = "inventory.readings"
on = ["truncate"]
emit = "readings.wiped"
object = "reading"
key = "id"
"""

BIG = 12345678901234567890123
NOTES = "".join(f"{i:08x}" for i in range(4000))  # 32 kB, stored out of line


def wait_events(config, count: int, run, timeout: float = 60) -> list[dict]:
    """The outbox once it holds ``count`` events (or the run ended, or time ran out)."""
    events: list[dict] = []

    def listed() -> bool:
        events[:] = [
            json.loads(line) for line in cli("outbox", "list", "--json", config=config).stdout.splitlines()
        ]
        return len(events) >= count or run.poll() is not None

    wait_until(listed, timeout, interval=0.2, last=True)
    return events


def test_a_foreign_schema_captured_exactly_across_ddl_and_kill_9(source_db, tmp_path):
    source_db.execute(SCHEMA)
    config = write_config(
        tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db", mapping=MAPPING
    )

    setup = cli("setup", "--no-probe", config=config)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "[ok  ] mapping: 3 tables" in setup.stdout
    assert "note: Sales Ops.Deal Lines has when_changed rules" in setup.stderr  # shadow mode

    log = tmp_path / "run.log"
    run = spawn("run", "--role", "capture", config=config, log=log)
    try:
        deal = 'INSERT INTO "Sales Ops"."Deal Lines" ("Deal ID", "select", tags, meta, amount, notes) VALUES '
        source_db.execute(
            deal + "(1, 'from', ARRAY['a b', 'c,d', NULL], %s::jsonb, 12345678901234567890.1234, %s)",
            json.dumps({"big": BIG, "deep": [[[[[{"x": -BIG}]]]]]}),
            NOTES,
        )
        source_db.execute("INSERT INTO inventory.stock_moves VALUES ('sku-1', 5, 9.99), ('sku-2', 0, 100)")
        source_db.execute("INSERT INTO inventory.readings VALUES (1, 'eu', 1.5), (2, 'us', -2.25)")
        first = wait_events(config, 5, run)
        assert len(first) == 5, log.read_text()
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)

    # while capture is down: the deal is won (draft -> won, known from the shadow), then
    # another column changes (no second deal.won; notes unchanged stays out of line)
    source_db.execute('UPDATE "Sales Ops"."Deal Lines" SET stage = \'won\' WHERE "Deal ID" = 1')
    source_db.execute('UPDATE "Sales Ops"."Deal Lines" SET "select" = \'where\' WHERE "Deal ID" = 1')

    run = spawn("run", "--role", "capture", config=config, log=log)
    try:
        wait_events(config, 6, run)
        # DDL while running: a new column, a new partition, then rows that use them
        source_db.execute('ALTER TABLE "Sales Ops"."Deal Lines" ADD COLUMN "Extra Col" int DEFAULT 7')
        source_db.execute(
            "CREATE TABLE inventory.readings_asia PARTITION OF inventory.readings FOR VALUES IN ('asia')"
        )
        source_db.execute("INSERT INTO inventory.readings VALUES (3, 'asia', 4.5)")
        source_db.execute(deal.replace("notes)", 'notes, "Extra Col")') + "(2, 'x', '{}', 'null', 1, 'n', 8)")
        source_db.execute('UPDATE "Sales Ops"."Deal Lines" SET stage = \'lost\' WHERE "Deal ID" = 2')
        source_db.execute("UPDATE inventory.readings SET value = 3 WHERE id = 2")
        source_db.execute("DELETE FROM inventory.stock_moves WHERE sku = 'sku-2'")
        source_db.execute("TRUNCATE inventory.readings")
        events = wait_events(config, 11, run)
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 0, log.read_text()

    assert [(e["type"], e["source"]["op"], e["source"]["table"], e["data"]["id"]) for e in events] == [
        ("deal.changed", "insert", "Sales Ops.Deal Lines", 1),
        ("stock.moved", "insert", "inventory.stock_moves", "sku-1"),
        ("stock.moved", "insert", "inventory.stock_moves", "sku-2"),
        ("reading.changed", "insert", "inventory.readings", 1),
        ("reading.changed", "insert", "inventory.readings", 2),
        ("deal.won", "update", "Sales Ops.Deal Lines", 1),
        ("reading.changed", "insert", "inventory.readings", 3),
        ("deal.changed", "insert", "Sales Ops.Deal Lines", 2),
        ("reading.changed", "update", "inventory.readings", 2),
        ("stock.moved", "delete", "inventory.stock_moves", "sku-2"),
        ("readings.wiped", "truncate", "inventory.readings", None),
    ]
    assert [e["id"] for e in events] == list(range(1, 12))  # nothing twice across the kill -9
    inserted = events[0]["data"]["record"]
    assert inserted["select"] == "from" and inserted["stage"] == "draft"
    assert inserted["tags"] == '{"a b","c,d",NULL}'
    assert inserted["meta"] == {"big": BIG, "deep": [[[[[{"x": -BIG}]]]]]}  # json.loads keeps big ints
    assert (
        inserted["amount"] == "12345678901234567890.1234"
        and inserted["doubled"] == "24691357802469135780.2468"
    )
    assert inserted["notes"] == NOTES
    stock = events[1]["data"]["record"]
    assert stock == {"sku": "sku-1", "qty": 5, "price": "9.99"}  # domains over numbers are numbers
    assert events[9]["data"]["record"] == {"sku": "sku-2", "qty": 0, "price": "100.00"}
    won = events[5]["data"]
    assert won["previous"] == {"stage": "draft"} and won["record"]["stage"] == "won"
    assert "notes" not in won["record"]  # excluded by the rule
    assert events[6]["data"]["record"] == {"id": 3, "region": "asia", "value": 4.5}
    second = events[7]["data"]["record"]
    assert second["Extra Col"] == 8 and second["meta"] is None and second["tags"] == "{}"
    assert (
        events[8]["source"]["table"] == "inventory.readings" and events[8]["data"]["record"]["value"] == 3.0
    )
    assert events[10]["data"]["record"] == {
        "truncated": [
            "inventory.readings",
            "inventory.readings_eu",
            "inventory.readings_other",
            "inventory.readings_asia",
        ]
    }
