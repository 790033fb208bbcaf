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
import hashlib
import os
import re
import secrets
import socket
import threading
import time
from typing import Any, Protocol

import nats.errors
import structlog

from common.jsontext import dumps, loads
from outbox.deliveries import Superseded
from outbox.jetstream import JetStreamError, JetStreamLog
from outbox.jetstream_rewinds import Rewinds

log = structlog.get_logger("ct1_cdc.jetstream")

PROGRESS_SECONDS = 1.0  # how often the holder of a partition publishes its progress
LEAVE_WITHIN = 10.0
ASSIGN_WITHIN = 60.0  # past it, a change of partitions not applied fences the node
# what the cluster answers when out of reach for a moment: a lease round tries again
_FAILURES = (
    TimeoutError,
    OSError,
    nats.errors.Error,
    JetStreamError,
)  # on a stop: how long the leases are renewed while the dispatcher finishes


class Shares(Protocol):
    """What the lease holder asks of the dispatcher (dispatcher/worker.py)."""

    started: threading.Event  # its endpoints' runtimes exist
    finished: threading.Event  # it stopped, everything recorded
    final: dict[str, dict[int, int]]  # then: per endpoint and partition held, settled up to
    final_generations: dict[str, int]  # and the generation of each endpoint's cursor it was measured under

    def assign(
        self, parts: frozenset[int], starts: dict[str, dict[int, int]], urgent: bool = False
    ) -> concurrent.futures.Future[dict[str, dict[str, Any]]]: ...

    def progress(self) -> concurrent.futures.Future[dict[str, tuple[dict[int, int], int]]]: ...

    def notify(self) -> None: ...

    def cursors(self) -> dict[str, int]: ...


def node_id() -> str:
    """This process among the dispatch nodes: host, pid and a random part (key characters)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def shares(nodes: list[str], partitions: int) -> dict[str, set[int]]:
    """Which of the live ``nodes`` should hold each of ``partitions``: every node works it
    out alike.  Rendezvous hashing (each partition ranks the nodes by a hash of node and
    partition) with bounded loads: a partition goes to the first node in its ranking still
    below its even share, so no node holds more than one partition above another, and a
    node joining or leaving moves few beyond its own share.  (The hash is cryptographic:
    crc32, being linear, gave one of three alike-named nodes nothing.)"""
    ranked = sorted(set(nodes))
    even, extra = divmod(partitions, len(ranked))  # ``extra`` nodes hold one more
    out: dict[str, set[int]] = {node: set() for node in ranked}
    above = 0  # nodes holding one more than ``even`` so far

    def weight(node: str, part: int) -> bytes:
        return hashlib.blake2b(f"{node}/{part}".encode(), digest_size=8).digest()

    for part in range(partitions):
        for node in sorted(ranked, key=lambda n: weight(n, part), reverse=True):
            held = len(out[node])
            if held < even or (held == even and above < extra):
                above += held == even
                out[node].add(part)
                break
    return out


class Leases:
    """Holds this node's share of the partitions for ``dispatcher``; :meth:`run` in the
    event loop of the node's copy of the stream (it shares ``log``'s connection).

    Three loops: one renews the leases held and reads who is live (every third of
    ``lease_seconds``, each request bounded by that); one checks every tenth of a second
    that the leases were renewed within two thirds of ``lease_seconds``, and if not stops
    the dispatcher delivering them; one works out the share and changes what the
    dispatcher holds.  :attr:`assigned` is what the dispatcher was last told to hold,
    always within :attr:`held`."""

    def __init__(
        self, log: JetStreamLog, dispatcher: Shares, lease_seconds: float, rewinds: Rewinds | None = None
    ) -> None:
        """``rewinds``: what the node's copy reads of ``outbox replay --from`` (each
        progress put names the last one it reflects; a partition taken over goes on from
        below any newer one)."""
        self.log = log
        self.rewinds = rewinds
        self.dispatcher = dispatcher
        self.lease_seconds = lease_seconds
        self.tick = lease_seconds / 3
        self.node = node_id()
        self.held: dict[int, int] = {}  # partition → revision of our lease
        self.assigned: frozenset[int] = frozenset()
        self.starts: dict[int, dict[str, int]] = {}  # partition → endpoint → where it goes on from
        self.nodes: list[str] = []  # live nodes, as last read
        self.taken: set[int] = set()  # partitions with a lease, as last read
        self._published: dict[tuple[str, int], tuple[int, int]] = {}
        self._start_tags: dict[tuple[str, int], int] = {}  # (endpoint, partition taken) → its start's rewinds
        self._renewed_at = 0.0
        self._seen = asyncio.Event()  # a first read of the bucket
        self._lock = threading.Lock()  # what the dispatcher is told, from the loop or the watch

    def run_thread(self, stop: threading.Event) -> None:
        """:meth:`run` on this thread, in an event loop and with a connection of its own:
        the copy of the stream writing a backlog, or a busy dispatcher, never holds the
        renewals up."""
        asyncio.run(self.run(stop))

    async def run(self, stop: threading.Event) -> None:
        """Hold this node's share until ``stop``; then renew what it holds until the
        dispatcher has finished, publish where each partition got to and let them go, so
        the others take them at once."""
        await self.log.connect()
        try:
            await self._run(stop)
        finally:
            with contextlib.suppress(Exception):
                await self.log.close()

    async def _run(self, stop: threading.Event) -> None:
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
        loops = [
            asyncio.ensure_future(self._renewing(leases, stop)),
            asyncio.ensure_future(self._sharing(leases, progress, stop)),
        ]
        watching = threading.Event()  # set: the watch ends
        watch = threading.Thread(
            target=self._watch, args=(asyncio.get_running_loop(), watching), name="lease-watch", daemon=True
        )
        watch.start()
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # (one failed: its error)
        except BaseException:
            self._fence("failed", force=True)  # deliver none of them rather than hold them unrenewed
            watching.set()
            raise
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
        try:
            await self._leave(leases, progress)
        finally:
            watching.set()

    async def _origins(self, progress: Any) -> None:
        """Each endpoint's origin, made once by the first node: its cursor there."""
        from nats.js.errors import KeyWrongLastSequenceError

        for endpoint, cursor in self.dispatcher.cursors().items():
            # made once: another node's (or an earlier dispatcher's progress) stands
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.log.retrying(progress.create, endpoint, dumps({"settled": cursor}))

    # -- the three loops --------------------------------------------------------------------

    async def _renewing(self, leases: Any, stop: threading.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(*_FAILURES):
                await self._renew(leases)
            await _wait(stop, self.tick)

    async def _renew(self, leases: Any) -> None:
        """Renew every lease held and read who is live; a lease another node took (it
        expired) is dropped at once."""
        from nats.js.errors import KeyWrongLastSequenceError, NoKeysError

        sent = time.monotonic()  # the leases run from no earlier than this
        async with asyncio.timeout(self.tick):
            await leases.put(f"node.{self.node}", self.node.encode())
            for part, revision in list(self.held.items()):
                try:
                    renewed = await leases.update(f"part.{part}", self.node.encode(), last=revision)
                except KeyWrongLastSequenceError:
                    self.held.pop(part, None)  # it expired and another node took it
                    log.warning("partitions_taken_by_another", node=self.node, partitions=[part])
                    self._post(self.assigned - {part}, urgent=True)
                    continue
                if part in self.held:  # (not let go meanwhile)
                    self.held[part] = renewed
            try:
                keys = await leases.keys()
            except NoKeysError:
                keys = []
        self._renewed_at = sent
        self.nodes = sorted({k[5:] for k in keys if k.startswith("node.")} | {self.node})
        self.taken = {int(k[5:]) for k in keys if k.startswith("part.") and k[5:].isdigit()}
        self._seen.set()

    def _stale(self) -> bool:
        """Whether the leases were last renewed too long ago to deliver under them."""
        return time.monotonic() - self._renewed_at > self.lease_seconds * 2 / 3

    def _watch(self, loop: asyncio.AbstractEventLoop, done: threading.Event) -> None:
        """A thread of its own, so that it acts even if this loop is held up: once the
        leases are stale, the dispatcher stops delivering them at once."""
        while not done.wait(0.1):
            with self._lock:  # (against a post between its check and its call)
                fenced = bool(self.assigned) and self._stale()
                if fenced:
                    self.assigned = frozenset()
                    self.dispatcher.assign(frozenset(), {}, urgent=True)
            if fenced:
                loop.call_soon_threadsafe(self._fence, "not renewed")

    def _fence(self, reason: str, force: bool = False) -> None:
        """Stop delivering every partition now and let the leases go: another node may
        take them once they expire.  (Not when renewed meanwhile, unless ``force``: the
        next round gives the dispatcher what is held again.)"""
        if not self.held or not (force or self._stale()):
            return
        log.warning("partition_leases_lost", node=self.node, partitions=sorted(self.held), reason=reason)
        self.held.clear()
        self.starts.clear()
        self._post(frozenset(), urgent=True)

    def _post(
        self, parts: frozenset[int], urgent: bool = False
    ) -> concurrent.futures.Future[dict[str, dict[str, Any]]]:
        """Tell the dispatcher to hold ``parts`` (never more than :attr:`held`, and none
        once the leases are stale); ``urgent``: what it sends of the others is cut short."""
        with self._lock:
            stale = self._stale()
            parts = frozenset() if stale else frozenset(p for p in parts if p in self.held)
            self.assigned = parts
            for part in [p for p in self.starts if p not in parts]:
                del self.starts[part]
            starts: dict[str, dict[int, int]] = {}
            for part, by_endpoint in self.starts.items():
                for endpoint, start in by_endpoint.items():
                    starts.setdefault(endpoint, {})[part] = start
            return self.dispatcher.assign(parts, starts, urgent or stale)

    async def _sharing(self, leases: Any, progress: Any, stop: threading.Event) -> None:
        while not (self._seen.is_set() or stop.is_set()):  # (a node stopped as it joins renews nothing)
            await asyncio.sleep(0.05)
        while self.rewinds is not None and not (self.rewinds.synced.is_set() or stop.is_set()):
            await asyncio.sleep(0.05)  # (a partition's start goes below the rewinds it does not reflect)
        next_progress = 0.0
        while not stop.is_set():
            try:
                if self.rewinds is not None and await asyncio.to_thread(self.rewinds.apply):
                    self.dispatcher.notify()  # (it starts over from the rewound cursor)
                await self._share(leases, progress)
                if time.monotonic() >= next_progress:
                    await self._publish(progress)
                    next_progress = time.monotonic() + PROGRESS_SECONDS
            except Exception as exc:  # the cluster out of reach for a moment: the next round
                # (what is held stays exclusive: the renewals and their watch go on apart)
                log.warning("partition_round_failed", node=self.node, error=f"{type(exc).__name__}: {exc}")
            await _wait(stop, self.tick)

    async def _share(self, leases: Any, progress: Any) -> None:
        """Take this node's share as others let it go, let go of what is another's."""
        from nats.js.errors import KeyWrongLastSequenceError

        desired = shares(self.nodes, self.log.partitions)[self.node]
        for part in sorted(desired - set(self.held) - self.taken):
            try:
                self.held[part] = await leases.create(f"part.{part}", self.node.encode())
            except KeyWrongLastSequenceError:
                continue  # held: its holder lets it go (or it expires)
        target = {p for p in self.held if p in desired}
        release = self.assigned - target
        taken = target - self.assigned
        idle = {p for p in self.held if p not in desired and p not in self.assigned}
        if not (release or taken or idle):
            return
        for part, by_endpoint in (await self._starts(progress, taken)).items():
            self.starts[part] = by_endpoint
        try:
            applied = await asyncio.wait_for(
                asyncio.wrap_future(self._post(frozenset(target))), ASSIGN_WITHIN
            )
        except Superseded:
            return  # (a lease lost or a fence came meanwhile: the next round works it out again)
        except TimeoutError:
            self._fence(
                f"the dispatcher did not apply its partitions within {ASSIGN_WITHIN:.0f} s", force=True
            )
            return
        for part in sorted(taken & self.assigned):  # its progress key from now on
            for endpoint, start in self.starts.get(part, {}).items():
                await self._put(progress, endpoint, part, start, self._start_tags.get((endpoint, part), 0))
        for part in sorted(release | idle):
            if part in self.assigned or part not in self.held:
                continue  # (held again, or fenced meanwhile)
            for endpoint, result in applied.items():
                settled = result["settled"].get(part)
                if settled is not None:
                    tag = self._tag(endpoint, result["generation"])
                    await self._put(progress, endpoint, part, settled, tag)
            revision = self.held.pop(part, None)
            if revision is None:
                continue  # (fenced meanwhile: it expires)
            with contextlib.suppress(*_FAILURES):  # (renewed meanwhile: it expires instead)
                await leases.delete(f"part.{part}", last=revision)
        log.info(
            "partitions_changed",
            node=self.node,
            nodes=len(self.nodes),
            held=sorted(self.assigned),
            taken=sorted(taken & self.assigned),
            given_up=sorted(release | idle),
        )

    async def _starts(self, progress: Any, parts: set[int]) -> dict[int, dict[str, int]]:
        """Per partition taken over, where it goes on from for each endpoint: the progress
        handed over, below any rewind it does not reflect (``outbox replay --from``)."""
        from nats.js.errors import KeyNotFoundError

        starts: dict[int, dict[str, int]] = {part: {} for part in parts}
        for endpoint in self.dispatcher.cursors() if parts else ():
            try:
                origin = await self._get(progress, endpoint)
            except KeyNotFoundError:  # (the bucket lost it): made again, as at the start
                await self._origins(progress)
                origin = await self._get(progress, endpoint)
            for part in parts:
                try:
                    handed = await self._get(progress, f"{endpoint}.{part}")
                except KeyNotFoundError:
                    handed = origin
                start, tag = self.rewinds.lowered(endpoint, *handed) if self.rewinds else handed
                starts[part][endpoint] = start
                self._start_tags[(endpoint, part)] = tag
        return starts

    async def _get(self, progress: Any, key: str) -> tuple[int, int]:
        """A progress key: settled up to, and the last rewind that reflects."""
        entry = await self.log.retrying(progress.get, key)
        value = loads(entry.value)
        return int(value["settled"]), int(value.get("rewound", 0))

    async def _publish(self, progress: Any) -> None:
        """What this node has settled of its partitions, where it moved."""
        measured = await asyncio.wrap_future(self.dispatcher.progress())
        for endpoint, (by_part, generation) in measured.items():
            tag = self._tag(endpoint, generation)
            for part, settled in by_part.items():
                if part in self.assigned:
                    await self._put(progress, endpoint, part, settled, tag)

    def _tag(self, endpoint: str, generation: int) -> int:
        return self.rewinds.tag(endpoint, generation) if self.rewinds is not None else 0

    async def _put(self, progress: Any, endpoint: str, part: int, settled: int, tag: int) -> None:
        if self._published.get((endpoint, part)) == (settled, tag):
            return
        await self.log.put(progress, f"{endpoint}.{part}", dumps({"settled": settled, "rewound": tag}))
        self._published[(endpoint, part)] = (settled, tag)

    async def _leave(self, leases: Any, progress: Any) -> None:
        """On a stop: keep the leases while the dispatcher finishes what is in flight, then
        publish what it settled and let every partition go."""
        if not self.held:
            return
        try:
            deadline = time.monotonic() + LEAVE_WITHIN
            while not self.dispatcher.finished.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(*_FAILURES):
                    await self._renew(leases)
                if not self.held or time.monotonic() - self._renewed_at > self.lease_seconds * 2 / 3:
                    return  # not renewed in time: they expire
                await _wait(self.dispatcher.finished, self.tick)
            if not self.dispatcher.finished.is_set():
                raise TimeoutError("the dispatcher did not finish")
            for endpoint, by_part in self.dispatcher.final.items():
                tag = self._tag(endpoint, self.dispatcher.final_generations.get(endpoint, -1))
                for part, settled in by_part.items():
                    if part in self.held:
                        await self._put(progress, endpoint, part, settled, tag)
            for part, revision in sorted(self.held.items()):
                await leases.delete(f"part.{part}", last=revision)
            log.info("partitions_given_up", node=self.node, partitions=sorted(self.held))
            self.held.clear()
        except Exception as exc:  # they expire instead
            log.warning("partitions_not_given_up", node=self.node, error=f"{type(exc).__name__}: {exc}")


async def _wait(event: threading.Event, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(min(0.05, seconds))
