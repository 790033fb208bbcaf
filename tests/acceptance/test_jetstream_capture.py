"""``ct1-cdc run --role capture`` with ``[outbox] backend = "jetstream"`` on a real
Postgres and a three-node JetStream cluster: killed with SIGKILL at random moments under
a sustained write load, the stream holds every committed change exactly once, in commit
order, with gap-free ids.  Other roles refuse the backend with one line."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
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
