"""Setup's check of the replication privilege on a managed server: Amazon RDS and Aurora
give no REPLICATION attribute, only membership in their role ``rds_replication``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.source import run_checks
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
    assert fix.startswith("GRANT rds_replication TO")
