"""The whole chain on the JetStream backend through a fault, end to end: a capture and its
standby, a dispatch node and a receiver over a three-node cluster of the test's own, a
sustained write load on Postgres, and in the middle of it one fault: the events stream's
leader killed with SIGKILL (started again later), that leader stopped with SIGSTOP for
longer than the cluster's heartbeats, or the active capture killed with SIGKILL.  After
each, all three things a user counts on: every committed change once in the stream, in
commit order, under gap-free ids; every event delivered at least once under its one
``evt_<id>`` webhook-id, verified by the official standardwebhooks package; and each
entity's events arriving in order."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from sidecar.natscluster import create_nats_cluster
from tests.acceptance import test_jetstream_capture as nodes_test
from tests.acceptance.helpers import ThreadReceiver, cli
from tests.acceptance.test_crash import Writer
from tests.acceptance.test_jetstream_capture import (  # noqa: F401  (no_process_left: a fixture)
    SECRET,
    kill_and_wait_for_take_over,
    no_process_left,
    node_config,
    spawn_standby,
    stream_env,
    stream_events,
    user_names,
    wait_for_capture,
)
from tests.acceptance.test_jetstream_dispatch import leader_of
from tests.waiting import wait_until

FAULTS = ["kill the stream's leader", "stop the stream's leader", "kill the active capture"]
STATUSES = ["pending", "processing", "shipped", "delivered"]


class OrderWriter(threading.Thread):
    """Moves a few orders through their statuses as fast as it can, one transaction each;
    remembers each order's statuses as committed, in order."""

    def __init__(self, dsn: str, orders: list[int]) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.orders = orders
        self.committed: dict[int, list[str]] = {order: [] for order in orders}
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            n = 0
            while not self.stop.is_set():
                order = self.orders[n % len(self.orders)]
                status = STATUSES[(n // len(self.orders) + 1) % len(STATUSES)]
                conn.execute("UPDATE orders SET status = %s WHERE id = %s", (status, order))
                self.committed[order].append(status)
                n += 1
                time.sleep(0.01)


def out_of_order(rx: ThreadReceiver) -> dict[str, list[int]]:
    """Entities whose events first arrived in another order than their ids."""
    seen: set[int] = set()
    firsts: dict[str, list[int]] = {}
    for envelope in rx.received:
        if envelope["id"] in seen:
            continue  # (sent again: at least once)
        seen.add(envelope["id"])
        entity = f"{envelope['data']['object']}:{envelope['data']['id']}"
        firsts.setdefault(entity, []).append(envelope["id"])
    return {entity: ids for entity, ids in firsts.items() if ids != sorted(ids)}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_the_chain_keeps_every_change_once_delivered_and_in_order_through_a_fault(fault, tmp_path, source_db):
    cluster = create_nats_cluster(tmp_path / "nats")
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(cluster, stream)
    procs: dict[str, Any] = {}
    writer = Writer(source_db.dsn)
    with source_db.connect() as conn:  # orders whose status changes go through the fault
        buyer = conn.execute(
            "INSERT INTO users (name, email, password) VALUES ('b', 'b@x', 'p') RETURNING id"
        )
        user = buyer.fetchone()[0]
        ids = [
            conn.execute("INSERT INTO orders (user_id) VALUES (%s) RETURNING id", (user,)).fetchone()[0]
            for _ in range(4)
        ]
        conn.commit()
    movers = OrderWriter(source_db.dsn, ids)
    try:
        with ThreadReceiver() as rx:
            rx.secret = SECRET
            configs = {n: node_config(tmp_path, source_db, n, rx.url) for n in ("a", "b", "dispatch")}
            logs = {n: tmp_path / f"{n}.log" for n in configs}
            setup = cli("setup", config=configs["a"], **env)
            assert setup.returncode == 0, setup.stderr
            rx.forget()  # (setup's webhook.test)
            procs["a"] = nodes_test.spawn(
                "run", "--role", "capture", config=configs["a"], log=logs["a"], **env
            )
            wait_until(lambda: "capture_started" in logs["a"].read_text(), 60, what="a to capture")
            procs["b"] = spawn_standby(configs["b"], logs["b"], env)
            procs["dispatch"] = nodes_test.spawn(
                "run", "--role", "dispatch", config=configs["dispatch"], log=logs["dispatch"], **env
            )
            writer.start()
            movers.start()
            time.sleep(2.0)
            if fault == "kill the active capture":
                took = kill_and_wait_for_take_over(procs.pop("a"), logs["b"])
                print(f"\nthe standby took over {took:.2f} s after the kill")
            else:
                leader = asyncio.run(leader_of(cluster.servers, stream))
                victim = next(i for i, node in enumerate(cluster.nodes) if node.name == leader)
                if fault == "stop the stream's leader":
                    cluster.pause(victim)
                    time.sleep(6.0)  # (past the cluster's heartbeats: a new leader is elected)
                    cluster.resume(victim)
                else:
                    cluster.kill(victim)
                    time.sleep(3.0)
                    cluster.start(victim)
            time.sleep(2.0)
            writer.stop.set()
            movers.stop.set()
            writer.join(timeout=30)
            movers.join(timeout=30)
            wait_for_capture(source_db)
            events = stream_events(cluster, stream)
            wanted = {f"evt_{seq}" for seq, _ in events}
            wait_until(lambda: set(rx.ids) >= wanted, 120, what="every event delivered")
            time.sleep(1.0)  # (a late repeat would have come by now)
            for name, proc in procs.items():
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0, (name, logs[name].read_text()[-3000:])
        assert len(writer.committed) > 200, "the load was not sustained"
        assert user_names(events) == writer.committed, "the stream differs from the source's truth"
        assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
        assert rx.rejected == 0
        assert set(rx.ids) == wanted  # every event, under its one webhook-id, nothing else
        assert not out_of_order(rx), list(out_of_order(rx).items())[:3]
        for order, statuses in movers.committed.items():  # each order's changes once, in order
            changed = [
                e["data"]["record"]["status"]
                for _, e in events
                if e["type"] == "order.status_changed" and e["data"]["id"] == order
            ]
            assert changed == statuses, (order, len(changed), len(statuses))
        assert sum(map(len, movers.committed.values())) > 100, "the orders' load was not sustained"
        print(f"{fault}: {len(events)} events, {len(rx.ids) - len(wanted)} deliveries sent again")
    finally:
        writer.stop.set()
        movers.stop.set()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        cluster.stop()
