"""The README's CT2/CT3 walk-through, as a user runs it: ``ct1-cdc demo`` with CT2's
webhooks sent to ``examples/ct2_seller_sync.py`` and ``examples/ct3_poller.py`` seeding
from the export then tailing ``/events``."""

from __future__ import annotations

import ast
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from sidecar.throwaway import free_port
from tests.acceptance.helpers import CLI, env_for

ROOT = Path(__file__).resolve().parents[2]


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for()
    )


def test_the_examples_run_against_the_demo(tmp_path):
    port = free_port()
    env_file = tmp_path / "ct1-demo.env"
    demo = start(
        CLI,
        "demo",
        "--duration",
        "15",
        "--rate",
        "12",
        "--ct2-url",
        f"http://127.0.0.1:{port}/webhooks/ct1",
        "--env-file",
        str(env_file),
        cwd=tmp_path,
    )
    ct2 = start(
        sys.executable,
        str(ROOT / "examples" / "ct2_seller_sync.py"),
        "--env-file",
        str(env_file),
        "--listen",
        f"127.0.0.1:{port}",
        cwd=tmp_path,
    )
    ct3 = start(
        sys.executable, str(ROOT / "examples" / "ct3_poller.py"), "--env-file", str(env_file), cwd=tmp_path
    )
    try:
        out, err = demo.communicate(timeout=300)
        assert demo.returncode == 0, err[-3000:]
    finally:
        for proc in (ct2, ct3):
            proc.send_signal(signal.SIGTERM)
        ct2_out, ct2_err = ct2.communicate(timeout=30)
        ct3_out, ct3_err = ct3.communicate(timeout=30)
    assert ct2.returncode == 0, ct2_err[-3000:]
    assert ct3.returncode == 0, ct3_err[-3000:]
    assert not env_file.exists()  # the key and secrets do not outlive the demo

    # every webhook to CT2 was verified and answered 2xx by the example's receiver kit
    (deliveries,) = [line for line in out.splitlines() if line.startswith("==> deliveries: ")]
    by_endpoint = ast.literal_eval(deliveries.removeprefix("==> deliveries: ").split("; ")[0])
    assert set(by_endpoint["ct2"]) == {"delivered"} and by_endpoint["ct2"]["delivered"] > 0

    seeded = int(re.search(r"seller \d+: (\d+) orders loaded", ct2_out).group(1))  # type: ignore[union-attr]
    seller_rows = (
        sqlite3.connect(tmp_path / "ct2_orders.db").execute("SELECT count(*) FROM orders").fetchone()[0]
    )
    assert seller_rows >= seeded > 0

    # CT3's copy holds the sample's orders and every order created during the traffic
    loaded = ast.literal_eval(re.search(r"sample marketplace loaded: (\{.*\})", out).group(1))  # type: ignore[union-attr]
    captured = ast.literal_eval(re.search(r"events captured: (\{.*\})", out).group(1))  # type: ignore[union-attr]
    copy = sqlite3.connect(tmp_path / "ct3_orders.db").execute("SELECT count(*) FROM orders").fetchone()[0]
    assert copy == loaded["orders"] + captured.get("order.created", 0), ct3_out[-2000:]
    assert "CT3: stopped at event" in ct3_out
