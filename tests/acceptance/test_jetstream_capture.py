"""``ct1-cdc run --role capture`` with ``[outbox] backend = "jetstream"`` on a real
Postgres and a three-node JetStream cluster: killed with SIGKILL at random moments under
a sustained write load, the stream holds every committed change exactly once, in commit
order, with gap-free ids.  Other roles refuse the backend with one line."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cdc import source
from common.formats import parse_lsn
from sidecar.natscluster import NatsCluster
from tests.acceptance.helpers import cli, spawn, write_config
from tests.acceptance.test_crash import Writer
from tests.conftest import read_stream
from tests.waiting import wait_until

KILLS = 5


def stream_env(cluster: NatsCluster, stream: str) -> dict[str, str]:
    return {
        "CT1_OUTBOX__BACKEND": "jetstream",
        "CT1_OUTBOX__JETSTREAM__SERVERS": json.dumps(cluster.servers),
        "CT1_OUTBOX__JETSTREAM__STREAM": stream,
        "CT1_OUTBOX__JETSTREAM__SUBJECT": f"ct1.{stream.lower()}",
    }


def stream_events(cluster: NatsCluster, stream: str) -> list[tuple[int, dict[str, Any]]]:
    return [(seq, event) for seq, _, event in read_stream(cluster.servers, stream, f"ct1.{stream.lower()}")]


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
    target = source_db.current_lsn()
    final = spawn("run", "--role", "capture", config=config, log=log, **env)
    try:

        def caught_up() -> bool:
            with source_db.connect() as c:
                status = source.slot_status(c, source_db.slot)
            return bool(status and parse_lsn(status["confirmed_flush_lsn"]) >= target)

        wait_until(caught_up, 90, interval=0.2, what="capture to catch up on the stream")
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=30) == 0, log.read_text()[-3000:]
    events = stream_events(nats_cluster, stream)
    assert len(writer.committed) > 300, "the load was not sustained"
    assert user_names(events) == writer.committed, f"seed {seed}: the stream differs from the source's truth"
    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    assert "capture_started" in log.read_text()


def test_the_other_roles_refuse_the_jetstream_backend_with_one_line(source_db, tmp_path, nats_cluster):
    env = stream_env(nats_cluster, "CT1_REFUSED")
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "state.db")
    run = cli("run", config=config, timeout=60, **env)
    assert run.returncode == 1
    assert 'backend = "jetstream"' in run.stderr and "--role capture" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_capture_says_which_servers_it_cannot_reach(source_db, tmp_path):
    env = {
        "CT1_OUTBOX__BACKEND": "jetstream",
        "CT1_OUTBOX__JETSTREAM__SERVERS": json.dumps(["nats://127.0.0.1:9"]),
        "CT1_OUTBOX__JETSTREAM__TIMEOUT_SECONDS": "1",
    }
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "state.db")
    assert cli("setup", config=config, **env).returncode == 0
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
    assert cli("setup", config=configs["a"], **env).returncode == 0
    with source_db.connect() as conn:
        buyer = conn.execute(
            "INSERT INTO users (name, email, password) VALUES ('buyer', 'b@x', 'p') RETURNING id"
        )
        order = conn.execute("INSERT INTO orders (user_id) VALUES (%s) RETURNING id", (buyer.fetchone()[0],))
        order_id = order.fetchone()[0]
        conn.commit()

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
    target = source_db.current_lsn()
    try:

        def caught_up() -> bool:
            with source_db.connect() as c:
                status = source.slot_status(c, source_db.slot)
            return bool(status and parse_lsn(status["confirmed_flush_lsn"]) >= target)

        wait_until(caught_up, 90, interval=0.2, what="capture to catch up on the stream")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for h, proc in procs.items():
            assert proc.wait(timeout=30) == 0, logs[h].read_text()[-3000:]
    events = stream_events(nats_cluster, stream)
    assert len(writer.committed) > 300, "the load was not sustained"
    assert user_names(events) == ["buyer", *writer.committed], "the stream differs from the source's truth"
    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    changes = [
        (e["data"]["previous"]["status"], e["data"]["record"]["status"])
        for _, e in events
        if e["type"] == "order.status_changed" and e["data"]["id"] == order_id
    ]
    assert changes == list(itertools.pairwise(STATUSES))
    print(f"take-over after kill -9: {', '.join(f'{t:.2f} s' for t in takeovers)}")
    assert all(t < 30 for t in takeovers)
