"""With JSON logging every stderr line is one JSON object: structlog's own events and what
libraries log through the standard library (aiohttp's tracebacks, psycopg's pool warnings,
Python warnings, a thread that dies), with exceptions as a field and secrets redacted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    import asyncio, threading, warnings
    import aiohttp, psycopg_pool, structlog
    from aiohttp import web
    from common import logs

    logs.configure("info", json=True)

    async def boom(request):
        raise RuntimeError("handler bug")

    async def main():
        # aiohttp logs a handler's exception (no middleware here) with its traceback
        runner = web.AppRunner(web.Application(middlewares=[]))
        runner.app.router.add_get("/", boom)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.status == 500
        await runner.cleanup()
        # psycopg's pool warns about each failed connection attempt
        pool = psycopg_pool.AsyncConnectionPool(
            "host=127.0.0.1 port=1 dbname=x password=hunter2", min_size=0, max_size=1, open=False
        )
        await pool.open()
        try:
            async with pool.connection(timeout=0.5):
                pass
        except psycopg_pool.PoolTimeout:
            pass
        await pool.close()

    asyncio.run(main())
    warnings.warn("a deprecated thing", UserWarning)
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start()
    thread.join()
    structlog.get_logger("ct1_cdc.test").info("done", dsn="host=x password=hunter2", token="t0ps3cret")
    """
)


def test_every_stderr_line_is_json_with_exceptions_as_a_field() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{done.stderr}") from None
    by_event = {str(r.get("event")): r for r in records}
    handler = next(r for e, r in by_event.items() if e.startswith("Error handling request"))
    assert handler["level"] == "error" and handler["logger"] == "aiohttp.server"
    assert "RuntimeError: handler bug" in handler["exception"]
    assert any(r.get("logger") == "psycopg.pool" and r["level"] == "warning" for r in records)
    assert any("a deprecated thing" in str(r.get("event")) for r in records)
    died = by_event["thread_failed"]
    assert died["thread"] == "worker" and "ZeroDivisionError" in died["exception"]
    assert by_event["done"]["dsn"] == "***" and by_event["done"]["token"] == "***"
    assert "hunter2" not in done.stderr and "t0ps3cret" not in done.stderr
    assert all("timestamp" in r and "level" in r for r in records)
