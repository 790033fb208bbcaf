"""Setup's check of the replication privilege on a managed server: Amazon RDS and Aurora
give no REPLICATION attribute, only membership in their role ``rds_replication``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.source import list_setting, plugin_list_with_wal2json, run_checks
from tests.conftest import SourceDb


@pytest.fixture
def rds_like(source_db: SourceDb) -> Iterator[dict[str, str]]:
    """A role ``rds_replication`` as RDS has it, a member of it and a role that is not:
    neither with REPLICATION."""
    suffix = uuid.uuid4().hex[:8]
    member, outsider = f"ct1_rds_{suffix}", f"ct1_plain_{suffix}"
    with psycopg.connect(source_db.server_dsn, autocommit=True) as admin:
        existed = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication'").fetchone()
        if not existed:
            admin.execute("CREATE ROLE rds_replication NOLOGIN")
        admin.execute(f"CREATE ROLE {member} LOGIN IN ROLE rds_replication")
        admin.execute(f"CREATE ROLE {outsider} LOGIN")
    params = conninfo_to_dict(source_db.dsn)
    yield {name: make_conninfo(**{**params, "user": name}) for name in (member, outsider)} | {
        "member": member,
        "outsider": outsider,
    }
    with psycopg.connect(source_db.server_dsn, autocommit=True) as admin:
        admin.execute(f"DROP ROLE {member}")
        admin.execute(f"DROP ROLE {outsider}")
        if not existed:
            admin.execute("DROP ROLE rds_replication")


def privilege(dsn: str, slot: str) -> tuple[bool, str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        (check,) = [c for c in run_checks(conn, slot) if c.name == "replication_privilege"]
    return check.ok, check.detail, check.fix


def test_a_member_of_rds_replication_may_replicate(source_db, rds_like):
    ok, detail, _ = privilege(rds_like[rds_like["member"]], source_db.slot)
    assert ok and detail == "role is a member of rds_replication"


def test_on_rds_the_fix_is_the_grant_rds_documents(source_db, rds_like):
    ok, detail, fix = privilege(rds_like[rds_like["outsider"]], source_db.slot)
    assert not ok and detail == "role lacks REPLICATION"
    assert fix == f"GRANT rds_replication TO {rds_like['outsider']} (as the master user)"


@pytest.mark.parametrize(
    ("shown", "items", "fix"),
    [
        ("pgoutput, test_decoding", ["pgoutput", "test_decoding"], "'pgoutput', 'test_decoding', 'wal2json'"),
        ("", [], "'wal2json'"),
        # what ALTER SYSTEM SET ... = 'pgoutput, test_decoding, wal2json' leaves: one item
        (
            '"pgoutput, test_decoding, wal2json"',
            ["pgoutput, test_decoding, wal2json"],
            "'pgoutput', 'test_decoding', 'wal2json'",
        ),
        ('"say ""hi""", x', ['say "hi"', "x"], "'say \"hi\"', 'x', 'wal2json'"),
    ],
)
def test_the_plugin_list_is_read_as_postgres_shows_it_and_fixed_item_by_item(shown, items, fix):
    assert list_setting(shown) == items
    assert plugin_list_with_wal2json(items) == fix


def test_the_printed_plugin_list_fix_gives_wal2json_its_own_item(source_db):
    """Run on a server that has the setting (some builds only): the value the fix prints,
    set in a session, is read back with wal2json as an item of its own, and the check then
    passes; the one-literal form it used to print is not."""
    with psycopg.connect(source_db.server_dsn, autocommit=True) as conn:
        shown = conn.execute("SELECT current_setting('output_plugin_libraries', true)").fetchone()[0]
        if shown is None:
            pytest.skip("this server has no output_plugin_libraries setting")
        conn.execute("SET output_plugin_libraries = 'pgoutput, test_decoding'")
        (check,) = [c for c in run_checks(conn, source_db.slot) if c.name == "output_plugin_libraries"]
        assert not check.ok
        assignment = check.fix.removeprefix("ALTER SYSTEM SET ").split(";")[0]
        assert assignment == "output_plugin_libraries = 'pgoutput', 'test_decoding', 'wal2json'"
        conn.execute(f"SET {assignment}")
        (check,) = [c for c in run_checks(conn, source_db.slot) if c.name == "output_plugin_libraries"]
        assert check.ok, check.detail
        conn.execute("SET output_plugin_libraries = 'pgoutput, test_decoding, wal2json'")
        (check,) = [c for c in run_checks(conn, source_db.slot) if c.name == "output_plugin_libraries"]
        assert not check.ok  # the old fix: one item, "pgoutput, test_decoding, wal2json"
