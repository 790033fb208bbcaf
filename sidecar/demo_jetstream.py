"""``ct1-cdc demo --backend jetstream``: the layout of docs/jetstream.md on one machine.

A throwaway Postgres with the sample marketplace, a three-node JetStream cluster on
loopback, and ct1-cdc as separate processes, each with its own outbox file: two captures
(one streams, the other is its standby), two dispatch nodes sharing the endpoints by
partition, two API nodes; CT2 and CT3 receivers that verify every signature; live
traffic.  Half-way the active capture is killed with SIGKILL and the standby takes over.
Everything runs on loopback and stops by itself; it is all removed at the end unless
``keep`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from api.openapi import BASE
from common.errors import Ct1Error
from config.settings import PACKAGE_DIR, Settings
from dispatcher.signing import generate_secret
from outbox.store import Router, routes_of
from sidecar import sample
from sidecar.demo import ABANDON_AFTER, ANALYTICS_PERIOD, demo_receiver
from sidecar.natscluster import create_nats_cluster
from sidecar.throwaway import create_cluster, free_port

NODES = ("capture-a", "capture-b", "dispatch-1", "dispatch-2", "api-1", "api-2")
STARTED_WITHIN = 90.0  # seconds for every node to log run_started
DELIVERED_WITHIN = 60.0  # after the traffic, for every event to be delivered


class Nodes:
    """The ct1-cdc processes, their logs and their environments."""

    def __init__(self, root: Path, config: Path) -> None:
        self.root = root
        self.config = config
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CT1_")}
        env.update(CT1_CONFIG=str(self.config), CT1_OUTBOX__PATH=str(self.root / f"{name}.db"))
        if name in self.ports:
            env["CT1_API__PORT"] = str(self.ports[name])
        if not name.startswith("capture"):
            env["CT1_ANALYTICS__ENABLED"] = "false"  # (it runs beside capture)
        return env

    def command(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sidecar.cli", *args],
            env=self.env(name),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def start(self, name: str) -> None:
        role = name.split("-")[0]
        with open(self.log(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", "run", "--role", role],
                env=self.env(name),
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def logged(self, name: str, event: str) -> bool:
        path = self.log(name)
        return path.exists() and event in path.read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _config(root: Path, dsn: str, servers: list[str], urls: dict[str, str], secrets: dict[str, str]) -> Path:
    mapping = root / "mapping.toml"
    default = (PACKAGE_DIR / "mapping.toml").read_text(encoding="utf-8")
    mapping.write_text(re.sub(r"(?m)^abandon_after = .*$", f"abandon_after = {ABANDON_AFTER}", default))
    q = json.dumps  # (a JSON string is a TOML basic string)
    lines = [
        "[source]",
        f"dsn = {q(dsn)}",
        'slot = "ct1_demo"',
        "heartbeat_seconds = 1",
        "[outbox]",
        'backend = "jetstream"',
        "[outbox.jetstream]",
        f"servers = [{', '.join(q(s) for s in servers)}]",
        'stream = "CT1_DEMO"',
        "[mapping]",
        f"file = {q(str(mapping))}",
        "[api]",
        'host = "127.0.0.1"',
        "[analytics]",  # (beside capture: every period's event through it, once)
        "enabled = true",
        f"period_seconds = {ANALYTICS_PERIOD}",
        "settle_seconds = 1",
        "retry_seconds = 2",
    ]
    for endpoint in Settings().endpoints:
        events = ", ".join(q(e) for e in endpoint.events)
        lines += [
            "[[endpoints]]",
            f"name = {q(endpoint.name)}",
            f"url = {q(urls[endpoint.name])}",
            f"secret = {q(secrets[endpoint.name])}",
            f"events = [{events}]",
        ]
    path = root / "ct1.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def _flow(
    dsn: str, servers: list[str], root: Path, duration: float, rate: float, echo: Callable[[str], None]
) -> dict[str, Any]:
    secrets = {"ct2": generate_secret(), "ct3": generate_secret()}
    receivers = {name: demo_receiver(name.upper(), secret, echo) for name, secret in secrets.items()}
    for receiver in receivers.values():
        await receiver.start()
    nodes = Nodes(root, _config(root, dsn, servers, {n: r.url for n, r in receivers.items()}, secrets))
    nodes.ports = {"api-1": free_port(), "api-2": free_port()}
    try:
        made = await asyncio.to_thread(nodes.command, "capture-a", "setup", "--json")
        if made.returncode != 0:
            raise Ct1Error(f"setup failed: {(made.stderr.strip().splitlines() or ['?'])[-1]}")
        key = json.loads(made.stdout.splitlines()[-1])["api_key"]["key"]
        for name in NODES:
            nodes.start(name)
            if name == "capture-a":  # (the first to reach the slot streams; the other waits)
                await _until(
                    lambda: nodes.logged("capture-a", "capture_started"), STARTED_WITHIN, "capture-a"
                )
        await _until(lambda: all(nodes.logged(n, "run_started") for n in NODES), STARTED_WITHIN, "every node")
        await _until(lambda: nodes.logged("capture-b", "standby_waiting"), STARTED_WITHIN, "the standby")
        api = f"http://127.0.0.1:{nodes.ports['api-1']}"
        echo(f"==> NATS JetStream, three nodes: {', '.join(servers)}")
        echo("==> ct1-cdc: capture-a streams, capture-b is its standby; dispatch-1 and dispatch-2 share")
        echo(f"    the partitions; api-1 and api-2 serve the stream's copy (logs and files in {root})")
        echo(f"==> HTTP API at {api} and http://127.0.0.1:{nodes.ports['api-2']} (demo key {key}), e.g.")
        echo(f"    curl -H 'Authorization: Bearer {key}' '{api}{BASE}/events?limit=5'")
        echo(f"==> live marketplace traffic for {duration:.0f} s; capture-a is killed (SIGKILL) half-way")
        took_over = await _traffic(dsn, duration, rate, nodes, echo)
        events, missing = await _delivered(api, key, receivers)
    finally:
        await asyncio.to_thread(nodes.stop)
        for receiver in receivers.values():
            await receiver.stop()
    verified = {name: len(r.received) for name, r in receivers.items()}
    shown = ", ".join(f"{name.upper()} {count}" for name, count in verified.items())
    echo(f"==> {events} events in the stream; the standby took over {took_over:.1f} s after the kill")
    echo(f"==> received and verified: {shown} (a webhook-id may come twice: at least once)")
    for name, count in missing.items():
        echo(
            f"==> {name.upper()}: "
            + (f"{count} events MISSING" if count else "every event it takes received")
        )
    if any(missing.values()):
        raise Ct1Error(f"events missing at a receiver after {DELIVERED_WITHIN:.0f} s: {missing}")
    return {"events": events, "took_over": took_over, **verified}


async def _traffic(
    dsn: str, duration: float, rate: float, nodes: Nodes, echo: Callable[[str], None]
) -> float:
    """Traffic for ``duration`` s, the active capture killed half-way; seconds from the
    kill to the standby's take-over."""
    loop = asyncio.get_running_loop()
    killed_at: float | None = None
    took_over: float | None = None
    with psycopg.connect(dsn, autocommit=True) as conn:
        traffic = sample.Traffic(conn)
        start = loop.time()
        while loop.time() < start + duration or took_over is None:
            if loop.time() > start + duration + STARTED_WITHIN:
                raise Ct1Error("the standby did not take over")
            await asyncio.to_thread(traffic.step)
            if killed_at is None and loop.time() >= start + duration / 2:
                nodes.procs["capture-a"].send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                echo("==> capture-a killed with SIGKILL")
            if killed_at is not None and took_over is None and nodes.logged("capture-b", "standby_took_over"):
                took_over = time.monotonic() - killed_at
                echo(f"==> capture-b took over {took_over:.1f} s later")
            await asyncio.sleep(1 / rate)
    return took_over


async def _delivered(api: str, key: str, receivers: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Until every receiver holds every event of the stream it takes (read back from an
    API node), at most :data:`DELIVERED_WITHIN` s: the events, and per receiver how many
    it is still missing."""
    router = Router(routes_of(Settings().endpoints))  # (the demo's endpoints: the defaults)
    deadline = time.monotonic() + DELIVERED_WITHIN
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        while True:
            events: list[dict[str, Any]] = []
            while True:  # every event, a page at a time
                after = events[-1]["id"] if events else 0
                params = {"last_event_id": str(after), "limit": "500"}
                async with http.get(f"{api}{BASE}/events", params=params) as resp:
                    page = (await resp.json())["data"]
                events += page
                if len(page) < 500:
                    break
            missing = {}
            for name, receiver in receivers.items():
                got = {r.envelope["id"] for r in receiver.received}
                wanted = {e["id"] for e in events if name in router.endpoints(e["type"])}
                missing[name] = len(wanted - got)
            if not any(missing.values()) or time.monotonic() > deadline:
                return len(events), missing
            await asyncio.sleep(1.0)


async def _until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise Ct1Error(f"{what} did not start within {within:.0f} s")
        await asyncio.sleep(0.2)


def run_jetstream_demo(
    duration: float = 30.0, rate: float = 5.0, keep: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ct1-demo-"))
    root.chmod(0o711)  # the postgres OS user must reach its data directory inside
    echo(f"==> starting a throwaway Postgres with wal_level=logical and three NATS nodes in {root}")
    cluster = create_cluster(root / "pg")
    nats = None
    try:
        dsn, counts = cluster.sample_database("marketplace")
        echo(f"==> sample marketplace loaded: {counts}")
        nats = create_nats_cluster(root / "nats")
        return asyncio.run(_flow(dsn, nats.servers, root, duration, rate, echo))
    finally:
        if nats is not None:
            with contextlib.suppress(Exception):
                nats.stop()
        if keep:
            echo(f"==> kept {root} (Postgres and NATS are stopped; their files left in place)")
            cluster.stop()
        else:
            cluster.destroy()
            shutil.rmtree(root, ignore_errors=True)
