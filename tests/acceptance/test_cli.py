"""The CLI as a subprocess: setup's checks and their fixes, one-line errors, the outbox
and slot commands with --json."""

from __future__ import annotations

import json
import signal
import time

import pytest

from sidecar.throwaway import create_cluster
from tests.acceptance.helpers import cli, spawn, write_config
from tests.conftest import with_db


def one_line_error(result) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ct1-cdc: error: ")
    return lines[0]


def test_setup_run_and_inspect_the_outbox(source_db, tmp_path):
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db")
    setup = cli("setup", "--json", config=config)
    assert setup.returncode == 0, setup.stderr
    checks = [json.loads(line) for line in setup.stdout.splitlines()]
    assert all(c["ok"] for c in checks if "check" in c)
    assert {c["check"] for c in checks if "check" in c} >= {
        "wal_level",
        "replication_privilege",
        "replication_slots",
        "wal_senders",
        "wal2json",
    }
    assert checks[-1]["slot_created"] is True
    first_key = checks[-1]["api_key"]
    assert first_key["key"].startswith("ct1_") and first_key["key"] in setup.stderr
    again = cli("setup", "--json", config=config)
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["slot_created"] is False and summary["api_key"] is None  # shown once

    log = tmp_path / "run.log"
    run = spawn("run", "--role", "capture", config=config, log=log)
    try:
        source_db.execute("INSERT INTO users (name, email, password) VALUES ('Ünïcode', 'u@x', 'pw')")
        source_db.execute(
            "INSERT INTO orders (user_id, total) SELECT id, 42.10 FROM users WHERE email = 'u@x'"
        )
        deadline = time.monotonic() + 30
        while True:
            listed = cli("outbox", "list", "--json", config=config)
            if len(listed.stdout.splitlines()) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 0, log.read_text()
    envelopes = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["type"] for e in envelopes] == ["customer.created", "order.created"]
    assert envelopes[0]["data"]["record"]["name"] == "Ünïcode"
    assert envelopes[1]["data"]["record"]["total"] == "42.10"

    only_orders = cli("outbox", "list", "--json", "--type", "order.*", config=config)
    assert [json.loads(x)["type"] for x in only_orders.stdout.splitlines()] == ["order.created"]
    after = cli("outbox", "list", "--json", "--after", "1", "--limit", "5", config=config)
    assert [json.loads(x)["id"] for x in after.stdout.splitlines()] == [2]
    human = cli("outbox", "list", config=config)
    assert "customer.created" in human.stdout and human.returncode == 0

    show = cli("outbox", "show", "2", "--json", config=config)
    shown = json.loads(show.stdout)
    assert shown["event"] == envelopes[1]
    assert {d["endpoint"] for d in shown["deliveries"]} == {"ct2", "ct3"}
    missing = cli("outbox", "show", "999", config=config)
    assert "no event 999" in one_line_error(missing)

    stats = json.loads(cli("outbox", "stats", "--json", config=config).stdout)
    assert stats["events"] == 2
    assert stats["events_by_type"] == {"customer.created": 1, "order.created": 1}
    assert stats["deliveries"]["ct2"] == {"pending": 2}

    status = cli("slot", "status", "--json", config=config)
    slot = json.loads(status.stdout)
    assert slot["slot"] == source_db.slot and slot["plugin"] == "wal2json"
    assert slot["wal_status"] in ("reserved", "extended") and slot["lag_bytes"] >= 0
    assert {"confirmed_flush_lsn", "safe_wal_size"} <= set(slot)
    readable = cli("slot", "status", config=config).stdout
    assert "safe_wal_size" in readable and "None" not in readable  # what no figure means, said

    refused = cli("slot", "drop", config=config)
    assert "--yes" in one_line_error(refused)
    dropped = cli("slot", "drop", "--yes", config=config)
    assert dropped.returncode == 0 and "dropped" in dropped.stdout
    gone = one_line_error(cli("slot", "status", config=config))
    # capture read from it: lost, and what `setup` and `run` would say too, only recover goes on
    assert "ct1-cdc recover --yes" in gone and "ct1-cdc setup" not in gone
    setup = cli("setup", "--no-probe", config=config)
    assert setup.returncode != 0 and setup.stderr.strip().splitlines()[-1] == gone


def test_setup_can_set_replica_identity_full_and_load_sample_data(pg_server, tmp_path):
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_db(pg_server, name)
    config = write_config(tmp_path / "c.toml", dsn, f"s_{name}", tmp_path / "o.db")
    try:
        result = cli("setup", "--sample-data", "--replica-identity-full", config=config)
        assert result.returncode == 0, result.stderr
        assert "created the sample marketplace schema" in result.stderr
        assert "set REPLICA IDENTITY FULL on public.orders" in result.stderr
        with psycopg.connect(dsn) as conn:
            ident = conn.execute(
                "SELECT relreplident FROM pg_class WHERE oid = 'public.orders'::regclass"
            ).fetchone()
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()
        assert ident == ("f",) and orders[0] > 0
        again = cli("setup", "--sample-data", config=config)  # never beside rows already there
        assert "already hold rows" in one_line_error(again)
        assert "public.orders" in one_line_error(again)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == orders
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                (name,),
            )
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_bad_configuration_fails_in_one_line_naming_the_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[source]\nheartbeat_seconds = -1\n")
    line = one_line_error(cli("setup", config=config))
    assert "source.heartbeat_seconds" in line
    line = one_line_error(cli("outbox", "stats", config=tmp_path / "missing.toml"))
    assert "not found" in line
    config.write_text("[outbox]\npath = 'x.db'\n")
    line = one_line_error(cli("run", config=config, CT1_API__PORT="not-a-port"))
    assert "api.port" in line


def test_unreachable_source_names_the_setting(tmp_path):
    config = write_config(
        tmp_path / "c.toml", "host=127.0.0.1 port=1 user=postgres connect_timeout=2", "s1", tmp_path / "o.db"
    )
    line = one_line_error(cli("setup", config=config))
    assert "cannot connect to the source" in line and "CT1_SOURCE__DSN" in line


def test_missing_wal2json_names_the_package(source_db, tmp_path):
    # The server looks for output plugins in dynamic_library_path: point it at an empty folder.
    empty = tmp_path / "nolib"
    empty.mkdir()
    empty.chmod(0o755)
    tmp_path.chmod(0o755)
    dsn = source_db.dsn + f" options='-c dynamic_library_path={empty}'"
    config = write_config(tmp_path / "c.toml", dsn, source_db.slot, tmp_path / "o.db")
    result = cli("setup", config=config)
    line = one_line_error(result)
    assert "wal2json" in line and "apt-get install postgresql-<major>-wal2json" in line
    assert "[FAIL] wal2json" in result.stdout


def test_wal_level_not_logical_names_the_fix(tmp_path):
    cluster = create_cluster(settings={"wal_level": "replica"})
    try:
        config = write_config(
            tmp_path / "c.toml", with_db(cluster.dsn(), "postgres"), "s1", tmp_path / "o.db"
        )
        line = one_line_error(cli("setup", config=config))
        assert "wal_level" in line and "ALTER SYSTEM SET wal_level = logical" in line
        result = cli("run", config=config, timeout=60)
        assert result.returncode == 1
        # run logs as it goes; its failure is still one line, the last one
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("ct1-cdc: error: ") and "wal_level = logical" in line
    finally:
        cluster.destroy()


@pytest.mark.parametrize(
    "args", [["--help"], ["outbox", "--help"], ["slot", "status", "--help"], ["demo", "--help"]]
)
def test_every_command_has_help(args):
    result = cli(*args)
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["outbox", "show", "abc"], "'abc' is not a valid integer"),
        (["outbox", "list", "--after", "-3"], "--after"),
        (["bogus"], "No such command 'bogus'"),
        (["run", "--role", "nonsense"], "unknown role 'nonsense'"),
    ],
)
def test_bad_command_line_fails_in_one_line(tmp_path, args, expected):
    config = tmp_path / "c.toml"
    config.write_text("[outbox]\npath = 'x.db'\n")
    result = cli(*args, config=config)
    assert expected in one_line_error(result)
    assert result.returncode == 2  # a wrong command line (docs/operations.md)


def test_an_endpoint_without_a_signing_secret_is_listed_as_sending_nothing(source_db, tmp_path):
    """An endpoint added to the config after setup has no secret until setup runs again:
    the dispatcher sends it nothing, and `endpoints list` says so instead of 'active'."""
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db")
    with open(config, "a", encoding="utf-8") as fh:
        fh.write('[[endpoints]]\nname = "ct2"\nurl = "http://127.0.0.1:9/hook"\n')
    assert cli("setup", "--no-probe", config=config).returncode == 0  # ct2's secret made
    with open(config, "a", encoding="utf-8") as fh:
        fh.write('[[endpoints]]\nname = "ct4"\nurl = "http://127.0.0.1:9/hook"\n')
    listed = cli("endpoints", "list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    by_name = {e["name"]: e for e in map(json.loads, listed.stdout.splitlines())}
    assert by_name["ct2"]["has_secret"] is True and by_name["ct4"]["has_secret"] is False
    lines = cli("endpoints", "list", config=config).stdout.splitlines()
    (ct4,) = [line for line in lines if line.startswith("ct4")]
    (ct2,) = [line for line in lines if line.startswith("ct2")]
    assert "no signing secret: nothing is sent; run `ct1-cdc setup`" in ct4
    assert "secret" not in ct2
