"""The capture loop: frames of the slot → decode → map → the sink, with feedback.

Capture is given its adapters (:mod:`cdc.ports`): the frames and the channel back to
Postgres (a :class:`~cdc.ports.FrameSource`, the replication stream in a run), the source
database beside them (a :class:`~cdc.ports.SourceDatabase`) and where the events go (a
:class:`~cdc.ports.Sink`, the outbox writer in a run).  It runs in its own thread and
is the only user of all three.  Positions:

* ``committed`` — end LSN of the last source transaction whose events are committed in
  the sink (stored there as the checkpoint).  Only this, or a position past which we
  hold nothing uncommitted, is ever confirmed to Postgres as flushed.
* A transaction whose commit end LSN is not past the stored checkpoint was already
  appended before a crash: it is skipped, so the sink never holds it twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from cdc import slot as slot_health
from cdc.backfill import WATERMARK_PREFIX, Backfiller
from cdc.carts import CartStore, CartTracker
from cdc.decode import COMPILED, Begin, Commit, Message, RowChange, Truncate, decode
from cdc.mapping import Mapping, apply, truncate_drafts
from cdc.ports import FrameSource, Sink, SourceDatabase
from cdc.schema import Problem, Relation, check_mapping, tables_to_shadow
from cdc.source import HEARTBEAT_PREFIX, heartbeat_time
from cdc.stream import Keepalive, XLogData
from common.errors import (
    CaptureError,
    Ct1Error,
    DecodeError,
    SetupError,
    SlotBusy,
    SlotLost,
    SourceUnavailable,
)
from common.formats import format_lsn, parse_lsn, unix_to_iso
from config.settings import Settings

log = structlog.get_logger("ct1_cdc.capture")

COMMIT_POLL = 0.001  # seconds between looks at a group commit the sink finishes on a thread


def wal2json_options(settings: Settings) -> dict[str, str]:
    options = {
        "format-version": "2",
        "include-xids": "1",
        "include-timestamp": "1",
        "include-lsn": "1",
        "include-pk": "1",
        "include-transaction": "1",
        "include-types": "1",
        "include-domain-data-type": "1",  # a domain typed by its base type: numbers stay numbers
        "add-msg-prefixes": f"{HEARTBEAT_PREFIX},{WATERMARK_PREFIX}",
    }
    if settings.source.tables:
        options["add-tables"] = ",".join(t.replace(",", r"\,") for t in settings.source.tables)
    return options


@dataclass
class CaptureStats:
    transactions: int = 0
    events: int = 0
    commits: int = 0
    derived: int = 0  # events derived from the stream (cart.abandoned)
    skipped_transactions: int = 0
    reconnects: int = 0
    standby_polls: int = 0  # tries while another capture held the slot
    last_event_id: int = 0
    confirmed_lsn: int = 0
    lag_bytes: int | None = None
    wal_status: str | None = None
    started: float = field(default_factory=time.time)


class Capture:
    """Capture ``frames`` of ``settings.source.slot`` into ``sink``; call :meth:`run` in a
    thread.  ``clock`` (monotonic seconds) times group commits and housekeeping."""

    def __init__(
        self,
        settings: Settings,
        mapping: Mapping,
        *,
        sink: Sink,
        frames: FrameSource,
        source: SourceDatabase,
        on_commit: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_commit = on_commit  # called after each commit in the sink (wakes the dispatcher)
        self.settings = settings
        self.mapping = mapping
        self.sink = sink
        self.frames = frames
        self.source = source
        self.clock = clock
        self.slot = settings.source.slot
        self.stats = CaptureStats()
        self.stopping = threading.Event()
        self.streaming = threading.Event()  # a session streams the slot: work handed over runs soon
        self._parents: dict[str, str] = {}
        self._shadowed: set[str] = set()
        self._warned_no_pk: set[str] = set()
        self._started = False  # a first session got going: later ones report, never refuse
        self._reached = False  # the source accepted a connection once
        self._problems: dict[tuple[str, str, int | None, str], Problem] = {}
        self._problems_stored = False  # whether the sink holds self._problems (clears old ones)
        self._columns: dict[str, frozenset[str]] = {}  # each mapped table's columns, last read
        self._catalog: dict[str, Relation] = {}  # the mapped tables, last read
        self._referenced = {
            t: frozenset(c for r in rules if r.on != {"truncate"} for _, c in r.columns())
            for t, rules in mapping.by_table.items()
        }
        self._recheck_at = 0.0  # when a change hinted at DDL: re-read the catalog then
        self._present: dict[str, frozenset[str]] = {}
        self._hinted: set[str] = set()  # tables whose columns this transaction already showed
        self._skips: set[int] = set()  # xids an operator asked to skip
        self._skipping: Begin | None = None  # the requested skip in progress
        self._skipped_changes = 0
        self._truncated: dict[str, list[str]] = {}  # root table → relations, of one TRUNCATE
        self._truncate_lsn = 0
        self._waiting_since: float | None = None  # a standby since: another capture holds the slot
        # per session
        self._resume = 0  # checkpoint stored in the sink when the session started
        self._position = 0  # end of the last fully processed transaction or message
        self._submitted = 0  # position handed to the sink with a commit request
        self._idle_lsn = 0  # a position past which nothing is owed, with all else durable
        self._confirmed = 0  # last flush position sent to Postgres
        self._in_txn: Begin | None = None
        self._skip_txn = False
        self._first_pending = 0.0
        self._last_commit = 0.0
        # derived events: cart.abandoned, judged by the stream's clock (source commit times
        # and heartbeat times, as read), never by the wall clock
        self._carts = CartTracker(mapping.carts, CartStore(sink.state)) if mapping.carts else None
        self._cart_tables = frozenset(mapping.carts.tables if mapping.carts else ())  # per row: a set
        self._stream_clock = 0.0
        self._txn_clock = 0.0
        self._warned_heartbeat = False
        # work handed to this thread (submit): run between transactions, in the group commit
        self._requests: deque[tuple[Callable[[Sink], Any], concurrent.futures.Future[Any]]] = deque()
        self._awaiting: list[tuple[concurrent.futures.Future[Any], Any]] = []
        # commits made and not yet durable: (the sink's number of the commit, what waited
        # for it, whether it held events); readers are woken and results given only then
        self._committing: deque[tuple[int, list[tuple[concurrent.futures.Future[Any], Any]], bool]] = deque()
        # backfill: existing rows read in chunks between transactions (cdc/backfill.py)
        self._backfill = Backfiller(
            mapping, sink, source, chunk_size=settings.backfill.chunk_size, clock=clock
        )

    # -- the outer loop: reconnect with backoff ----------------------------------------------

    def stop(self) -> None:
        self.stopping.set()

    def submit(self, work: Callable[[Sink], Any]) -> concurrent.futures.Future[Any]:
        """``work(sink)`` on capture's thread, between source transactions and inside its
        group commit (callable from any thread): what it adds commits with the group, or
        not at all.  The future gets its result once that commit is durable (at once if it
        added nothing), or the error that stopped it.  The sink has one writer, capture:
        other writers in the process (``marketplace.analytics`` on the JetStream backend)
        go through here."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests.append((work, done))
        return done

    def _serve(self) -> None:
        """Run the work handed over (between transactions)."""
        while self._requests:
            work, done = self._requests.popleft()
            if not done.set_running_or_notify_cancel():
                continue  # (given up by the one who asked: not run)
            pending = self._has_uncommitted()
            try:
                result = work(self.sink)
            except BaseException as exc:  # capture's own failure: it stops as it would anyway
                done.set_exception(exc)
                raise
            if self.sink.in_transaction:
                if not pending:
                    self._first_pending = self.clock()  # (the group's age, for its commit)
                self._awaiting.append((done, result))
            else:
                done.set_result(result)

    def _refuse_requests(self, reason: str) -> None:
        while self._requests:
            _, done = self._requests.popleft()
            if done.set_running_or_notify_cancel():  # (not if given up by the one who asked)
                done.set_exception(CaptureError(reason))

    def _fail_awaiting(self, exc: BaseException) -> None:
        """The group rolled back: what waited for its commit did not happen (nor for a
        commit the sink could not make durable)."""
        with contextlib.suppress(Exception):
            self._after_durable()  # (what did become durable before the failure)
        failed, self._awaiting = self._awaiting, []
        while self._committing:
            failed += self._committing.popleft()[1]
        for done, _ in failed:
            if not done.done():  # (a caller that gave up cancelled it)
                done.set_exception(CaptureError(f"not committed: {type(exc).__name__}: {exc}"))

    def run(self) -> None:
        delay = 0.2
        while not self.stopping.is_set():
            started = self.clock()
            try:
                self._session()
            except SlotBusy as exc:
                # another capture reads the slot (this one was started as its standby):
                # try again often, so that it takes over within a poll of the other's end;
                # each try brings the sink's copy of the state up to date
                self.sink.rollback()
                self._fail_awaiting(exc)
                self._refuse_requests("another capture reads the slot (this one is its standby)")
                if self._waiting_since is None:
                    self._waiting_since = self.clock()
                    log.info("standby_waiting", slot=self.slot, detail=str(exc))
                self.stats.standby_polls += 1
                self.stopping.wait(self.settings.source.standby_poll_seconds)
                continue
            except SourceUnavailable as exc:
                self.sink.rollback()
                self._fail_awaiting(exc)
                if not self._reached:
                    raise  # never reached the source: a wrong DSN fails the run, not waits
                self.stats.reconnects += 1
                if self.clock() - started > 30:
                    delay = 0.2
                log.warning("source_unavailable", error=str(exc), retry_in=round(delay, 2))
                self.stopping.wait(delay)
                delay = min(delay * 2, self.settings.source.reconnect_max_seconds)
            except BaseException as exc:
                self.sink.rollback()
                self._fail_awaiting(exc)
                self._refuse_requests("capture stopped")
                raise
        self._refuse_requests("capture stopped")

    # -- one replication session -------------------------------------------------------------

    def _session(self) -> None:
        self.source.open()
        self._reached = True  # from now on a lost source (or a slot still held) is retried
        try:
            self._prepare()
            stored = self.sink.checkpoint(self.slot) or 0
            self._resume = self._position = self._submitted = stored
            self._in_txn = None
            self._skip_txn = False
            self._skipping = None
            self._truncated = {}
            self._skips = self.sink.pending_skips()
            self._backfill.forget()
            if self._carts is not None:
                self._carts.forget()  # a rollback may have undone what it knew
                self._stream_clock = 0.0  # the replay sweeps again where the first reading did
            try:
                self.frames.start(stored)
                log.info(
                    "capture_started",
                    slot=self.slot,
                    lsn=format_lsn(stored),
                    decoder="compiled" if COMPILED else "python",  # python: built without a C compiler
                    reads=self.frames.reads,  # native: many frames a call (cdc/_frames.c)
                )
                if self._waiting_since is not None:
                    log.info(
                        "standby_took_over",
                        slot=self.slot,
                        lsn=format_lsn(stored),
                        waited_seconds=round(self.clock() - self._waiting_since, 1),
                    )
                    self._waiting_since = None
                self._started = True
                self.streaming.set()
                try:
                    self._stream_loop()
                finally:
                    self.streaming.clear()
            except SlotLost as exc:
                self.sink.rollback()  # (first: a group commit on its way finishes, or fails)
                self._fail_awaiting(exc)  # what waited for a group rolled back did not happen
                held = self.sink.durable_lsn or stored
                lost = slot_health.lost(self.slot, held, str(exc))
                if self.settings.source.on_slot_lost != "recover":
                    raise lost from exc
                self.frames.close()
                self._recover(held, "dropped" if "dropped" in str(exc) else "invalidated")
        finally:
            self.frames.close()
            self.source.close()

    def _prepare(self) -> None:
        if not self._started:  # what setup checks, in its order: the source first
            failed = [c for c in self.source.checks() if not c.ok]
            if failed:
                raise SetupError(f"{failed[0].name} check failed ({failed[0].detail}); fix: {failed[0].fix}")
        problems = self._read_schema()
        if problems and not self._started:
            more = f" (and {len(problems) - 1} more: `ct1-cdc setup` lists them)" if len(problems) > 1 else ""
            raise SetupError(f"mapping does not fit the source: {problems[0].line()}{more}")
        self._report(problems)
        self._shadowed = tables_to_shadow(self.mapping, self._catalog)
        if self._shadowed:
            log.info("shadow_tables", tables=sorted(self._shadowed))
        held = self.sink.checkpoint(self.slot) or 0
        if held and self.source.slot_status() is None:
            # capture read from this slot before: it was dropped (by hand, by a provider near
            # a full disk, or not carried over by a failover), and what changed since is lost
            if self.settings.source.on_slot_lost != "recover":
                raise slot_health.lost(self.slot, held, "it no longer exists: dropped, or not on this server")
            self._recover(held, "dropped")
            return
        if self.source.ensure_slot(self.mapping, self.sink, self._shadowed):
            log.info("slot_created", slot=self.slot)

    def _stream_loop(self) -> None:
        cfg = self.settings.source
        clock = self.clock
        batch_s = self.settings.outbox.batch_max_ms / 1000
        commit_interval = self.settings.outbox.commit_interval_ms / 1000
        next_status = clock() + cfg.status_interval_seconds
        next_heartbeat = clock() + cfg.heartbeat_seconds
        next_slot_check = clock()
        next_housekeeping = 0.0  # status, heartbeat and slot checks run even under load
        backfill = self._backfill
        while not self.stopping.is_set():
            if self._in_txn is None and self._requests:
                self._serve()  # between transactions: work handed over (submit)
            if self._in_txn is None and backfill.next_at <= clock():
                backfill.step(self._position)  # between transactions: a backfill's next chunk, if due
            # commit as soon as the stream pauses, but not more often than commit_interval
            timeout = 0.5
            if self._in_txn is None and self._has_uncommitted():
                timeout = max(0.0, self._last_commit + commit_interval - clock())
            if self._committing:
                timeout = min(timeout, COMMIT_POLL)  # its readers are woken once it is durable
            frames = self.frames.read_many(timeout=timeout)
            for frame in frames:  # (a transaction, up to its commit, or up to a limit)
                if type(frame) is RowChange:  # decoded by the reader already
                    self._change(frame, None)
                elif isinstance(frame, (Begin, Commit)):  # (so are a transaction's edges)
                    self._message(frame)
                elif isinstance(frame, XLogData):
                    self._handle(frame)
                else:
                    assert isinstance(frame, Keepalive)
                    if self._in_txn is None and self._all_durable():
                        self._idle_lsn = max(self._idle_lsn, frame.wal_end)
                    self._confirm(reply=frame.reply_requested, force=frame.reply_requested)
                    continue
                if self._should_commit(batch_s):
                    self._commit()
            if (
                not frames
                and self._in_txn is None
                and self._has_uncommitted()
                and clock() >= self._last_commit + commit_interval
            ):
                self._commit()  # nothing buffered: a good moment for a group commit
            self._confirm()
            now = clock()
            if now < next_housekeeping:
                continue
            next_housekeeping = now + 0.1
            if now >= next_status:
                self._confirm(force=True)
                next_status = now + cfg.status_interval_seconds
            if now >= next_heartbeat:
                self.source.heartbeat()
                next_heartbeat = now + cfg.heartbeat_seconds
            if now >= next_slot_check:
                self._check_slot()
                self._report(self._read_schema())
                next_slot_check = now + cfg.slot_check_seconds
            elif self._recheck_at and now >= self._recheck_at:
                self._report(self._read_schema())
            if not self._problems_stored and not self.sink.in_transaction:
                self.sink.set_problems([p.as_dict() for p in self._problems.values()])
                self._problems_stored = True
        if self._in_txn is None and self._has_uncommitted():
            self._commit()
        while self._committing:  # the last group commit durable before the session ends
            time.sleep(COMMIT_POLL)
            self._after_durable()
        self._confirm()

    # -- frames ------------------------------------------------------------------------------

    def _has_uncommitted(self) -> bool:
        return self._position > self._submitted or self.sink.in_transaction

    def _all_durable(self) -> bool:
        return not self._has_uncommitted() and self.sink.durable_lsn >= self._submitted

    def _should_commit(self, batch_s: float) -> bool:
        if self._in_txn is not None or not self._has_uncommitted():
            return False
        if self.sink.pending >= self.settings.outbox.batch_max_events:
            return True
        return self.clock() - self._first_pending >= batch_s

    def _handle(self, frame: XLogData) -> None:
        try:
            msg = decode(frame.payload)
        except DecodeError as exc:
            if self._skip_txn:
                return  # inside a transaction we pass by anyway
            raise self._stopped_by(exc, None, frame.wal_start) from exc
        if isinstance(msg, RowChange):
            self._change(msg, frame.wal_start)
        else:
            self._message(msg)

    def _message(self, msg: Begin | Commit | Truncate | Message) -> None:
        """One decoded message other than a row change."""
        if self._truncated and not isinstance(msg, Truncate):
            self._flush_truncates()
        if isinstance(msg, Begin):
            self._in_txn = msg
            self._hinted.clear()
            self._skip_txn = msg.end_lsn <= self._resume
            if not self._skip_txn and msg.xid in self._skips:
                self._skip_txn = True
                self._skipping = msg
                self._skipped_changes = 0
            if not self._has_uncommitted():
                self._first_pending = self.clock()
            if self._carts is not None and not self._skip_txn:
                self._txn_clock = _epoch(msg.commit_time)
                self._advance(self._txn_clock, msg.lsn)  # what fell due before this transaction
        elif isinstance(msg, Commit):
            if self._skipping is not None:
                self._skip_requested(msg)
            elif self._skip_txn:
                self.stats.skipped_transactions += 1
            else:
                self.stats.transactions += 1
                self._position = max(self._position, msg.end_lsn)
            self._backfill.committed(msg.xid)
            self._in_txn = None
            self._skip_txn = False
        elif isinstance(msg, Truncate):
            if not self._skip_txn:
                self._truncate(msg)
        elif isinstance(msg, Message) and msg.prefix == WATERMARK_PREFIX:
            if not self._skip_txn:  # a backfill chunk's watermark: its rows go out here
                self._backfill.watermark(msg.content, format_lsn(msg.lsn))
        elif isinstance(msg, Message) and self._in_txn is None and not msg.transactional:
            # Our heartbeat.  Outside a transaction nothing before it is still owed to us.
            if self._carts is not None and msg.prefix == HEARTBEAT_PREFIX:
                emitted = heartbeat_time(msg.content, time.time())
                if emitted is not None:
                    self._advance(emitted, msg.lsn)  # every commit before it has been read
                elif msg.content != "heartbeat" and not self._warned_heartbeat:  # (older ones carry no time)
                    self._warned_heartbeat = True
                    log.warning("heartbeat_ignored", lsn=format_lsn(msg.lsn), content=msg.content[:80])
            if self._all_durable():
                self._idle_lsn = max(self._idle_lsn, msg.lsn)
            else:
                self._position = max(self._position, msg.lsn)

    def _change(self, msg: RowChange, wal_start: int | None) -> None:
        """One row change, decoded (by the reader, or from ``wal_start``'s frame)."""
        if self._truncated:
            self._flush_truncates()
        if self._skip_txn:
            self._skipped_changes += 1
            if self._backfill.pending is not None:  # a change never sent: its row is read again
                self._backfill.change(self._table(msg.table), msg, msg.xid, False)
            return
        table = self._table(msg.table)  # the source's own errors stay what they are
        try:
            self._row(table, msg)
        except Ct1Error:
            raise
        except Exception as exc:  # a value or a rule we did not foresee: say where, and how past it
            raise self._stopped_by(exc, msg, _lsn_of(msg) if wal_start is None else wal_start) from exc

    def _stopped_by(self, exc: BaseException, change: RowChange | None, lsn: int) -> CaptureError:
        """The one line capture stops with: where, what, and how to move past it."""
        txn = self._in_txn
        where = f"at lsn {format_lsn(lsn)}"
        if change is not None:
            table = self._parents.get(change.table, change.table)
            keys = [r.key for r in self.mapping.by_table.get(table, [])] or list(change.pk)
            row = change.new or change.old or {}
            key = next((f"{k}={row[k]!r}" for k in keys if k in row), "key unknown")
            where = f"in {table} ({key}) at lsn {change.lsn}"
        hint = (
            f"; to move past this one transaction (its changes are then not captured): "
            f"`ct1-cdc slot skip {txn.xid}`, then restart"
            if txn is not None
            else ""
        )
        reason = (str(exc).strip().splitlines() or [""])[0][:200]  # one line, never a whole row
        log.error(
            "capture_failed",
            lsn=format_lsn(lsn),
            xid=txn and txn.xid,
            error=f"{type(exc).__name__}: {reason}",
        )
        return CaptureError(
            f"capture stopped {where}, transaction {txn.xid if txn else '?'}: {type(exc).__name__}: {reason}{hint}"
        )

    def _skip_requested(self, msg: Commit) -> None:
        """Pass by a transaction an operator asked to skip; the checkpoint moves past it and
        the skip is recorded with it, in the same commit of the sink."""
        assert self._skipping is not None
        self.sink.mark_skipped(msg.xid, format_lsn(msg.end_lsn), self._skipped_changes)
        log.warning(
            "transaction_skipped", xid=msg.xid, lsn=format_lsn(msg.end_lsn), changes=self._skipped_changes
        )
        self._skips.discard(msg.xid)
        self._skipping = None
        self._position = max(self._position, msg.end_lsn)

    # -- the mapping against the live schema ---------------------------------------------------

    def _read_schema(self) -> list[Problem]:
        self._recheck_at = 0.0
        tables = [self.mapping.parts(t) for t in self.mapping.tables]
        catalog, names = self.source.catalog(tables)
        self._catalog = catalog
        self._columns = {t: frozenset(r.columns) for t, r in catalog.items()}
        # the columns rules name that exist: an insert without one of them hints at DDL
        self._present = {t: self._referenced[t] & self._columns.get(t, frozenset()) for t in self._referenced}
        self._parents.clear()  # a table attached as a partition since: its parent from now on
        return check_mapping(self.mapping, catalog, names)

    def _report(self, problems: list[Problem]) -> None:
        """Log each new problem once as an error and each one gone once; the sink holds
        the current ones for /readyz, /metrics and `ct1-cdc slot status`."""
        now = {p.key: p for p in problems}
        for key, problem in now.items():
            if key not in self._problems:
                log.error(
                    "mapping_broken",
                    table=problem.table,
                    rule=problem.rule,
                    problem=problem.message,
                    fix=problem.fix,
                )
        for key, problem in self._problems.items():
            if key not in now:
                log.info("mapping_repaired", table=problem.table, rule=problem.rule, problem=problem.message)
        if now.keys() != self._problems.keys():
            self._problems_stored = False
        self._problems = now

    def _schema_hint(self, table: str, change: RowChange) -> None:
        """A change whose columns the catalog did not show (DDL since it was read): re-read
        it soon, so a rule broken by a rename or a drop is reported, not silent."""
        columns = self._columns.get(table)
        if columns is None:
            return
        if self._recheck_at:
            return
        if not columns.issuperset(change.new) or (
            change.op == "insert" and not change.new.keys() >= self._present[table]
        ):
            self._recheck_at = self.clock() + 1.0

    def _table(self, reported: str) -> str:
        if reported in self.mapping.by_table:
            return reported
        parent = self._parents.get(reported)
        if parent is None:
            parent = self.source.partition_parent(reported, self.mapping.by_table)
            self._parents[reported] = parent
        return parent

    def _row(self, table: str, change: RowChange) -> None:
        """One row change of ``table`` (a partition's changes: of its mapped parent)."""
        if table in self._cart_tables:
            assert self._carts is not None
            self._carts.change(table, change, self._txn_clock)
        rules = self.mapping.by_table.get(table)
        if not rules:
            return
        txn = self._in_txn
        if txn is None:  # wal2json always frames rows; be strict rather than guess
            raise SourceUnavailable("row change outside a transaction")
        if not change.pk and table not in self._warned_no_pk:
            self._warned_no_pk.add(table)
            log.warning("table_without_primary_key", table=table)
        if change.op != "delete" and table not in self._hinted:
            self._hinted.add(table)  # the first row of each table per transaction is enough
            self._schema_hint(table, change)
        shadow = None
        shadow_key = None
        if table in self._shadowed:
            watched = self.mapping.watched(table)
            key_col = rules[0].key
            row = change.new if change.op != "delete" else (change.old or {})
            if key_col in row:
                shadow_key = str(row[key_col])
                if change.op != "insert":
                    shadow = self.sink.shadow_get(table, shadow_key)
        add = self.sink.add
        drafts = apply(self.mapping, table, change, shadow)
        for draft in drafts:
            data = {
                "object": draft.object,
                "id": draft.entity_id,
                "record": draft.record,
                "previous": draft.previous,
            }
            add(
                draft.type,
                draft.object,
                draft.entity_id,
                data,
                txn.commit_time,
                table,
                draft.op,
                change.lsn,
                change.xid,
            )
            self.stats.events += 1
        if self._backfill.pending is not None:
            self._backfill.change(table, change, txn.xid, bool(drafts))
        if shadow_key is not None:
            if change.op == "delete":
                self.sink.shadow_delete(table, shadow_key)
            else:
                merged = dict(shadow or {})
                merged.update({c: change.new[c] for c in watched if c in change.new})
                self.sink.shadow_put(table, shadow_key, merged)

    def _truncate(self, msg: Truncate) -> None:
        """One TRUNCATE statement arrives as one message per relation (a partitioned
        table's partitions each, too), all at one LSN: gather them, one event per root."""
        if msg.lsn != self._truncate_lsn:
            self._flush_truncates()
        self._truncate_lsn = msg.lsn
        table = self._table(msg.table)
        if self._backfill.pending is not None and self._in_txn is not None:
            self._backfill.truncated(table, self._in_txn.xid)
        log.info("truncate_seen", table=table, lsn=format_lsn(msg.lsn), mapped=table in self.mapping.by_table)
        if self.mapping.truncates(table):
            self._truncated.setdefault(table, []).append(msg.table)

    def _flush_truncates(self) -> None:
        txn = self._in_txn
        truncated, self._truncated = self._truncated, {}
        if txn is None:
            return
        for table, relations in truncated.items():
            for draft in truncate_drafts(self.mapping, table, relations):
                data = {"object": draft.object, "id": None, "record": draft.record, "previous": None}
                self.sink.add(
                    draft.type,
                    draft.object,
                    None,
                    data,
                    txn.commit_time,
                    table,
                    "truncate",
                    format_lsn(self._truncate_lsn),
                    txn.xid,
                )
                self.stats.events += 1

    # -- derived events ----------------------------------------------------------------------

    def _advance(self, clock: float, lsn: int) -> None:
        """The stream's clock reads ``clock`` at ``lsn``: carts idle past their deadline
        fire now, in the group commit that holds this position."""
        assert self._carts is not None
        if clock <= self._stream_clock:
            return
        self._stream_clock = clock
        due = self._carts.due(clock)
        if not due:
            return  # nearly every transaction: nothing more to do
        rule = self._carts.rule
        at = unix_to_iso(clock)
        position = format_lsn(lsn)
        for abandoned in due:
            record = abandoned.record(unix_to_iso)
            data = {"object": "cart", "id": abandoned.cart.id, "record": record, "previous": None}
            self.sink.add(
                rule.emit, "cart", abandoned.cart.id, data, at, rule.carts, "derived", position, None
            )
            self.stats.events += 1
            self.stats.derived += 1

    # -- commit and feedback -----------------------------------------------------------------

    def _commit(self) -> None:
        """Commit the group in the sink; :meth:`_confirm` then reports it to Postgres."""
        events = self.sink.pending
        number = self.sink.commit(self.slot, self._position, wait=False)
        done, self._awaiting = self._awaiting, []
        self._committing.append((number, done, bool(events)))
        self._last_commit = self.clock()
        self._submitted = self._position
        self.stats.commits += 1
        self._after_durable()

    def _after_durable(self) -> None:
        """For each commit the sink has made durable: the results of the work that waited
        for it, and the readers woken (:attr:`on_commit`) if it held events."""
        if not self._committing:
            return
        durable = self.sink.commits_durable
        while self._committing and self._committing[0][0] <= durable:
            _, done, events = self._committing.popleft()
            for future, result in done:
                if not future.done():  # (a caller that gave up cancelled it)
                    future.set_result(result)
            if events and self.on_commit is not None:
                self.on_commit()

    def _confirm(self, *, reply: bool = False, force: bool = False) -> None:
        self._after_durable()
        durable = self.sink.durable_lsn
        target = max(durable, self._idle_lsn) if durable >= self._submitted else durable
        if target > self._confirmed or force:
            self._confirmed = max(self._confirmed, target)
            self.stats.confirmed_lsn = self._confirmed
            self.stats.last_event_id = self.sink.last_event_id
            self.frames.send_status(self._confirmed, self._confirmed, self._confirmed, reply=reply)

    def _recover(self, held: int, reason: str) -> None:
        """``on_slot_lost = "recover"``: a new slot, the gap and a backfill recorded in the
        commit that moves the checkpoint to its start; the next session reads from there."""
        start = slot_health.recover(
            self.source, self.sink, self.mapping, self.settings, self._shadowed, held, reason
        )
        self._confirmed = start
        self.stats.events += 1

    def _check_slot(self) -> None:
        status = slot_health.check(self.source, self.slot, self.settings.source.lag_warning_bytes)
        self.stats.lag_bytes = status["lag_bytes"]
        self.stats.wal_status = status["wal_status"]


def _epoch(iso: str) -> float:
    """A commit time as events write it (``...Z``) → Unix seconds."""
    return datetime.fromisoformat(iso).timestamp()


def _lsn_of(change: RowChange) -> int:
    """The change's own LSN, for an error message (0 where wal2json's text is not one)."""
    try:
        return parse_lsn(change.lsn)
    except DecodeError:
        return 0
