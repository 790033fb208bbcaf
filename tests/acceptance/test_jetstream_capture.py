"""``ct1-cdc run --role capture`` with ``[outbox] backend = "jetstream"`` on a real
Postgres and a three-node JetStream cluster: killed with SIGKILL at random moments under
a sustained write load, the stream holds every committed change exactly once, in commit
order, with gap-free ids.  Other roles refuse the backend with one line."""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cdc import source
from common.formats import parse_lsn
from config.settings import JetStreamSettings
from outbox import backfills, source_state, store
from outbox.jetstream import JetStreamLog
from outbox.jetstream_sink import LoopThread, skip_requests
from sidecar.natscluster import NatsCluster
from sidecar.throwaway import free_port
from tests.acceptance.helpers import ThreadReceiver, cli, spawn, write_config
from tests.acceptance.test_crash import Writer
from tests.conftest import read_stream
from tests.waiting import wait_until

KILLS = 5
PARTITIONS = JetStreamSettings().partitions  # (what the CLI runs use)


@pytest.fixture(autouse=True)
def no_process_left(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every ct1-cdc this module's tests start is killed after the test if it still runs
    (a test that fails half-way would otherwise leave captures reconnecting for good)."""
    started: list[subprocess.Popen[bytes]] = []
    original = spawn

    def spawning(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = original(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setitem(globals(), "spawn", spawning)
    yield
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def stream_env(cluster: NatsCluster, stream: str) -> dict[str, str]:
    return {
        "CT1_OUTBOX__BACKEND": "jetstream",
        "CT1_OUTBOX__JETSTREAM__SERVERS": json.dumps(cluster.servers),
        "CT1_OUTBOX__JETSTREAM__STREAM": stream,
        "CT1_OUTBOX__JETSTREAM__SUBJECT": f"ct1.{stream.lower()}",
    }


def stream_events(cluster: NatsCluster, stream: str) -> list[tuple[int, dict[str, Any]]]:
    read = read_stream(cluster.servers, stream, f"ct1.{stream.lower()}", partitions=PARTITIONS)
    return [(seq, event) for seq, _, event in read]


def wait_for_capture(db: Any) -> None:
    """Until the slot's confirmed position reaches the source's position now."""
    target = db.current_lsn()

    def caught_up() -> bool:
        with db.connect() as c:
            status = source.slot_status(c, db.slot)
        return bool(status and parse_lsn(status["confirmed_flush_lsn"]) >= target)

    wait_until(caught_up, 90, interval=0.2, what="capture to catch up on the stream")


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a ct1-cdc run."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def user_names(events: list[tuple[int, dict[str, Any]]]) -> list[str]:
    return [e["data"]["record"]["name"] for _, e in events if e["type"] == "customer.created"]


@pytest.mark.slow
def test_kill_9_at_random_moments_puts_every_change_in_the_stream_once(source_db, tmp_path, nats_cluster):
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "state.db")
    setup = cli("setup", config=config, **env)
    assert setup.returncode == 0, setup.stderr
    seed = int(os.environ.get("CT1_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    writer = Writer(source_db.dsn)
    writer.start()
    log = tmp_path / "run.log"
    try:
        for _ in range(KILLS):
            proc = spawn("run", "--role", "capture", config=config, log=log, **env)
            time.sleep(rng.uniform(0.5, 2.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    final = spawn("run", "--role", "capture", config=config, log=log, **env)
    try:
        wait_for_capture(source_db)
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=30) == 0, log.read_text()[-3000:]
    events = stream_events(nats_cluster, stream)
    assert len(writer.committed) > 300, "the load was not sustained"
    assert user_names(events) == writer.committed, f"seed {seed}: the stream differs from the source's truth"
    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    assert "capture_started" in log.read_text()


SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def node_config(tmp_path: Path, db: Any, name: str, receiver: str) -> Path:
    """One node's config: its own outbox file and API port, the shared endpoint."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"[source]\ndsn = {db.dsn!r}\nslot = {db.slot!r}\nheartbeat_seconds = 0.5\n"
        f"[outbox]\npath = {str(tmp_path / f'{name}.db')!r}\n"
        f"[api]\nport = {free_port()}\n"
        f"[dispatcher]\nretry_schedule = [0, 0.2, 0.2]\n"
        f'[[endpoints]]\nname = "ct2"\nurl = "{receiver}"\nsecret = "{SECRET}"\n'
    )
    return path


def api_events(config: Path, key: str, after: int = 0, wait: int = 0) -> dict[str, Any]:
    port = next(
        int(line.split("=")[1]) for line in config.read_text().splitlines() if line.startswith("port")
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/core-transaction-1/events?last_event_id={after}&limit=500&wait={wait}",
        headers={"Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=wait + 10) as response:
        return dict(json.loads(response.read()))


def make_key(config: Path, **env: str) -> str:
    made = cli(
        "keys",
        "create",
        "--name",
        "reader",
        "--permissions",
        "core_transaction_1_export",
        "--json",
        config=config,
        **env,
    )
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["key"])


@pytest.mark.slow
def test_api_and_dispatch_nodes_read_the_stream_with_the_same_ids_and_survive_kill_9(
    source_db, tmp_path, nats_cluster
):
    """Capture on one node; dispatch and an API on a second; an API alone on a third.
    Both APIs serve the same events under the same ids (the stream's sequences), a
    long-poll on the third wakes for a new change, and the receiver gets every event
    verified by the official standardwebhooks package, as ``evt_<id>``.  The dispatch
    node killed with SIGKILL and started again goes on from its copy: nothing missed."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    with ThreadReceiver() as rx:
        rx.secret = SECRET
        configs = {n: node_config(tmp_path, source_db, n, rx.url) for n in ("capture", "dispatch", "api")}
        logs = {n: tmp_path / f"{n}.log" for n in configs}
        assert cli("setup", config=configs["capture"], **env).returncode == 0
        rx.forget()  # (setup's webhook.test)
        key = make_key(configs["capture"], **env)  # made on another host: shared by the cluster
        keys = {n: key for n in ("dispatch", "api")}
        procs = {
            "capture": spawn(
                "run", "--role", "capture", config=configs["capture"], log=logs["capture"], **env
            ),
            "dispatch": spawn(
                "run", "--role", "dispatch,api", config=configs["dispatch"], log=logs["dispatch"], **env
            ),
            "api": spawn("run", "--role", "api", config=configs["api"], log=logs["api"], **env),
        }
        try:
            wait_until(
                lambda: all("run_started" in logs[n].read_text() for n in logs), 60, what="three nodes"
            )
            for i in range(20):
                source_db.execute(
                    "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"u{i}", f"u{i}@x"
                )
            wait_until(lambda: len(rx.received) >= 20, 60, what="20 deliveries")
            in_stream = stream_events(nats_cluster, stream)
            assert [e["type"] for _, e in in_stream] == ["customer.created"] * 20
            for node in ("dispatch", "api"):
                page = wait_until(
                    lambda node=node: (
                        (p := api_events(configs[node], keys[node]))["meta"]["count"] == 20 and p
                    ),
                    30,
                    what=f"the {node} node's copy",
                )
                assert [(e["id"], e["data"]["record"]["name"]) for e in page["data"]] == [
                    (seq, e["data"]["record"]["name"]) for seq, e in in_stream
                ]
            assert sorted(rx.ids) == sorted(f"evt_{seq}" for seq, _ in in_stream)
            assert "pw" not in json.dumps(rx.received)

            polled: dict[str, Any] = {}
            poll = threading.Thread(
                target=lambda: polled.update(api_events(configs["api"], keys["api"], after=20, wait=20))
            )
            poll.start()
            time.sleep(0.5)
            source_db.execute("INSERT INTO users (name, email, password) VALUES ('late', 'late@x', 'pw')")
            poll.join(timeout=25)
            assert [e["data"]["record"]["name"] for e in polled["data"]] == ["late"]
            assert polled["data"][0]["id"] == 21

            procs["dispatch"].send_signal(signal.SIGKILL)
            procs["dispatch"].wait(timeout=30)
            for i in range(20, 40):
                source_db.execute(
                    "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"u{i}", f"u{i}@x"
                )
            procs["dispatch"] = spawn(
                "run", "--role", "dispatch,api", config=configs["dispatch"], log=logs["dispatch"], **env
            )
            wait_until(lambda: len(set(rx.ids)) >= 41, 60, what="every event delivered after the restart")
            in_stream = stream_events(nats_cluster, stream)
            assert len(in_stream) == 41
            assert set(rx.ids) == {f"evt_{seq}" for seq, _ in in_stream}  # at least once, same ids
            assert rx.rejected == 0

            listed = cli("keys", "list", "--json", config=configs["capture"]).stdout.splitlines()
            key_id = next(k["id"] for k in map(json.loads, listed) if k["name"] == "reader")
            assert cli("keys", "revoke", key_id, config=configs["capture"], **env).returncode == 0

            def refused() -> bool:
                try:
                    api_events(configs["api"], key)
                except urllib.error.HTTPError as exc:
                    return exc.code == 401
                return False

            wait_until(refused, 30, what="the key revoked on another host to be refused")

            # an endpoint disabled on another host is so on the dispatch node, and enabled again
            assert cli("endpoints", "disable", "ct2", config=configs["capture"], **env).returncode == 0
            time.sleep(2.5)  # (the dispatcher reads its endpoints' states every second)
            delivered = len(set(rx.ids))
            source_db.execute("INSERT INTO users (name, email, password) VALUES ('held', 'h@x', 'pw')")
            time.sleep(2.0)
            assert len(set(rx.ids)) == delivered, "delivered to an endpoint disabled on another host"
            assert cli("endpoints", "enable", "ct2", config=configs["capture"], **env).returncode == 0
            wait_until(lambda: len(set(rx.ids)) == delivered + 1, 30, what="the held event after enabling")

            # a delivery the dispatch node gave up on is dead on the API node too; replayed
            # there, the dispatch node sends it, and the API node then lists it delivered
            refusing = {"on": True}

            async def refuse_doomed(request: web.Request, _calls: int) -> web.StreamResponse | None:
                doomed = json.loads(await request.read())["data"]["record"]["name"] == "doomed"
                return web.Response(status=500) if doomed and refusing["on"] else None

            rx.receiver.before = refuse_doomed
            source_db.execute("INSERT INTO users (name, email, password) VALUES ('doomed', 'd@x', 'pw')")

            def listed(config: Path, status: str) -> list[dict[str, Any]]:
                shown = cli("outbox", "deliveries", "--status", status, "--json", config=config)
                assert shown.returncode == 0, shown.stderr
                return [json.loads(line) for line in shown.stdout.splitlines()]

            dead = wait_until(
                lambda: listed(configs["api"], "dead"), 30, what="the dead delivery on the API node"
            )
            assert [(d["endpoint"], d["attempts"], d["last_status"]) for d in dead] == [("ct2", 3, 500)]
            doomed_id = dead[0]["event_id"]
            refusing["on"] = False
            replayed = cli("outbox", "replay", "--dead", "--json", config=configs["api"], **env)
            assert replayed.returncode == 0 and json.loads(replayed.stdout) == {"replayed": 1}, (
                replayed.stderr
            )
            wait_until(lambda: f"evt_{doomed_id}" in rx.ids, 30, what="the replayed delivery sent")
            for node in ("api", "dispatch"):
                wait_until(
                    lambda node=node: (
                        doomed_id in [d["event_id"] for d in listed(configs[node], "delivered")]
                    ),
                    30,
                    what=f"the replayed delivery listed delivered on the {node} node",
                )
                assert listed(configs[node], "dead") == []
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for name, proc in procs.items():
                assert proc.wait(timeout=30) == 0, logs[name].read_text()[-3000:]
        assert SECRET not in "".join(log.read_text() for log in logs.values())


def send(config: Path, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /webhooks/send on a node: (status, body)."""
    port = next(int(x.split("=")[1]) for x in config.read_text().splitlines() if x.startswith("port"))
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/core-transaction-1/webhooks/send",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return exc.code, dict(json.loads(exc.read()))


def test_a_manual_event_asked_on_an_api_node_goes_through_capture_to_the_endpoints_it_names(
    source_db, tmp_path, nats_cluster
):
    """`POST /webhooks/send` on an API node: with no capture running it is refused within
    twice `timeout_seconds` and never sent later; with one, capture appends it to the
    stream once, the node answers with its id (its copy holds it), and it reaches the
    endpoint `systems` names alone, also when a dispatch node restarts and takes every
    partition over after it was appended."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = {**stream_env(nats_cluster, stream), "CT1_OUTBOX__JETSTREAM__TIMEOUT_SECONDS": "1"}
    with ThreadReceiver() as rx2, ThreadReceiver() as rx3:
        rx2.secret = rx3.secret = SECRET
        configs = {n: node_config(tmp_path, source_db, n, rx2.url) for n in ("capture", "dispatch", "api")}
        for config in configs.values():  # a second endpoint, on a receiver of its own
            config.write_text(
                config.read_text() + f'[[endpoints]]\nname = "ct3"\nurl = "{rx3.url}"\nsecret = "{SECRET}"\n'
            )
        logs = {n: tmp_path / f"{n}.log" for n in configs}
        assert cli("setup", config=configs["capture"], **env).returncode == 0
        made = cli(
            "keys",
            "create",
            "--name",
            "w",
            "--permissions",
            "core_transaction_1_webhooks,core_transaction_1_export",
            "--json",
            config=configs["capture"],
            **env,
        )
        key = json.loads(made.stdout)["key"]
        procs = {
            n: spawn("run", "--role", n, config=configs[n], log=logs[n], **env) for n in ("dispatch", "api")
        }
        try:
            wait_until(lambda: all("run_started" in logs[n].read_text() for n in procs), 60, what="two nodes")
            started = time.monotonic()
            status, body = send(configs["api"], key, {"event": "ops.notice", "data": {"n": "withdrawn"}})
            assert (status, body["error"]["code"]) == (503, "capture_unavailable"), body
            assert "not sent" in body["error"]["message"] and time.monotonic() - started < 10

            procs["capture"] = spawn(
                "run", "--role", "capture", config=configs["capture"], log=logs["capture"], **env
            )
            wait_until(lambda: "run_started" in logs["capture"].read_text(), 60, what="capture")
            big = 123456789012345678901234567890  # (past 64 bits: exact all the way)
            status, body = send(
                configs["api"], key, {"event": "ops.notice", "data": {"n": 1, "big": big}, "systems": ["ct2"]}
            )
            assert status == 201, body
            first = body["data"]
            assert first == {"id": first["id"], "event": "ops.notice", "systems": ["ct2"]}
            page = api_events(configs["api"], key, after=first["id"] - 1)  # at once, on that node
            assert [(e["id"], e["type"], e["data"]) for e in page["data"]] == [
                (first["id"], "ops.notice", {"n": 1, "big": big})
            ]
            wait_until(lambda: f"evt_{first['id']}" in rx2.ids, 30, what="the manual event at ct2")

            # a dispatch node that starts again takes every partition over from the progress
            # in the cluster: the event appended meanwhile goes to ct2 alone, as asked
            procs["dispatch"].send_signal(signal.SIGTERM)
            assert procs["dispatch"].wait(timeout=30) == 0, logs["dispatch"].read_text()[-3000:]
            status, body = send(
                configs["api"], key, {"event": "ops.notice", "data": {"n": 2}, "systems": ["ct2"]}
            )
            assert status == 201, body
            second = body["data"]["id"]
            status, body = send(configs["api"], key, {"event": "ops.notice", "data": {"n": 3}})
            assert status == 201 and body["data"]["systems"] == ["ct2", "ct3"], body
            third = body["data"]["id"]
            procs["dispatch"] = spawn(
                "run", "--role", "dispatch", config=configs["dispatch"], log=logs["dispatch"], **env
            )
            source_db.execute("INSERT INTO users (name, email, password) VALUES ('after', 'a@x', 'pw')")
            wait_until(lambda: {f"evt_{second}", f"evt_{third}"} <= set(rx2.ids), 60, what="ct2's events")
            wait_until(lambda: f"evt_{third}" in rx3.ids and len(rx3.ids) >= 2, 60, what="ct3's events")
            assert f"evt_{first['id']}" not in rx3.ids and f"evt_{second}" not in rx3.ids

            notices = [
                (seq, e["data"]["n"])
                for seq, e in stream_events(nats_cluster, stream)
                if e["type"] == "ops.notice"
            ]
            assert notices == [(first["id"], 1), (second, 2), (third, 3)]  # once each; "withdrawn" never

            # the API node's /webhooks/status tells the deliveries as the dispatch node made
            # them (its own copy moves no cursor): every one delivered, none pending
            def status() -> dict[str, Any]:
                port = next(
                    int(x.split("=")[1])
                    for x in configs["api"].read_text().splitlines()
                    if x.startswith("port")
                )
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/core-transaction-1/webhooks/status",
                    headers={"Authorization": f"Bearer {key}"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    return {e["system"]: e for e in json.loads(response.read())["data"]}

            def got(rx: ThreadReceiver) -> int:
                return len({i for i in rx.ids if i[4:].isdigit()})  # (not setup's webhook.test)

            wanted = {"ct2": 4, "ct3": 2}  # the three manual events and the user; the third and the user
            wait_until(lambda: (got(rx2), got(rx3)) == (4, 2), 30, what="every delivery at the receivers")
            shown: dict[str, Any] = {}

            def told() -> bool:
                shown.update(status())
                return all(shown[n]["delivered"] == wanted[n] and shown[n]["pending"] == 0 for n in wanted)

            wait_until(told, 30, interval=1.0, last=True)  # (slowly: the key's rate limit)
            assert {n: (shown[n]["delivered"], shown[n]["pending"]) for n in wanted} == {
                n: (wanted[n], 0) for n in wanted
            }
            assert shown["ct2"]["dispatch_nodes"] == 1 and shown["ct2"]["attempts_1h"] >= wanted["ct2"]
            assert sorted(rx2.ids) == sorted(set(rx2.ids))  # (each once here)
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for name, proc in procs.items():
                assert proc.wait(timeout=30) == 0, logs[name].read_text()[-3000:]


def test_capture_says_which_servers_it_cannot_reach(source_db, tmp_path):
    env = {
        "CT1_OUTBOX__BACKEND": "jetstream",
        "CT1_OUTBOX__JETSTREAM__SERVERS": json.dumps(["nats://127.0.0.1:9"]),
        "CT1_OUTBOX__JETSTREAM__TIMEOUT_SECONDS": "1",
    }
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "state.db")
    setup = cli("setup", config=config, **env)  # it seeds the shadow into the state stream
    assert setup.returncode == 1
    assert setup.stderr.strip().splitlines()[-1] == (
        "ct1-cdc: error: cannot reach NATS at nats://127.0.0.1:9: no server answered within 3 s"
    ), setup.stderr
    run = cli("run", "--role", "capture", config=config, timeout=60, **env)
    assert run.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:9" in run.stderr, run.stderr


STATUSES = ["pending", "processing", "shipped", "delivered", "refunded"]


def took_over(log: Path) -> int:
    return log.read_text(errors="replace").count("standby_took_over") if log.exists() else 0


def waits(log: Path) -> int:
    return log.read_text(errors="replace").count("standby_waiting") if log.exists() else 0


def spawn_standby(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a capture while another reads the slot; return once it waits as the standby."""
    before = waits(log)
    proc = spawn("run", "--role", "capture", config=config, log=log, **env)
    wait_until(lambda: waits(log) > before, 60, what="the capture started again to wait as the standby")
    return proc


def kill_and_wait_for_take_over(active: subprocess.Popen[bytes], standby_log: Path) -> float:
    """Kill -9 the active capture; seconds until the standby's log says it took over."""
    before = took_over(standby_log)
    active.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    active.wait(timeout=30)
    wait_until(lambda: took_over(standby_log) > before, 60, interval=0.05, what="the standby to take over")
    return time.monotonic() - killed


@pytest.mark.slow
def test_a_standby_takes_over_a_killed_capture_with_nothing_lost_twice_or_out_of_its_state(
    source_db, tmp_path, nats_cluster
):
    """Two captures on two "hosts" (each its own state file): one streams, the other waits.
    Kill -9 the active one under a sustained load, three times, starting it again as the
    new standby each time: the stream holds every committed change once, in order; and an
    order's status changes, made on either side of each take-over, each name the status
    before (the shadow, which the standby has from the state stream, not from its disk)."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    hosts = ("a", "b")
    configs = {
        h: write_config(tmp_path / f"{h}.toml", source_db.dsn, source_db.slot, tmp_path / f"{h}.db")
        for h in hosts
    }
    logs = {h: tmp_path / f"{h}.log" for h in hosts}
    with source_db.connect() as conn:  # before setup: its shadow is the one setup seeds
        buyer = conn.execute(
            "INSERT INTO users (name, email, password) VALUES ('buyer', 'b@x', 'p') RETURNING id"
        )
        order = conn.execute("INSERT INTO orders (user_id) VALUES (%s) RETURNING id", (buyer.fetchone()[0],))
        order_id = order.fetchone()[0]
        conn.commit()
    assert cli("setup", config=configs["a"], **env).returncode == 0

    def set_status(status: str) -> None:
        with source_db.connect() as conn:
            conn.execute("UPDATE orders SET status = %s WHERE id = %s", (status, order_id))
            conn.commit()

    rng = random.Random(int(os.environ.get("CT1_CRASH_SEED", random.randrange(1 << 30))))
    writer = Writer(source_db.dsn)
    procs = {"a": spawn("run", "--role", "capture", config=configs["a"], log=logs["a"], **env)}
    takeovers: list[float] = []
    try:
        wait_until(lambda: "capture_started" in logs["a"].read_text(), 60, what="a to capture")
        procs["b"] = spawn_standby(configs["b"], logs["b"], env)
        writer.start()
        active, standby = "a", "b"
        for status in STATUSES[1:4]:
            time.sleep(rng.uniform(0.5, 1.5))
            set_status(status)  # captured by the active one, or read again by the standby
            time.sleep(rng.uniform(0.0, 0.5))
            takeovers.append(kill_and_wait_for_take_over(procs[active], logs[standby]))
            procs[active] = spawn_standby(configs[active], logs[active], env)
            active, standby = standby, active
        set_status(STATUSES[4])  # after the last take-over
        time.sleep(rng.uniform(0.5, 1.0))
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    try:
        wait_for_capture(source_db)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for h, proc in procs.items():
            assert proc.wait(timeout=30) == 0, logs[h].read_text()[-3000:]
    events = stream_events(nats_cluster, stream)
    assert len(writer.committed) > 300, "the load was not sustained"
    assert user_names(events) == writer.committed, "the stream differs from the source's truth"
    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    changes = [
        (e["data"]["previous"]["status"], e["data"]["record"]["status"])
        for _, e in events
        if e["type"] == "order.status_changed" and e["data"]["id"] == order_id
    ]
    assert changes == list(itertools.pairwise(STATUSES))
    print(f"take-over after kill -9: {', '.join(f'{t:.2f} s' for t in takeovers)}")
    assert all(t < 30 for t in takeovers)


def test_capture_side_commands_write_the_file_capture_reads_on_this_host(source_db, tmp_path, nats_cluster):
    """On the JetStream backend capture keeps its host's records beside the outbox file
    (``<stem>.capture.db``): `slot skip` and `backfill` must write there, or capture never
    sees them, and `slot skip` puts the request into the cluster too, for a standby;
    `recover` refuses with one line."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db")
    capture_file = tmp_path / "o.capture.db"
    store.open_outbox(capture_file).close()  # (setup or capture made it)
    skip = cli("slot", "skip", "7", "--yes", config=config, **env)
    assert skip.returncode == 0, skip.stderr
    queued = cli("backfill", "--table", "users", "--no-wait", config=config, **env)
    assert queued.returncode == 0, queued.stderr
    conn = store.connect(capture_file, readonly=True)
    try:
        assert source_state.pending_skips(conn) == {7}
        assert [job["table"] for job in backfills.active(conn)] == ["public.users"]
    finally:
        conn.close()
    log = JetStreamLog(nats_cluster.servers, stream=stream, subject=f"ct1.{stream.lower()}")
    loop = LoopThread()
    try:
        loop.run(log.connect())
        assert [xid for xid, _ in loop.run(skip_requests(log))] == [7]
        loop.run(log.close())
    finally:
        loop.stop()
    recover = cli("recover", "--yes", config=config, **env)
    assert recover.returncode == 1
    assert len(recover.stderr.strip().splitlines()) == 1 and "on_slot_lost" in recover.stderr


@pytest.mark.slow
def test_a_dispatch_node_on_a_new_file_goes_on_from_the_progress_the_cluster_holds(
    source_db, tmp_path, nats_cluster
):
    """A dispatch node shares what it has delivered through the cluster: one killed with
    SIGKILL and replaced by a node on a new host (an empty file) does not send the stream
    again from its start, and misses nothing."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    with ThreadReceiver() as rx:
        rx.secret = SECRET
        configs = {n: node_config(tmp_path, source_db, n, rx.url) for n in ("capture", "first", "second")}
        logs = {n: tmp_path / f"{n}.log" for n in configs}
        assert cli("setup", config=configs["capture"], **env).returncode == 0
        rx.forget()
        capture = spawn("run", "--role", "capture", config=configs["capture"], log=logs["capture"], **env)
        first = spawn("run", "--role", "dispatch", config=configs["first"], log=logs["first"], **env)
        second = None
        try:
            for i in range(30):
                source_db.execute(
                    "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"u{i}", f"u{i}@x"
                )
            wait_until(lambda: len(rx.ids) >= 30, 60, what="30 deliveries")
            time.sleep(2.5)  # (the progress is shared every second)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
            second = spawn("run", "--role", "dispatch", config=configs["second"], log=logs["second"], **env)
            for i in range(30, 40):
                source_db.execute(
                    "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"u{i}", f"u{i}@x"
                )
            wait_until(lambda: len(set(rx.ids)) >= 40, 60, what="40 events delivered")
            time.sleep(1.0)  # (anything sent twice would have come by now)
            assert sorted(rx.ids, key=lambda i: int(i[4:])) == [f"evt_{n}" for n in range(1, 41)]
            changes = [e for e in log_events(logs["second"]) if e["event"] == "partitions_changed"]
            # (in one round, or two when the killed node's leases lapse a moment apart)
            assert sorted(p for change in changes for p in change["taken"]) == list(range(PARTITIONS)), (
                changes
            )
        finally:
            for proc in (capture, second):
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(timeout=30) == 0


def test_every_role_in_one_process_on_the_jetstream_backend(source_db, tmp_path, nats_cluster):
    """`ct1-cdc run` with every role on one host: capture into the stream, the copy, the
    dispatcher and the API beside it, as a first try of the backend would run it."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    with ThreadReceiver() as rx:
        rx.secret = SECRET
        config = node_config(tmp_path, source_db, "one", rx.url)
        setup = cli("setup", "--json", config=config, **env)
        assert setup.returncode == 0, setup.stderr
        key = json.loads(setup.stdout.splitlines()[-1])["api_key"]["key"]
        rx.forget()
        log = tmp_path / "one.log"
        proc = spawn("run", config=config, log=log, **env)
        try:
            for i in range(5):
                source_db.execute(
                    "INSERT INTO users (name, email, password) VALUES (%s, %s, 'pw')", f"u{i}", f"u{i}@x"
                )
            wait_until(lambda: len(rx.ids) >= 5, 60, what="5 deliveries")
            page = wait_until(lambda: (p := api_events(config, key))["meta"]["count"] == 5 and p, 30)
            assert [e["id"] for e in page["data"]] == [1, 2, 3, 4, 5]
            assert sorted(rx.ids) == [f"evt_{i}" for i in range(1, 6)]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]


def test_marketplace_analytics_goes_into_the_stream_through_capture_once_per_period(
    source_db, tmp_path, nats_cluster
):
    """On this backend the analytics event is appended by capture, the stream's one
    writer, in one of its group commits with its mark: one event per period, also across
    a kill -9 and a restart that catches the missed periods up."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = {
        **stream_env(nats_cluster, stream),
        "CT1_ANALYTICS__ENABLED": "true",
        "CT1_ANALYTICS__PERIOD_SECONDS": "1",
        "CT1_ANALYTICS__SETTLE_SECONDS": "0.1",
        "CT1_ANALYTICS__RETRY_SECONDS": "0.2",
        "CT1_ANALYTICS__CATCH_UP_PERIODS": "10",
    }
    config = node_config(tmp_path, source_db, "capture", "http://127.0.0.1:9/")
    assert cli("setup", config=config, **env).returncode == 0
    log = tmp_path / "capture.log"

    def periods() -> list[str]:
        return [
            e["data"]["id"]
            for _, e in stream_events(nats_cluster, stream)
            if e["type"] == "marketplace.analytics"
        ]

    proc = spawn("run", "--role", "capture", config=config, log=log, **env)
    try:
        wait_until(lambda: len(periods()) >= 2, 60, what="two periods' events in the stream")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        before = periods()
        time.sleep(2.5)  # periods missed while it is down
        proc = spawn("run", "--role", "capture", config=config, log=log, **env)
        wait_until(lambda: len(periods()) >= len(before) + 3, 60, what="the missed periods and new ones")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    got = periods()
    assert len(got) == len(set(got)), got  # each period once
    assert got == sorted(got)  # in order of their periods
    assert "analytics_not_run" not in log.read_text()
    events = [e for _, e in stream_events(nats_cluster, stream) if e["type"] == "marketplace.analytics"]
    assert all(e["op"] == "derived" and e["xid"] is None for e in events)
