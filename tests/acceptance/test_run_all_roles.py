"""`ct1-cdc run` with every role in one process: a row committed in the marketplace wakes
a long poll through the in-process commit callback, shows in an export, and the process
stops cleanly on SIGTERM even with an event stream open."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from api.openapi import BASE
from sidecar.throwaway import free_port
from tests.acceptance.helpers import cli, spawn, write_config


def get(url: str, key: str, timeout: float = 30) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def test_all_roles_in_one_process(source_db, tmp_path):
    port = free_port()
    config = write_config(tmp_path / "c.toml", source_db.dsn, source_db.slot, tmp_path / "o.db")
    config.write_text(config.read_text() + f"[api]\nport = {port}\n")
    setup = cli("setup", "--json", "--no-probe", config=config)
    assert setup.returncode == 0, setup.stderr
    key = json.loads(setup.stdout.splitlines()[-1])["api_key"]["key"]
    log = tmp_path / "run.log"
    proc = spawn("run", config=config, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                ready = json.loads(urllib.request.urlopen(f"{url}/readyz", timeout=2).read())
                if ready["status"] == "ready":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        # an event stream stays open through the shutdown below
        stream = socket.create_connection(("127.0.0.1", port))
        stream.sendall(
            f"GET {BASE}/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
        )
        source_db.execute("INSERT INTO users (name, email, password) VALUES ('Ada', 'ada@x.test', 'secret')")
        (user_id,) = source_db.execute("SELECT id FROM users WHERE email = 'ada@x.test'")[0]
        started = time.monotonic()
        body = get(f"{url}{BASE}/events?event_types=customer.created&wait=25", key)
        assert time.monotonic() - started < 20, "the long poll was not woken"
        assert [e["data"]["id"] for e in body["data"]] == [user_id]
        assert "secret" not in json.dumps(body)
        customer = get(f"{url}{BASE}/customers/{user_id}", key)["data"]
        assert customer["email"] == "ada@x.test" and "password" not in customer
        stream.settimeout(20)
        seen = b""
        while b"event: customer.created" not in seen:
            chunk = stream.recv(65536)
            assert chunk, seen
            seen += chunk
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    stream.close()
    assert code == 0, log.read_text()
