"""`ct1-cdc run` starts every role or none, and stops when told to (issue 9, breakage 4).

A role that cannot start (API port taken, outbox unwritable, source unreachable) stops
the others and the process exits non-zero within seconds with one line naming the cause;
SIGTERM and SIGINT end it within 10 s, also when the source's sockets are alive but
silent (a hung server, a black-holed network).  The bounds below are the ones the issue
names, given as generous subprocess timeouts, not benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sidecar.throwaway import free_port
from tests.acceptance.helpers import cli, spawn, write_config
from tests.waiting import wait_until

START_FAILS_WITHIN = 20  # "within seconds": the run must not hang, and must not retry forever
STOPS_WITHIN = 15  # "SIGTERM ends `ct1-cdc run` within 10 s", plus interpreter start-up slack


def config_for(tmp_path: Path, dsn: str, slot: str, outbox: Path, api_port: int) -> Path:
    config = write_config(tmp_path / "c.toml", dsn, slot, outbox)
    config.write_text(config.read_text() + f"[api]\nhost = '127.0.0.1'\nport = {api_port}\n")
    return config


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ct1-cdc: error: ")]


def run_expecting_failure(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return cli("run", *args, config=config, timeout=START_FAILS_WITHIN)
    except subprocess.TimeoutExpired as exc:  # the breakage: it hung instead of exiting
        pytest.fail(f"`ct1-cdc run {' '.join(args)}` still running after {exc.timeout} s: {exc.stderr!r}")


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, event: str, timeout: float = 30) -> None:
    def logged() -> bool:
        assert proc.poll() is None, log.read_text()
        return f'"event": "{event}"' in log.read_text()

    wait_until(logged, timeout, interval=0.1, what=f"{event} in {log}")


def stop(proc: subprocess.Popen[bytes], log: Path, sig: signal.Signals = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=STOPS_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{sig.name} did not end `ct1-cdc run` within {STOPS_WITHIN} s:\n{log.read_text()}")


def outbox_events(config: Path) -> list[object]:
    listed = cli("outbox", "list", "--json", config=config, timeout=30)
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()]


# -- a role that cannot start ----------------------------------------------------------------


def test_api_port_taken_fails_the_run_before_anything_is_captured(source_db, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = config_for(tmp_path, source_db.dsn, source_db.slot, tmp_path / "o.db", port)
        setup = cli("setup", "--json", "--no-probe", config=config)
        assert setup.returncode == 0, setup.stderr
        source_db.execute("INSERT INTO users (name, email, password) VALUES ('Ada', 'ada@x.test', 'x')")
        done = run_expecting_failure(config)
    assert done.returncode == 1, done.stderr
    assert error_lines(done.stderr) == [
        f"ct1-cdc: error: api: cannot listen on 127.0.0.1:{port}: address already in use"
    ], done.stderr
    assert "capture_started" not in done.stderr
    assert outbox_events(config) == []  # the insert waits in the slot for a run that can serve it


def test_api_port_taken_fails_role_api_alone(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        closed = f"host=127.0.0.1 port={free_port()} user=postgres dbname=x"
        config = config_for(tmp_path, closed, "s", tmp_path / "o.db", port)
        done = run_expecting_failure(config, "--role", "api")
    assert done.returncode == 1, done.stderr
    assert error_lines(done.stderr) == [
        f"ct1-cdc: error: api: cannot listen on 127.0.0.1:{port}: address already in use"
    ], done.stderr


@pytest.mark.parametrize("roles", ["capture,dispatch,api", "capture", "dispatch", "api"])
def test_unwritable_outbox_fails_every_role(source_db, tmp_path, roles):
    # Tests run as root, whom permissions do not stop: the outbox's directory is a file.
    (tmp_path / "not-a-dir").write_text("")
    outbox = tmp_path / "not-a-dir" / "outbox.db"
    config = config_for(tmp_path, source_db.dsn, source_db.slot, outbox, free_port())
    done = run_expecting_failure(config, "--role", roles)
    assert done.returncode == 1, done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith(f"ct1-cdc: error: outbox: cannot open {outbox}: "), done.stderr
    assert "Traceback" not in done.stderr
    assert "capture_started" not in done.stderr


@pytest.mark.parametrize("roles", ["capture,dispatch,api", "capture"])
def test_source_unreachable_at_start_fails_the_run(tmp_path, roles):
    closed = f"host=127.0.0.1 port={free_port()} user=postgres dbname=x connect_timeout=3"
    config = config_for(tmp_path, closed, "s", tmp_path / "o.db", free_port())
    done = run_expecting_failure(config, "--role", roles)
    assert done.returncode == 1, done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("ct1-cdc: error: capture: cannot connect to the source"), done.stderr
    assert "check source.dsn" in line


def test_roles_without_capture_start_without_the_source(tmp_path):
    """Only capture needs the source at start: dispatch and the API serve the outbox."""
    closed = f"host=127.0.0.1 port={free_port()} user=postgres dbname=x"
    port = free_port()
    config = config_for(tmp_path, closed, "s", tmp_path / "o.db", port)
    log = tmp_path / "run.log"
    proc = spawn("run", "--role", "dispatch,api", config=config, log=log)
    wait_for_log(proc, log, "run_started")
    assert stop(proc, log) == 0, log.read_text()


# -- stopping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "sig"),
    [
        ("capture,dispatch,api", signal.SIGTERM),
        ("capture,dispatch,api", signal.SIGINT),
        ("capture", signal.SIGTERM),
        ("dispatch", signal.SIGTERM),
        ("api", signal.SIGINT),
    ],
)
def test_signal_stops_a_running_process_cleanly(source_db, tmp_path, roles, sig):
    config = config_for(tmp_path, source_db.dsn, source_db.slot, tmp_path / "o.db", free_port())
    log = tmp_path / "run.log"
    proc = spawn("run", "--role", roles, config=config, log=log)
    if "capture" in roles:
        wait_for_log(proc, log, "capture_started")
    wait_for_log(proc, log, "run_started")
    assert stop(proc, log, sig) == 0, log.read_text()
    assert '"event": "run_stopped"' in log.read_text()


class SilentProxy:
    """A TCP proxy to Postgres that can go silent: it then stops forwarding in both
    directions and answers no new connection, while every socket stays open.  To the
    sidecar the source looks like a hung server or a black-holed network: reads and
    writes block, nothing fails."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.silent.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            if self.silent.is_set():
                time.sleep(0.05)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def proxy(source_db) -> Iterator[SilentProxy]:
    params = conninfo_to_dict(source_db.dsn)
    p = SilentProxy(str(params["host"]), int(str(params["port"])))
    try:
        yield p
    finally:
        p.close()


def via(dsn: str, proxy: SilentProxy) -> str:
    params = conninfo_to_dict(dsn)
    params.update(host="127.0.0.1", port=str(proxy.port))
    return make_conninfo(**params)  # type: ignore[arg-type]


def test_sigterm_stops_the_run_while_the_source_is_silent(source_db, proxy, tmp_path):
    config = config_for(tmp_path, via(source_db.dsn, proxy), source_db.slot, tmp_path / "o.db", free_port())
    log = tmp_path / "run.log"
    proc = spawn("run", config=config, log=log)
    wait_for_log(proc, log, "capture_started")
    wait_for_log(proc, log, "run_started")
    source_db.execute("INSERT INTO users (name, email, password) VALUES ('Ada', 'ada@x.test', 'x')")
    deadline = time.monotonic() + 30
    while '"type": "customer.created"' not in json.dumps(outbox_events(config)):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    proxy.silent.set()
    time.sleep(2)  # heartbeats (every 0.2 s) and status updates now block on the silent source
    assert stop(proc, log) == 0, log.read_text()
    assert len(outbox_events(config)) == 1  # what was committed stays committed


def test_sigterm_stops_the_run_while_the_walsender_is_paused(source_db, tmp_path):
    config = config_for(tmp_path, source_db.dsn, source_db.slot, tmp_path / "o.db", free_port())
    log = tmp_path / "run.log"
    proc = spawn("run", config=config, log=log)
    wait_for_log(proc, log, "capture_started")
    rows = source_db.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", source_db.slot
    )
    (pid,) = rows[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2)
        assert stop(proc, log) == 0, log.read_text()
    finally:
        os.kill(pid, signal.SIGCONT)


def test_sigterm_stops_a_run_whose_source_never_answers_at_start(source_db, proxy, tmp_path):
    proxy.silent.set()  # connections are accepted and never answered
    config = config_for(tmp_path, via(source_db.dsn, proxy), source_db.slot, tmp_path / "o.db", free_port())
    log = tmp_path / "run.log"
    proc = spawn("run", config=config, log=log)
    # the run reaches the source only once its signal handlers are in place: wait for its
    # connection, not a fixed time (on a loaded machine the imports alone took over 2 s,
    # and a SIGTERM before the handlers ended the process by the default action)
    deadline = time.monotonic() + 60
    while len(proxy.sockets) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, log.read_text()  # still waiting for the source's answer
    assert stop(proc, log) == 0, log.read_text()
    assert "capture_started" not in log.read_text()
