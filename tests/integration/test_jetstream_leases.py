"""A dispatch node's leases (outbox/jetstream_leases.py) on a real three-node cluster, in
what the dispatch tests do not reach."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from outbox.jetstream import JetStreamLog
from outbox.jetstream_leases import Leases
from sidecar.natscluster import NatsCluster


class Started:
    """A dispatcher that started and has nothing in flight: all the leases ask of one
    that is stopped before it takes a partition."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.started.set()
        self.finished = threading.Event()
        self.finished.set()
        self.final: dict[str, dict[int, int]] = {}
        self.final_generations: dict[str, int] = {}

    def cursors(self) -> dict[str, int]:
        return {"ct2": 0}

    def assign(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("a stopped node takes no partition")


def test_a_node_stopped_as_it_joins_stops_at_once(nats_cluster: NatsCluster) -> None:
    """A dispatch node told to stop as it joined hung until the run's forced stop, 9 s
    later, and exited 1 (seen in CI): its partition round waited for a first renewal that
    a stopped node never makes."""
    name = f"L{uuid.uuid4().hex[:10].upper()}"
    log = JetStreamLog(nats_cluster.servers, stream=name, subject=f"l.{name}", partitions=4, timeout=2.0)
    leases = Leases(log, Started(), lease_seconds=3.0)  # type: ignore[arg-type]
    stop = threading.Event()
    stop.set()  # (the stop came while the node was joining)
    thread = threading.Thread(target=leases.run_thread, args=(stop,), daemon=True)
    thread.start()
    thread.join(timeout=20)  # (it would wait for good)
    assert not thread.is_alive(), "the leases did not stop"
