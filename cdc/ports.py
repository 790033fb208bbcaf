"""What capture is given: where its frames come from, the source database beside them,
and where its events go.

:class:`cdc.capture.Capture` knows its adapters only by these Protocols; the shell builds
the real ones and passes them in:

* :class:`FrameSource` — :class:`cdc.stream.ReplicationStream` (frames of a logical slot
  over a replication connection, and standby status updates back);
* :class:`SourceDatabase` — :class:`cdc.postgres.PostgresSource` (plain SQL against the
  source: checks, catalog, partitions, slot creation, heartbeats, slot health);
* :class:`Sink` — ``outbox.writer.OutboxWriter`` (the SQLite outbox), which satisfies it
  structurally: capture and the outbox know nothing of each other.

Tests drive the same loop with fakes of each (``tests/fakes.py``) that pass the same
contract tests as the real ones.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any, NamedTuple, Protocol

from cdc.carts import StateStore
from cdc.mapping import Mapping
from cdc.schema import Relation
from cdc.source import Check
from cdc.stream import Read


class ChunkRead(NamedTuple):
    """What the source read for one backfill chunk (see :mod:`cdc.backfill`)."""

    snapshot: str  # txid_current_snapshot() of the chunk's transaction
    at: str  # its time, ISO 8601 UTC (the events' timestamp)
    rows: list[dict[str, Any]]  # by key order, at most the limit
    rereads: list[dict[str, Any]]  # the rows of the keys asked again
    passed: int  # a WAL position past the watermark's commit: streamed beyond it, it is lost


class FrameSource(Protocol):
    """A logical slot, one session at a time: frames in, the confirmed position out."""

    def start(self, lsn: int) -> None:
        """Start a session streaming the slot from ``lsn`` (capture's stored checkpoint)."""

    @property
    def reads(self) -> str:
        """How the session reads, for the log: "native" (many frames a call), "psycopg"."""

    def read_many(self, timeout: float) -> list[Read]:
        """The frames already received (XLogData and keepalives; a row change, begin or
        commit decoded already where the source can, a batch ending at a commit), or the
        next to come within ``timeout`` seconds: none if none did."""

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        """Tell the server what is received and durable: it may drop WAL up to ``flush``."""

    def close(self) -> None:
        """End the session (a later :meth:`start` begins another)."""


class SourceDatabase(Protocol):
    """The source database beside the stream, over a connection per session.

    Errors leave it as ``SourceUnavailable`` (the connection is gone: retry) or
    ``SetupError`` (the user must change something)."""

    def open(self) -> None:
        """Connect for a session."""

    def close(self) -> None: ...

    def checks(self) -> list[Check]:
        """What the source needs for capture (as ``ct1-cdc setup`` checks it)."""

    def catalog(self, tables: list[tuple[str, str]]) -> tuple[dict[str, Relation], list[str]]:
        """What the catalog says of each (schema, name), and every table name when one
        of them is missing (for a did-you-mean)."""

    def partition_parent(self, table: str, mapped: Container[str]) -> str:
        """The mapped ancestor of a partition (else ``table`` itself)."""

    def ensure_slot(self, mapping: Mapping, sink: Sink, shadowed: set[str]) -> bool:
        """Create the slot if it is missing, seeding ``sink``'s shadow of the ``shadowed``
        tables from the slot's snapshot; True when it was created now."""

    def drop_slot(self) -> bool:
        """Drop the slot (a lost one, before :meth:`ensure_slot` makes it anew); True if
        there was one."""

    def heartbeat(self) -> None:
        """Emit a logical message that comes back through the stream, so an idle slot
        advances."""

    def slot_status(self) -> dict[str, Any] | None:
        """The slot's lag and ``wal_status`` (see ``cdc.source.slot_status``); None if
        the slot is gone."""

    def key_columns(self, schema: str, name: str) -> list[tuple[str, str]]:
        """(column, type) of the key a backfill reads the table in order of (its primary
        key, else its replica identity index); empty without one."""

    def count_rows(self, table: str, condition: str | None) -> int | None:
        """Rows of a mapped table a backfill will read (None if counting takes too long);
        ``BackfillError`` for a condition Postgres refuses."""

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
        """The next ``limit`` rows of a mapped table after the key ``after`` (and the rows
        of the keys in ``reread``) in one snapshot, then the watermark ``label`` (see
        :mod:`cdc.backfill`); ``BackfillError`` when the read fails for good."""


class Sink(Protocol):
    """Where capture's events go, with the checkpoint that says how far they reach.

    Everything added since the last :meth:`commit` becomes durable together with that
    commit's checkpoint, or not at all (:meth:`rollback`, a crash).  Capture confirms to
    Postgres only what :attr:`durable_lsn` says is durable.
    """

    @property
    def durable_lsn(self) -> int:
        """The checkpoint of the last commit (or the one read by :meth:`checkpoint`)."""

    @property
    def commits_durable(self) -> int:
        """How many commits are durable: every one up to this number.  (A commit that
        fails is raised by a later call, and its number is given again.)"""

    @property
    def pending(self) -> int:
        """Events added since the last commit."""

    @property
    def last_event_id(self) -> int:
        """Id of the last event committed or written."""

    @property
    def in_transaction(self) -> bool:
        """Whether anything was added since the last commit."""

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
        """Append one event (called positionally: it is the hot path).  ``name``: what names
        the event among those of no transaction (a backfill chunk's rows, a manual event),
        where the sink needs a name that is the same when the event is made again after a
        crash.  ``endpoints``: the only endpoints it goes to (a manual event narrowed by
        ``systems``); None, every endpoint whose routes take its type."""

    def commit(self, slot: str, lsn: int, *, wait: bool = True) -> int:
        """Make everything added so far durable together with the checkpoint ``lsn``; the
        commit's number (1, 2, ...).  With ``wait=False`` it may become durable after this
        returns (the SQLite writer finishes it on its thread): :attr:`durable_lsn` and
        :attr:`commits_durable` say when."""

    def rollback(self) -> None:
        """Forget everything not yet committed."""

    def checkpoint(self, slot: str) -> int | None:
        """The stored checkpoint of ``slot``, None if there is none."""

    def shadow_get(self, table: str, key: str) -> dict[str, Any] | None:
        """The watched columns of a row as last seen (a table without full identity)."""

    def shadow_put(self, table: str, key: str, values: dict[str, Any]) -> None: ...

    def shadow_delete(self, table: str, key: str) -> None: ...

    def pending_skips(self) -> set[int]:
        """Transactions an operator asked capture to skip (``ct1-cdc slot skip``) and
        that are not yet skipped."""

    def mark_skipped(self, xid: int, lsn: str, changes: int) -> None:
        """Record a requested transaction as skipped, in the current group commit: durable
        with the checkpoint that passes it, or not at all."""

    @property
    def state(self) -> StateStore:
        """Derived events' state (cart timers), written in the current group commit."""

    def backfills(self) -> list[dict[str, Any]]:
        """Backfill jobs queued or running, oldest first (``outbox.backfills`` rows)."""

    def backfill_update(self, job: int, **progress: Any) -> None:
        """A job's progress (state, after, reread, rows, events, total, error), in the
        current group commit: durable with the events of the chunk, or not at all."""

    def backfill_request(self, tables: list[str], reason: str, rate: float) -> None:
        """Queue a backfill of ``tables`` (at most ``rate`` rows a second, 0: no limit) in
        the current group commit, in place of any job still active (after a lost slot,
        every table is read again)."""

    def set_problems(self, problems: list[dict[str, Any]]) -> None:
        """Replace the stored mapping problems (shown by /readyz, /metrics, ``slot
        status``); runs in a write transaction of its own, so only between commits."""
