"""Delivery workers: events past a cursor, and due deliveries ▶ signed POST ▶ attempt
log, per endpoint.

Per endpoint, a loop reads the events past what it has read (the endpoint's routes
applied) and the delivery rows that are due (retries, replays), and sends each in its own
task, within a global and a per-endpoint concurrency limit.  One entity's events go one
at a time, in order (a chain in memory), while other entities proceed; an entity with a
pending delivery row gets rows for its later events, queued behind it.  The retry policy
decides what happens after an attempt; endpoint health pauses an endpoint after a run of
failures and probes it with one delivery at a time until one succeeds.

A first-try success never gets a row: the endpoint's cursor moves past it, in the same
commit as its batch of attempt_batches.  The cursor only passes events whose outcome is
committed, so after a crash the ones above it are sent again (at least once, same
``webhook-id``); see docs/design-delivery-cursors.md.

SQLite work runs on threads of its own; the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from common.errors import ConfigError
from common.metrics import ATTEMPT_SECONDS, ATTEMPTS
from common.version import version
from config.settings import EndpointSettings, Settings
from dispatcher import retry, signing
from dispatcher.health import Health, after_attempt
from dispatcher.runtime import Chain, Runtime
from dispatcher.sender import Attempt, Sender, check_url
from dispatcher.shares import Shares, forget_send
from outbox.deliveries import DeliveryStore, Due, Finished

log = structlog.get_logger("ct1_cdc.dispatch")
T = TypeVar("T")

POLL_SECONDS = 0.02  # how often another process's commits are looked for
STATE_REFRESH_SECONDS = 1.0  # how often endpoint state set by the CLI is re-read
SHUTDOWN_GRACE_SECONDS = 5.0  # on stop, how long deliveries in flight may finish
CLAIM_FRACTION = 0.25  # claim again once this share of the slots is free
MAX_AHEAD = 1000  # events read past the cursor and not settled, at most, per endpoint
MAX_CHAIN = 100  # one entity's events waiting in memory; past it they queue as rows
CURSOR_IDLE_SECONDS = 1.0  # how often a cursor moves when nothing else is committed
READ_AHEAD = 64  # events read ahead of the free slots, so that sends need not wait for a read
ROW_POLL_SECONDS = 0.1  # how often due rows made by another process are looked for


class Dispatcher(Shares):
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        partitions: int = 0,
    ) -> None:
        """``partitions``: the events' partitions, shared with other dispatchers (the
        JetStream backend): this one delivers only those :meth:`assign` gives it, none
        until then.  0: every event is this dispatcher's."""
        self.settings = settings
        self.partitions = partitions
        self.started = threading.Event()  # the endpoints' runtimes exist: assign() may come
        self.finished = threading.Event()  # stopped, everything recorded
        # once finished: per endpoint and partition held, the event id settled up to
        self.final: dict[str, dict[int, int]] = {}
        self.final_generations: dict[str, int] = {}  # the cursors' generations final was measured under
        self.cfg = settings.dispatcher
        self.clock = clock
        self.rng = rng or random.Random()
        self.version = version()
        for endpoint in settings.endpoints:
            check_url(endpoint.name, endpoint.url, self.cfg.require_https, self.cfg.refuse_private_networks)
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="dispatch-write")
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="dispatch-read")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.runtimes: dict[str, Runtime] = {}
        self._global = asyncio.Semaphore(self.cfg.concurrency)
        self._results: list[tuple[Finished, Runtime, Chain | None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._commits = 0  # attempt-log commits so far
        self._cursors_due = False  # a cursor may move with nothing else to commit
        self._stopping = False
        self._store: DeliveryStore | None = None

    # -- wiring -------------------------------------------------------------------------------

    def notify(self) -> None:
        """New deliveries were committed (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for runtime in self.runtimes.values():
            runtime.wake.set()  # something new to read ...
            runtime.freed.set()  # ... and the loop's one wait ends

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a write (or anything touching the write connection) on the write thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writes, lambda: fn(*args, **kwargs))

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read of the claim connection on the read thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reads, lambda: fn(*args))

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        store = await self._db(DeliveryStore, self.settings.outbox.path, self.partitions)
        sender = Sender(
            self.cfg.timeout_seconds,
            concurrency=self.cfg.concurrency,
            refuse_private=self.cfg.refuse_private_networks,
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            for cfg in self.settings.endpoints:
                if not cfg.enabled:
                    continue
                runtime = await self._runtime(store, cfg)
                if runtime is None and self.partitions:
                    raise ConfigError(
                        f"endpoint {cfg.name} has no secret on this dispatch node: dispatch nodes"
                        " sharing the partitions each deliver to every endpoint (give it"
                        " [[endpoints]] secret, the same on every node)"
                    )
                if runtime is None:
                    continue
                self.runtimes[cfg.name] = runtime
                loop_task = asyncio.create_task(self._endpoint_loop(store, sender, runtime))
                loop_task.add_done_callback(functools.partial(self._loop_ended, cfg.name))
                tasks.append(loop_task)
            tasks.append(asyncio.create_task(self._poll(store)))
            self._store = store
            self.started.set()
            log.info("dispatch_started", endpoints=sorted(self.runtimes))
            await stop.wait()
        finally:
            self._stopping = True
            for task in tasks:  # no new claims
                task.cancel()
            # let deliveries in flight finish and be recorded; what does not finish in
            # the grace period stays pending and is sent again (same webhook-id)
            inflight = [t for r in self.runtimes.values() for t in r.tasks]
            if inflight:
                await asyncio.wait(inflight, timeout=SHUTDOWN_GRACE_SECONDS)
            for task in inflight:
                task.cancel()
            await asyncio.gather(*tasks, *inflight, return_exceptions=True)
            if self._flusher is not None:  # what finished is recorded before we close
                await asyncio.gather(self._flusher, return_exceptions=True)
            self._cursors_due = True  # and the cursors go as far as it allows
            await asyncio.gather(self._flush(store), return_exceptions=True)
            await self._last_progress(store)
            await sender.close()
            self._reads.shutdown(wait=True)
            await self._db(store.close)
            self._writes.shutdown(wait=True)
            self._loop = None
            self.finished.set()

    @staticmethod
    def _loop_ended(endpoint: str, task: asyncio.Task[None]) -> None:
        """An endpoint's loop ends only on stop; anything else is said, not swallowed."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("endpoint_loop_failed", endpoint=endpoint, error=f"{type(exc).__name__}: {exc}")

    async def _runtime(self, store: DeliveryStore, cfg: EndpointSettings) -> Runtime | None:
        state = await self._db(store.endpoint, cfg.name)
        secret = cfg.secret or state.secret
        if not secret:
            log.error(
                "endpoint_without_secret",
                endpoint=cfg.name,
                fix="set [[endpoints]] secret or run `ct1-cdc setup`",
            )
            return None
        keys = [signing.secret_key(secret)]
        if cfg.previous_secret:
            keys.append(signing.secret_key(cfg.previous_secret))
        limit = self.cfg.endpoint_concurrency
        cursor, generation = await self._db(store.cursor, cfg.name)
        # what a crash left past the cursor with its outcome committed is done
        delivered_ahead, batched = await self._db(store.batched_after, cfg.name, cursor, generation)
        return Runtime(
            cfg=cfg,
            keys=keys,
            state=state,
            limit=limit,
            max_limit=limit,
            cursor=cursor,
            generation=generation,
            horizon=cursor,
            delivered_ahead=delivered_ahead,
            batched=batched,
            cursor_moved_at=self.clock(),
            durations=ATTEMPT_SECONDS.labels(cfg.name),
            delivered_total=ATTEMPTS.labels(cfg.name, "delivered"),
            parts=frozenset() if self.partitions else None,
        )

    async def _poll(self, store: DeliveryStore) -> None:
        """Notice commits by another process (capture running apart) within tens of ms."""
        while True:
            if await self._read(store.changed):
                self._wake_all()
            await asyncio.sleep(POLL_SECONDS)

    # -- one endpoint -------------------------------------------------------------------------

    async def _endpoint_loop(self, store: DeliveryStore, sender: Sender, rt: Runtime) -> None:
        try:
            await self._endpoint_rounds(store, sender, rt)
        finally:
            reading, rt.reading = rt.reading, None
            if reading is not None:  # a read's result is only a read: dropped
                if reading.done() and not reading.cancelled():
                    reading.exception()  # looked at, so asyncio does not report it at exit
                reading.cancel()

    async def _endpoint_rounds(self, store: DeliveryStore, sender: Sender, rt: Runtime) -> None:
        """Send what is ready as slots free, while the next read runs beside the sends (a
        read never leaves the slots idle).  After a read that found nothing, the next one
        waits for a commit (the wake-up) or the poll.  Every wait is on ``freed`` (a slot
        freed, a read ended, a commit), so nothing here spins."""
        next_refresh = 0.0
        quiet_until = 0.0  # after a read that found nothing: no read before, unless woken
        while True:
            now = self.clock()
            if now >= next_refresh:
                # adopt the stored state only when someone else (the CLI) wrote it since
                stored = await self._db(store.endpoint, rt.cfg.name)
                if stored.updated_at > rt.state.updated_at:
                    rt.state = stored
                await self._check_cursor(store, rt)  # (waits while a read runs)
                next_refresh = now + STATE_REFRESH_SECONDS
            if rt.reading is not None and rt.reading.done():
                reading, rt.reading = rt.reading, None
                try:
                    result = reading.result()
                except Exception as exc:  # the outbox unreadable for a moment: again soon
                    log.error("read_failed", endpoint=rt.cfg.name, error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(STATE_REFRESH_SECONDS)
                    continue
                if not self._take_read(store, rt, result):
                    wait = min(ROW_POLL_SECONDS, max(0.0, rt.rows_at - now))
                    quiet_until = now + (wait if wait > 0 else POLL_SECONDS)
            if rt.assigning is not None:
                try:
                    await self._apply(store, rt)
                except Exception as exc:  # the outbox unwritable for a moment: again soon
                    log.error(
                        "partitions_not_applied", endpoint=rt.cfg.name, error=f"{type(exc).__name__}: {exc}"
                    )
                    await asyncio.sleep(STATE_REFRESH_SECONDS)
                    continue
            # Disabled, or paused until its probe: new deliveries do not matter, so these
            # waits ignore the wake-up (it stays set until the next read: waiting on it
            # would end every wait at once, and the loop would spin until the probe).
            if rt.state.state == "disabled":
                await asyncio.sleep(STATE_REFRESH_SECONDS)
                continue
            paused = rt.state.state == "paused"
            if paused and now < rt.state.paused_until:
                await asyncio.sleep(min(rt.state.paused_until - now, STATE_REFRESH_SECONDS))
                continue
            limit = 1 if paused else rt.limit
            # a paused endpoint gets one probe at a time, until its outcome is recorded
            busy = rt.outstanding if paused else rt.sending
            capacity = limit - busy
            if rt.assigning is not None and rt.parts is not None and rt.parts - rt.assigning.parts:
                self._park(rt, rt.parts - rt.assigning.parts)  # what is given up is not sent
            while rt.ready and capacity > 0:  # events read ahead go first
                chain, item = rt.ready.popleft()
                self._send(store, sender, rt, chain, item)
                capacity -= 1
            if rt.reading is None and (now >= quiet_until or rt.wake.is_set()):
                self._start_read(store, rt, now, capacity)
            rt.freed.clear()
            if rt.reading is not None and rt.reading.done():
                continue
            if rt.reading is not None:
                timeout = STATE_REFRESH_SECONDS  # the read's end sets freed
            else:
                timeout = quiet_until - now if quiet_until > now else POLL_SECONDS
            await self._sleep_on(rt.freed, min(timeout, STATE_REFRESH_SECONDS))

    def _start_read(self, store: DeliveryStore, rt: Runtime, now: float, capacity: int) -> None:
        """Start the next read on the read thread, if there is anything to read: due rows
        (retries, replays, events queued behind their entity) when this dispatcher made
        some or every ROW_POLL_SECONDS for those made elsewhere (a replay from the CLI, a
        manual event), up to the free slots; then the events past what was read, without
        a row, up to READ_AHEAD waiting in memory."""
        if rt.assigning is not None or rt.parts == frozenset():
            return  # partitions changing hands (reads wait), or none held
        rows = max(0, capacity) if not rt.rewinding and now >= rt.rows_at else 0
        room = min(READ_AHEAD - len(rt.ready), MAX_AHEAD - (len(rt.unsettled) - len(rt.settled)))
        # (an endpoint without a cursor reads no events: only rows, every one of them)
        events = room if rt.generation >= 0 and not rt.rewinding else 0
        if rt.ready and events < READ_AHEAD // 2:
            events = 0  # enough in memory: a read of a few events is not worth its round trip
        if not rows and events <= 0:
            return
        rt.wake.clear()
        read_seq = self._commits
        upto = rt.horizon if rt.generation >= 0 else None
        rt.reading = asyncio.ensure_future(
            self._read(
                store.next_batch,
                rt.cfg.name,
                now,
                rows,
                frozenset(rt.inflight),
                list(rt.chains),
                upto,
                rt.horizon,
                max(0, events),
                rt.parts,
                dict(rt.floors),
            )
        )
        rt.reading_as = (read_seq, rows, events, now, rt.rows_at)
        rt.reading.add_done_callback(lambda _: rt.freed.set())

    def _take_read(
        self,
        store: DeliveryStore,
        rt: Runtime,
        result: tuple[list[Due], list[Due], int, float | None],
    ) -> bool:
        """Admit what a read found; whether it found anything."""
        due, fresh, horizon, next_at = result
        read_seq, rows, events, now, rows_at = rt.reading_as
        if rows:
            due_at = now if len(due) >= rows else now + ROW_POLL_SECONDS
            # a row made due while the read ran (a failure's retry) keeps its time
            rt.rows_at = due_at if rt.rows_at >= rows_at else min(due_at, rt.rows_at)
        # rows go first, as slots free (slots may have been taken while the read ran)
        rt.ready.extendleft(reversed([r for r in (self._admit_row(rt, item) for item in due) if r]))
        rt.horizon = max(rt.horizon, horizon)
        for item in fresh:
            self._admit_fresh(store, rt, item, read_seq)
        for entity in [e for e, at in rt.to_rows_at.items() if at <= read_seq]:
            del rt.to_rows_at[entity]  # reads from now on see its rows
        if events > 0 and len(fresh) >= events:
            rt.wake.set()  # more to read: no wait before the next read
        clock = self.clock()
        if clock - rt.cursor_moved_at >= CURSOR_IDLE_SECONDS and self._cursor_after(rt, ()) > rt.cursor:
            self._cursors_due = True
            self._kick(store)
        if due or fresh:
            return True
        if next_at is not None:
            rt.rows_at = min(rt.rows_at, next_at)
        return False

    async def _check_cursor(self, store: DeliveryStore, rt: Runtime) -> None:
        """Notice a cursor registered since the start, or moved back by ``outbox replay
        --from`` (a new generation): stop reading, let what is in memory settle, and go
        on from the stored cursor."""
        cursor, generation = await self._db(store.cursor, rt.cfg.name)
        if generation == rt.generation:
            return
        rt.rewinding = True
        if rt.chains or rt.ready or rt.reading or rt.outstanding or len(rt.unsettled) > len(rt.settled):
            return  # not yet: the next refresh looks again
        if any(r is rt for _, r, _ in self._results):
            return
        rt.delivered_ahead, rt.batched = await self._db(store.batched_after, rt.cfg.name, cursor, generation)
        rt.cursor = rt.horizon = cursor
        rt.generation = generation
        rt.unsettled.clear()
        rt.settled.clear()
        rt.to_rows_at.clear()
        rt.queuing.clear()
        rt.floors.clear()  # (what is replayed is sent again, whoever sent it before)
        rt.rewinding = False
        rt.wake.set()
        log.info("cursor_moved", endpoint=rt.cfg.name, event_id=cursor)

    def _admit_row(self, rt: Runtime, item: Due) -> tuple[Chain, Due] | None:
        """A due row: its entity has nothing in memory (the claim leaves those out), so it
        starts a chain and is ready to send."""
        rt.inflight.add(item.event_id)
        chain = rt.chains.get(item.entity)
        if chain is not None:  # not by the claim; kept in order if it happens
            chain.waiting.append(item)
            return None
        chain = rt.chains[item.entity] = Chain()
        return chain, item

    def _admit_fresh(self, store: DeliveryStore, rt: Runtime, item: Due, read_seq: int) -> None:
        """An event read past the horizon: sent, or waiting behind its entity's event in
        memory, or queued as a row behind its entity's pending delivery."""
        if item.event_id in rt.delivered_ahead:  # delivered before a crash: the cursor may pass
            rt.delivered_ahead.discard(item.event_id)
            return
        rt.unsettled.append(item.event_id)
        if self.partitions:
            rt.entity_of[item.event_id] = item.entity
        chain = rt.chains.get(item.entity)
        # a row of its entity went pending after this read started: the read could not see it
        to_rows = rt.to_rows_at.get(item.entity, -1) > read_seq
        queuing = rt.queuing.get(item.entity, 0) > 0
        if item.blocked or to_rows or queuing or (chain is not None and chain.to_rows):
            self._queue(store, rt, item)
        elif chain is not None:  # behind the one sent: it goes once that outcome is committed
            if len(chain.waiting) >= MAX_CHAIN:
                chain.to_rows = True  # the rest of this entity flows as rows
                self._queue(store, rt, item)
            else:
                chain.waiting.append(item)
        else:
            chain = rt.chains[item.entity] = Chain()
            rt.ready.append((chain, item))  # sent as slots free, in order

    def _queue(self, store: DeliveryStore, rt: Runtime, item: Due) -> None:
        rt.queuing[item.entity] = rt.queuing.get(item.entity, 0) + 1
        now = self.clock()
        result = Finished(
            rt.cfg.name, item.event_id, now, 0, 0.0, None, None, "pending", now, item.entity, "queue"
        )
        self._record(store, rt, result, None)

    def _send(self, store: DeliveryStore, sender: Sender, rt: Runtime, chain: Chain, item: Due) -> None:
        chain.open += 1
        rt.outstanding += 1
        rt.sending += 1  # counted now: the task starts later, and the limit must hold
        task = asyncio.create_task(self._deliver(store, sender, rt, chain, item))
        rt.tasks.add(task)
        task.add_done_callback(rt.tasks.discard)
        if self.partitions:
            rt.sends[task] = item
            task.add_done_callback(functools.partial(forget_send, rt))

    async def _sleep(self, rt: Runtime, seconds: float) -> None:
        await self._sleep_on(rt.wake, seconds)

    @staticmethod
    async def _sleep_on(event: asyncio.Event, seconds: float) -> None:
        """Wait until ``event`` is set or ``seconds`` pass; a cancellation always goes
        through.  Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that
        comes as the event is set (it returns the event's result instead), and the loop
        would outlive the stop until the process is ended by force."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    async def _deliver(
        self, store: DeliveryStore, sender: Sender, rt: Runtime, chain: Chain, item: Due
    ) -> None:
        msg_id = signing.message_id(item.event_id)
        try:
            async with self._global:
                sent_at = self.clock()
                try:
                    headers = signing.headers(rt.keys, msg_id, int(sent_at), item.body, self.version)
                    attempt = await sender.post(rt.cfg.url, item.body, headers)
                except asyncio.CancelledError:
                    if item.event_id not in rt.cut:
                        raise  # (the dispatcher stopping)
                    # its partition's lease may lapse: not waited for, sent again by the next holder
                    attempt = Attempt(
                        0, (self.clock() - sent_at) * 1000, "cut short: partition given up", None, None
                    )
                except Exception as exc:  # anything unforeseen is a failed attempt, recorded
                    log.exception("send_failed", endpoint=rt.cfg.name, event_id=item.event_id)
                    attempt = Attempt(
                        0, (self.clock() - sent_at) * 1000, f"internal error: {exc!r}", None, None
                    )
        finally:
            rt.sending -= 1
            rt.freed.set()
        now = self.clock()
        rt.durations.observe(attempt.duration_ms / 1000)
        number = item.attempts + 1
        decision = retry.decide(
            retry.Outcome(attempt.status, attempt.retry_after),
            number,
            self.cfg.retry_schedule,
            now,
            self.rng,
        )
        status = {"delivered": "delivered", "dead": "dead"}.get(decision.action, "pending")
        next_at = decision.next_attempt_at or now
        result = Finished(
            rt.cfg.name,
            item.event_id,
            sent_at,
            attempt.status,
            attempt.duration_ms,
            attempt.error,
            attempt.response,
            status,
            next_at,
            item.entity,
            "row" if item.has_row else ("again" if item.event_id in rt.batched else "first"),
            rt.generation,
        )
        self._record(store, rt, result, chain)
        if status == "pending":
            # a retry (or a 410) holds the entity: what waits behind it queues as rows
            chain.to_rows = True
            while chain.waiting:
                self._queue(store, rt, chain.waiting.popleft())
        if decision.action == "delivered":
            rt.delivered_total.inc()
            rt.delivered += 1
            log.debug("webhook_delivered", endpoint=rt.cfg.name, event_id=item.event_id, attempt=number)
        else:
            ATTEMPTS.labels(rt.cfg.name, decision.action).inc()
            rt.failed += 1
            log.info(
                "webhook_failed",
                endpoint=rt.cfg.name,
                event_id=item.event_id,
                attempt=number,
                status=attempt.status,
                duration_ms=attempt.duration_ms,
                error=attempt.error,
                outcome=decision.action,
            )
        if rt.cut and item.event_id in rt.cut:
            rt.cut.discard(item.event_id)  # (not the receiver's fault: its health stands)
        elif self._update_health(rt, decision, now):
            rt.state.updated_at = time.time()
            await self._db(store.save_endpoint, rt.state)

    def _record(self, store: DeliveryStore, rt: Runtime, result: Finished, chain: Chain | None) -> None:
        """Queue an outcome for the next group commit.  The delivery stays in memory
        (never read or claimed again, the cursor not past it) until it is committed."""
        self._results.append((result, rt, chain))
        self._kick(store)

    def _kick(self, store: DeliveryStore) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(store))

    @staticmethod
    def _cursor_after(rt: Runtime, committing: Collection[int]) -> int:
        """How far the cursor may go once ``committing`` is committed: to just below the
        first event read and not settled, or to the horizon."""
        if rt.generation < 0 or rt.rewinding:
            return rt.cursor
        for event_id in rt.unsettled:
            if event_id not in rt.settled and event_id not in committing:
                return max(rt.cursor, event_id - 1)
        return rt.horizon

    async def _flush(self, store: DeliveryStore) -> None:
        while self._results or self._cursors_due:
            self._cursors_due = False
            batch, self._results = self._results, []
            committing: dict[Runtime, set[int]] = {}
            for result, rt, _ in batch:
                if result.kind != "row":
                    committing.setdefault(rt, set()).add(result.event_id)
            cursors = []
            for rt in self.runtimes.values():
                upto = self._cursor_after(rt, committing.get(rt, ()))
                if upto > rt.cursor:
                    cursors.append((rt, upto))
            if not batch and not cursors:
                continue
            try:
                await self._db(
                    store.finish_many,
                    [result for result, _, _ in batch],
                    [(rt.cfg.name, upto, rt.generation) for rt, upto in cursors],
                )
            except Exception as exc:
                # nothing of it counts as done: the cursor stays below these events, so
                # they are sent again after a restart if this commit never succeeds
                log.error("attempt_log_failed", error=str(exc), deliveries=len(batch))
                if self._stopping:
                    return
                self._results[:0] = batch
                await asyncio.sleep(1.0)
                continue
            self._commits += 1
            now = self.clock()
            for rt, upto in cursors:
                rt.cursor = upto
                rt.cursor_moved_at = now
            for result, rt, chain in batch:
                self._settle(store, rt, result, chain)
            for rt in committing:
                while rt.unsettled and rt.unsettled[0] in rt.settled:
                    rt.settled.discard(rt.unsettled.popleft())

    def _settle(self, store: DeliveryStore, rt: Runtime, result: Finished, chain: Chain | None) -> None:
        """An outcome is committed: the delivery leaves memory."""
        if result.kind == "row":
            rt.inflight.discard(result.event_id)
        else:
            rt.settled.add(result.event_id)
            rt.batched.discard(result.event_id)
        if result.status == "pending":  # a row this dispatcher made: due now, or at its retry
            rt.rows_at = min(rt.rows_at, result.next_attempt_at)
        if result.kind == "queue":
            left = rt.queuing.pop(result.entity) - 1
            if left:
                rt.queuing[result.entity] = left
            # a read that started before this commit could not see the row
            rt.to_rows_at[result.entity] = self._commits
        if chain is not None:
            chain.open -= 1
            rt.outstanding -= 1
            if chain.open == 0 and chain.waiting and not self._stopping:  # (on stop: after the restart)
                nxt = chain.waiting.popleft()
                if nxt.has_row:
                    rt.inflight.add(nxt.event_id)
                rt.ready.appendleft((chain, nxt))  # sent first, as a slot frees: the limit holds
            elif chain.open == 0 and not chain.waiting and rt.chains.get(result.entity) is chain:
                del rt.chains[result.entity]
                if chain.to_rows:
                    rt.to_rows_at[result.entity] = self._commits
        rt.freed.set()

    def _update_health(self, rt: Runtime, decision: retry.Decision, now: float) -> bool:
        """Apply one outcome to the endpoint's health; whether its stored state changed."""
        state = rt.state
        before = Health(state.state, state.failures, state.paused_until, rt.limit)
        after, change = after_attempt(
            before,
            decision,
            now,
            max_limit=rt.max_limit,
            pause_after=self.cfg.pause_after_failures,
            probe_seconds=self.cfg.probe_interval_seconds,
        )
        if after is before:
            return False  # the common case: nothing to store
        rt.limit = after.limit
        if change == "resumed":
            log.info("endpoint_resumed", endpoint=state.name)
        elif change == "paused":
            log.warning(
                "endpoint_paused",
                endpoint=state.name,
                failures=after.failures,
                probe_in=self.cfg.probe_interval_seconds,
            )
        elif change == "disabled":
            log.warning("endpoint_disabled", endpoint=state.name, reason="410 Gone")
        if after[:3] == before[:3]:
            return False
        state.state, state.failures, state.paused_until = after[:3]
        return True
