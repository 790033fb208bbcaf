"""The event log on a real three-node JetStream cluster (``nats-server`` on loopback):
gap-free ids in append order, a second writer fenced, a group cut short resumed without
a duplicate, and the same through kill -9 of the stream's leader and a node stopped."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from outbox.jetstream import Fenced, JetStreamLog
from sidecar.natscluster import NatsCluster, create_nats_cluster
from sidecar.throwaway import free_port


@pytest.fixture
async def log(nats_cluster: NatsCluster) -> AsyncIterator[JetStreamLog]:
    name = f"T{uuid.uuid4().hex[:10].upper()}"
    writer = JetStreamLog(nats_cluster.servers, stream=name, subject=f"t.{name}", timeout=2.0)
    await writer.connect()
    await writer.ensure_stream()
    try:
        yield writer
    finally:
        await writer.close()


def events(prefix: str, n: int) -> list[tuple[str, bytes]]:
    return [(f"{prefix}-{i}", f'{{"n": {i}}}'.encode()) for i in range(n)]


async def other_writer(log: JetStreamLog) -> JetStreamLog:
    other = JetStreamLog(log.servers, stream=log.stream, subject=log.subject, timeout=2.0)
    await other.connect()
    return other


async def test_groups_get_gap_free_ids_in_the_order_they_were_appended(log):
    assert await log.append(events("a", 1), checkpoint=10) == 1
    assert await log.append(events("b", 700), checkpoint=20) == 2
    assert await log.append(events("c", 3), checkpoint=30) == 702

    stored = await log.read(0, 1000)
    assert [s.seq for s in stored] == list(range(1, 705))
    assert [s.key for s in stored] == [k for k, _ in events("a", 1) + events("b", 700) + events("c", 3)]
    assert stored[100].body == b'{"n": 99}'
    # each group's last message carries its checkpoint, and only that one
    assert {s.seq: s.commit for s in stored if s.commit is not None} == {1: 10, 701: 20, 704: 30}

    # a new process learns where the writer stopped from the stream alone
    again = await other_writer(log)
    await again.adopt()
    tail = await again.tail()
    await again.close()
    assert (tail.last_seq, tail.checkpoint, tail.checkpoint_seq, tail.after) == (704, 30, 704, [])


async def test_a_second_writer_fences_the_first_and_nothing_interleaves(log):
    await log.append(events("a", 5), checkpoint=1)
    standby = await other_writer(log)
    try:
        await standby.append(events("s", 1), checkpoint=2)  # the standby took over
        with pytest.raises(Fenced):
            await log.append(events("late", 3), checkpoint=3)
        with pytest.raises(Fenced):
            await log.append_whole(events("late", 3), checkpoint=3)
        await standby.append(events("s2", 2), checkpoint=4)  # the standby goes on
    finally:
        await standby.close()
    keys = [s.key for s in await log.read(0, 100)]
    assert keys == ["a-0", "a-1", "a-2", "a-3", "a-4", "s-0", "s2-0", "s2-1"]


async def test_a_group_cut_short_is_resumed_where_it_stopped(log):
    await log.append(events("a", 2), checkpoint=1)
    # a writer died after the first two messages of a group landed: a prefix of the group,
    # without the group's Ct1-Commit (its last message carries it)
    nc = log._nc
    assert nc is not None
    for seq, (key, body) in enumerate(events("h", 4)[:2], start=3):
        await nc.publish(log.subject, body, headers={"Ct1-Key": key, "Nats-Msg-Id": f"{seq}:{key}"})
    await nc.flush()
    await asyncio.sleep(0.2)

    resumed = await other_writer(log)
    try:
        await resumed.adopt()
        tail = await resumed.tail()
        assert (tail.checkpoint, tail.checkpoint_seq, tail.after) == (1, 2, ["h-0", "h-1"])
        # the writer reading the group again passes over what the stream holds of it
        rest = [e for e in events("h", 4) if e[0] not in tail.after]
        await resumed.append_whole(rest, checkpoint=40)
    finally:
        await resumed.close()
    stored = await log.read(0, 100)
    assert [s.key for s in stored] == ["a-0", "a-1", "h-0", "h-1", "h-2", "h-3"]
    assert (stored[-1].seq, stored[-1].commit) == (6, 40)


async def test_resuming_refuses_a_tail_this_writer_did_not_send(log):
    await log.append(events("a", 2), checkpoint=1)
    nc = log._nc
    assert nc is not None
    await nc.publish(log.subject, b"{}", headers={"Ct1-Key": "stranger"})
    await nc.flush()
    await asyncio.sleep(0.2)
    with pytest.raises(Fenced):
        await log.append_whole(events("b", 3), checkpoint=2)
    with pytest.raises(Fenced):  # and for good
        await log.append(events("c", 1), checkpoint=3)


# -- faults: a cluster of their own -------------------------------------------------------------


async def burst(log: JetStreamLog, groups: int, size: int, fault: asyncio.Event) -> None:
    for g in range(groups):
        if g == groups // 3:
            fault.set()
        await log.append_whole(events(f"g{g}", size), checkpoint=g + 1, within=60)


async def check_exactly_once(log: JetStreamLog, groups: int, size: int) -> None:
    stored = await log.read(0, groups * size + 10)
    assert [s.seq for s in stored] == list(range(1, groups * size + 1))
    assert [s.key for s in stored] == [f"g{g}-{i}" for g in range(groups) for i in range(size)]
    assert [s.commit for s in stored if s.commit is not None] == list(range(1, groups + 1))


@pytest.mark.parametrize("fault", ["kill the leader", "stop a node"])
async def test_a_burst_through_a_node_fault_is_stored_exactly_once_in_order(fault, tmp_path):
    cluster = create_nats_cluster(tmp_path / "nats")
    writer = JetStreamLog(cluster.servers, stream="FAULTS", subject="faults", timeout=2.0)
    try:
        await writer.connect()
        await writer.ensure_stream()
        info = await writer.js.stream_info("FAULTS")
        leader = next(i for i, n in enumerate(cluster.nodes) if n.name == info.cluster.leader)
        # the leader, or the node the writer talks to (when that is the leader too, both)
        port = writer._nc.connected_url.port if writer._nc and writer._nc.connected_url else None
        talking = next(i for i, n in enumerate(cluster.nodes) if n.port == port)
        victim = leader if fault == "kill the leader" else talking
        hit = asyncio.Event()

        async def inject() -> None:
            await hit.wait()
            if fault == "kill the leader":
                cluster.kill(victim)
            else:
                cluster.pause(victim)  # longer than the cluster's heartbeats: seen as gone
                await asyncio.sleep(6)
                cluster.resume(victim)

        groups, size = 30, 200
        await asyncio.gather(burst(writer, groups, size, hit), inject())
        await check_exactly_once(writer, groups, size)
        if fault == "kill the leader":
            cluster.start(victim)
        # what a reader connected to any node sees, the restarted one included
        await check_exactly_once(writer, groups, size)
    finally:
        await writer.close()
        cluster.stop()


async def test_a_cluster_restarted_after_a_quiet_spell_does_not_fence_its_writer(tmp_path):
    # a node restarted after more than the duplicate window forgets the stream's last
    # message id; the writer whose end it is goes on (the expected sequence still guards)
    cluster = create_nats_cluster(tmp_path / "nats")
    writer = JetStreamLog(cluster.servers, stream="QUIET", subject="quiet", timeout=2.0, duplicate_window=1.0)
    try:
        await writer.connect()
        await writer.ensure_stream()
        await writer.append_whole(events("a", 3), checkpoint=1)
        await asyncio.sleep(1.5)
        for i in range(len(cluster.nodes)):
            cluster.restart(i)
        await writer.append_whole(events("b", 2), checkpoint=2, within=60)
        await check_keys(writer, ["a-0", "a-1", "a-2", "b-0", "b-1"])
    finally:
        await writer.close()
        cluster.stop()


async def check_keys(log: JetStreamLog, keys: list[str]) -> None:
    stored = await log.read(0, 100)
    assert [s.key for s in stored] == keys
    assert [s.seq for s in stored] == list(range(1, len(keys) + 1))


async def test_the_local_cluster_script_prints_its_servers_and_stops_on_ctrl_c(tmp_path):
    import json
    import signal
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.natscluster", "--dir", str(tmp_path / "n")],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        servers = json.loads(lines[1].split("=", 1)[1])
        assert len(servers) == 3 and all(s.startswith("nats://127.0.0.1:") for s in servers)
        log = JetStreamLog(servers, stream="SCRIPT", subject="script", timeout=2.0)
        await log.connect()
        await log.ensure_stream()
        assert await log.append(events("a", 2), checkpoint=1) == 1
        await log.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0
    port = int(servers[0].rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the nodes went with it
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_a_bucket_asked_for_before_the_cluster_has_formed_is_made_once_it_has(tmp_path):
    # seen in CI on a cluster just started: "no suitable peers for placement" (three
    # replicas while the third node had not joined yet) was raised at once, and the
    # dispatch node stopped; here the third node joins four seconds later
    cluster = create_nats_cluster(tmp_path / "nats", up=2)
    log = JetStreamLog(cluster.servers[:2], stream="PLACED", subject="placed", timeout=2.0)
    try:
        await log.connect()
        asking = asyncio.ensure_future(log.bucket("PLACED_B"))
        await asyncio.sleep(4.0)  # (the two nodes answer within a second)
        assert not asking.done(), f"the bucket should wait for its third node: {asking}"
        cluster.start(2)
        bucket = await asyncio.wait_for(asking, timeout=30)
        await bucket.put("k", b"v")
        assert (await bucket.get("k")).value == b"v"
    finally:
        await log.close()
        cluster.stop()


def test_a_port_taken_before_a_node_binds_it_is_chosen_anew(tmp_path, monkeypatch):
    # seen in CI: a port chosen free was taken by another test's process before the node
    # bound it ("bind: address already in use"), and the whole module's tests errored
    from sidecar import natscluster

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # (bound, not listening: nothing answers on it)
    busy = taken.getsockname()[1]
    chosen = iter([free_port(), busy])  # the first node's client port, then its route port
    monkeypatch.setattr(natscluster, "free_port", lambda: next(chosen, None) or free_port())
    try:
        cluster = create_nats_cluster(tmp_path / "nats")
        try:
            assert busy not in {p for n in cluster.nodes for p in (n.port, n.cluster_port)}
            assert all(n.proc is not None and n.proc.poll() is None for n in cluster.nodes)
        finally:
            cluster.stop()
    finally:
        taken.close()
