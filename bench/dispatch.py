"""Dispatch throughput against a bare aiohttp client loop, same receiver, same run.

    .venv/bin/python bench/dispatch.py [--events 100000] [--rounds 3] [--concurrency 32]

A receiver process on loopback answers 200 to every POST.  Each round fills a fresh
outbox with ``--events`` events for one endpoint, then times
  * the baseline: ``--concurrency`` aiohttp workers posting the same bodies, and
  * ct1-cdc's dispatcher: signing, per-entity ordering, and every attempt recorded
    durably in SQLite, with the same concurrency, and
  * the bare loop again on ct1-cdc's own HTTP client (``ratio_to_same_client``: what the
    dispatcher's work costs over its transport alone),
alternating.  ct1-cdc runs with the garbage-collector setting of ``ct1-cdc run``
(``sidecar.runner.tune_gc``); the bare loop runs once with the interpreter's defaults (the
baseline of ``ratio``) and once with the same setting (``ratio_to_gc_tuned_baseline``,
the like-for-like figure).  The last line is JSON with deliveries/s and both ratios
(medians).

``--backend jetstream`` starts a three-node JetStream cluster on loopback, appends each
round's events to a stream of three replicas (as capture does, partitioned by entity)
and times ct1-cdc as ``ct1-cdc run --role dispatch`` runs on that backend: the node's copy
of the stream (``outbox/jetstream_mirror.py``) and the dispatcher reading it, in one
process, each node a ``ct1-cdc run --role dispatch`` of its own (timed from their start
until the receiver has every event); the baselines post the same bodies.

``--dispatchers N`` (JetStream): N dispatch nodes share the endpoint by partition
(outbox/jetstream_leases.py), each with its own copy of the stream.  ``--kill-one``: the
first node is killed with SIGKILL once half the events are delivered, and the time until
the others hold its partitions is reported (``takeover_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import logs  # noqa: E402
from config.settings import Settings  # noqa: E402
from dispatcher.http1 import Client  # noqa: E402
from dispatcher.signing import generate_secret  # noqa: E402
from dispatcher.worker import Dispatcher  # noqa: E402
from outbox import store  # noqa: E402
from outbox.jetstream import JetStreamLog  # noqa: E402
from outbox.store import Route, Router  # noqa: E402
from outbox.writer import OutboxWriter  # noqa: E402
from sidecar.natscluster import create_nats_cluster  # noqa: E402
from sidecar.runner import tune_gc  # noqa: E402
from sidecar.throwaway import free_port  # noqa: E402


def serve(port: int) -> None:
    seen: set[str] = set()  # webhook-ids (ct1-cdc's deliveries), for the nodes' timing
    total = [0]

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        webhook_id = request.headers.get("webhook-id")
        if webhook_id is not None:
            seen.add(webhook_id)
            total[0] += 1
        return web.Response(text="ok")

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"distinct": len(seen), "total": total[0]})

    async def reset(request: web.Request) -> web.Response:
        seen.clear()
        total[0] = 0
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", ok)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def fill(path: Path, n: int) -> list[bytes]:
    writer = OutboxWriter(store.open_outbox(path), Router([Route("bench", ("*",))]))
    for i in range(n):
        key = i % 1000
        writer.add(
            type="order.updated",
            object="order",
            entity_id=key,
            data={
                "object": "order",
                "id": key,
                "record": {"id": key, "status": "shipped", "total": "59.90", "n": i},
                "previous": {"status": "paid"},
            },
            occurred_at="2026-11-25T00:00:00.000000Z",
            table="public.orders",
            op="update",
            lsn="0/1",
            xid=1,
        )
    writer.commit("bench", 1)
    conn = writer.conn
    bodies = [store.envelope_json(row).encode() for row in store.iter_events(conn)]
    writer.close()
    return bodies


async def baseline(url: str, bodies: list[bytes], concurrency: int) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                    await resp.read()
                    assert resp.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


async def same_client(url: str, bodies: list[bytes], concurrency: int) -> float:
    """The bare loop on ct1-cdc's own HTTP client (dispatcher.http1): what the transport
    allows, without signing, ordering or recording."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    client = Client(max_idle=concurrency)

    async def worker() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            answer = await client.post(url, body, {"content-type": "application/json"}, keep=1024)
            assert answer.status == 200

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started
    finally:
        await client.close()


def fill_stream(servers: list[str], stream: str, path: Path) -> None:
    """The events of the outbox at ``path`` appended to a new stream, as capture would."""
    from outbox.jetstream_sink import JetStreamSink

    sink = JetStreamSink(
        JetStreamLog(servers, stream=stream, subject=f"bench.{stream.lower()}", partitions=16),
        OutboxWriter(store.open_outbox(path.with_name(path.stem + ".capture.db")), Router([])),
    )
    try:
        conn = store.connect(path, readonly=True)
        for n, row in enumerate(
            conn.execute(
                "SELECT type, object, entity_key, data, occurred_at, source_table, op, lsn FROM events"
            )
        ):
            sink.add(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7], n)
            if n % 1000 == 999:
                sink.commit("bench", n + 1)
        sink.commit("bench", 10**9)
        conn.close()
    finally:
        sink.close()


async def ours(url: str, path: Path, n: int, concurrency: int) -> float:
    """Until the dispatcher delivered ``n`` (the SQLite backend; JetStream: :func:`nodes`)."""
    settings = Settings(
        outbox={"path": str(path)},
        dispatcher={"concurrency": concurrency, "endpoint_concurrency": concurrency},
        endpoints=[{"name": "bench", "url": url, "secret": generate_secret(), "events": ["*"]}],
    )
    dispatcher = Dispatcher(settings)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(dispatcher.run(stop))
    while "bench" not in dispatcher.runtimes or dispatcher.runtimes["bench"].delivered < n:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    conn = store.connect(path, readonly=True)
    delivered = store.stats(conn)["deliveries"]["bench"].get("delivered", 0)
    conn.close()
    assert delivered == n, delivered  # every delivery recorded (a row, or a batch of first tries)
    return elapsed


CLI = str(Path(sys.executable).parent / "ct1-cdc")


def received(port: int, reset: bool = False) -> dict[str, int]:
    """The receiver's count of distinct webhook-ids and of deliveries (or reset them)."""
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/{'reset' if reset else 'count'}", method="POST" if reset else "GET"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return dict(json.loads(answer.read()))


def held(log: Path) -> list[int]:
    """The partitions a node said it holds last."""
    last: list[int] = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if '"partitions_changed"' in line or '"partition_leases_lost"' in line:
            last = list(json.loads(line).get("held", []))
    return last


def nodes(
    port: int,
    n: int,
    work: Path,
    servers: list[str],
    stream: str,
    dispatchers: int,
    concurrency: int,
    kill_one: bool,
) -> tuple[float, float | None, int]:
    """``dispatchers`` processes of ``ct1-cdc run --role dispatch`` on the stream, each with
    its own copy, until the receiver has all ``n`` events: (seconds, take-over seconds of
    the killed node's share or None, deliveries sent again)."""
    received(port, reset=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT1_")}
    env.update(
        {
            "CT1_OUTBOX__BACKEND": "jetstream",
            "CT1_OUTBOX__JETSTREAM__SERVERS": json.dumps(servers),
            "CT1_OUTBOX__JETSTREAM__STREAM": stream,
            "CT1_OUTBOX__JETSTREAM__SUBJECT": f"bench.{stream.lower()}",
        }
    )
    secret = generate_secret()
    procs, logs_of = [], []
    started = time.perf_counter()
    for i in range(dispatchers):
        config = work / f"{stream}-{i}.toml"
        config.write_text(
            f"[outbox]\npath = {str(work / f'{stream}-{i}.db')!r}\n"
            f"[dispatcher]\nconcurrency = {concurrency}\nendpoint_concurrency = {concurrency}\n"
            f'[[endpoints]]\nname = "bench"\nurl = "http://127.0.0.1:{port}/hook"\n'
            f'secret = "{secret}"\nevents = ["*"]\n'
        )
        log = work / f"{stream}-{i}.log"
        logs_of.append(log)
        with open(log, "w") as fh:
            procs.append(
                subprocess.Popen(
                    [CLI, "--config", str(config), "run", "--role", "dispatch"], env=env, stderr=fh, stdout=fh
                )
            )
    killed_at = None
    takeover = None
    lost: list[int] = []
    try:
        while True:
            count = received(port)
            if count["distinct"] >= n:
                break
            if any(p.poll() is not None for p in procs[1 if killed_at else 0 :]):
                raise RuntimeError(f"a dispatch node exited: see {work}")
            if kill_one and killed_at is None and count["distinct"] >= n // 2 and held(logs_of[0]):
                lost = held(logs_of[0])
                procs[0].send_signal(signal.SIGKILL)
                procs[0].wait()
                killed_at = time.perf_counter()
            survivors = {p for log in logs_of[1:] for p in held(log)}
            if killed_at is not None and takeover is None and set(lost) <= survivors:
                takeover = time.perf_counter() - killed_at
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
    count = received(port)
    return elapsed, takeover, count["total"] - count["distinct"]


@contextlib.contextmanager
def gc_tuned() -> Iterator[None]:
    """The garbage-collector setting of `ct1-cdc run` (sidecar.runner.tune_gc), undone after."""
    previous = tune_gc()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*previous)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--backend", choices=["sqlite", "jetstream"], default="sqlite")
    parser.add_argument("--dispatchers", type=int, default=1, help="dispatch nodes (jetstream)")
    parser.add_argument("--kill-one", action="store_true", help="kill -9 one node half-way (jetstream)")
    args = parser.parse_args()
    if args.backend != "jetstream" and (args.dispatchers != 1 or args.kill_one):
        parser.error("--dispatchers and --kill-one are for --backend jetstream")
    takeovers: list[float | None] = []
    repeated: list[int] = []
    cluster = create_nats_cluster() if args.backend == "jetstream" else None
    logs.configure("warning")  # as `ct1-cdc run` would, without per-delivery debug lines
    port = free_port()
    receiver = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    receiver.start()
    url = f"http://127.0.0.1:{port}/hook"
    work = Path(tempfile.mkdtemp(prefix="ct1-bench-dispatch-"))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        rates: dict[str, list[float]] = {
            "baseline": [],
            "ct1_cdc": [],
            "baseline_gc_tuned": [],
            "same_client": [],
        }
        for r in range(args.rounds):
            path = work / f"outbox_{r}.db"
            bodies = fill(path, args.events)
            jetstream = None
            if cluster is not None:  # the same events in a stream; the node's copy starts empty
                stream = f"BENCH{r}"
                fill_stream(cluster.servers, stream, path)
                path.unlink()
                path = work / f"node_{r}.db"
                jetstream = (cluster.servers, stream)
            secs = asyncio.run(baseline(url, bodies, args.concurrency))
            rates["baseline"].append(args.events / secs)
            # ct1-cdc as `ct1-cdc run` runs it: with its garbage-collector setting ...
            if jetstream is not None:
                secs, takeover, again = nodes(
                    port, args.events, work, *jetstream, args.dispatchers, args.concurrency, args.kill_one
                )
                takeovers.append(takeover)
                repeated.append(again)
            else:
                with gc_tuned():
                    secs = asyncio.run(ours(url, path, args.events, args.concurrency))
            rates["ct1_cdc"].append(args.events / secs)
            # ... and, for a like-for-like figure, the bare loop with the same setting
            with gc_tuned():
                secs = asyncio.run(baseline(url, bodies, args.concurrency))
            rates["baseline_gc_tuned"].append(args.events / secs)
            with gc_tuned():
                secs = asyncio.run(same_client(url, bodies, args.concurrency))
            rates["same_client"].append(args.events / secs)
            print(
                f"round {r + 1}: bare aiohttp {rates['baseline'][-1]:,.0f}/s "
                f"(GC tuned {rates['baseline_gc_tuned'][-1]:,.0f}/s), "
                f"ct1-cdc {rates['ct1_cdc'][-1]:,.0f}/s, "
                f"bare loop on ct1-cdc's client {rates['same_client'][-1]:,.0f}/s",
                file=sys.stderr,
            )
            path.unlink(missing_ok=True)
        med_base = statistics.median(rates["baseline"])
        med_ours = statistics.median(rates["ct1_cdc"])
        med_tuned = statistics.median(rates["baseline_gc_tuned"])
        print(
            json.dumps(
                {
                    "bench": "dispatch",
                    "backend": args.backend,
                    "events": args.events,
                    "concurrency": args.concurrency,
                    "baseline_per_s": [round(x) for x in rates["baseline"]],
                    "ct1_cdc_per_s": [round(x) for x in rates["ct1_cdc"]],
                    "baseline_median": round(med_base),
                    "ct1_cdc_median": round(med_ours),
                    "baseline_gc_tuned_per_s": [round(x) for x in rates["baseline_gc_tuned"]],
                    "ratio_to_gc_tuned_baseline": round(med_ours / med_tuned, 3),
                    "ratio": round(med_ours / med_base, 3),
                    "same_client_per_s": [round(x) for x in rates["same_client"]],
                    "ratio_to_same_client": round(med_ours / statistics.median(rates["same_client"]), 3),
                    **(
                        {
                            "dispatchers": args.dispatchers,
                            "takeover_s": [None if t is None else round(t, 2) for t in takeovers],
                            "sent_again": repeated,
                        }
                        if cluster is not None
                        else {}
                    ),
                }
            )
        )
    finally:
        receiver.terminate()
        receiver.join(5)
        shutil.rmtree(work, ignore_errors=True)
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
