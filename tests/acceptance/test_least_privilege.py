"""The documented minimum: a non-superuser role with REPLICATION and SELECT on the mapped
tables sets up and captures; what it may not do ends in one line with the fix."""

from __future__ import annotations

import json
import signal
import time
import uuid

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.acceptance.helpers import cli, spawn, write_config


@pytest.fixture
def replication_role(source_db):
    role = f"ct1_min_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_db.server_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    source_db.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    params = conninfo_to_dict(source_db.dsn)
    params["user"] = role
    yield make_conninfo(**params)
    with psycopg.connect(source_db.server_dsn, autocommit=True) as admin:
        for (pid,) in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s", (role,)
        ).fetchall():
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    source_db.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
    with psycopg.connect(source_db.server_dsn, autocommit=True) as admin:
        for _ in range(50):
            try:
                admin.execute(f"DROP ROLE {role}")
                break
            except psycopg.errors.DependentObjectsStillInUse:
                time.sleep(0.1)


def test_setup_and_capture_as_a_replication_role(source_db, replication_role, tmp_path):
    config = write_config(tmp_path / "c.toml", replication_role, source_db.slot, tmp_path / "o.db")
    setup = cli("setup", "--no-probe", "--json", config=config)
    assert setup.returncode == 0, setup.stderr
    checks = {c["check"]: c for c in map(json.loads, setup.stdout.splitlines()) if "check" in c}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["replication_privilege"]["detail"] == "role has REPLICATION"
    assert "Traceback" not in setup.stderr

    log = tmp_path / "run.log"
    run = spawn("run", "--role", "capture", config=config, log=log)
    try:
        source_db.execute("INSERT INTO users (name, email, password) VALUES ('least', 'l@x', 'p')")
        deadline = time.monotonic() + 30
        listed: list[str] = []
        while not listed and time.monotonic() < deadline:
            time.sleep(0.2)
            listed = cli("outbox", "list", "--json", config=config).stdout.splitlines()
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 0, log.read_text()
    assert [json.loads(x)["data"]["record"]["name"] for x in listed] == ["least"]


def test_what_the_role_may_not_do_prints_the_fix(source_db, replication_role, tmp_path):
    source_db.execute("ALTER TABLE orders REPLICA IDENTITY NOTHING")  # updates of orders would be lost
    config = write_config(tmp_path / "c.toml", replication_role, source_db.slot, tmp_path / "o.db")
    refused = cli("setup", "--no-probe", "--replica-identity-full", config=config)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "ct1-cdc: error: cannot change the replica identity of public.orders: only its owner can"
    )
    assert "ALTER TABLE public.orders REPLICA IDENTITY FULL" in line
