"""Several dispatch nodes sharing one endpoint on the JetStream backend (docs/jetstream.md):
the partitions are spread over the nodes by leases; a node joining during a burst of
10,000 events takes its share, a node killed with SIGKILL has its share taken by the
others; every event reaches the receiver at least once under its one webhook-id, and each
entity's events arrive in order."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from common.jsontext import dumps
from outbox import store
from outbox.jetstream import JetStreamLog
from outbox.jetstream_sink import LoopThread
from tests.acceptance import test_jetstream_capture as nodes_test
from tests.acceptance.helpers import ThreadReceiver, cli
from tests.acceptance.test_jetstream_capture import (  # noqa: F401  (no_process_left: a fixture)
    PARTITIONS,
    SECRET,
    log_events,
    no_process_left,
    node_config,
    stream_env,
)
from tests.sink_contract import AT
from tests.waiting import wait_until

EVENTS = 10_000
ENTITIES = 200
GROUP = 500
WANTED = {f"evt_{n}" for n in range(1, EVENTS + 1)}


def append_orders(servers: list[str], stream: str, first: int, count: int) -> None:
    """``count`` order.updated events as capture stores them, each of ENTITIES orders in
    turn (the version in the record counts per order), in groups of GROUP."""
    loop = LoopThread()
    log = JetStreamLog(servers, stream=stream, subject=f"ct1.{stream.lower()}", partitions=PARTITIONS)
    try:
        loop.run(log.connect())
        loop.run(log.ensure_stream())
        loop.run(log.adopt())
        for start in range(first, first + count, GROUP):
            group = []
            for n in range(start, min(start + GROUP, first + count)):
                key, version = str(n % ENTITIES), n // ENTITIES
                body = dumps(
                    {
                        "type": "order.updated",
                        "object": "order",
                        "entity_key": key,
                        "occurred_at": AT,
                        "data": {
                            "object": "order",
                            "id": key,
                            "record": {"version": version},
                            "previous": {"version": version - 1},
                        },
                        "source_table": "public.orders",
                        "op": "update",
                        "lsn": f"0/{n + 1:X}",
                        "xid": 1000 + start // GROUP,
                        "created_at": 0.0,
                    }
                )
                group.append((f"order:{n}", body, zlib.crc32(f"order:{key}".encode()) % PARTITIONS))
            loop.run(log.append_whole(group, start + GROUP))
        loop.run(log.close())
    finally:
        loop.stop()


def answer_after(seconds: float) -> Any:
    """A receiver hook that answers each webhook ``seconds`` late."""

    async def before(request: Any, calls: int) -> None:
        await asyncio.sleep(seconds)

    return before


def check_received(rx: ThreadReceiver) -> int:
    """Every event received, verified, under its one webhook-id (a repeat the same event
    byte for byte), each order's versions in order; how many deliveries were repeats."""
    assert rx.rejected == 0
    by_id: dict[str, dict[str, Any]] = {}
    firsts: dict[str, list[int]] = {}
    for webhook_id, envelope in zip(rx.ids, rx.received, strict=True):
        assert webhook_id == f"evt_{envelope['id']}"
        if webhook_id in by_id:  # sent again: the same event, byte for byte
            assert by_id[webhook_id] == envelope
            continue
        by_id[webhook_id] = envelope
        firsts.setdefault(envelope["data"]["id"], []).append(envelope["data"]["record"]["version"])
    assert set(by_id) == WANTED
    # each order's versions arrive in order: no node sent a newer one before another's older
    disorder = {key: versions for key, versions in firsts.items() if versions != sorted(versions)}
    assert not disorder, list(disorder.items())[:3]
    assert sum(len(v) for v in firsts.values()) == EVENTS
    return len(rx.ids) - len(by_id)


def delivered(path: Path) -> int:
    """Deliveries a node's outbox records as delivered."""
    conn = store.connect(path, readonly=True)
    try:
        return int(store.stats(conn)["deliveries"].get("ct2", {}).get("delivered", 0))
    finally:
        conn.close()


def held(path: Path) -> list[int]:
    """The partitions a node said it holds last."""
    changes = [e for e in log_events(path) if e["event"] in ("partitions_changed", "partition_leases_lost")]
    return list(changes[-1].get("held", [])) if changes else []


def sharing(*logs: Path) -> bool:
    """Whether these nodes hold every partition between them, each some."""
    shares = [held(log) for log in logs]
    return all(shares) and sorted(p for share in shares for p in share) == list(range(PARTITIONS))


@pytest.mark.slow
def test_three_dispatch_nodes_share_an_endpoint_through_a_join_and_a_kill_9(
    tmp_path, source_db, nats_cluster
):
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    append_orders(nats_cluster.servers, stream, 0, 0)  # the stream, empty
    with ThreadReceiver() as rx:
        rx.secret = SECRET
        rx.receiver.before = answer_after(0.01)  # sends in flight when partitions change hands
        configs = {n: node_config(tmp_path, source_db, n, rx.url) for n in ("a", "b", "c")}
        logs = {n: tmp_path / f"{n}.log" for n in configs}
        # (through the module: its fixture kills what a failed test leaves running)
        nodes = {
            n: nodes_test.spawn("run", "--role", "dispatch", config=configs[n], log=logs[n], **env)
            for n in "ab"
        }
        try:
            wait_until(lambda: sharing(logs["a"], logs["b"]), 60, what="two nodes sharing the partitions")
            append_orders(nats_cluster.servers, stream, 1, EVENTS)
            wait_until(lambda: len(rx.ids) >= EVENTS // 10, 60, what="a tenth delivered")
            nodes["c"] = nodes_test.spawn(
                "run", "--role", "dispatch", config=configs["c"], log=logs["c"], **env
            )
            wait_until(lambda: held(logs["c"]), 60, what="the joining node taking its share")
            wait_until(lambda: len(set(rx.ids)) >= EVENTS // 2, 120, what="half delivered")
            lost = held(logs["a"])
            assert lost, "node a holds nothing to lose"
            before_kill = len(rx.ids)
            nodes["a"].send_signal(signal.SIGKILL)
            nodes["a"].wait(timeout=30)
            killed_at = time.monotonic()
            wait_until(
                lambda: set(lost) <= set(held(logs["b"]) + held(logs["c"])),
                60,
                what="node a's partitions taken by the others",
            )
            print(f"\nnode a's share taken over {time.monotonic() - killed_at:.2f} s after its kill")
            wait_until(lambda: set(rx.ids) >= WANTED, 240, what="every event delivered")
            time.sleep(1.0)  # (a late duplicate would have come by now)
        finally:
            for proc in nodes.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(timeout=30) == 0
    duplicates = check_received(rx)
    print(f"{duplicates} deliveries sent again after the kill (at least once, same webhook-id)")
    # up to the kill (node c's join included, partitions changing hands under load): a
    # hand-over sends again at most what its partition held above its first event still
    # on the way (a progress is one event id per partition), never a newer event first
    again = len(rx.ids[:before_kill]) - len(set(rx.ids[:before_kill]))
    print(f"{again} deliveries sent again by the hand-overs before the kill")
    assert again < EVENTS // 20
    # shared, not repeated: a node sending every event would have doubled the deliveries
    assert duplicates < EVENTS // 4
    shares = {n: delivered(tmp_path / f"{n}.db") for n in "abc"}
    print(f"first-try deliveries by node: {shares}")
    assert all(shares.values()), shares
    for name in "bc":  # the survivors stopped cleanly and let their partitions go
        assert any(e["event"] == "partitions_given_up" for e in log_events(logs[name])), name


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill the leases' leader", "stop a node"])
def test_dispatch_nodes_go_through_a_nats_node_fault_during_a_burst(fault, tmp_path, source_db):
    """Three dispatch nodes sharing an endpoint while one NATS node is killed with SIGKILL
    (the leader of the leases' bucket, started again later) or stopped with SIGSTOP for
    longer than the cluster's heartbeats: renewals fail for a while, a node that cannot
    renew lets its partitions go, and the partitions are shared again; nothing is lost,
    each entity's events arrive in order."""
    from sidecar.natscluster import create_nats_cluster

    cluster = create_nats_cluster(tmp_path / "nats")
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(cluster, stream)
    nodes: dict[str, Any] = {}
    try:
        append_orders(cluster.servers, stream, 0, 0)
        with ThreadReceiver() as rx:
            rx.secret = SECRET
            rx.receiver.before = answer_after(0.005)
            configs = {n: node_config(tmp_path, source_db, n, rx.url) for n in "abc"}
            logs = {n: tmp_path / f"{n}.log" for n in configs}
            try:
                for n in "abc":
                    nodes[n] = nodes_test.spawn(
                        "run", "--role", "dispatch", config=configs[n], log=logs[n], **env
                    )
                wait_until(
                    lambda: sorted(p for n in "abc" for p in held(logs[n])) == list(range(PARTITIONS)),
                    60,
                    what="three nodes sharing the partitions",
                )
                append_orders(cluster.servers, stream, 1, EVENTS)
                wait_until(lambda: len(rx.ids) >= EVENTS // 4, 60, what="a quarter delivered")
                leader = asyncio.run(leader_of(cluster.servers, f"KV_{stream}_LEASES"))
                victim = next(i for i, node in enumerate(cluster.nodes) if node.name == leader)
                if fault == "stop a node":
                    cluster.pause(victim)
                    time.sleep(6)
                    cluster.resume(victim)
                else:
                    cluster.kill(victim)
                wait_until(lambda: set(rx.ids) >= WANTED, 240, what="every event delivered")
                if fault != "stop a node":
                    cluster.start(victim)
                time.sleep(1.0)
            finally:
                for proc in nodes.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(timeout=30)
        for name, proc in nodes.items():
            assert proc.returncode == 0, (name, logs[name].read_text()[-2000:])
        print(f"\n{fault}: {check_received(rx)} deliveries sent again")
    finally:
        cluster.stop()


async def leader_of(servers: list[str], stream: str) -> str:
    log = JetStreamLog(servers, stream=stream)
    try:
        await log.connect()
        info = await log.js.stream_info(stream)
        assert info.cluster is not None and info.cluster.leader
        return str(info.cluster.leader)
    finally:
        await log.close()


@pytest.mark.slow
def test_a_dead_delivery_replayed_after_its_holder_was_killed_is_sent_by_the_next_holder(
    tmp_path, source_db, nats_cluster
):
    """Two dispatch nodes and an API node.  The receiver refuses one order, whose two
    events go dead on the node holding its partition; that node is killed with SIGKILL;
    the operator replays the dead deliveries on the API node.  The other node takes the
    partition (its take drops the replayed rows it had made due, below the killed node's
    progress) and sends them anyway, under their webhook-ids; the API node then lists them
    delivered."""
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    append_orders(nats_cluster.servers, stream, 0, 0)  # the stream, empty
    refusing = {"on": True}

    async def refuse_order_7(request: web.Request, _calls: int) -> web.StreamResponse | None:
        refused = json.loads(await request.read())["data"]["id"] == "7"
        return web.Response(status=500) if refused and refusing["on"] else None

    with ThreadReceiver() as rx:
        rx.secret = SECRET
        rx.receiver.before = refuse_order_7
        configs = {n: node_config(tmp_path, source_db, n, rx.url) for n in ("a", "b", "api")}
        logs = {n: tmp_path / f"{n}.log" for n in configs}
        nodes = {
            n: nodes_test.spawn("run", "--role", "dispatch", config=configs[n], log=logs[n], **env)
            for n in "ab"
        }
        nodes["api"] = nodes_test.spawn("run", "--role", "api", config=configs["api"], log=logs["api"], **env)

        def dead_on_api() -> list[int]:
            shown = cli("outbox", "deliveries", "--status", "dead", "--json", config=configs["api"])
            assert shown.returncode == 0, shown.stderr
            return sorted(json.loads(line)["event_id"] for line in shown.stdout.splitlines())

        try:
            wait_until(lambda: sharing(logs["a"], logs["b"]), 60, what="two nodes sharing the partitions")
            append_orders(nats_cluster.servers, stream, 1, 400)  # order 7: events 7 and 207
            wait_until(lambda: len(set(rx.ids)) >= 398, 60, what="every other order delivered")
            wait_until(
                lambda: dead_on_api() == [7, 207], 30, what="order 7's two deliveries dead on the API node"
            )
            partition = zlib.crc32(b"order:7") % PARTITIONS
            holder = next(n for n in "ab" if partition in held(logs[n]))
            other = "b" if holder == "a" else "a"
            nodes[holder].send_signal(signal.SIGKILL)
            nodes[holder].wait(timeout=30)
            refusing["on"] = False
            replayed = cli("outbox", "replay", "--dead", "--json", config=configs["api"], **env)
            assert replayed.returncode == 0 and json.loads(replayed.stdout) == {"replayed": 2}, (
                replayed.stderr
            )
            wait_until(lambda: {"evt_7", "evt_207"} <= set(rx.ids), 60, what="the replayed deliveries sent")
            assert partition in held(logs[other])
            wait_until(lambda: dead_on_api() == [], 30, what="the API node no longer listing them dead")
        finally:
            for name, proc in nodes.items():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(timeout=30) == 0, name
    order_7 = [r for r in rx.received if r["data"]["id"] == "7"]
    assert [r["data"]["record"]["version"] for r in order_7] == [0, 1]  # in order, once each


def test_a_replay_from_an_id_is_sent_again_by_every_dispatch_node_through_a_hand_over(
    tmp_path, source_db, nats_cluster
):
    """`ct1-cdc outbox replay --from ID --endpoint ct2` on the JetStream backend: every
    dispatch node sends again, from that id, the partitions it holds, and the partitions
    that change hands right after (a third node joins as the command returns) go on from
    below it on their new holders: every event from ID on arrives again under its
    webhook-id, none before it.  (Reproduced first: run on one node, it sent again only
    the partitions that node held.)"""
    total, first = 2000, 501
    stream = f"CT1_{uuid.uuid4().hex[:8].upper()}"
    env = stream_env(nats_cluster, stream)
    append_orders(nats_cluster.servers, stream, 0, 0)
    with ThreadReceiver() as rx:
        rx.secret = SECRET
        configs = {n: node_config(tmp_path, source_db, n, rx.url) for n in ("a", "b", "c")}
        logs = {n: tmp_path / f"{n}.log" for n in configs}
        nodes = {
            n: nodes_test.spawn("run", "--role", "dispatch", config=configs[n], log=logs[n], **env)
            for n in "ab"
        }
        try:
            wait_until(lambda: sharing(logs["a"], logs["b"]), 60, what="two nodes sharing the partitions")
            append_orders(nats_cluster.servers, stream, 1, total)
            everything = {f"evt_{n}" for n in range(1, total + 1)}
            wait_until(lambda: set(rx.ids) >= everything, 120, what="every event delivered")
            time.sleep(1.5)  # (each node's progress published)
            once = len(rx.ids)
            asked = cli(
                "outbox",
                "replay",
                "--from",
                str(first),
                "--endpoint",
                "ct2",
                "--json",
                config=configs["a"],
                **env,
            )
            assert asked.returncode == 0, asked.stderr
            assert json.loads(asked.stdout) == {"replayed": total - first + 1}
            nodes["c"] = nodes_test.spawn(
                "run", "--role", "dispatch", config=configs["c"], log=logs["c"], **env
            )
            again = {f"evt_{n}" for n in range(first, total + 1)}
            wait_until(lambda: set(rx.ids[once:]) >= again, 120, what="every event from the id sent again")
            wait_until(lambda: held(logs["c"]), 60, what="the joining node taking its share")
            time.sleep(2.0)  # (a late one would have come by now)
        finally:
            for proc in nodes.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(timeout=30) == 0
    assert rx.rejected == 0
    resent = rx.ids[once:]
    assert set(resent) == again, sorted(set(resent) - again)[:5]  # none before the id
    print(f"\n{len(resent)} deliveries for {len(again)} events replayed (at least once)")
    assert all(
        e["event"] != "rewind_applied" or e["event_id"] == first for n in "abc" for e in log_events(logs[n])
    )
