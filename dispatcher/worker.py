"""Delivery workers: due deliveries ▶ signed POST ▶ attempt log, per endpoint.

Per endpoint, a loop claims due deliveries (only the oldest pending one of each entity,
so one order's events arrive in order while other orders proceed) and sends each in its
own task, within a global and a per-endpoint concurrency limit.  The retry policy decides
what happens next; endpoint health pauses an endpoint after a run of failures and probes
it with one delivery at a time until one succeeds.

SQLite work runs on one thread of its own; the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from common.metrics import ATTEMPT_SECONDS, ATTEMPTS
from common.version import version
from config.settings import EndpointSettings, Settings
from dispatcher import retry, signing
from dispatcher.sender import Sender, check_url
from outbox.deliveries import MATERIALIZE_BATCH, DeliveryStore, Due, Finished
from outbox.endpoints import EndpointState

log = structlog.get_logger("ct1_cdc.dispatch")
T = TypeVar("T")

POLL_SECONDS = 0.02  # how often another process's commits are looked for
STATE_REFRESH_SECONDS = 1.0  # how often endpoint state set by the CLI is re-read
SHUTDOWN_GRACE_SECONDS = 5.0  # on stop, how long deliveries in flight may finish
CLAIM_FRACTION = 0.25  # claim again once this share of the slots is free


@dataclass
class Runtime:
    """One endpoint while the dispatcher runs."""

    cfg: EndpointSettings
    keys: list[bytes]
    state: EndpointState
    limit: int
    max_limit: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # deliveries claimed and not yet recorded (never claimed twice) ...
    inflight: set[int] = field(default_factory=set)
    # ... of which this many are waiting for the receiver (what the limit counts)
    sending: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    durations: Any = None  # the attempt-duration histogram of this endpoint
    delivered_total: Any = None  # its counter of successful attempts
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: int = 0
    failed: int = 0


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
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
        self._results: list[tuple[Finished, Runtime]] = []
        self._flusher: asyncio.Task[None] | None = None

    # -- wiring -------------------------------------------------------------------------------

    def notify(self) -> None:
        """New deliveries were committed (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for runtime in self.runtimes.values():
            runtime.wake.set()

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
        store = await self._db(DeliveryStore, self.settings.outbox.path)
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
                if runtime is None:
                    continue
                self.runtimes[cfg.name] = runtime
                tasks.append(asyncio.create_task(self._endpoint_loop(store, sender, runtime)))
            tasks.append(asyncio.create_task(self._poll(store)))
            log.info("dispatch_started", endpoints=sorted(self.runtimes))
            await stop.wait()
        finally:
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
            await sender.close()
            self._reads.shutdown(wait=True)
            await self._db(store.close)
            self._writes.shutdown(wait=True)
            self._loop = None

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
        return Runtime(
            cfg=cfg,
            keys=keys,
            state=state,
            limit=limit,
            max_limit=limit,
            durations=ATTEMPT_SECONDS.labels(cfg.name),
            delivered_total=ATTEMPTS.labels(cfg.name, "delivered"),
        )

    async def _poll(self, store: DeliveryStore) -> None:
        """Notice commits by another process (capture running apart) within tens of ms."""
        while True:
            if await self._read(store.changed):
                self._wake_all()
            await asyncio.sleep(POLL_SECONDS)

    # -- one endpoint -------------------------------------------------------------------------

    async def _endpoint_loop(self, store: DeliveryStore, sender: Sender, rt: Runtime) -> None:
        next_refresh = 0.0
        while True:
            now = self.clock()
            if now >= next_refresh:
                # adopt the stored state only when someone else (the CLI) wrote it since
                fresh = await self._db(store.endpoint, rt.cfg.name)
                if fresh.updated_at > rt.state.updated_at:
                    rt.state = fresh
                next_refresh = now + STATE_REFRESH_SECONDS
            # Disabled, or paused until its probe: new deliveries do not matter, so these
            # waits ignore the wake-up (it stays set until the next claim: waiting on it
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
            busy = len(rt.inflight) if paused else rt.sending
            capacity = limit - busy
            # claim in batches: wait for a quarter of the slots unless none is busy
            if capacity <= 0 or (busy and capacity < max(1, int(limit * CLAIM_FRACTION))):
                rt.freed.clear()
                await self._sleep_on(rt.freed, STATE_REFRESH_SECONDS)
                continue
            rt.wake.clear()
            inflight = frozenset(rt.inflight)
            due = await self._read(store.claim, rt.cfg.name, now, capacity, inflight)
            if len(due) < capacity:
                # short of rows: make those of the events appended since (capture writes
                # events only), a batch per write rather than a write per round
                made = await self._db(store.materialize, rt.cfg.name)
                if made:
                    due = await self._read(store.claim, rt.cfg.name, now, capacity, inflight)
                if made >= MATERIALIZE_BATCH:
                    rt.wake.set()  # more to make: no sleep before the next round
            if not due:
                next_at = await self._read(store.next_due, rt.cfg.name)
                wait = 1.0 if next_at is None else min(1.0, max(0.0, next_at - now))
                await self._sleep(rt, wait if wait > 0 else POLL_SECONDS)
                continue
            for item in due:
                rt.inflight.add(item.event_id)
                task = asyncio.create_task(self._deliver(store, sender, rt, item))
                rt.tasks.add(task)
                task.add_done_callback(rt.tasks.discard)

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

    async def _deliver(self, store: DeliveryStore, sender: Sender, rt: Runtime, item: Due) -> None:
        msg_id = signing.message_id(item.event_id)
        rt.sending += 1
        try:
            async with self._global:
                sent_at = self.clock()
                headers = signing.headers(rt.keys, msg_id, int(sent_at), item.body, self.version)
                attempt = await sender.post(rt.cfg.url, item.body, headers)
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
        self._record(
            store,
            rt,
            Finished(
                rt.cfg.name,
                item.event_id,
                sent_at,
                attempt.status,
                attempt.duration_ms,
                attempt.error,
                attempt.response,
                status,
                next_at,
            ),
        )
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
        if self._update_health(rt, decision, now):
            rt.state.updated_at = time.time()
            await self._db(store.save_endpoint, rt.state)

    def _record(self, store: DeliveryStore, rt: Runtime, result: Finished) -> None:
        """Queue a finished attempt for the next group commit.  The delivery stays in
        flight (never claimed again) until it is committed."""
        self._results.append((result, rt))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(store))

    async def _flush(self, store: DeliveryStore) -> None:
        while self._results:
            batch, self._results = self._results, []
            try:
                await self._db(store.finish_many, [result for result, _ in batch])
            except Exception as exc:  # the deliveries stay pending and are sent again
                log.error("attempt_log_failed", error=str(exc), deliveries=len(batch))
            for result, rt in batch:
                rt.inflight.discard(result.event_id)
                rt.freed.set()

    def _update_health(self, rt: Runtime, decision: retry.Decision, now: float) -> bool:
        """Apply one outcome to the endpoint's health; whether its stored state changed."""
        state = rt.state
        if decision.action == "delivered":
            rt.limit = min(rt.max_limit, rt.limit + 1)
            if state.failures == 0 and state.state != "paused":
                return False  # the common case: nothing to store
            state.failures = 0
            if state.state == "paused":
                state.state = "active"
                log.info("endpoint_resumed", endpoint=state.name)
            return True
        before = (state.state, state.failures, state.paused_until)
        if decision.action == "disable":
            state.state = "disabled"
            log.warning("endpoint_disabled", endpoint=state.name, reason="410 Gone")
        else:
            state.failures += 1
            if decision.slow_down:
                rt.limit = max(1, rt.limit // 2)
            probe = self.cfg.probe_interval_seconds
            if state.state == "paused":
                state.paused_until = now + probe
            elif state.state == "active" and state.failures >= self.cfg.pause_after_failures:
                state.state = "paused"
                state.paused_until = now + probe
                log.warning("endpoint_paused", endpoint=state.name, failures=state.failures, probe_in=probe)
        return (state.state, state.failures, state.paused_until) != before
