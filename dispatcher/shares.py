"""Several dispatchers sharing the events by partition (the JetStream backend's dispatch
nodes, docs/jetstream.md): what a dispatcher does when it is told which partitions it
holds from now on (:meth:`Shares.assign`, from outbox/jetstream_leases.py), and the
progress it hands over.

A partition given up leaves the dispatcher's partitions once nothing of it is on its way
to a receiver (an urgent change cuts those sends short), in the same step as where it got
to is worked out; a partition taken over gets a row for each event between where the
previous holder settled it and where this dispatcher has read.  The mixin works on the
dispatcher's own state (:class:`dispatcher.runtime.Runtime` per endpoint).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import structlog

from dispatcher.runtime import Assignment, Chain, Runtime
from outbox.deliveries import DeliveryStore, Due, Superseded, partition_of

log = structlog.get_logger("ct1_cdc.dispatch")
T = TypeVar("T")


class Shares:
    """The partitions part of :class:`dispatcher.worker.Dispatcher` (a mixin: it works
    on the dispatcher's runtimes, loop and write thread)."""

    partitions: int
    runtimes: dict[str, Runtime]
    clock: Callable[[], float]
    final: dict[str, dict[int, int]]
    final_generations: dict[str, int]
    _loop: asyncio.AbstractEventLoop | None
    _store: DeliveryStore | None
    _cursors_due: bool

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        raise NotImplementedError

    @staticmethod
    def _cursor_after(rt: Runtime, committing: Collection[int]) -> int:
        raise NotImplementedError

    def assign(
        self, parts: frozenset[int], starts: dict[str, dict[int, int]], urgent: bool = False
    ) -> concurrent.futures.Future[dict[str, dict[str, Any]]]:
        """Hold ``parts`` from now on (callable from any thread, once :attr:`started` is
        set).  Partitions given up are let go once nothing of theirs is on its way to a
        receiver; partitions taken over get a row for each event between where their
        ``starts`` say another dispatcher settled them and where this one has read.  The
        future resolves when every endpoint has done so (see :class:`Assignment`), or
        fails with :class:`Superseded`.  ``urgent``: the leases may lapse, so what is being
        sent of a partition given up is cut short rather than waited for."""
        done: concurrent.futures.Future[dict[str, dict[str, Any]]] = concurrent.futures.Future()
        assignment = Assignment(parts, starts, done, urgent)
        loop = self._loop
        if loop is None or loop.is_closed():
            done.set_exception(RuntimeError("the dispatcher is not running"))
            return done
        loop.call_soon_threadsafe(self._assign_now, assignment)
        return done

    def _assign_now(self, assignment: Assignment) -> None:
        assignment.left = set(self.runtimes)
        if not assignment.left:
            assignment.done.set_result({})
        for rt in self.runtimes.values():
            old = rt.assigning
            if old is not None and not old.done.done():  # (its partial outcome is not final)
                old.done.set_exception(Superseded())
            rt.assigning = assignment
            rt.freed.set()

    async def _apply(self, store: DeliveryStore, rt: Runtime) -> None:
        """Apply ``rt.assigning`` once no read runs and nothing of a partition given up is
        being sent (its receiver could otherwise get an older event of an entity after the
        next holder sent a newer one; an urgent one cuts those sends short); until then
        the next round looks again.  A partition given up leaves ``rt.parts`` in the same
        step as its handed-over progress is worked out, so a failure or a stop after it
        never reports more than was settled."""
        a = rt.assigning
        assert a is not None and rt.parts is not None
        released = rt.parts - a.parts
        if rt.reading is not None:
            return
        part = self.partitions
        sending = [e for e, chain in rt.chains.items() if chain.open and partition_of(e, part) in released]
        if sending:
            if a.urgent:
                self._cut(rt, set(sending))
            return
        name = rt.cfg.name
        if released:  # where the next holder goes on from: below anything not settled here
            pending = await self._db(store.pending_by_partition, name)
            if rt.assigning is not a or rt.reading is not None or rt.parts - a.parts != released:
                return  # (changed meanwhile: the next round looks again)
            if not rt.handed:  # (what it is measured under: a rewind applied since is not in it)
                rt.handed_generation = rt.generation
            rt.handed.update(self._settled_by_partition(rt, released, pending))
            self._drop(rt, released)
            rt.parts = rt.parts - released
            for p in released:
                rt.floors.pop(p, None)
        if rt.handed:  # their pending rows are the next holder's (sent by it from there)
            await self._db(store.release_partitions, name, [p for p in rt.handed if p not in a.parts])
        taken = {p: start for p, start in a.starts.get(name, {}).items() if p in a.parts - rt.parts}
        behind = {p: start for p, start in taken.items() if start >= rt.horizon}
        catch_up = {p: start for p, start in taken.items() if start < rt.horizon}
        if taken:
            made = await self._db(store.take_partitions, name, taken, rt.horizon, self.clock())
            rt.rows_at = 0.0
            if made:
                log.info("partition_rows_made", endpoint=name, rows=made, partitions=sorted(catch_up))
        if rt.assigning is not a:
            return  # a newer one came meanwhile: applied at the next round, from here
        rt.floors.update(behind)
        rt.parts = a.parts
        rt.assigning = None
        rt.wake.set()
        handed = {p: at for p, at in rt.handed.items() if p not in a.parts}
        rt.handed.clear()
        a.applied[name] = {"horizon": rt.horizon, "settled": handed, "generation": rt.handed_generation}
        a.left.discard(name)
        if not a.left and not a.done.done():
            a.done.set_result(a.applied)

    def _cut(self, rt: Runtime, entities: set[str]) -> None:
        """Cut short the sends of ``entities`` (partitions whose leases may lapse): each
        is recorded as a failed attempt, pending, so the progress handed over stays below."""
        for task, item in list(rt.sends.items()):
            if item.entity in entities and item.event_id not in rt.cut:
                rt.cut.add(item.event_id)
                task.cancel()

    def _park(self, rt: Runtime, releasing: frozenset[int]) -> None:
        """Hold back the events ready to send of partitions being given up (they stay
        unsettled, so the progress handed over is below them)."""
        part = self.partitions
        if any(partition_of(item.entity, part) in releasing for _, item in rt.ready):
            keep: deque[tuple[Chain, Due]] = deque()
            for chain, item in rt.ready:
                if partition_of(item.entity, part) in releasing:
                    rt.parked.append(item)
                else:
                    keep.append((chain, item))
            rt.ready = keep

    def _drop(self, rt: Runtime, released: frozenset[int]) -> None:
        """Forget the events of ``released`` partitions held in memory and not sent: the
        next holder sends them (the cursor here may pass them)."""
        part = self.partitions

        def mine(entity: str) -> bool:
            return partition_of(entity, part) not in released

        for item in rt.parked:
            self._forget(rt, item)
        rt.parked.clear()
        for _, item in [pair for pair in rt.ready if not mine(pair[1].entity)]:
            self._forget(rt, item)
        rt.ready = deque(pair for pair in rt.ready if mine(pair[1].entity))
        for entity in [e for e in rt.chains if not mine(e)]:
            chain = rt.chains.pop(entity)
            for item in chain.waiting:
                self._forget(rt, item)
        self._cursors_due = True

    @staticmethod
    def _forget(rt: Runtime, item: Due) -> None:
        if item.has_row:
            rt.inflight.discard(item.event_id)
        else:
            rt.settled.add(item.event_id)
        while rt.unsettled and rt.unsettled[0] in rt.settled:
            rt.settled.discard(rt.unsettled.popleft())

    def _settled_by_partition(
        self, rt: Runtime, parts: Collection[int], pending: dict[int, int]
    ) -> dict[int, int]:
        """Per partition of ``parts``, the event id up to which every delivery is settled
        here: what it has read, below its first event not settled and its first pending
        row (``pending``, per partition)."""
        base = rt.cursor if rt.generation < 0 or rt.rewinding else rt.horizon
        firsts: dict[int, int] = {}
        entity_of = rt.entity_of
        for event_id in rt.unsettled:
            if event_id not in rt.settled and event_id in entity_of:
                firsts.setdefault(partition_of(entity_of[event_id], self.partitions), event_id)
        rt.entity_of = {e: entity_of[e] for e in rt.unsettled if e in entity_of}  # (the rest settled)
        beyond = base + 1
        return {
            # (a partition taken over past what this node had read: settled up to its floor)
            p: max(min(base, firsts.get(p, beyond) - 1, pending.get(p, beyond) - 1), rt.floors.get(p, 0))
            for p in parts
        }

    async def _last_progress(self, store: DeliveryStore) -> None:
        """On the way out: what it settled per partition held (:attr:`final`), and no
        assignment left waiting."""
        for name, rt in self.runtimes.items():
            if rt.assigning is not None and not rt.assigning.done.done():
                rt.assigning.done.set_exception(RuntimeError("the dispatcher stopped"))
            if rt.parts:
                with contextlib.suppress(Exception):
                    pending = await self._db(store.pending_by_partition, name)
                    self.final[name] = self._settled_by_partition(rt, rt.parts, pending)
                    self.final_generations[name] = rt.generation

    def cursors(self) -> dict[str, int]:
        """Each endpoint's committed cursor (callable from any thread)."""
        return {name: rt.cursor for name, rt in list(self.runtimes.items())}

    def progress(self) -> concurrent.futures.Future[dict[str, tuple[dict[int, int], int]]]:
        """Per endpoint and partition held, the event id up to which every delivery is
        settled here (callable from any thread): what the next holder goes on from; with
        the generation of the endpoint's cursor it was measured under."""
        done: concurrent.futures.Future[dict[str, tuple[dict[int, int], int]]] = concurrent.futures.Future()
        loop, store = self._loop, self._store
        if loop is None or loop.is_closed() or store is None:
            done.set_result({})
            return done

        async def measure() -> None:
            try:
                out: dict[str, tuple[dict[int, int], int]] = {}
                for name, rt in self.runtimes.items():
                    if not rt.parts or rt.assigning is not None:
                        continue
                    pending = await self._db(store.pending_by_partition, name)
                    if rt.assigning is None:  # (not while partitions change hands)
                        out[name] = (self._settled_by_partition(rt, rt.parts, pending), rt.generation)
                done.set_result(out)
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(measure()))
        return done


def forget_send(rt: Runtime, task: asyncio.Task[None]) -> None:
    rt.sends.pop(task, None)
