"""Fakes of capture's adapters (cdc/ports.py), for driving the capture loop without
Postgres or SQLite: a recorded stream served as a logical slot serves it, the source
database beside it, a sink in memory, and a clock that moves only when told.

The memory sink passes the same contract tests as the outbox writer
(tests/sink_contract.py), so what the loop tests show of it holds of the real one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdc import decode as decoding
from cdc.decode import Begin, Commit, RowChange, decode
from cdc.mapping import Mapping
from cdc.ports import ChunkRead
from cdc.schema import Relation
from cdc.source import Check
from cdc.stream import Frame, Keepalive, Read, XLogData
from common.errors import DecodeError, SourceUnavailable
from common.formats import format_lsn
from outbox.state import MemoryState

COMMIT_TIME = "2026-11-25 15:07:53.877066+00"  # as wal2json prints it in a UTC session


class FakeClock:
    """Monotonic seconds that move only when the fakes say time passes."""

    def __init__(self, now: float = 1024.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- a recorded stream ----------------------------------------------------------------------


@dataclass
class Txn:
    xid: int
    end: int  # the commit's end LSN: where a consumer resumes after it
    rows: int


@dataclass
class _Unit:
    """One thing the server sends, with the position past which it is sent again."""

    frame: Frame | None
    end: int
    marker: str | None = None  # "pause": read() times out once; "disconnect": the connection drops once


def _column(name: str, value: Any) -> dict[str, Any]:
    kind = "boolean" if isinstance(value, bool) else "bigint" if isinstance(value, int) else "text"
    return {"name": name, "type": kind, "value": value}


class Wal:
    """The server's WAL as a logical slot decodes it: wal2json format-version 2 messages in
    XLogData frames at increasing LSNs, keepalives, and the pauses and dropped connections
    a real stream has."""

    def __init__(self, lsn: int = 0x1_000_000, xid: int = 700) -> None:
        self.lsn = lsn  # the server's current position
        self.units: list[_Unit] = []
        self._xid = xid

    def _message(self, obj: dict[str, Any], end: int) -> None:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        lsn = self.lsn
        self.units.append(_Unit(XLogData(lsn, lsn, memoryview(payload)), end))

    def transaction(
        self,
        *rows: tuple[str, str, dict[str, Any]],
        xid: int | None = None,
        between: Callable[[int], None] | None = None,
        commit_time: str = COMMIT_TIME,
    ) -> Txn:
        """One source transaction of ``(op, table, columns)`` rows; ``between(i)`` runs
        before row ``i`` (e.g. to put a keepalive or a dropped connection there)."""
        if xid is None:
            self._xid += 1
            xid = self._xid
        commit_lsn = self.lsn + 0x28 * (len(rows) + 1)
        end = commit_lsn + 0x30
        frame = {
            "xid": xid,
            "timestamp": commit_time,
            "lsn": format_lsn(commit_lsn),
            "nextlsn": format_lsn(end),
        }
        self._message({"action": "B", **frame}, end)
        for i, (op, table, columns) in enumerate(rows):
            if between is not None:
                between(i)
            self.lsn += 0x28
            schema, name = table.split(".")
            self._message(
                {
                    "action": {"insert": "I", "update": "U", "delete": "D"}[op],
                    "xid": xid,
                    "timestamp": commit_time,
                    "lsn": format_lsn(self.lsn),
                    "schema": schema,
                    "table": name,
                    "columns": [_column(k, v) for k, v in columns.items()],
                    "pk": [{"name": "id", "type": "bigint"}],
                },
                end,
            )
        self.lsn = commit_lsn
        self._message({"action": "C", **frame}, end)
        self.lsn = end
        return Txn(xid, end, len(rows))

    def garbage(self, end: int) -> None:
        """A message no decoder understands, sent again until ``end`` is confirmed."""
        self.units.append(_Unit(XLogData(self.lsn, self.lsn, memoryview(b'{"action":"I","xid":')), end))

    def keepalive(self, *, reply: bool = False) -> int:
        self.units.append(_Unit(Keepalive(self.lsn, reply), self.lsn))
        return self.lsn

    def heartbeat(self, content: str = "heartbeat") -> int:
        """Capture's own heartbeat (``pg_logical_emit_message(false, 'ct1-cdc', ...)``),
        e.g. ``"heartbeat 1764083273.5"`` with the server's time."""
        self.lsn += 0x38
        message = {"action": "M", "transactional": False, "prefix": "ct1-cdc", "content": content}
        self._message({**message, "lsn": format_lsn(self.lsn)}, self.lsn)
        return self.lsn

    def _one(self, body: dict[str, Any], xid: int | None) -> Txn:
        """A transaction holding one message ``body`` (no row change)."""
        if xid is None:
            self._xid += 1
            xid = self._xid
        commit_lsn = self.lsn + 0x50
        end = commit_lsn + 0x30
        frame = {
            "xid": xid,
            "timestamp": COMMIT_TIME,
            "lsn": format_lsn(commit_lsn),
            "nextlsn": format_lsn(end),
        }
        self._message({"action": "B", **frame}, end)
        self.lsn += 0x28
        self._message({**body, "xid": xid, "lsn": format_lsn(self.lsn)}, end)
        self.lsn = commit_lsn
        self._message({"action": "C", **frame}, end)
        self.lsn = end
        return Txn(xid, end, 0)

    def truncate(self, table: str, xid: int) -> Txn:
        """A transaction holding one TRUNCATE of ``table``."""
        schema, name = table.split(".")
        return self._one({"action": "T", "schema": schema, "table": name}, xid)

    def watermark(self, label: str, xid: int | None = None) -> Txn:
        """A backfill chunk's watermark: a transaction holding one transactional logical
        message (``pg_logical_emit_message(true, 'ct1-cdc.watermark', label)``)."""
        message = {"action": "M", "transactional": True, "prefix": "ct1-cdc.watermark", "content": label}
        return self._one(message, xid)

    def pause(self) -> None:
        self.units.append(_Unit(None, 0, "pause"))

    def disconnect(self) -> None:
        self.units.append(_Unit(None, 0, "disconnect"))


@dataclass
class Status:
    flush: int
    reply: bool


def _decoded(frame: Frame) -> RowChange | Begin | Commit | None:
    """What the native reader hands over decoded: what the compiled decoder takes (row
    changes and transactions' edges); the rest comes as the frame, which capture decodes
    in Python.  (Without the compiled decoder, as it would be.)"""
    if not isinstance(frame, XLogData):
        return None
    if decoding._compiled is not None:
        try:
            msg = decoding._compiled.decode_row(frame.payload)
        except ValueError:
            return None
    else:
        try:
            msg = decode(frame.payload)
        except DecodeError:  # (capture decodes it again, and names the fault)
            return None
    return msg if isinstance(msg, (RowChange, Begin, Commit)) else None


class FakeSlot:
    """A logical slot serving a :class:`Wal` (a :class:`cdc.ports.FrameSource`).

    Each session sends everything the slot has not had confirmed, whatever position
    :meth:`start` names: the worst case, a server that sends again what a crash kept from
    being confirmed.  When the WAL is exhausted it calls ``at_end`` (stop capture).
    ``per_frame`` seconds pass on ``clock`` with each frame; a pause lets ``timeout`` pass.
    ``witness(flush)`` runs at every status update, before the slot believes it.
    """

    def __init__(
        self,
        wal: Wal,
        clock: FakeClock,
        *,
        per_frame: float = 0.0,
        witness: Callable[[int], None] | None = None,
    ) -> None:
        self.wal = wal
        self.clock = clock
        self.per_frame = per_frame
        self.witness = witness
        self.at_end: Callable[[], None] = lambda: None
        self.confirmed = 0  # the slot's confirmed_flush_lsn
        self.starts: list[int] = []  # the position each session asked for
        self.statuses: list[Status] = []
        self._fired: set[int] = set()  # markers that happened already
        self._queue: list[tuple[int, _Unit]] = []
        self._idle_reads = 0
        self._open = False

    def start(self, lsn: int) -> None:
        assert not self._open, "a session started twice"
        self.starts.append(lsn)
        self._open = True
        self._queue = [
            (i, unit)
            for i, unit in enumerate(self.wal.units)
            if (unit.marker is not None and i not in self._fired)
            or (unit.marker is None and unit.end > self.confirmed)
        ]
        self._queue.reverse()
        self._known = len(self.wal.units)

    reads = "fake"
    batch = 64  # row changes a read_many gives at most (1: a frame a call, undecoded)

    def read_many(self, timeout: float) -> list[Read]:
        """As the native reader batches: row changes, begins and commits decoded, up to a
        commit or a frame that is none of those (which comes last, as a frame) or to what
        is buffered (here: the next marker)."""
        frame = self.read(timeout)
        if self.batch <= 1:  # psycopg's path: a frame a read, which capture decodes
            return [] if frame is None else [frame]
        items: list[Read] = []
        while frame is not None:
            msg = _decoded(frame)
            if msg is None:
                items.append(frame)
                break
            items.append(msg)
            if isinstance(msg, Commit) or len(items) >= self.batch:
                break
            if not self._queue or self._queue[-1][1].marker is not None:
                break
            frame = self.read(0)
        return items

    def read(self, timeout: float) -> Frame | None:
        assert self._open, "read outside a session"
        if not self._queue and len(self.wal.units) > self._known:  # written while streaming
            self._queue = [(i, u) for i, u in enumerate(self.wal.units) if i >= self._known][::-1]
            self._known = len(self.wal.units)
        if not self._queue:
            self._idle_reads += 1
            assert self._idle_reads < 1000, "capture did not stop at the end of the stream"
            self.at_end()
            return None
        i, unit = self._queue.pop()
        if unit.marker is not None:
            self._fired.add(i)
            if unit.marker == "disconnect":
                raise SourceUnavailable("replication connection lost (fake)")
            self.clock.advance(timeout)
            return None
        self.clock.advance(self.per_frame)
        return unit.frame

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        assert self._open, "status outside a session"
        if self.witness is not None:
            self.witness(flush)
        self.statuses.append(Status(flush, reply))
        self.confirmed = max(self.confirmed, flush)

    def close(self) -> None:
        self._open = False

    def emit_heartbeat(self) -> None:
        """What Postgres does with capture's heartbeat: decode it and send it next."""
        self.wal.heartbeat()
        self._queue.append((len(self.wal.units) - 1, self.wal.units[-1]))  # the next one read


class FakeSource:
    """The source database beside the stream (a :class:`cdc.ports.SourceDatabase`):
    ``tables`` are its tables with their columns, each with a primary key."""

    def __init__(
        self,
        tables: dict[str, tuple[str, ...]],
        *,
        reachable: bool = True,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.tables = tables
        self.reachable = reachable
        self.on_heartbeat = on_heartbeat
        self.sessions = 0
        self.heartbeats = 0
        self.slot_created = False
        self.lost_once = False  # the next slot check finds the slot invalidated
        # backfill: each table's rows (by "id"), the snapshot a chunk reads at, and what
        # happens when a chunk was read (a test writes its watermark, and what raced it)
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.snapshot = "100000:100000:"  # sees every transaction a test streams
        self.passed = 1 << 62  # a position past a chunk's watermark (the stream never gets there)
        self.on_chunk: Callable[[str], None] | None = None
        self.chunks: list[tuple[str, list[Any] | None, int]] = []  # (table, after, rows) read

    def open(self) -> None:
        if not self.reachable:
            raise SourceUnavailable("cannot connect to the source (fake): check source.dsn / CT1_SOURCE__DSN")
        self.sessions += 1

    def close(self) -> None:
        pass

    def checks(self) -> list[Check]:
        return [Check("wal_level", True, "wal_level = logical")]

    def catalog(self, tables: list[tuple[str, str]]) -> tuple[dict[str, Relation], list[str]]:
        catalog = {
            f"{schema}.{name}": Relation(schema, name, "r", "d", True, False, self.tables[f"{schema}.{name}"])
            for schema, name in tables
            if f"{schema}.{name}" in self.tables
        }
        return catalog, sorted(self.tables)

    def partition_parent(self, table: str, mapped: Container[str]) -> str:
        return table

    def ensure_slot(self, mapping: Mapping, sink: Any, shadowed: set[str]) -> bool:
        created, self.slot_created = not self.slot_created, True
        return created

    def drop_slot(self) -> bool:
        dropped, self.slot_created = self.slot_created, False
        return dropped

    def heartbeat(self) -> None:
        self.heartbeats += 1
        if self.on_heartbeat is not None:
            self.on_heartbeat()

    def slot_status(self) -> dict[str, Any] | None:
        status = "lost" if self.lost_once else "reserved"  # (a test's: invalidated, once)
        self.lost_once = False
        return {"lag_bytes": 0, "confirmed_flush_lsn": "0/0", "wal_status": status, "safe_wal_size": None}

    def key_columns(self, schema: str, name: str) -> list[tuple[str, str]]:
        return [("id", "bigint")] if f"{schema}.{name}" in self.tables else []

    def count_rows(self, table: str, condition: str | None) -> int | None:
        return len(self.rows.get(table, []))

    def read_chunk(
        self,
        table: str,
        keys: list[tuple[str, str]],
        after: list[Any] | None,
        condition: str | None,
        limit: int,
        reread: list[list[Any]],
        label: str,
    ) -> ChunkRead:
        ordered = sorted(self.rows.get(table, []), key=lambda r: r["id"])
        rows = [dict(r) for r in ordered if after is None or r["id"] > after[0]][:limit]
        again = [dict(r) for r in ordered if [r["id"]] in reread]
        self.chunks.append((table, after, len(rows)))
        if self.on_chunk is not None:
            self.on_chunk(label)
        return ChunkRead(self.snapshot, "2026-11-25T14:00:00.000000Z", rows, again, self.passed)


# -- a sink in memory -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredEvent:
    id: int
    type: str
    object: str
    entity_id: str | None
    data: dict[str, Any]
    occurred_at: str
    table: str | None
    op: str | None
    lsn: str | None
    xid: int | None


@dataclass(frozen=True)
class StoredCommit:
    slot: str
    lsn: int
    events: int
    skipped: tuple[int, ...]


@dataclass
class MemoryOutbox:
    """What a :class:`MemorySink` made durable; it outlives the sink as a file outlives
    its writer, so a new sink on it is capture after a restart."""

    events: list[StoredEvent] = field(default_factory=list)
    checkpoints: dict[str, int] = field(default_factory=dict)
    shadow: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    skips: dict[int, tuple[str, int] | None] = field(
        default_factory=dict
    )  # xid -> (lsn, changes) once skipped
    problems: list[dict[str, Any]] = field(default_factory=list)
    commits: list[StoredCommit] = field(default_factory=list)
    state: dict[tuple[str, str], Any] = field(default_factory=dict)  # derived state, as committed
    backfills: list[dict[str, Any]] = field(default_factory=list)  # backfill jobs, as committed

    def request_backfill(self, *tables: str, rate: float = 0.0) -> None:
        first = len(self.backfills) + 1
        for n, table in enumerate(tables):
            self.backfills.append(
                {
                    "id": first + n,
                    "request": first,
                    "table": table,
                    "condition": None,
                    "rate": rate,
                    "reason": "cli",
                    "state": "queued",
                    "after": None,
                    "reread": [],
                    "rows_done": 0,
                    "events": 0,
                    "total": None,
                    "error": None,
                    "cancel_requested_at": None,
                }
            )

    def request_skip(self, xid: int) -> None:
        self.skips.setdefault(xid, None)

    def xids(self) -> list[int | None]:
        return [e.xid for e in self.events]


def _applied(jobs: list[dict[str, Any]], changes: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Backfill jobs with a commit's changes applied (job 0: a request)."""
    renamed = {"rows": "rows_done"}
    for job, progress in changes:
        if job == 0:
            for stored in jobs:
                if stored["state"] in ("queued", "running"):
                    stored["state"] = "cancelled"
            holder = MemoryOutbox(backfills=jobs)
            holder.request_backfill(*progress["tables"])
            continue
        stored = next(j for j in jobs if j["id"] == job)
        stored.update({renamed.get(k, k): v for k, v in progress.items() if v is not None})
    return jobs


class MemorySink:
    """The outbox writer's contract in memory (a :class:`cdc.ports.Sink`).  With
    ``fail_commits``, every commit raises it and changes nothing, as a full disk would."""

    def __init__(
        self, outbox: MemoryOutbox | None = None, *, fail_commits: BaseException | None = None
    ) -> None:
        self.outbox = outbox if outbox is not None else MemoryOutbox()
        self.fail_commits = fail_commits
        self.durable_lsn = 0
        self.commits_durable = 0
        self.last_event_id = self.outbox.events[-1].id if self.outbox.events else 0
        self._events: list[tuple[Any, ...]] = []
        self._shadow: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._skipped: dict[int, tuple[str, int]] = {}
        self._backfills: list[tuple[int, dict[str, Any]]] = []  # (job, progress) of this commit
        self.state = MemoryState()  # derived state: what the outbox holds, plus this commit's changes
        self.state.rows = dict(self.outbox.state)

    @property
    def pending(self) -> int:
        return len(self._events)

    @property
    def in_transaction(self) -> bool:
        return bool(
            self._events
            or self._shadow
            or self._skipped
            or self._backfills
            or self.state.rows != self.outbox.state
        )

    def add(
        self,
        type: str,
        object: str,
        entity_id: Any,
        data: dict[str, Any],
        occurred_at: str,
        table: str | None,
        op: str | None,
        lsn: str | None,
        xid: int | None,
        name: str | None = None,
        endpoints: Sequence[str] | None = None,
    ) -> None:
        key = None if entity_id is None else str(entity_id)
        # what the writer stores is JSON: a value that is not JSON fails here too
        data = json.loads(json.dumps(data))
        self._events.append((type, object, key, data, occurred_at, table, op, lsn, xid))

    def commit(self, slot: str | None, lsn: int = 0, *, wait: bool = True) -> int:
        if self.fail_commits is not None:
            raise self.fail_commits
        outbox = self.outbox
        first = (outbox.events[-1].id if outbox.events else 0) + 1
        outbox.events += [StoredEvent(first + i, *event) for i, event in enumerate(self._events)]
        for key, values in self._shadow.items():
            if values is None:
                outbox.shadow.pop(key, None)
            else:
                outbox.shadow[key] = values
        outbox.skips.update(self._skipped)
        outbox.state = dict(self.state.rows)
        outbox.backfills = _applied(outbox.backfills, self._backfills)
        self._backfills = []
        if slot is not None:
            outbox.checkpoints[slot] = lsn
            outbox.commits.append(StoredCommit(slot, lsn, len(self._events), tuple(self._skipped)))
            self.durable_lsn = lsn
        if outbox.events:
            self.last_event_id = outbox.events[-1].id
        self._events, self._shadow, self._skipped = [], {}, {}
        self.commits_durable += 1
        return self.commits_durable

    def rollback(self) -> None:
        self._events, self._shadow, self._skipped = [], {}, {}
        self._backfills = []
        self.state.rows = dict(self.outbox.state)
        self.last_event_id = self.outbox.events[-1].id if self.outbox.events else 0

    def checkpoint(self, slot: str) -> int | None:
        lsn = self.outbox.checkpoints.get(slot)
        if lsn is not None:
            self.durable_lsn = max(self.durable_lsn, lsn)
        return lsn

    def shadow_get(self, table: str, key: str) -> dict[str, Any] | None:
        if (table, key) in self._shadow:
            return self._shadow[(table, key)]
        return self.outbox.shadow.get((table, key))

    def shadow_put(self, table: str, key: str, values: dict[str, Any]) -> None:
        self._shadow[(table, key)] = dict(values)

    def shadow_delete(self, table: str, key: str) -> None:
        self._shadow[(table, key)] = None

    def pending_skips(self) -> set[int]:
        return {xid for xid, done in self.outbox.skips.items() if done is None}

    def mark_skipped(self, xid: int, lsn: str, changes: int) -> None:
        if xid in self.outbox.skips:  # as the UPDATE of a requested skip does
            self._skipped[xid] = (lsn, changes)

    def set_problems(self, problems: list[dict[str, Any]]) -> None:
        self.outbox.problems = [dict(p) for p in problems]

    def backfills(self) -> list[dict[str, Any]]:
        """As the writer's connection reads them: this commit's changes included."""
        jobs = _applied(json.loads(json.dumps(self.outbox.backfills)), self._backfills)
        return [j for j in jobs if j["state"] in ("queued", "running")]

    def backfill_update(self, job: int, **progress: Any) -> None:
        self._backfills.append((job, progress))

    def backfill_request(self, tables: list[str], reason: str, rate: float) -> None:
        self._backfills.append((0, {"tables": tables, "reason": reason, "rate": rate}))

    def close(self) -> None:
        self.rollback()
