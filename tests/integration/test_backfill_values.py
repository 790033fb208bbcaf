"""A backfilled row carries exactly the values its insert event carried: the same text for
numerics, timestamps, arrays, intervals, money, bytea, json and the awkward values of
tests/integration/test_decode_real_types.py, so a receiver cannot tell a read from a
streamed row by its values."""

from __future__ import annotations

from tests.conftest import make_settings, read_events
from tests.integration.test_backfill import jobs, request
from tests.integration.test_decode_real_types import COLUMNS, ROWS, TABLE
from tests.waiting import wait_until

MAPPING = """
[[rule]]
table = "public.odd_types"
on = ["insert"]
emit = "odd.created"
object = "odd"
key = "id"
"""


def test_a_read_event_carries_the_values_of_the_rows_insert_event(source_db, tmp_path, run_capture):
    source_db.execute(TABLE)
    source_db.execute("CREATE DOMAIN positive AS integer CHECK (VALUE > 0)")
    source_db.execute("ALTER TABLE odd_types ADD COLUMN dom positive, ADD COLUMN ints int[]")
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING)
    settings = make_settings(source_db, tmp_path / "outbox.db", mapping={"file": str(mapping)})
    capture = run_capture(settings)
    capture.wait_caught_up()
    for row in ROWS:
        source_db.execute(f"INSERT INTO odd_types ({COLUMNS}) VALUES {row}")
    source_db.execute("UPDATE odd_types SET dom = id, ints = ARRAY[id::int, -1] WHERE id < 3")
    source_db.execute(
        f"INSERT INTO odd_types ({COLUMNS}, dom, ints) SELECT {COLUMNS}, 7, '{{1,NULL}}' FROM odd_types WHERE id = 1"
    )
    capture.wait_caught_up()
    request(settings.outbox.path, "public.odd_types")
    wait_until(lambda: jobs(settings.outbox.path)[0]["state"] == "done", timeout=60, what="the backfill")
    capture.wait_caught_up()
    events = read_events(settings.outbox.path)
    inserted = {e["data"]["id"]: e["data"]["record"] for e in events if e["type"] == "odd.created"}
    read = {e["data"]["id"]: e["data"]["record"] for e in events if e["source"]["op"] == "read"}
    assert sorted(read) == sorted(inserted) == [1, 2, 3, 4, 5]
    for key in (4, 5):  # never updated: the read must equal the insert, value for value
        differ = {
            c: (inserted[key][c], read[key][c]) for c in inserted[key] if inserted[key][c] != read[key][c]
        }
        assert not differ, f"row {key}: (insert, read) {differ}"
    for key in (1, 2, 3):
        differ = {
            c: (inserted[key][c], read[key][c])
            for c in inserted[key]
            if c not in ("dom", "ints") and inserted[key][c] != read[key][c]
        }
        assert not differ, f"row {key}: (insert, read) {differ}"
    assert (read[1]["dom"], read[1]["ints"]) == (1, "{1,-1}")
    assert (read[5]["dom"], read[5]["ints"]) == (7, "{1,NULL}")
