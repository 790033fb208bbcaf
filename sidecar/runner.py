"""The composition root: builds the parts of a run from settings and wires them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from cdc import source
from cdc.capture import Capture, wal2json_options
from cdc.mapping import Mapping, load_mapping
from cdc.postgres import PostgresSource
from cdc.stream import ReplicationStream
from common.errors import ConfigError, Ct1Error, SetupError, SourceUnavailable
from config.settings import Settings
from dispatcher.worker import Dispatcher
from outbox.checkpointer import Checkpointer
from outbox.store import OutboxError, Router, open_outbox, routes_of
from outbox.writer import OutboxWriter

if TYPE_CHECKING:  # aiohttp is imported by the API role alone: capture starts without it
    from aiohttp import web

    from outbox.jetstream import JetStreamLog
    from outbox.jetstream_mirror import Mirror
    from outbox.jetstream_sink import JetStreamSink

log = structlog.get_logger("ct1_cdc.run")

ROLES = ("capture", "dispatch", "api")
GC_THRESHOLD = 10_000  # allocations between young-generation collections (Python's default: 700)


def tune_gc() -> tuple[int, int, int]:
    """A long-running stream processor allocates many short-lived objects per row and per
    delivery: collect the young generation less often, and keep what startup built out of
    every collection.  Returns the previous thresholds."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, previous[1], previous[2])
    return previous


def parse_roles(text: str | None) -> list[str]:
    if not text:
        return list(ROLES)
    roles = [r.strip() for r in text.split(",") if r.strip()]
    for role in roles:
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: this version runs {', '.join(ROLES)}")
    return roles


def router_for(settings: Settings) -> Router:
    return Router(routes_of(settings.endpoints))


def open_sink(settings: Settings) -> OutboxWriter | JetStreamSink:
    """Capture's sink: the outbox writer, or with ``[outbox] backend = "jetstream"`` the
    stream (its connection made and the stream checked or created: blocking) with
    capture's state in the file at ``outbox.path``."""
    if settings.outbox.backend != "jetstream":
        return open_writer(settings)
    from outbox.jetstream_sink import JetStreamSink

    path = settings.outbox.capture_path
    local = OutboxWriter(open_outbox(path), Router([]), checkpointer=Checkpointer(path))
    try:
        return JetStreamSink(events_log(settings), local)
    except BaseException:
        local.close()
        raise


def events_log(settings: Settings) -> JetStreamLog:
    from outbox import jetstream

    return jetstream.events_log(settings)


def open_mirror(
    settings: Settings, on_commit: Callable[[], None], dispatcher: Dispatcher | None = None
) -> Mirror:
    """The API's and dispatch's copy of the events stream, in the outbox file; a dispatch
    node (with its ``dispatcher``) shares the partitions and its delivery progress with
    the other dispatch nodes through the cluster."""
    from outbox.jetstream_leases import Leases
    from outbox.jetstream_mirror import Mirror
    from outbox.jetstream_rewinds import Rewinds

    path = settings.outbox.path
    log = events_log(settings)
    leases = None
    if dispatcher is not None:  # dispatch nodes share the partitions
        # (a connection of its own: on its own thread, see Leases.run_thread)
        rewinds = Rewinds(lambda: open_outbox(path), router_for(settings).names)  # (replay --from)
        leases = Leases(events_log(settings), dispatcher, settings.outbox.jetstream.lease_seconds, rewinds)
    return Mirror(log, lambda: open_outbox(path), router_for(settings), on_commit, leases)


def open_writer(settings: Settings) -> OutboxWriter:
    """The outbox's single writer, for capture (the caller closes it)."""
    conn = open_outbox(settings.outbox.path)
    writer = OutboxWriter(
        conn, router_for(settings), checkpointer=Checkpointer(settings.outbox.path), appends_on_thread=True
    )
    # thread: events inserted on a native thread; executemany: built without a C compiler
    log.info("outbox_writer_opened", appends="thread" if writer.appends_on_thread else "executemany")
    return writer


def build_capture(
    settings: Settings,
    writer: OutboxWriter | JetStreamSink,
    mapping: Mapping | None = None,
    on_commit: Callable[[], None] | None = None,
) -> Capture:
    """Capture of ``settings.source`` into ``writer``: the slot's replication stream, the
    source database beside it, and the outbox writer as its sink."""
    dsn, slot = settings.source.dsn, settings.source.slot
    mapping = mapping or load_mapping(settings.mapping.file)
    return Capture(
        settings,
        mapping,
        sink=writer,
        frames=ReplicationStream(dsn, slot, wal2json_options(settings)),
        source=PostgresSource(dsn, slot, mapping),
        on_commit=on_commit,
    )


# How long `run` may take to stop once told to (SIGTERM, SIGINT, a role failing), whatever
# a socket is doing: past it the process ends anyway (the CLI asks for this).
STOP_SECONDS = 9.0
# How long capture may take to notice a stop before its thread is left behind.
CAPTURE_STOP_SECONDS = 5.0

T = TypeVar("T")


async def run(settings: Settings, roles: Sequence[str], *, exit_within: float | None = None) -> None:
    """Run the chosen roles on one loop until SIGINT/SIGTERM or a role fails.

    Every role starts or none does: the outbox is opened, the API port bound and the
    source reached before any role runs, so a role that cannot start fails the run with
    one line naming it, and nothing has been captured.  With ``exit_within``, the process
    ends at most that many seconds after the run begins to stop, even if a thread hangs.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    deadline = ExitDeadline(exit_within)

    def stop_requested(sig: signal.Signals) -> None:
        deadline.arm()
        if not stop.is_set():
            log.info("stop_requested", signal=sig.name)
            stop.set()

    jetstream = settings.outbox.backend == "jetstream"
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested, sig)
    partitions = settings.outbox.jetstream.partitions if jetstream else 0
    dispatcher = Dispatcher(settings, partitions=partitions) if "dispatch" in roles else None
    app = None
    if "api" in roles:
        from api.app import FEED, create_app

        app = create_app(settings)
    # after each outbox commit: wake the dispatcher and the API's waiting requests
    listeners = [f for f in (dispatcher and dispatcher.notify, app and app[FEED].notify) if f]

    def committed() -> None:
        for listener in listeners:
            listener()

    mirror_stop = threading.Event()
    capture: Capture | None = None
    writer: OutboxWriter | JetStreamSink | None = None
    runner: web.AppRunner | None = None
    running: dict[asyncio.Future[Any], str] = {}
    failed: BaseException | None = None
    try:
        check_outbox(settings.outbox.path)  # every role writes it
        if app is not None:
            runner = await listen(app, settings.api.host, settings.api.port)
        if "capture" in roles:
            probe = in_thread(functools.partial(probe_source, settings.source.dsn), "source-probe")
            if await until_stopped(stop, probe):  # else stopped while starting: nothing runs
                mapping = load_mapping(settings.mapping.file)  # a wrong mapping fails before the outbox opens
                writer = await asyncio.to_thread(open_sink, settings)
                capture = build_capture(settings, writer, mapping, on_commit=committed)
                running[in_thread(capture.run, "capture")] = "capture"
                if settings.analytics.enabled:
                    from api.app import excluded_columns
                    from sidecar.derived import AnalyticsRole

                    # (on the JetStream backend through capture, the stream's one writer)
                    through = capture if settings.outbox.backend == "jetstream" else None
                    analytics = AnalyticsRole(
                        settings, router_for(settings), excluded_columns(mapping), through
                    )
                    running[asyncio.ensure_future(analytics.run(stop))] = "analytics"
                if jetstream:  # manual events the API nodes ask for, through capture
                    from sidecar.sends import SendServer

                    running[asyncio.ensure_future(SendServer(settings, capture).run(stop))] = "sends"
        if jetstream and (dispatcher is not None or app is not None) and not stop.is_set():
            # dispatch and the API read a copy of the stream in the outbox file
            mirror = open_mirror(settings, committed, dispatcher)
            copying = in_thread(functools.partial(mirror.run, mirror_stop), "mirror")
            running[copying] = "mirror"
            while not (mirror.ready.is_set() or copying.done() or stop.is_set()):
                await asyncio.sleep(0.02)  # the dispatcher starts from the cursors it leaves
        if dispatcher is not None and not stop.is_set():
            running[asyncio.ensure_future(dispatcher.run(stop))] = "dispatch"
        tune_gc()  # after startup: what it built stays out of every collection
        log.info("run_started", roles=list(roles))
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([waiter, *running], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        found = first_failure(done - {waiter}, running, stop.is_set())
        if found is not None:
            name, failed = found
            log.error("role_failed", role=name, error=str(failed))
    finally:
        deadline.arm()
        stop.set()
        mirror_stop.set()
        await stop_roles(capture, writer, running, runner)
    for role in running:
        error = None if not role.done() or role.cancelled() else role.exception()
        failed = failed or error
    if failed is not None:
        raise failed
    log.info("run_stopped")


def first_failure(
    done: Iterable[asyncio.Future[Any]], running: dict[asyncio.Future[Any], str], stopping: bool
) -> tuple[str, BaseException] | None:
    """The first role of ``done`` that failed, by name: one that raised, or one that ended
    while no stop was asked.  (A role that returned because a stop was asked, in the same
    turn of the loop as the stop itself, did what it should.)"""
    for role in done:
        error = None if role.cancelled() else role.exception()
        if error is not None:
            return running[role], error
        if not stopping:
            return running[role], Ct1Error(f"{running[role]} stopped on its own")
    return None


def check_outbox(path: str) -> None:
    """Open (create, migrate) the outbox for writing, or fail with one line naming it."""
    try:
        open_outbox(path).close()
    except OutboxError as exc:
        raise OutboxError(f"outbox: cannot open {path}: {exc.__cause__ or exc}") from exc
    except OSError as exc:
        if isinstance(exc, FileExistsError):  # mkdir of a parent that is a file
            reason = f"{exc.filename} is not a directory"
        else:
            reason = f"{(exc.strerror or str(exc)).lower()}: {exc.filename}"
        raise OutboxError(f"outbox: cannot open {path}: {reason}") from exc


async def listen(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start the API and bind its port, or fail with one line naming host:port."""
    from aiohttp import web

    from api.server import ApiRunner  # the JSON error body also for what aiohttp refuses

    runner = ApiRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if isinstance(exc, socket.gaierror) or not exc.errno:
            reason = str(exc.strerror or exc)
        else:  # asyncio's message repeats the address; the errno is what matters
            reason = os.strerror(exc.errno)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise SetupError(f"api: cannot listen on {where}: {reason.lower()}") from exc
    log.info("api_listening", host=host, port=port)
    return runner


def probe_source(dsn: str) -> None:
    """Capture's rule at start: the source must accept a connection, or the run fails.

    A source lost after the start is retried with backoff instead (Capture.run): a
    restarted Postgres must not end the process, a wrong DSN must not keep it waiting.
    """
    try:
        source.connect(dsn).close()
    except SourceUnavailable as exc:
        cause = exc.__cause__ or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise SourceUnavailable(
            f"capture: cannot connect to the source: {reason}: check source.dsn / CT1_SOURCE__DSN"
        ) from exc


def in_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread of its own; the future settles with its outcome.

    Not the loop's default executor: ``asyncio.run`` and the interpreter wait for those
    threads at exit, so one blocked on a silent socket would keep the process alive.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the run is over
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


async def until_stopped(stop: asyncio.Event, future: asyncio.Future[Any]) -> bool:
    """Wait for ``future`` (raising its error) unless a stop comes first: then False."""
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, future], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not future.done():
        future.cancel()
        return False
    future.result()
    return True


async def stop_roles(
    capture: Capture | None,
    writer: OutboxWriter | JetStreamSink | None,
    running: dict[asyncio.Future[Any], str],
    runner: web.AppRunner | None,
) -> None:
    """Stop every role at once; each has its own bound (see STOP_SECONDS)."""

    async def capture_stopped(thread: asyncio.Future[Any]) -> None:
        assert capture is not None and writer is not None
        capture.stop()
        await asyncio.wait([thread], timeout=CAPTURE_STOP_SECONDS)
        if not thread.done():
            # Capture is blocked (a source that accepts and never answers, a hung read):
            # leave its daemon thread behind, it ends with the process.  Nothing is lost:
            # each group of source transactions is committed to SQLite atomically with its
            # checkpoint, and only committed positions were confirmed to Postgres, so what
            # the thread held uncommitted is rolled back by SQLite and sent again by the
            # slot at the next start, exactly as after kill -9.
            log.warning("capture_abandoned", waited_seconds=CAPTURE_STOP_SECONDS)
            return
        writer.close()

    steps: list[Awaitable[Any]] = []
    for role, name in running.items():
        steps.append(capture_stopped(role) if name == "capture" else asyncio.wait([role]))
    if runner is not None:
        steps.append(runner.cleanup())
    for outcome in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(outcome, BaseException):
            log.error("role_stop_failed", error=str(outcome))


class ExitDeadline:
    """Ends the process ``seconds`` after :meth:`arm`, unless it has ended by then.

    The last resort once stopping: a thread stuck on a socket or waiting for an SQLite
    lock that the abandoned capture thread holds would otherwise keep the interpreter
    from exiting.  With ``seconds`` None it does nothing (the run is not the process).
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self.seconds is None or self._timer is not None:
            return
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        stuck = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread())
        log.error("stop_forced", seconds=self.seconds, threads=stuck)
        os._exit(1)
