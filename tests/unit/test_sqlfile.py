from __future__ import annotations

from pathlib import Path

import pytest

from common import sqlfile
from common.sqlfile import parse_blocks
from outbox.store import MIGRATIONS, Q

ROOT = Path(__file__).resolve().parents[2]


def test_named_blocks():
    text = "-- preamble\n-- name: a\nSELECT 1\n\n-- name: b\nSELECT\n  2;\n"
    assert parse_blocks(text) == {"a": "SELECT 1", "b": "SELECT\n  2;"}


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        parse_blocks("-- name: a\nx\n-- name: a\ny\n")


def test_shipped_sql_files_parse():
    assert "insert_event" in Q and "1" in MIGRATIONS


@pytest.mark.parametrize("path", sorted(ROOT.glob("*/sql/*.sql")), ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_every_sql_file_loads_as_a_resource_of_its_package(path):
    blocks = sqlfile.load(path.parts[-3], path.name)
    assert blocks and blocks == parse_blocks(path.read_text(encoding="utf-8"))
    assert sqlfile.load(path.parts[-3], path.name) is blocks  # read once


def test_migration_scripts_split_on_real_semicolons_only():
    from outbox.store import _statements

    script = (
        "CREATE TABLE a (x TEXT); -- one; two\nINSERT INTO a VALUES ('p;q');\n-- trailing; comment\nSELECT 1"
    )
    parts = [p.strip() for p in _statements(script)]
    assert parts[0].startswith("CREATE TABLE a (x TEXT);")
    assert parts[1].endswith("INSERT INTO a VALUES ('p;q');")
    assert parts[-1].endswith("SELECT 1;")
