"""Capture on a real Postgres never stops on a value and never changes one (issue 9):
integers past 64 bits and deep nesting in jsonb, and domains over numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cdc import capture as capture_module
from outbox import store
from tests.conftest import make_settings
from tests.outbox_helpers import same_json

BIG = 12345678901234567890123
DEEP = 5000  # levels: past orjson (254 out, 1024 in) and Python's recursion limit


def _deep(levels: int) -> tuple[str, Any]:
    """jsonb text nested ``levels`` deep, and its value."""
    value: Any = BIG
    for _ in range(levels):
        value = {"a": value}
    return '{"a": ' * levels + str(BIG) + "}" * levels, value


def _events(path: str | Path, after: int = 0) -> list[dict[str, Any]]:
    """The envelopes as a receiver reads them: parsed exactly (integers stay integers)."""
    conn = store.connect(path, readonly=True)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * DEEP))  # only for the test's own parser
    try:
        return [json.loads(store.envelope_json(r)) for r in store.iter_events(conn, after=after)]
    finally:
        sys.setrecursionlimit(limit)
        conn.close()


def _order(db) -> int:
    user = db.execute("INSERT INTO users (name, email, password) VALUES ('u', 'u@x', 'p') RETURNING id")[0][0]
    return int(db.execute("INSERT INTO orders (user_id, total) VALUES (%s, 10) RETURNING id", user)[0][0])


def test_a_jsonb_integer_past_64_bits_and_deep_nesting_never_stop_capture(source_db, settings, run_capture):
    # issue 9, breakage 1: a jsonb column of a mapped table got {"big": 12345678901234567890123};
    # capture died with "Integer exceeds 64-bit range", and again at every restart.
    source_db.execute("ALTER TABLE orders ADD COLUMN extra jsonb")
    order = _order(source_db)
    deep_text, deep_value = _deep(DEEP)
    capture = run_capture(settings)
    capture.wait_caught_up()
    first = max((e["id"] for e in _events(settings.outbox.path)), default=0)
    source_db.execute("UPDATE orders SET extra = '{\"big\": 12345678901234567890123}' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET extra = %s::jsonb WHERE id = %s", deep_text, order)
    source_db.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", order)
    capture.wait_caught_up()
    capture.stop()
    events = _events(settings.outbox.path, after=first)
    updated = [e for e in events if e["type"] == "order.updated"]
    # (an unchanged value stored out of line, TOAST, is absent from later updates)
    extras = [e["data"]["record"].get("extra", "absent") for e in updated]
    assert same_json(extras, [{"big": BIG}, deep_value, "absent"])
    assert [e["data"]["record"]["status"] for e in updated] == ["pending", "pending", "shipped"]
    (shipped,) = [e for e in events if e["type"] == "order.status_changed"]
    assert shipped["data"]["previous"] == {"status": "pending"}
    # the text a receiver gets is the number as Postgres holds it
    conn = store.connect(settings.outbox.path, readonly=True)
    try:
        stored = store.envelope_json(store.get_event(conn, updated[0]["id"]) or ())
    finally:
        conn.close()
    assert '"extra":{"big": 12345678901234567890123}' in stored
    # and a restart goes on from there: nothing again, the next change captured
    again = run_capture(settings)
    source_db.execute("UPDATE orders SET notes = 'after' WHERE id = %s", order)
    again.wait_caught_up()
    again.stop()
    later = _events(settings.outbox.path, after=events[-1]["id"])
    assert [(e["type"], e["data"]["record"]["notes"]) for e in later] == [("order.updated", "after")]


def test_a_watched_jsonb_column_goes_through_the_shadow_exactly(source_db, tmp_path, run_capture):
    # without REPLICA IDENTITY FULL, old values of when_changed columns live in the shadow
    mapping = tmp_path / "m.toml"
    mapping.write_text(
        '[[rule]]\ntable = "public.orders"\non = ["update"]\nwhen_changed = ["extra"]\n'
        'emit = "order.extra_changed"\nobject = "order"\nkey = "id"\n'
    )
    settings = make_settings(source_db, tmp_path / "o.db", mapping={"file": str(mapping)})
    source_db.execute("ALTER TABLE orders ADD COLUMN extra jsonb")
    order = _order(source_db)
    deep_text, deep_value = _deep(DEEP)
    source_db.execute("UPDATE orders SET extra = '{\"big\": 12345678901234567890123}' WHERE id = %s", order)
    capture = run_capture(settings)  # the shadow is seeded from the slot's snapshot
    capture.wait_caught_up()
    source_db.execute("UPDATE orders SET notes = 'same extra' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET extra = %s::jsonb WHERE id = %s", deep_text, order)
    capture.wait_caught_up()
    capture.stop()
    again = run_capture(settings)  # the shadow read back from SQLite
    source_db.execute("UPDATE orders SET notes = 'still the same' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET extra = '[1]' WHERE id = %s", order)
    again.wait_caught_up()
    again.stop()
    events = _events(settings.outbox.path)
    assert same_json([e["data"]["record"]["extra"] for e in events], [deep_value, [1]])
    assert same_json([e["data"]["previous"]["extra"] for e in events], [{"big": BIG}, deep_value])


@pytest.fixture
def domain_data_types(monkeypatch):
    """Capture with wal2json's include-domain-data-type (harmless once capture sets it)."""
    options = capture_module.wal2json_options
    monkeypatch.setattr(
        capture_module, "wal2json_options", lambda s: {**options(s), "include-domain-data-type": "1"}
    )


def test_domains_over_numbers_arrive_as_numbers(source_db, settings, run_capture, domain_data_types):
    # issue 9: a domain over integer came through as the string "42"
    source_db.execute("CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0)")
    source_db.execute("CREATE DOMAIN price AS numeric(12,2) CHECK (VALUE >= 0)")
    source_db.execute("CREATE DOMAIN exact AS numeric")
    source_db.execute("CREATE DOMAIN big_id AS bigint")
    source_db.execute("CREATE DOMAIN yes_no AS boolean")
    source_db.execute(
        "ALTER TABLE orders ADD COLUMN qty positive_int, ADD COLUMN unit price, ADD COLUMN ratio exact,"
        " ADD COLUMN ref big_id, ADD COLUMN gift yes_no"
    )
    capture = run_capture(settings)
    capture.wait_caught_up()
    order = _order(source_db)
    source_db.execute(
        "UPDATE orders SET qty = 42, unit = 59.9, ratio = 1234567890.12345678901234567890,"
        " ref = 9223372036854775807, gift = true WHERE id = %s",
        order,
    )
    capture.wait_caught_up()
    capture.stop()
    (updated,) = [e for e in _events(settings.outbox.path) if e["type"] == "order.updated"]
    record = updated["data"]["record"]
    assert record["qty"] == 42 and type(record["qty"]) is int
    assert record["unit"] == "59.90" and record["ratio"] == "1234567890.12345678901234567890"
    assert record["ref"] == 9223372036854775807 and record["gift"] is True


def test_the_shadow_seed_reads_any_jsonb_depth_from_the_snapshot(source_db, tmp_path, run_capture):
    """Seeding the shadow reads the watched columns with psycopg: a deeply nested jsonb
    stopped the slot's creation there (RecursionError in the JSON parser)."""
    mapping = tmp_path / "m.toml"
    mapping.write_text(
        '[[rule]]\ntable = "public.orders"\non = ["update"]\nwhen_changed = ["extra"]\n'
        'emit = "order.extra_changed"\nobject = "order"\nkey = "id"\n'
    )
    settings = make_settings(source_db, tmp_path / "o.db", mapping={"file": str(mapping)})
    source_db.execute("ALTER TABLE orders ADD COLUMN extra jsonb")
    order = _order(source_db)
    deep_text, deep_value = _deep(DEEP)
    source_db.execute("UPDATE orders SET extra = %s::jsonb WHERE id = %s", deep_text, order)
    capture = run_capture(settings)  # seeds the shadow with the deep value
    capture.wait_caught_up()
    source_db.execute("UPDATE orders SET notes = 'extra unchanged' WHERE id = %s", order)
    source_db.execute("UPDATE orders SET extra = '{\"big\": 12345678901234567890123}' WHERE id = %s", order)
    capture.wait_caught_up()
    capture.stop()
    (event,) = _events(settings.outbox.path)  # the notes update changed no watched column
    assert event["data"]["record"]["extra"] == {"big": BIG}
    assert same_json(event["data"]["previous"]["extra"], deep_value)
