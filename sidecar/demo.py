"""``ct1-cdc demo``: a throwaway Postgres, the sample marketplace, capture, dispatch, two
receivers (CT2, CT3) that verify every signature, the HTTP API, and live traffic.

Everything runs on loopback and stops by itself after ``duration`` seconds; the cluster
and the outbox are removed at the end unless ``keep`` is set.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web

from api.app import FEED, excluded_columns
from api.openapi import BASE
from cdc.postgres import ensure_slot
from config.settings import PACKAGE_DIR, EndpointSettings, Settings
from ct1_client.receiver import Receiver
from ct1_client.webhooks import WebhookVerifier
from dispatcher.signing import generate_secret
from dispatcher.worker import Dispatcher
from outbox import store
from sidecar import sample
from sidecar.derived import AnalyticsRole
from sidecar.runner import build_capture, open_writer, router_for
from sidecar.throwaway import create_cluster

ABANDON_AFTER = 5  # seconds a cart may sit idle in the demo before it is abandoned
ANALYTICS_PERIOD = 10  # seconds per marketplace.analytics period in the demo


def describe(envelope: dict[str, Any]) -> str:
    data = envelope["data"]
    record = data.get("record") or {}
    previous = data.get("previous") or {}
    details = []
    shown = ("status", "payment_status", "total", "rating", "name", "product_id", "quantity")
    for col in (*shown, "value", "item_count", "gmv", "orders"):
        if col in record:
            before = f"{previous[col]} -> " if col in previous else ""
            details.append(f"{col}={before}{record[col]}")
    return f"{envelope['type']:<24} {data.get('object')}:{data.get('id')}  " + " ".join(details[:3])


def demo_receiver(name: str, secret: str, echo: Callable[[str], None]) -> Receiver:
    """CT2 or CT3 as the demo shows them: verify with the client kit, print, answer 200."""

    def shown(envelope: dict[str, Any], headers: Mapping[str, str]) -> None:
        echo(f"{name} <- {headers['webhook-id']:<9} {describe(envelope)}  [signature ok]")

    def refused(headers: Mapping[str, str], exc: Exception) -> None:
        echo(f"{name} REJECTED {headers.get('webhook-id')}: {exc}")

    return Receiver(WebhookVerifier(secret).verify, shown, on_rejected=refused, path="/webhooks/ct1")


async def _flow(
    dsn: str,
    root: Path,
    duration: float,
    rate: float,
    echo: Callable[[str], None],
    ct2_url: str | None = None,
    env_file: Path | None = None,
) -> dict[str, int]:
    secrets = {"ct2": generate_secret(), "ct3": generate_secret()}
    receivers = {name: demo_receiver(name.upper(), secret, echo) for name, secret in secrets.items()}
    if ct2_url is not None:
        del receivers["ct2"]  # CT2's webhooks go to the user's receiver instead
    for receiver in receivers.values():
        await receiver.start()
    urls = {name: receiver.url for name, receiver in receivers.items()} | (
        {"ct2": ct2_url} if ct2_url else {}
    )
    base = Settings()
    # the marketplace's mapping with carts abandoned after a few seconds, not an hour
    mapping_file = root / "mapping.toml"
    default = (PACKAGE_DIR / "mapping.toml").read_text(encoding="utf-8")
    mapping_file.write_text(re.sub(r"(?m)^abandon_after = .*$", f"abandon_after = {ABANDON_AFTER}", default))
    settings = Settings(
        source={"dsn": dsn, "slot": "ct1_demo", "heartbeat_seconds": 1},
        outbox={"path": str(root / "outbox.db")},
        mapping={"file": str(mapping_file)},
        analytics={
            "enabled": True,
            "period_seconds": ANALYTICS_PERIOD,
            "settle_seconds": 1,
            "retry_seconds": 2,
        },
        endpoints=[
            {"name": e.name, "url": urls[e.name], "secret": secrets[e.name], "events": e.events}
            for e in base.endpoints
        ],
    )
    dispatcher = Dispatcher(settings)
    api, api_url, key = await _start_api(settings)
    feed = api.app[FEED]

    def committed() -> None:
        dispatcher.notify()
        feed.notify()

    writer = open_writer(settings)
    capture = build_capture(settings, writer, on_commit=committed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_slot(conn, dsn, settings.source.slot, capture.mapping, writer)
    if env_file is not None:
        _write_env(env_file, api_url, key, secrets)
        echo(f"==> wrote the API's address, a key and the webhook secrets to {env_file} (removed at the end)")
    if ct2_url is not None:
        (ct2,) = [e for e in settings.endpoints if e.name == "ct2"]
        await _wait_for_receiver(ct2, secrets["ct2"], echo)
    echo(f"==> capture and dispatch running; CT2 at {urls['ct2']}, CT3 at {urls['ct3']}")
    echo(f"==> HTTP API at {api_url} (demo key {key}), e.g.")
    echo(f"    curl -H 'Authorization: Bearer {key}' '{api_url}/api/core-transaction-1/events?limit=5'")
    echo(
        f"    (the key and the API last as long as the demo: `--duration {max(600, int(duration))}` for longer)"
    )
    echo(f"==> live marketplace traffic for {duration:.0f} s:")
    echo(
        f"    carts idle for {ABANDON_AFTER} s are abandoned (cart.abandoned); "
        f"marketplace.analytics every {ANALYTICS_PERIOD} s, to CT3 only"
    )
    stop, stop_analytics = asyncio.Event(), asyncio.Event()
    capture_task = asyncio.ensure_future(asyncio.to_thread(capture.run))
    dispatch_task = asyncio.ensure_future(dispatcher.run(stop))
    analytics = AnalyticsRole(settings, router_for(settings), excluded_columns(capture.mapping))
    analytics_task = asyncio.ensure_future(analytics.run(stop_analytics))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            traffic = sample.Traffic(conn)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + duration
            while loop.time() < deadline:
                await asyncio.to_thread(traffic.step)
                await asyncio.sleep(1 / rate)
        await asyncio.sleep(2)  # let the last events arrive
        await _show_api(api_url, key, echo)
        # the exports' own heartbeats move the stream's clock (they reach capture once the
        # WAL writer flushes them), so a cart may fall due just now: let those events come
        # and be delivered before stopping (until all is delivered and quiet; bounded)
        await _delivered(settings.outbox.path, within=15.0)
        # then the sources stop first, and the dispatcher delivers what they wrote last
        # (a cart can fall due at any moment while the stream's clock moves)
        capture.stop()
        stop_analytics.set()
        await asyncio.gather(capture_task, analytics_task)
        await _delivered(settings.outbox.path, within=15.0, quiet=0.0)
    finally:
        capture.stop()
        stop_analytics.set()
        stop.set()
        await asyncio.gather(capture_task, dispatch_task, analytics_task, return_exceptions=True)
        writer.close()
        await api.cleanup()
        for receiver in receivers.values():
            await receiver.stop()
        if env_file is not None:
            env_file.unlink(missing_ok=True)
    reader = store.connect(settings.outbox.path, readonly=True)
    stats = store.stats(reader)
    reader.close()
    echo(f"==> {stats['events']} events captured: {stats['events_by_type']}")
    verified = {name: len(r.received) for name, r in receivers.items()}
    shown = ", ".join(f"{name.upper()} {count}" for name, count in verified.items())
    echo(f"==> deliveries: {stats['deliveries']}; received and verified: {shown}")
    return {"events": stats["events"], **verified}


def _write_env(path: Path, api_url: str, key: str, secrets: Mapping[str, str]) -> None:
    """What CT2/CT3 programs need to reach this demo, as shell ``export`` lines (readable
    by the owner alone: it holds a key and secrets)."""
    lines = [
        f"export CT1_API_URL={api_url}",
        f"export CT1_API_KEY={key}",
        *(f"export {name.upper()}_WEBHOOK_SECRET={secret}" for name, secret in secrets.items()),
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    tmp.replace(path)


async def _wait_for_receiver(
    endpoint: EndpointSettings, secret: str, echo: Callable[[str], None], within: float = 120.0
) -> None:
    """Before any traffic, wait until the user's receiver takes a signed ``webhook.test``,
    so its first webhooks are not spent on retries; say so when it answers but refuses
    (another secret: an older receiver still running?); go on after ``within`` s."""
    from common.version import version
    from dispatcher.probe import send_test
    from dispatcher.sender import Sender

    echo(f"==> waiting for CT2's receiver at {endpoint.url} (e.g. examples/ct2_seller_sync.py)")
    sender = Sender(5.0, concurrency=1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    told = 0
    try:
        while loop.time() < deadline:
            probe = await send_test(sender, endpoint, secret, version())
            if probe.delivered:
                echo(f"==> CT2's receiver took a signed webhook.test ({probe.status})")
                return
            if probe.status and probe.status != told:
                told = probe.status
                echo(
                    f"==> CT2's receiver answered {probe.status} to a signed webhook.test"
                    + (
                        " (an older receiver with another secret still running?)"
                        if probe.status == 401
                        else ""
                    )
                )
            await asyncio.sleep(0.5)
    finally:
        await sender.close()
    echo(
        f"==> CT2's receiver at {endpoint.url} does not take webhooks yet: they will be retried with backoff"
    )


async def _delivered(path: str, within: float, quiet: float = 2.0) -> None:
    """Wait until nothing is pending and no event has come for ``quiet`` seconds, at most
    ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, still_since = -1, loop.time()
    while loop.time() < deadline:
        reader = store.connect(path, readonly=True)
        try:
            stats = store.stats(reader)
        finally:
            reader.close()
        if stats["events"] != last:
            last, still_since = stats["events"], loop.time()
        pending = any(states.get("pending") for states in stats["deliveries"].values())
        if not pending and loop.time() - still_since >= quiet:
            return
        await asyncio.sleep(0.2)


async def _start_api(settings: Settings) -> tuple[web.AppRunner, str, str]:
    """The API on a free loopback port, with a demo key that may do everything."""
    from api import keys
    from api.app import create_app
    from api.server import ApiRunner

    conn = store.open_outbox(settings.outbox.path)
    key = keys.create(conn, "demo", [keys.EXPORT, keys.WEBHOOKS], []).key
    conn.close()
    runner = ApiRunner(create_app(settings), access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", key


async def _show_api(api_url: str, key: str, echo: Callable[[str], None]) -> None:
    """What a CT2/CT3 client sees over HTTP after the traffic."""
    import aiohttp

    base = f"{api_url}{BASE}"
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{base}/events", params={"limit": "1000", "event_types": "order.*"}) as resp:
            events = (await resp.json())["data"]
        async with http.get(f"{base}/orders", params={"payment_status": "paid", "per_page": "1"}) as resp:
            orders = (await resp.json())["data"]
        async with http.get(f"{base}/analytics") as resp:
            analytics = (await resp.json())["data"]
    echo(f"==> API: GET /events?event_types=order.* gave {len(events)} events")
    if orders:
        order = orders[0]
        echo(
            f"==> API: GET /orders?payment_status=paid, first: order {order['id']},"
            f" payment {order.get('payment_status')}, status {order['status']},"
            f" total {order['total']} {order['currency']}"
        )
    echo(
        f"==> API: GET /analytics (last 30 days): GMV {analytics['gmv']}, {analytics['orders']} orders,"
        f" conversion {analytics['conversion_rate']}"
    )


def run_demo(
    duration: float = 30.0,
    rate: float = 5.0,
    keep: bool = False,
    echo: Callable[[str], None] = print,
    ct2_url: str | None = None,
    env_file: Path | None = None,
) -> dict[str, int]:
    root = Path(tempfile.mkdtemp(prefix="ct1-demo-"))
    root.chmod(0o711)  # the postgres OS user must reach its data directory inside
    echo(f"==> starting a throwaway Postgres with wal_level=logical in {root}")
    cluster = create_cluster(root / "pg")
    try:
        dsn, counts = cluster.sample_database("marketplace")
        echo(f"==> sample marketplace loaded: {counts}")
        result = asyncio.run(_flow(dsn, root, duration, rate, echo, ct2_url, env_file))
        if keep:
            echo(f"    inspect: CT1_OUTBOX__PATH={root / 'outbox.db'} ct1-cdc outbox list --json")
        echo("==> next: attach ct1-cdc to your own database, step by step: docs/attach.md")
        return result
    finally:
        if keep:
            echo(f"==> kept {root} (Postgres is stopped; data directory left in place)")
            cluster.stop()
        else:
            cluster.destroy()
            shutil.rmtree(root, ignore_errors=True)
