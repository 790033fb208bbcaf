"""The whole flow as a user runs it: setup generates secrets, `ct1-cdc run` captures and
delivers, the receiver verifies with standardwebhooks, and the CLI inspects, disables,
enables and replays."""

from __future__ import annotations

import json
import signal
import time

from sidecar.throwaway import free_port
from tests.acceptance.helpers import ThreadReceiver, cli, spawn
from tests.contract import TWELVE
from tests.waiting import wait_until


def test_setup_run_deliver_disable_enable_replay(source_db, tmp_path):
    with ThreadReceiver() as rx:
        config = tmp_path / "c.toml"
        config.write_text(
            f"[source]\ndsn = {source_db.dsn!r}\nslot = {source_db.slot!r}\nheartbeat_seconds = 0.5\n"
            f"[outbox]\npath = {str(tmp_path / 'o.db')!r}\n"
            f"[dispatcher]\nretry_schedule = [0, 0.2, 0.2]\n"
            f"[api]\nport = {free_port()}\n"  # never the default 8080, which another run may hold
            f'[[endpoints]]\nname = "ct2"\nurl = "{rx.url}"\n'
        )
        setup = cli("setup", "--json", config=config)
        assert setup.returncode == 0, setup.stderr
        summary = json.loads(setup.stdout.splitlines()[-1])
        rx.secret = summary["generated_secrets"]["ct2"]
        assert rx.secret.startswith("whsec_") and rx.secret in setup.stderr
        # the receiver did not know the secret yet: the probe is refused, setup still succeeds
        assert summary["endpoints"]["ct2"]["delivered"] is False and rx.rejected == 1
        assert "warning: endpoint ct2: webhook.test not accepted (HTTP 401)" in setup.stderr
        again = cli("setup", "--json", config=config)
        summary = json.loads(again.stdout.splitlines()[-1])
        assert summary["generated_secrets"] == {}  # shown once
        assert (
            summary["endpoints"]["ct2"]["delivered"] is True and summary["endpoints"]["ct2"]["status"] == 200
        )
        assert [e["type"] for e in rx.received] == ["webhook.test"]
        assert rx.ids == [summary["endpoints"]["ct2"]["webhook_id"]]  # verified with the secret
        rx.forget()

        log = tmp_path / "run.log"
        run = spawn("run", config=config, log=log)
        try:
            for i in range(5):
                source_db.execute(
                    "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"u{i}", f"u{i}@x"
                )
            source_db.execute("UPDATE users SET phone = '1' WHERE name = 'u0'")
            wait_until(lambda: len(rx.received) == 6)
            assert rx.rejected == 0
            assert [e["type"] for e in rx.received].count("customer.created") == 5
            assert rx.ids == [f"evt_{e['id']}" for e in rx.received]
            assert "pw" not in json.dumps(rx.received)

            delivered = cli("outbox", "deliveries", "--json", "--status", "delivered", config=config)
            assert len(delivered.stdout.splitlines()) == 6
            listed = [
                json.loads(x) for x in cli("endpoints", "list", "--json", config=config).stdout.splitlines()
            ]
            assert listed[0]["name"] == "ct2" and listed[0]["state"] == "active"

            assert cli("endpoints", "disable", "ct2", config=config).returncode == 0
            time.sleep(1.5)  # the dispatcher re-reads endpoint state every second
            source_db.execute("INSERT INTO users (name, email, password) VALUES ('late', 'late@x', 'pw')")
            time.sleep(1.5)
            assert len(rx.received) == 6
            pending = cli("outbox", "deliveries", "--json", "--status", "pending", config=config)
            assert len(pending.stdout.splitlines()) == 1
            assert cli("endpoints", "enable", "ct2", config=config).returncode == 0
            wait_until(lambda: len(rx.received) == 7)

            replay = cli("outbox", "replay", "--event", "1", "--json", config=config)
            assert json.loads(replay.stdout) == {"replayed": 1}
            wait_until(lambda: len(rx.received) == 8)
            assert rx.ids[-1] == "evt_1" and rx.received[-1] == rx.received[0]

            shown = json.loads(cli("outbox", "show", "1", "--json", config=config).stdout)
            assert [a["status"] for a in shown["attempts"]] == [200, 200]

            # history again from event 3 on: a running dispatcher starts over there
            later = sorted({int(i.removeprefix("evt_")) for i in rx.ids if int(i.removeprefix("evt_")) >= 3})
            again = cli("outbox", "replay", "--from", "3", "--endpoint", "ct2", "--json", config=config)
            assert json.loads(again.stdout) == {"replayed": len(later)}, again.stderr
            wait_until(lambda: len(rx.received) == 8 + len(later))
            resent = [int(i.removeprefix("evt_")) for i in rx.ids[8:]]
            assert resent == later  # one entity each here, so in id order as well
        finally:
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0, log.read_text()
    assert rx.secret not in log.read_text()  # secrets never reach a log line


def test_replay_needs_exactly_one_selection(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f"[outbox]\npath = {str(tmp_path / 'o.db')!r}\n")
    result = cli("outbox", "replay", config=config)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("ct1-cdc: error:")
    both = cli("outbox", "replay", "--dead", "--from", "1", config=config)
    assert "give exactly one of --event ID, --dead or --from ID" in both.stderr
    alone = cli("outbox", "replay", "--from", "1", config=config)
    assert "--from goes with --endpoint NAME" in alone.stderr
    unknown = cli("outbox", "replay", "--from", "1", "--endpoint", "nope", config=config)
    assert unknown.returncode != 0 and "no endpoint 'nope'" in unknown.stderr


def test_the_jetstream_demo_has_its_standby_take_over_and_every_event_reach_its_receivers():
    """`ct1-cdc demo --backend jetstream`: three NATS nodes, two captures (the active one
    killed with SIGKILL half-way), two dispatch and two API nodes as processes of their
    own; the standby takes over, and every event of the stream, read back from an API
    node, reaches each receiver that takes it, verified (the demo checks it and fails
    otherwise)."""
    result = cli("demo", "--backend", "jetstream", "--duration", "10", "--rate", "10", timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    out = result.stdout
    assert "==> capture-a killed with SIGKILL" in out and "==> capture-b took over " in out
    assert "==> CT2: every event it takes received" in out and "==> CT3: every event it takes received" in out
    assert "[signature ok]" in out and "REJECTED" not in out
    (events_line,) = [line for line in out.splitlines() if " events in the stream" in line]
    assert int(events_line.split()[1]) > 0
    refused = cli("demo", "--backend", "jetstream", "--ct2-url", "http://127.0.0.1:9/")
    assert refused.returncode != 0 and "--ct2-url and --env-file go with the sqlite demo" in refused.stderr


def test_demo_shows_all_twelve_types_reaching_their_receivers_verified():
    """The demo's own run: every documented type arrives, signed and verified, at CT2 and
    CT3 as the default endpoints route them (marketplace.analytics to CT3 alone)."""
    result = cli("demo", "--duration", "25", "--rate", "12", timeout=240)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    received: dict[str, set[str]] = {"CT2": set(), "CT3": set()}
    for line in out.splitlines():
        words = line.split()
        if len(words) > 3 and words[0] in received and words[1] == "<-":
            received[words[0]].add(words[3])
    assert received["CT3"] == TWELVE, sorted(TWELVE - received["CT3"])
    assert received["CT2"] == TWELVE - {"marketplace.analytics"}, sorted(received["CT2"] ^ TWELVE)
    assert "CT3 <- evt_1 " in out  # (evt_1 may be an analytics event: CT3 only)
    assert "[signature ok]" in out and "REJECTED" not in out
    assert "==> HTTP API at http://127.0.0.1:" in out and "curl -H 'Authorization: Bearer ct1_" in out
    (events_line,) = [line for line in out.splitlines() if line.startswith("==> API: GET /events")]
    assert int(events_line.split(" gave ")[1].split()[0]) > 0
    assert "==> API: GET /analytics (last 30 days): GMV " in out
    (summary,) = [line for line in out.splitlines() if line.startswith("==> deliveries: ")]
    assert "'delivered'" in summary and "'pending'" not in summary and "'dead'" not in summary
    assert out.strip().splitlines()[-1].endswith("docs/attach.md")  # and where to go next


def test_prune_removes_only_settled_old_events(tmp_path):
    import sqlite3

    from tests.outbox_helpers import append_events

    path = tmp_path / "o.db"
    append_events(path, ["ct2"], [("order.created", "order", i) for i in range(6)], rows=True)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE events SET created_at = created_at - 30 * 86400 WHERE id <= 4")
        conn.execute("UPDATE deliveries SET status = 'delivered' WHERE event_id IN (1, 2, 5)")
        conn.execute("UPDATE deliveries SET status = 'dead' WHERE event_id = 3")
        conn.execute(
            "INSERT INTO attempts (endpoint, event_id, attempted_at, status, duration_ms)"
            " VALUES ('ct2', 1, 0, 200, 1)"
        )
    conn.close()
    config = tmp_path / "c.toml"
    config.write_text(f"[outbox]\npath = {str(path)!r}\nretention_days = 7\n")
    dry = cli("outbox", "prune", "--dry-run", "--json", config=config)
    assert json.loads(dry.stdout)["would_prune"] == 3
    done = cli("outbox", "prune", "--json", config=config)
    assert json.loads(done.stdout)["pruned"] == 3
    conn = sqlite3.connect(path)
    remaining = [r[0] for r in conn.execute("SELECT id FROM events ORDER BY id")]
    attempts = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    conn.close()
    # 1-3 were old and settled; 4 is old but pending; 5-6 are recent
    assert remaining == [4, 5, 6] and attempts == 0
    listed = [json.loads(x)["id"] for x in cli("outbox", "list", "--json", config=config).stdout.splitlines()]
    assert listed == [4, 5, 6]
