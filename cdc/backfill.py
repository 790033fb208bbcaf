"""Backfill: the rows a table already holds, as ``read`` events, read in chunks while the
stream goes on (the watermark method of Netflix's DBLog and Debezium's incremental
snapshots), without locks and without a long transaction on the source.

For each chunk, between two transactions of the stream, capture:

1. reads the next ``chunk_size`` rows by key in a short REPEATABLE READ transaction,
   whose snapshot S it notes, then commits a logical message, the chunk's *watermark*,
   in a transaction of its own, that comes back through the stream;
2. goes on with the stream.  A row change of the table by a transaction S does not see
   is newer than what the chunk read, so its row leaves the chunk (its own event carries
   the newer state; if the rules emit nothing for it, the row is read again with the
   next chunk);
3. when the watermark arrives, every transaction S sees has been streamed (a visible
   transaction's commit record precedes the watermark's, which was written after S), so
   the rows left go out as events there, with the job's progress in the same group commit.

Classifying by S's visibility rather than by WAL position matters: Postgres writes a
commit record slightly before the transaction becomes visible (longer with synchronous
replication), so a transaction can be streamed before the chunk and still be unseen by S.
A chunk whose snapshot does not see a transaction already streamed is read again a
moment later.  A chunk whose cut cannot be trusted (a TRUNCATE of a partition, too many
rows to read again) is read again whole.

So for every row, the last event of it is never older than the row: a chunk row never
overwrites a newer streamed change, and per-entity order holds (the chunk's events come
after every earlier event of the same entity in the outbox).
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from cdc.decode import RowChange
from cdc.mapping import Mapping, SnapshotRule
from cdc.ports import Sink, SourceDatabase
from common.errors import Ct1Error
from common.jsontext import dumps, loads
from common.snapshot import XID_SPACE, Snapshot

log = structlog.get_logger("ct1_cdc.backfill")

WATERMARK_PREFIX = "ct1-cdc.watermark"
RECENT_XIDS = 100_000  # streamed transactions remembered, for the commit-visibility race
REREAD_MAX = 10_000  # keys waiting to be read again, at most, per chunk
JOB_POLL_SECONDS = 1.0  # how often capture looks for new, cancelled or stopped jobs
RETRY_SECONDS = 0.05  # a chunk whose snapshot raced a streamed commit is read again after this
BUSY_SECONDS = 5.0  # a chunk that waited on a lock is tried again after this

Key = tuple[str, ...]


class BackfillError(Ct1Error):
    """A job cannot go on (no key to read by, a bad condition, a query past its timeout):
    the job fails with this message; capture goes on."""


class BackfillBusy(Ct1Error):
    """The chunk could not be read just now (a lock held by DDL): try it again later."""


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
    passed: int
    reread: dict[Key, list[Any]] = field(default_factory=dict)
    spoiled: str | None = None  # why the cut cannot be trusted: read the chunk again


def key_of(values: dict[str, Any], keys: list[str]) -> Key | None:
    """A row's key as compared across the chunk and the stream (text of each value)."""
    try:
        return tuple(str(values[k]) for k in keys)
    except KeyError:
        return None


def condition_problem(condition: str) -> str | None:
    """Why ``condition`` (``backfill --where``) is not one SQL expression, or None: outside
    quotes it may hold no ``;``, no comment and no unbalanced parenthesis, so it cannot end
    the expression it is placed in.  Dollar quoting is refused (use '...')."""
    if not condition.strip():
        return "it is empty"
    depth, i, n = 0, 0, len(condition)
    while i < n:
        c = condition[i]
        if c in "'\"":
            escapes = c == "'" and i > 0 and condition[i - 1] in "eE"
            i += 1
            while i < n:
                if escapes and condition[i] == "\\":
                    i += 2
                    continue
                if condition[i] == c:
                    if i + 1 < n and condition[i + 1] == c:  # '' or "" inside
                        i += 2
                        continue
                    break
                i += 1
            else:
                return "a quote is not closed"
        elif c == ";":
            return "it holds a ';'"
        elif condition.startswith(("--", "/*"), i):
            return "it holds a comment"
        elif c == "$":
            return "it holds a '$' (dollar quoting or parameters)"
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return "a ')' closes what it did not open"
        i += 1
    return "a '(' is not closed" if depth else None


class Backfiller:
    """The backfill side of capture's loop, given capture's sink and source."""

    def __init__(
        self,
        mapping: Mapping,
        sink: Sink,
        source: SourceDatabase,
        *,
        chunk_size: int,
        clock: Callable[[], float],
        labels: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.mapping = mapping
        self.sink = sink
        self.source = source
        self.chunk_size = chunk_size
        self.clock = clock
        self.labels = labels
        self.pending: Chunk | None = None
        self.next_at = 0.0  # when :meth:`step` has something to do next
        self._jobs: list[dict[str, Any]] = []
        self._jobs_read = -1e18
        self._keys: dict[str, list[tuple[str, str]]] = {}
        self._recent: dict[int, None] = {}
        self._newest: int | None = None  # the newest xid streamed (by xid order, modulo 2^32)
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
        newest = self._newest
        if newest is None or 0 < (xid - newest) % XID_SPACE < XID_SPACE // 2:
            self._newest = xid

    def change(self, table: str, change: RowChange, xid: int, emitted: bool) -> None:
        """A row change of a mapped table; ``emitted``: whether the rules made an event of
        it (a change capture passed by, ``slot skip``, made none)."""
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
                if len(chunk.reread) >= REREAD_MAX:
                    chunk.spoiled = f"more than {REREAD_MAX} rows changed to read again"
                chunk.reread[key] = [values[k] for k in chunk.keys]

    def truncated(self, table: str, xid: int) -> None:
        """A TRUNCATE of ``table`` (or of one of its partitions: which rows it took is not
        known here) by a transaction the chunk did not see: read the chunk again."""
        chunk = self.pending
        if chunk is not None and chunk.rule.table == table and not chunk.snapshot.sees(xid):
            chunk.spoiled = "a TRUNCATE the chunk did not see"

    def watermark(self, content: str, lsn: str) -> bool:
        """A watermark came back; True when it was the pending chunk's and its rows went
        to the sink at ``lsn`` with the job's progress (capture commits them together).
        A spoiled chunk sends nothing and is read again."""
        chunk = self.pending
        if chunk is None or content != chunk.label:
            return False  # an older one, replayed after a restart
        self.pending = None
        now = self.clock()
        if chunk.spoiled is not None:
            log.info(
                "backfill_chunk_again", job=chunk.job["id"], table=chunk.rule.table, reason=chunk.spoiled
            )
            self.next_at = now
            return True
        rule, job = chunk.rule, chunk.job
        add = self.sink.add
        events = 0
        # the chunk's name: its job and where it starts (the same when it is read again)
        # (as its progress is stored: JSON read back, whatever types the read gave)
        name = f"bf{job['id']}:{dumps(loads(dumps(job['after']))).decode()}"
        for row in chunk.rows.values():
            draft = rule.draft(row)
            if draft is None:
                continue
            data = {"object": draft.object, "id": draft.entity_id, "record": draft.record, "previous": None}
            add(
                draft.type, draft.object, draft.entity_id, data, chunk.at, rule.table, "read", lsn, None, name
            )
            events += 1
        reread = list(chunk.reread.values())
        done = not chunk.full and not reread
        job["rows_done"] += chunk.read
        job["events"] += events
        job["reread"] = reread
        if chunk.after is not None:
            job["after"] = chunk.after
        job["state"] = "done" if done else "running"
        # the jobs read again while the chunk waited are older than this: this one counts
        self._jobs = [job if j["id"] == job["id"] else j for j in self._jobs]
        self.sink.backfill_update(
            job["id"],
            state=job["state"],
            after=chunk.after,
            reread=reread,
            rows=job["rows_done"],
            events=job["events"],
        )
        rate = float(job.get("rate") or 0)
        self._throttle_until = now + (chunk.read / rate if rate > 0 else 0.0)
        self.next_at = now
        if done:
            self._jobs = [j for j in self._jobs if j["id"] != job["id"]]
            log.info(
                "backfill_done", job=job["id"], table=rule.table, rows=job["rows_done"], events=job["events"]
            )
        return True

    # -- between transactions --------------------------------------------------------------------

    def step(self, position: int) -> None:
        """Start the next chunk if one is due (capture calls it between transactions;
        ``position``: the end of the last transaction it has streamed)."""
        now = self.clock()
        self.next_at = now + JOB_POLL_SECONDS
        if now - self._jobs_read >= JOB_POLL_SECONDS:
            self._jobs = self.sink.backfills()
            self._jobs_read = now
            if self.pending is not None and not any(j["id"] == self.pending.job["id"] for j in self._jobs):
                self.pending = None  # cancelled meanwhile: its rows are not sent
        if self.pending is not None:
            if position >= self.pending.passed:  # streamed past its commit without it
                log.warning("backfill_watermark_lost", job=self.pending.job["id"], label=self.pending.label)
                self.pending = None
            else:
                return
        job = self._next_job()
        if job is None:
            return
        if now < self._throttle_until:  # --rate: the next chunk waits; jobs are still watched
            self.next_at = min(self.next_at, self._throttle_until)
            return
        rule = self.mapping.snapshots[job["table"]]
        keys = self._keys[job["table"]]
        rate = float(job.get("rate") or 0)
        limit = min(self.chunk_size, max(1, math.ceil(rate))) if rate > 0 else self.chunk_size
        label = f"{job['id']}:{self.labels()}"
        try:
            read = self.source.read_chunk(
                rule.table, keys, job["after"], job["condition"], limit, job["reread"], label
            )
        except BackfillBusy as exc:
            log.info("backfill_busy", job=job["id"], table=rule.table, reason=str(exc))
            self.next_at = now + BUSY_SECONDS
            return
        except BackfillError as exc:
            self._fail(job, str(exc))
            return
        snapshot = Snapshot.parse(read.snapshot)
        newest = self._newest
        if any(x in self._recent for x in snapshot.xip) or (newest is not None and not snapshot.sees(newest)):
            # a transaction already streamed was not yet visible to this snapshot: read again
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
            full=len(read.rows) >= limit,
            passed=read.passed,
        )

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
            raise BackfillError(no_key(table))
        return keys

    def _fail(self, job: dict[str, Any], error: str) -> None:
        self.sink.backfill_update(job["id"], state="failed", error=error)
        log.error("backfill_failed", job=job["id"], table=job["table"], error=error)
        self._jobs = [j for j in self._jobs if j["id"] != job["id"]]
        self.next_at = self.clock()


def no_key(table: str) -> str:
    return (
        f"{table} has no primary key (nor a replica identity index): backfill reads in key order; "
        "add a primary key"
    )
