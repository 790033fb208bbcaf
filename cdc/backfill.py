"""Backfill: the rows a table already holds, as ``read`` events, read in chunks while the
stream goes on (the watermark method of Netflix's DBLog and Debezium's incremental
snapshots), without locks and without a long transaction on the source.

For each chunk, between two transactions of the stream, capture:

1. reads the next ``chunk_size`` rows by primary key in a short REPEATABLE READ
   transaction, whose snapshot S it notes (``pg_current_snapshot()``), then emits a
   logical message, the chunk's *watermark*, that comes back through the stream;
2. goes on with the stream.  A row change of the table by a transaction S does not see
   is newer than what the chunk read, so its row leaves the chunk (its own event carries
   the newer state; if the rules emit nothing for it, the row is read again with the
   next chunk);
3. when the watermark arrives, every transaction S sees has been streamed (a visible
   transaction's commit record precedes the watermark, which was written after S), so the
   rows left go out as events there, with the job's progress in the same group commit.

Classifying by S's visibility rather than by WAL position matters: Postgres writes a
commit record slightly before the transaction becomes visible, so a transaction can be
streamed before the chunk and still be unseen by S.  Such a chunk is read again a moment
later (its snapshot's running transactions include one already streamed).

So for every row, the last event of it is never older than the row: a chunk row never
overwrites a newer streamed change, and per-entity order holds (the chunk's events come
after every earlier event of the same entity in the outbox).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from cdc.decode import RowChange
from cdc.mapping import Mapping, SnapshotRule
from common.errors import Ct1Error
from common.snapshot import Snapshot

log = structlog.get_logger("ct1_cdc.backfill")

WATERMARK_PREFIX = "ct1-cdc.watermark"
RECENT_XIDS = 100_000  # streamed transactions remembered, for the commit-visibility race
REREAD_MAX = 10_000  # keys waiting to be read again, at most, per job
JOB_POLL_SECONDS = 1.0  # how often capture looks for new, cancelled or stopped jobs
RETRY_SECONDS = 0.05  # a chunk whose snapshot raced a streamed commit is read again after this
# A watermark always comes back within its session (a lost connection ends the session and
# the chunk with it); one not back after this long is given up and its chunk read again.
WATERMARK_WAIT = 600.0

Key = tuple[str, ...]


class BackfillError(Ct1Error):
    """A job cannot go on (no key to read by, a bad condition, a query past its timeout):
    the job fails with this message; capture goes on."""


class ChunkRead(NamedTuple):
    """What the source read for one chunk."""

    snapshot: str  # pg_current_snapshot() of the chunk's transaction
    at: str  # its time, ISO 8601 UTC (the events' timestamp)
    rows: list[dict[str, Any]]  # by key order, at most the limit
    rereads: list[dict[str, Any]]  # the rows of the keys asked again
    watermark: int  # the LSN of the watermark message


@dataclass
class Chunk:
    job: dict[str, Any]
    rule: SnapshotRule
    keys: list[str]
    snapshot: Snapshot
    at: str
    label: str
    rows: OrderedDict[Key, dict[str, Any]]
    read: int  # rows the keyset read (re-reads not counted)
    after: list[Any] | None
    full: bool  # the keyset read a whole chunk: more may follow
    reread: dict[Key, list[Any]] = field(default_factory=dict)
    started: float = 0.0


def key_of(values: dict[str, Any], keys: list[str]) -> Key | None:
    """A row's key as compared across the chunk and the stream (text of each value)."""
    try:
        return tuple(str(values[k]) for k in keys)
    except KeyError:
        return None


class Backfiller:
    """The backfill side of capture's loop, given capture's sink and source."""

    def __init__(
        self,
        mapping: Mapping,
        sink: Any,
        source: Any,
        *,
        chunk_size: int,
        clock: Callable[[], float],
    ) -> None:
        self.mapping = mapping
        self.sink = sink
        self.source = source
        self.chunk_size = chunk_size
        self.clock = clock
        self.pending: Chunk | None = None
        self.next_at = 0.0  # when :meth:`step` has something to do next
        self._jobs: list[dict[str, Any]] = []
        self._jobs_read = -1e18
        self._keys: dict[str, list[tuple[str, str]]] = {}
        self._recent: dict[int, None] = {}
        self._throttle_until = 0.0

    def forget(self) -> None:
        """A new session: what was not committed is gone (a rollback undid it)."""
        self.pending = None
        self._jobs_read = -1e18
        self.next_at = 0.0

    # -- from the stream -------------------------------------------------------------------------

    def committed(self, xid: int) -> None:
        """A transaction was streamed (or passed by): remember its xid a while."""
        recent = self._recent
        recent[xid] = None
        if len(recent) > 2 * RECENT_XIDS:  # keep the newest half (dicts keep insertion order)
            self._recent = dict.fromkeys(list(recent)[RECENT_XIDS:])

    def change(self, table: str, change: RowChange, xid: int, emitted: bool) -> None:
        """A row change of a mapped table; ``emitted``: whether the rules made an event
        of it."""
        chunk = self.pending
        if chunk is None or chunk.rule.table != table or chunk.snapshot.sees(xid):
            return
        for values in (change.old, change.new):
            if not values:
                continue
            key = key_of(values, chunk.keys)
            if key is None:
                continue
            chunk.rows.pop(key, None)
            if not emitted and change.op != "delete" and values is change.new:
                if len(chunk.reread) < REREAD_MAX:
                    chunk.reread[key] = [values[k] for k in chunk.keys]
                else:
                    log.warning("backfill_reread_full", table=table, job=chunk.job["id"])

    def truncated(self, table: str, xid: int) -> None:
        chunk = self.pending
        if chunk is not None and chunk.rule.table == table and not chunk.snapshot.sees(xid):
            chunk.rows.clear()

    def watermark(self, content: str, lsn: str) -> bool:
        """A watermark came back; True when it was the pending chunk's and its rows went
        to the sink (with the job's progress: capture commits them together)."""
        chunk = self.pending
        if chunk is None or content != chunk.label:
            return False  # an older one, replayed after a restart
        self.pending = None
        rule, job = chunk.rule, chunk.job
        add = self.sink.add
        events = 0
        for row in chunk.rows.values():
            draft = rule.draft(row)
            if draft is None:
                continue
            data = {"object": draft.object, "id": draft.entity_id, "record": draft.record, "previous": None}
            add(draft.type, draft.object, draft.entity_id, data, chunk.at, rule.table, "read", lsn, None)
            events += 1
        reread = [v for v in chunk.reread.values()]
        done = not chunk.full and not reread
        job["rows_done"] += chunk.read
        job["events"] += events
        job["reread"] = reread
        if chunk.after is not None:
            job["after"] = chunk.after
        job["state"] = "done" if done else "running"
        self.sink.backfill_update(
            job["id"],
            state=job["state"],
            after=chunk.after,
            reread=reread,
            rows=job["rows_done"],
            events=job["events"],
        )
        now = self.clock()
        rate = float(job.get("rate") or 0)
        self.next_at = now + (chunk.read / rate if rate > 0 else 0.0)
        if done:
            self._jobs = [j for j in self._jobs if j["id"] != job["id"]]
            log.info(
                "backfill_done", job=job["id"], table=rule.table, rows=job["rows_done"], events=job["events"]
            )
        return True

    # -- between transactions --------------------------------------------------------------------

    def step(self) -> None:
        """Start the next chunk if one is due (capture calls it between transactions)."""
        now = self.clock()
        if self.pending is not None:
            if now - self.pending.started < WATERMARK_WAIT:
                self.next_at = now + JOB_POLL_SECONDS
                return
            log.warning("backfill_watermark_lost", job=self.pending.job["id"], label=self.pending.label)
            self.pending = None
        if now - self._jobs_read >= JOB_POLL_SECONDS:
            self._jobs = self.sink.backfills()
            self._jobs_read = now
        job = self._next_job()
        if job is None:
            self.next_at = now + JOB_POLL_SECONDS
            return
        rule = self.mapping.snapshots[job["table"]]
        keys = self._keys[job["table"]]
        label = f"{job['id']}:{uuid.uuid4().hex}"
        try:
            read = self.source.read_chunk(
                rule.table, keys, job["after"], job["condition"], self.chunk_size, job["reread"], label
            )
        except BackfillError as exc:
            self._fail(job, str(exc))
            return
        snapshot = Snapshot.parse(read.snapshot)
        if any(x in self._recent for x in snapshot.xip):
            # a transaction we streamed was not yet visible to this snapshot: read again
            self.next_at = now + RETRY_SECONDS
            return
        names = [k for k, _ in keys]
        rows: OrderedDict[Key, dict[str, Any]] = OrderedDict()
        for row in (*read.rereads, *read.rows):
            key = key_of(row, names)
            if key is not None:
                rows[key] = row
        self.pending = Chunk(
            job=job,
            rule=rule,
            keys=names,
            snapshot=snapshot,
            at=read.at,
            label=label,
            rows=rows,
            read=len(read.rows),
            after=[read.rows[-1][k] for k in names] if read.rows else None,
            full=len(read.rows) >= self.chunk_size,
            started=now,
        )
        self.next_at = now + JOB_POLL_SECONDS

    def _next_job(self) -> dict[str, Any] | None:
        """The oldest active job, started (counted, checked) if it was only queued; a job
        asked to stop is cancelled here."""
        while self._jobs:
            job = self._jobs[0]
            if job.get("cancel_requested_at"):
                self.sink.backfill_update(job["id"], state="cancelled")
                log.info("backfill_cancelled", job=job["id"], table=job["table"], rows=job["rows_done"])
                self._jobs.pop(0)
                continue
            try:
                if job["table"] not in self._keys:
                    self._keys[job["table"]] = self._key_columns(job["table"])
                if job["state"] == "queued":
                    total = self.source.count_rows(
                        self.mapping.snapshots[job["table"]].table, job["condition"]
                    )
                    self.sink.backfill_update(job["id"], state="running", total=total)
                    job["state"], job["total"] = "running", total
                    log.info("backfill_started", job=job["id"], table=job["table"], total=total)
            except BackfillError as exc:
                self._fail(job, str(exc))
                continue
            return job
        return None

    def _key_columns(self, table: str) -> list[tuple[str, str]]:
        rule = self.mapping.snapshots.get(table)
        if rule is None:
            raise BackfillError(
                f"{table} is not a table the mapping snapshots (no insert, update or delete rule, "
                "or [[snapshot]] enabled = false)"
            )
        keys: list[tuple[str, str]] = self.source.key_columns(*self.mapping.parts(table))
        if not keys:
            raise BackfillError(
                f"{table} has no primary key (nor a replica identity index): backfill reads in key order; "
                "add a primary key"
            )
        return keys

    def _fail(self, job: dict[str, Any], error: str) -> None:
        self.sink.backfill_update(job["id"], state="failed", error=error)
        log.error("backfill_failed", job=job["id"], table=job["table"], error=error)
        self._jobs = [j for j in self._jobs if j["id"] != job["id"]]
        self.next_at = self.clock()
