"""Running the CLI as a subprocess, the way a user or a supervisor does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CLI = str(Path(sys.executable).parent / "ct1-cdc")


def write_config(
    path: Path, dsn: str, slot: str, outbox: Path, *, mapping: str | None = None, **extra: Any
) -> Path:
    """A config file; ``mapping``, the text of a mapping file written beside it (default:
    the marketplace's)."""
    from tests.conftest import MAPPING

    mapping_file = MAPPING
    if mapping is not None:
        mapping_file = path.with_name(path.stem + ".mapping.toml")
        mapping_file.write_text(mapping)

    lines = [
        "[source]",
        f"dsn = {dsn!r}",
        f"slot = {slot!r}",
        "heartbeat_seconds = 0.2",
        "status_interval_seconds = 1",
        "reconnect_max_seconds = 1",
        "[outbox]",
        f"path = {str(outbox)!r}",
        "[mapping]",
        f"file = {str(mapping_file)!r}",
    ]
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def env_for(config: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT1_")}
    if config is not None:
        env["CT1_CONFIG"] = str(config)
    env.update(extra)
    return env


def cli(
    *args: str, config: Path | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for(config, **env),
        stdin=subprocess.DEVNULL,
    )


def spawn(*args: str, log: Path, config: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """Start the CLI in the background; its stderr (the logs) is appended to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [CLI, *args],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            env=env_for(config, **env),
            stdin=subprocess.DEVNULL,
        )


class ThreadReceiver:
    """A webhook receiver on loopback, served from a thread, for subprocess tests.

    It verifies every request with the official standardwebhooks package (once the
    secret is known) and records the verified envelopes and the webhook-id headers.
    """

    def __init__(self) -> None:
        import asyncio
        import threading

        self.secret: str | None = None
        self.received: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.rejected = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def _serve(self) -> None:
        import asyncio

        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            from standardwebhooks import Webhook

            body = await request.read()
            try:
                assert self.secret is not None
                envelope = Webhook(self.secret).verify(body, dict(request.headers))
            except Exception:
                self.rejected += 1
                return web.Response(status=400)
            self.received.append(envelope)
            self.ids.append(request.headers["webhook-id"])
            return web.Response(text="ok")

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/hook", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            return runner

        asyncio.set_event_loop(self._loop)
        self._runner = self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> ThreadReceiver:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
