"""A throwaway NATS JetStream cluster of three nodes on loopback, for tests, benchmarks
and the JetStream demo (``python -m sidecar.natscluster`` runs one until Ctrl-C).

Each node is a ``nats-server`` (the Debian package) with JetStream on, its own storage
directory, a client port and a cluster port, all free loopback ports; the nodes route to
each other.  :meth:`NatsCluster.kill`, :meth:`pause` and :meth:`restart` are the faults the
tests use: kill -9 of a node, a node that stops answering (SIGSTOP), a node back.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.throwaway import free_port

NODES = 3


class NatsUnavailable(RuntimeError):
    pass


def nats_server() -> str:
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    if found is None:
        raise NatsUnavailable("nats-server is not installed (Debian: apt-get install nats-server)")
    return found


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    store: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class NatsCluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)
    owns_root: bool = False

    @property
    def servers(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, i: int) -> None:
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            return
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(
                [nats_server(), "-c", str(node.config)], stdout=log, stderr=subprocess.STDOUT
            )
        _wait_port(node.port, node.proc, node.log)

    def kill(self, i: int) -> None:
        """kill -9 of node ``i``."""
        proc = self.nodes[i].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self, i: int) -> None:
        """SIGSTOP: the node holds its connections and answers nothing."""
        proc = self.nodes[i].proc
        if proc is not None:
            proc.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        proc = self.nodes[i].proc
        if proc is not None:
            proc.send_signal(signal.SIGCONT)

    def restart(self, i: int) -> None:
        self.kill(i)
        self.start(i)

    def stop(self) -> None:
        for i in range(len(self.nodes)):
            self.resume(i)
            proc = self.nodes[i].proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def create_nats_cluster(root: Path | None = None, nodes: int = NODES, up: int | None = None) -> NatsCluster:
    """Start ``nodes`` JetStream nodes routed to each other on free loopback ports (only
    the first ``up`` of them, if given: the others wait for :meth:`NatsCluster.start`);
    returns once those accept connections (the stream's leader may take a moment more:
    :func:`outbox.jetstream.JetStreamLog.ensure_stream` waits for it)."""
    nats_server()  # fail first, with the fix, when it is missing
    owns = root is None
    root = Path(tempfile.mkdtemp(prefix="ct1-nats-")) if root is None else root
    for attempt in range(3):
        try:
            return _start_cluster(root, owns, nodes, up)
        except NatsUnavailable as exc:
            # a port taken between choosing it and binding it (seen in CI: another test's
            # process had it): again, on new ports
            if "address already in use" not in str(exc) or attempt == 2:
                raise
            for node in root.glob("n*"):  # (what the failed start left)
                if node.is_dir():
                    shutil.rmtree(node, ignore_errors=True)
                else:
                    node.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _start_cluster(root: Path, owns: bool, nodes: int, up: int | None) -> NatsCluster:
    root.mkdir(parents=True, exist_ok=True)
    ports = [(free_port(), free_port()) for _ in range(nodes)]
    cluster = NatsCluster(root=root, owns_root=owns)
    routes = ", ".join(f'"nats-route://127.0.0.1:{cp}"' for _, cp in ports)
    for i, (port, cluster_port) in enumerate(ports):
        name = f"n{i + 1}"
        store = root / name
        store.mkdir(exist_ok=True)
        config = root / f"{name}.conf"
        config.write_text(
            "\n".join(
                [
                    f'server_name: "{name}"',
                    f'listen: "127.0.0.1:{port}"',
                    "jetstream {",
                    f'  store_dir: "{store}"',
                    "  max_memory_store: 64MB",
                    "  max_file_store: 1GB",
                    "}",
                    "cluster {",
                    '  name: "ct1"',
                    f'  listen: "127.0.0.1:{cluster_port}"',
                    f"  routes: [{routes}]",
                    "}",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        cluster.nodes.append(Node(name, port, cluster_port, store, config, root / f"{name}.log"))
    try:
        for i in range(nodes if up is None else up):
            cluster.start(i)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise NatsUnavailable(f"nats-server exited {proc.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NatsUnavailable(f"nats-server did not listen on 127.0.0.1:{port} within {within:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="keep the nodes' storage here")
    args = parser.parse_args(argv)
    cluster = create_nats_cluster(args.dir)
    print(f"JetStream cluster of {len(cluster.nodes)} nodes, storage in {cluster.root}")
    print(f"  [outbox.jetstream] servers = {cluster.servers!r}".replace("'", '"'))
    print("Ctrl-C stops it", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
