"""Backfill on a schema nobody designed for it: a quoted schema and table, a partitioned
table whose primary key has two columns (one of them text, ordered by its collation), a
table without a primary key, and rows changing under the chunks."""

from __future__ import annotations

import threading

import psycopg

from tests.conftest import make_settings, read_events
from tests.integration.test_backfill import jobs, request
from tests.waiting import wait_until

SCHEMA = """
CREATE SCHEMA "Sales Ops";
CREATE TABLE "Sales Ops"."Order Lines" (
    "Order Id" bigint NOT NULL,
    "Line" text NOT NULL,
    qty integer NOT NULL,
    PRIMARY KEY ("Order Id", "Line")
) PARTITION BY RANGE ("Order Id");
CREATE TABLE "Sales Ops".lines_low PARTITION OF "Sales Ops"."Order Lines" FOR VALUES FROM (0) TO (50);
CREATE TABLE "Sales Ops".lines_high PARTITION OF "Sales Ops"."Order Lines" FOR VALUES FROM (50) TO (1000);
CREATE TABLE public.no_key (label text, n integer);
"""

MAPPING = """
[[rule]]
table = '"Sales Ops"."Order Lines"'
on = ["insert", "update"]
emit = "line.changed"
object = "line"
key = "Line"

[[rule]]
table = "public.no_key"
on = ["insert"]
emit = "thing.created"
object = "thing"
key = "label"
"""


def test_quoted_names_a_partitioned_table_and_a_two_column_key(source_db, tmp_path, run_capture):
    with source_db.connect() as conn:
        conn.execute(SCHEMA)
        conn.execute(
            """INSERT INTO "Sales Ops"."Order Lines"
               SELECT i % 100, 'L' || i || CASE WHEN i % 3 = 0 THEN 'a' ELSE 'B' END, 0
               FROM generate_series(1, 400) i"""
        )
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING)
    settings = make_settings(
        source_db, tmp_path / "outbox.db", mapping={"file": str(mapping)}, backfill={"chunk_size": 7}
    )
    capture = run_capture(settings)
    capture.wait_caught_up()
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(source_db.dsn, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                conn.execute(
                    'UPDATE "Sales Ops"."Order Lines" SET qty = qty + 1 WHERE "Order Id" = %s', (n % 100,)
                )
                stop.wait(0.005)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        request(settings.outbox.path, "Sales Ops.Order Lines")
        wait_until(lambda: jobs(settings.outbox.path)[0]["state"] == "done", timeout=120, what="the backfill")
    finally:
        stop.set()
        writer.join(timeout=10)
    capture.wait_caught_up()
    events = [e for e in read_events(settings.outbox.path) if e["data"]["object"] == "line"]
    reads = [e for e in events if e["source"]["op"] == "read"]
    assert {e["type"] for e in reads} == {"line.snapshot"}
    assert {e["source"]["table"] for e in reads} == {"Sales Ops.Order Lines"}  # the parent, not a partition
    view: dict[str, int] = {}
    versions: dict[str, int] = {}
    for e in events:
        line, qty = e["data"]["id"], e["data"]["record"]["qty"]
        assert qty >= versions.get(line, 0), (line, e["id"], e["source"]["op"], qty, versions[line])
        versions[line] = qty
        view[line] = qty
    table = dict(source_db.execute('SELECT "Line", qty FROM "Sales Ops"."Order Lines"'))
    assert view == table
    [job] = jobs(settings.outbox.path)
    assert (job["rows_done"], job["total"]) == (400, 400)


def test_a_table_without_a_primary_key_fails_with_the_fix(source_db, tmp_path, run_capture):
    source_db.execute(SCHEMA)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING)
    settings = make_settings(source_db, tmp_path / "outbox.db", mapping={"file": str(mapping)})
    run_capture(settings).wait_caught_up()
    request(settings.outbox.path, "public.no_key")
    [job] = wait_until(
        lambda: [j for j in jobs(settings.outbox.path) if j["state"] == "failed"],
        timeout=30,
        what="the failure",
    )
    assert "public.no_key has no primary key" in job["error"] and "add a primary key" in job["error"]


def test_a_bytea_key_pages_through_every_row_once(source_db, tmp_path, run_capture):
    source_db.execute("CREATE TABLE public.blobs (k bytea PRIMARY KEY, n integer)")
    source_db.execute(
        "INSERT INTO public.blobs SELECT decode(lpad(to_hex(i * 7919), 8, '0'), 'hex'), i FROM generate_series(1, 30) i"
    )
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        '[[rule]]\ntable = "public.blobs"\non = ["insert"]\nemit = "blob.created"\nobject = "blob"\nkey = "k"\n'
    )
    settings = make_settings(
        source_db, tmp_path / "outbox.db", mapping={"file": str(mapping)}, backfill={"chunk_size": 4}
    )
    run_capture(settings).wait_caught_up()
    request(settings.outbox.path, "public.blobs")
    wait_until(lambda: jobs(settings.outbox.path)[0]["state"] == "done", timeout=60, what="the backfill")
    reads = [e for e in read_events(settings.outbox.path) if e["source"]["op"] == "read"]
    assert sorted(e["data"]["record"]["n"] for e in reads) == list(range(1, 31))
    assert reads[0]["data"]["id"] == "00001eef"  # hex without \x, as a streamed bytea value
