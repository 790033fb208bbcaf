"""Dispatch nodes sharing the events by partition (JetStream backend, docs/jetstream.md).

Events are partitioned by entity (``<subject>.<p>``).  Each dispatch node delivers the
partitions it holds a lease on, so an entity's events go out from one node at a time, in
order, and the work of every endpoint is spread over the nodes.  The key-value bucket
``<stream>_LEASES`` keeps, with a time to live of ``lease_seconds``:

* ``node.<id>``: each live node, put every third of ``lease_seconds``;
* ``part.<p>``: the node holding partition ``p``, made only where absent and renewed
  only at the revision it was made or last renewed at, so two nodes never hold one.

Which node should hold a partition is the highest of a hash of (node, partition) over the
live nodes (rendezvous hashing): every node works it out alike, and a node joining or
leaving moves only its own share.  A node gives a partition up once nothing of it is on
its way to a receiver, after publishing where it got to; a node that dies holds its
partitions until their leases expire.  A node that cannot renew for two thirds of
``lease_seconds`` stops delivering them at once, before another may take them.

``<stream>_PROGRESS`` keeps, per endpoint and partition (``<endpoint>.<p>``), the event
id up to which that partition is settled, put every second by its holder: the next holder
sends what follows (at least once, the same ``webhook-id``).  ``<endpoint>`` alone is the
endpoint's origin, the cursor of the first node that dispatched to it: a partition no one
held yet starts there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
import zlib
from typing import Any, Protocol

import structlog

from common.jsontext import dumps, loads
from outbox.deliveries import D, partition_of
from outbox.jetstream import JetStreamError, JetStreamLog

log = structlog.get_logger("ct1_cdc.jetstream")

PROGRESS_SECONDS = 1.0  # how often the holder of a partition publishes its progress
LEAVE_WITHIN = 10.0  # on a stop: how long the leases are renewed while the dispatcher finishes


class Shares(Protocol):
    """What the lease holder asks of the dispatcher (dispatcher/worker.py)."""

    started: threading.Event  # its endpoints' runtimes exist
    finished: threading.Event  # it stopped, everything recorded

    def assign(
        self, parts: frozenset[int], starts: dict[str, dict[int, int]]
    ) -> concurrent.futures.Future[dict[str, dict[str, Any]]]: ...

    def progress(self) -> concurrent.futures.Future[dict[str, dict[int, int]]]: ...

    def cursors(self) -> dict[str, int]: ...


def node_id() -> str:
    """This process among the dispatch nodes: host, pid and a random part (key characters)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def owner(part: int, nodes: list[str]) -> str:
    """The node that should hold ``part`` among live ``nodes`` (rendezvous hashing)."""
    return max(nodes, key=lambda node: (zlib.crc32(f"{node}/{part}".encode()), node))


class Leases:
    """Holds this node's share of the partitions for ``dispatcher``; :meth:`run` in the
    event loop of the node's copy of the stream (it shares ``log``'s connection)."""

    def __init__(self, log: JetStreamLog, dispatcher: Shares, lease_seconds: float) -> None:
        self.log = log
        self.dispatcher = dispatcher
        self.lease_seconds = lease_seconds
        self.node = node_id()
        self.held: dict[int, int] = {}  # partition → revision of our lease
        self._published: dict[tuple[str, int], int] = {}
        self._renewed_at = 0.0

    async def run(self, stop: threading.Event, conn: sqlite3.Connection) -> None:
        """Hold this node's share until ``stop``; then renew what it holds until the
        dispatcher has finished, publish where each partition got to (read from the
        node's outbox on ``conn``) and let them go, so the others take them at once."""
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError

        name = f"{self.log.stream}_LEASES"
        try:
            leases = await self.log.retrying(self.log.js.key_value, name)
        except BucketNotFoundError:
            config = KeyValueConfig(
                bucket=name,
                history=1,
                ttl=self.lease_seconds,
                replicas=self.log.replicas,
                storage=StorageType.FILE,
            )
            leases = await self.log.retrying(self.log.js.create_key_value, config)
        progress = await self.log.bucket(f"{self.log.stream}_PROGRESS")
        while not self.dispatcher.started.is_set():
            await asyncio.sleep(0.05)
        await self._origins(progress)
        log.info("dispatch_node_joined", node=self.node, partitions=self.log.partitions)
        tick = self.lease_seconds / 3
        next_progress = 0.0
        self._renewed_at = time.monotonic()
        try:
            while not stop.is_set():
                await self._round(leases, progress)
                if time.monotonic() >= next_progress:
                    await self._publish(progress)
                    next_progress = time.monotonic() + PROGRESS_SECONDS
                await _wait(stop, tick)
        except BaseException:
            if self.held:  # failing: deliver none of them rather than hold them unrenewed
                self.dispatcher.assign(frozenset(), {})
            raise
        await self._leave(leases, progress, conn)

    async def _origins(self, progress: Any) -> None:
        """Each endpoint's origin, made once by the first node: its cursor there."""
        from nats.js.errors import KeyWrongLastSequenceError

        for endpoint, cursor in self.dispatcher.cursors().items():
            # made once: another node's (or an earlier dispatcher's progress) stands
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.log.retrying(progress.create, endpoint, dumps({"settled": cursor}))

    async def _round(self, leases: Any, progress: Any) -> None:
        from nats.errors import Error as NatsError
        from nats.js.errors import KeyWrongLastSequenceError, NoKeysError

        lost: set[int] = set()
        try:
            await leases.put(f"node.{self.node}", self.node.encode())
            for part, revision in list(self.held.items()):
                try:
                    self.held[part] = await leases.update(f"part.{part}", self.node.encode(), last=revision)
                except KeyWrongLastSequenceError:
                    lost.add(part)  # it expired and another node took it
            try:
                keys = await leases.keys()
            except NoKeysError:
                keys = []
        except (TimeoutError, NatsError, OSError, JetStreamError) as exc:
            if self.held and time.monotonic() - self._renewed_at > self.lease_seconds * 2 / 3:
                log.warning(
                    "partition_leases_lost", node=self.node, partitions=sorted(self.held), error=str(exc)
                )
                self.held.clear()  # fenced: another node may take them once they expire
                await self._assign({}, set(), set())
            return
        self._renewed_at = time.monotonic()
        for part in lost:
            self.held.pop(part, None)
        nodes = sorted({k[5:] for k in keys if k.startswith("node.")} | {self.node})
        taken = {int(k[5:]) for k in keys if k.startswith("part.") and k[5:].isdigit()}
        desired = {p for p in range(self.log.partitions) if owner(p, nodes) == self.node}
        release = {p for p in self.held if p not in desired}
        acquired: dict[int, int] = {}
        for part in sorted(desired - set(self.held) - taken):
            try:
                acquired[part] = await leases.create(f"part.{part}", self.node.encode())
            except KeyWrongLastSequenceError:
                continue  # held: its holder lets it go (or it expires)
        if lost:
            log.warning("partitions_taken_by_another", node=self.node, partitions=sorted(lost))
        if not (release or acquired or lost):
            return
        self.held.update(acquired)
        keep = {p: r for p, r in self.held.items() if p not in release}
        starts = await self._starts(progress, set(acquired))
        applied = await self._assign(starts, set(keep), release)
        for part in acquired:  # its progress key from now on (the origin's value, if none)
            for endpoint, by_part in starts.items():
                await self._put(progress, endpoint, part, by_part[part])
        for part in sorted(release):
            for endpoint, result in applied.items():
                settled = result["settled"].get(part)
                if settled is not None:
                    await self._put(progress, endpoint, part, settled)
            await leases.delete(f"part.{part}", last=self.held.pop(part))
        log.info(
            "partitions_changed",
            node=self.node,
            nodes=len(nodes),
            held=sorted(self.held),
            taken=sorted(acquired),
            given_up=sorted(release),
        )

    async def _starts(self, progress: Any, parts: set[int]) -> dict[str, dict[int, int]]:
        """Per endpoint, where each partition taken over goes on from."""
        from nats.js.errors import KeyNotFoundError

        starts: dict[str, dict[int, int]] = {}
        for endpoint in self.dispatcher.cursors():
            origin = await self._get(progress, endpoint)
            by_part = starts[endpoint] = {}
            for part in parts:
                try:
                    by_part[part] = await self._get(progress, f"{endpoint}.{part}")
                except KeyNotFoundError:
                    by_part[part] = origin
        return starts

    async def _get(self, progress: Any, key: str) -> int:
        entry = await self.log.retrying(progress.get, key)
        return int(loads(entry.value)["settled"])

    async def _assign(
        self, starts: dict[str, dict[int, int]], keep: set[int], release: set[int]
    ) -> dict[str, dict[str, Any]]:
        parts = frozenset(keep) - frozenset(release)
        return await asyncio.wrap_future(self.dispatcher.assign(parts, starts))

    async def _publish(self, progress: Any) -> None:
        """What this node has settled of its partitions, where it moved."""
        measured = await asyncio.wrap_future(self.dispatcher.progress())
        for endpoint, by_part in measured.items():
            for part, settled in by_part.items():
                if part in self.held:
                    await self._put(progress, endpoint, part, settled)

    async def _put(self, progress: Any, endpoint: str, part: int, settled: int) -> None:
        if self._published.get((endpoint, part)) == settled:
            return
        await self.log.put(progress, f"{endpoint}.{part}", dumps({"settled": settled}))
        self._published[(endpoint, part)] = settled

    async def _renew(self, leases: Any) -> None:
        await leases.put(f"node.{self.node}", self.node.encode())
        for part, revision in list(self.held.items()):
            self.held[part] = await leases.update(f"part.{part}", self.node.encode(), last=revision)

    async def _leave(self, leases: Any, progress: Any, conn: sqlite3.Connection) -> None:
        """On a stop: keep the leases while the dispatcher finishes what is in flight, then
        publish what it settled and let every partition go."""
        if not self.held:
            return
        try:
            deadline = time.monotonic() + LEAVE_WITHIN
            while not self.dispatcher.finished.is_set() and time.monotonic() < deadline:
                await self._renew(leases)
                await _wait(self.dispatcher.finished, self.lease_seconds / 3)
            if not self.dispatcher.finished.is_set():
                raise TimeoutError("the dispatcher did not finish")
            for (endpoint, part), settled in settled_in(conn, self.log.partitions, set(self.held)).items():
                await self._put(progress, endpoint, part, settled)
            for part, revision in sorted(self.held.items()):
                await leases.delete(f"part.{part}", last=revision)
            log.info("partitions_given_up", node=self.node, partitions=sorted(self.held))
            self.held.clear()
        except Exception as exc:  # they expire instead
            log.warning("partitions_not_given_up", node=self.node, error=f"{type(exc).__name__}: {exc}")


def settled_in(conn: sqlite3.Connection, partitions: int, parts: set[int]) -> dict[tuple[str, int], int]:
    """Per (endpoint, partition) of ``parts``, the event id up to which every delivery is
    settled in the outbox on ``conn``, its dispatcher stopped: its cursor, or below the
    first delivery still pending."""
    out: dict[tuple[str, int], int] = {}
    for endpoint, cursor in conn.execute("SELECT endpoint, last_event_id FROM delivery_cursors").fetchall():
        first: dict[int, int] = {}
        for entity, event_id in conn.execute(D["pending_by_entity"], {"endpoint": endpoint}):
            part = partition_of(entity, partitions)
            first[part] = min(first.get(part, event_id), event_id)
        for part in parts:
            out[(endpoint, part)] = min(int(cursor), first.get(part, int(cursor) + 1) - 1)
    return out


async def _wait(event: threading.Event, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(min(0.05, seconds))
