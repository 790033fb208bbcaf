"""API keys from the CLI: shown once, stored hashed, listed without secrets, revoked."""

from __future__ import annotations

import json
import sqlite3

import pytest

from api.keys import hash_key
from tests.acceptance.helpers import cli


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f"[outbox]\npath = {str(tmp_path / 'o.db')!r}\n")
    return path


def test_create_list_revoke(config, tmp_path):
    made = cli(
        "keys",
        "create",
        "--name",
        "ct2 export",
        "--permissions",
        "core_transaction_1_export",
        "--allow-ip",
        "10.0.0.0/8",
        "--allow-ip",
        "127.0.0.1",
        "--json",
        config=config,
    )
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert set(key) >= {"id", "name", "key", "permissions"}
    assert key["name"] == "ct2 export" and key["permissions"] == ["core_transaction_1_export"]
    assert key["allow_ips"] == ["10.0.0.0/8", "127.0.0.1/32"]
    assert key["key"].startswith("ct1_") and len(key["key"]) > 40

    both = cli(
        "keys",
        "create",
        "--name",
        "ops",
        "--permissions",
        "core_transaction_1_export,core_transaction_1_webhooks",
        "--json",
        config=config,
    )
    assert json.loads(both.stdout)["permissions"] == [
        "core_transaction_1_export",
        "core_transaction_1_webhooks",
    ]

    raw = (tmp_path / "o.db").read_bytes()
    assert key["key"].encode() not in raw  # only the hash is stored
    conn = sqlite3.connect(tmp_path / "o.db")
    assert (
        conn.execute("SELECT count(*) FROM api_keys WHERE key_hash = ?", (hash_key(key["key"]),)).fetchone()[
            0
        ]
        == 1
    )
    conn.close()

    listed = [json.loads(x) for x in cli("keys", "list", "--json", config=config).stdout.splitlines()]
    assert [k["id"] for k in listed] == [key["id"], json.loads(both.stdout)["id"]]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    assert key["key"] not in cli("keys", "list", config=config).stdout

    assert cli("keys", "revoke", key["id"], config=config).returncode == 0
    listed = [json.loads(x) for x in cli("keys", "list", "--json", config=config).stdout.splitlines()]
    assert listed[0]["revoked_at"] is not None and listed[1]["revoked_at"] is None
    again = cli("keys", "revoke", key["id"], config=config)
    assert again.returncode == 1 and "already revoked" in again.stderr


def test_list_shows_no_secret_characters_of_any_key(config, tmp_path):
    made = cli(
        "keys", "create", "--name", "n", "--permissions", "core_transaction_1_export", "--json", config=config
    )
    key = json.loads(made.stdout)["key"]
    conn = sqlite3.connect(tmp_path / "o.db")
    stored = conn.execute("SELECT prefix FROM api_keys").fetchone()[0]
    # a key made before this fix stored its first 10 characters, 6 of them secret
    old = "ct1_Ab3xYz" + "q" * 38
    conn.execute(
        "INSERT INTO api_keys (id, name, key_hash, prefix, permissions, allow_ips, created_at)"
        " VALUES ('key_old', 'old', ?, ?, '[\"core_transaction_1_export\"]', '[]', 0)",
        (hash_key(old), old[:10]),
    )
    conn.commit()
    conn.close()
    assert stored == "ct1_"  # nothing secret is stored beside the hash
    text = cli("keys", "list", config=config).stdout
    listed = [json.loads(x) for x in cli("keys", "list", "--json", config=config).stdout.splitlines()]
    assert {k["prefix"] for k in listed} == {"ct1_"}
    for secret in (key[4:10], old[4:10]):
        assert secret not in text and secret not in json.dumps(listed)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "x", "--permissions", "admin"], "unknown permission 'admin'"),
        (["--name", "x", "--permissions", ","], "at least one permission"),
        (
            ["--name", "x", "--permissions", "core_transaction_1_export", "--allow-ip", "10.0.0.300"],
            "not an IP",
        ),
        (["--name", " ", "--permissions", "core_transaction_1_export"], "--name must not be empty"),
        (["--permissions", "core_transaction_1_export"], "Missing option '--name'"),
    ],
)
def test_bad_key_requests_fail_in_one_line(config, args, message):
    result = cli("keys", "create", *args, config=config)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_revoking_an_unknown_key_names_the_list_command(config):
    cli("keys", "list", config=config)
    cli("keys", "create", "--name", "a", "--permissions", "core_transaction_1_export", config=config)
    result = cli("keys", "revoke", "key_nope", config=config)
    assert result.returncode == 1 and "ct1-cdc keys list" in result.stderr


def test_run_serves_the_events_cursor_with_a_created_key(tmp_path):
    import signal
    import time
    import urllib.error
    import urllib.request

    from sidecar.throwaway import free_port
    from tests.acceptance.helpers import spawn
    from tests.outbox_helpers import append_events

    port = free_port()
    path = tmp_path / "o.db"
    append_events(path, ["ct2"], [("order.created", "order", 7)])
    config = tmp_path / "c.toml"
    config.write_text(f"[outbox]\npath = {str(path)!r}\n[api]\nport = {port}\n")
    made = json.loads(
        cli(
            "keys",
            "create",
            "--name",
            "ct3",
            "--permissions",
            "core_transaction_1_export",
            "--json",
            config=config,
        ).stdout
    )
    proc = spawn("run", "--role", "api", config=config, log=tmp_path / "run.log")
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as resp:
                    assert json.loads(resp.read()) == {"status": "ok"}
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{base}/api/core-transaction-1/events?limit=10",
            headers={"Authorization": f"Bearer {made['key']}"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.loads(resp.read())
        assert [e["data"]["id"] for e in body["data"]] == [7] and body["meta"]["last_event_id"] == 1
        try:
            urllib.request.urlopen(f"{base}/api/core-transaction-1/events", timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code == 401 and json.loads(exc.read())["error"]["code"] == "unauthorized"
        else:
            raise AssertionError("a request without a key must be refused")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
