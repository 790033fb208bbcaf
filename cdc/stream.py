"""The logical replication stream over a psycopg 3 replication connection.

This module knows the wire format ("Streaming Replication Protocol"; with
``cdc/_frames.c``, which reads many frames a call, set up by ``cdc/native_read.py``):
``START_REPLICATION`` puts the connection in COPY BOTH; the server sends XLogData
(``w``: start LSN, end LSN, send time, payload) and keepalives (``k``: end LSN, send time,
reply-requested); we answer with standby status updates (``r``: write, flush, apply LSN,
client time, reply-requested).

The replication session runs with ``TimeZone=UTC`` (and ISO dates, Postgres-style
intervals) whatever the server's or the database's setting, so wal2json prints every timestamptz (and each commit time) as
``...+00``: the decoders turn that into ISO 8601 UTC by rearranging text, never by
parsing a date, and capture's timestamps never depend on the source's TimeZone.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.decode import Begin, Commit, RowChange
from cdc.native_read import address, native_reader
from common.errors import SetupError, SlotBusy, SlotLost, SourceUnavailable
from common.formats import format_lsn

_XLOG = struct.Struct(">QQq")
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")
_PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 in unix microseconds


class XLogData(NamedTuple):  # one per row change: a NamedTuple is the cheapest immutable value
    wal_start: int
    wal_end: int
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    reply_requested: bool


Frame = XLogData | Keepalive
Read = Frame | RowChange | Begin | Commit  # what read_many gives: rows and edges may come decoded


_W = ord("w")
_K = ord("k")
_PAYLOAD_AT = 1 + _XLOG.size


def parse_frame(buf: bytes | memoryview) -> Frame:
    kind = buf[0] if len(buf) else -1
    try:
        if kind == _W:
            start, end, _sent = _XLOG.unpack_from(buf, 1)
            return XLogData(start, end, buf[_PAYLOAD_AT:])  # a view: no copy of the payload
        if kind == _K:
            end, _sent, reply = _KEEPALIVE.unpack_from(buf, 1)
            return Keepalive(end, bool(reply))
    except struct.error:
        raise SourceUnavailable(
            f"replication message of type {bytes(buf[:1])!r} cut short ({len(buf)} bytes)"
        ) from None
    raise SourceUnavailable(f"unexpected replication message type {bytes(buf[:1])!r}")


def status_update(
    write: int, flush: int, apply: int, *, reply: bool = False, now: float | None = None
) -> bytes:
    micros = int((time.time() if now is None else now) * 1_000_000) - _PG_EPOCH_OFFSET_US
    return _STATUS.pack(b"r", write, flush, apply, micros, 1 if reply else 0)


def plugin_options(options: Mapping[str, str]) -> str:
    parts = []
    for key, value in options.items():
        escaped = value.replace("'", "''")
        parts.append(f"\"{key}\" '{escaped}'")
    return ", ".join(parts)


class ReplicationStream:
    """START_REPLICATION sessions of one slot (a :class:`cdc.ports.FrameSource`): each
    :meth:`start` opens one, :meth:`close` ends it.  Not thread-safe: owned by the
    capture loop."""

    def __init__(self, dsn: str, slot: str, options: Mapping[str, str]) -> None:
        self.dsn = dsn
        self.slot = slot
        self.options = dict(options)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._reader: Any = None  # cdc._frames, when it can read this connection
        self._address = 0  # (libpq's PGconn, for it)

    def start(self, lsn: int) -> None:
        try:
            conn = psycopg.connect(
                utc_conninfo(self.dsn), replication="database", autocommit=True, connect_timeout=10
            )
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"cannot open replication connection: {_first_line(exc)}") from exc
        command = (
            f'START_REPLICATION SLOT "{self.slot}" LOGICAL {format_lsn(lsn)} ({plugin_options(self.options)})'
        )
        try:
            conn.execute(command)
        except psycopg.Error as exc:
            conn.close()
            message = _first_line(exc)
            if "does not exist" in message and "slot" in message:
                raise SetupError(f"replication slot {self.slot} does not exist: run `ct1-cdc setup`") from exc
            if "wal2json" in message or "output plugin" in message:
                raise SetupError(f"wal2json cannot be used: {message}") from exc
            if isinstance(exc, psycopg.errors.InvalidParameterValue) and "is unknown" in message:
                # an older wal2json on the server: retrying cannot help
                raise SetupError(
                    f"the server's wal2json does not know an option ct1-cdc needs ({message}): upgrade"
                    " wal2json on the database server (ct1-cdc asks for format-version 2 with include-pk)"
                ) from exc
            detail = getattr(getattr(exc, "diag", None), "message_detail", None) or ""
            if isinstance(exc, psycopg.errors.ObjectNotInPrerequisiteState) and "invalidated" in detail:
                raise SlotLost(detail.split(".")[0]) from exc
            if "is active for PID" in message:
                raise SlotBusy(f"slot {self.slot} is in use by another reader: {message}") from exc
            raise SourceUnavailable(f"START_REPLICATION failed: {message}") from exc
        self._conn = conn
        self._reader = native_reader(conn.pgconn, parse_frame)
        self._address = address(conn.pgconn)

    @property
    def _pg(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise SourceUnavailable("replication stream is not started")
        return self._conn.pgconn

    def read(self, timeout: float) -> Frame | None:
        """The next frame, or None if none arrived within ``timeout`` seconds."""
        pg = self._pg
        try:
            nbytes, data = pg.get_copy_data(1)
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"replication connection lost: {_first_line(exc)}") from exc
        if nbytes > 0:  # under load the next frame is nearly always buffered already
            return parse_frame(data)
        try:
            return self._wait(pg, timeout)
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"replication connection lost: {_first_line(exc)}") from exc

    @property
    def reads(self) -> str:
        return "psycopg" if self._reader is None else "native"

    def read_many(self, timeout: float) -> list[Read]:
        """The frames already received, up to a transaction's commit (each row change,
        begin and commit decoded, where the compiled reader is built), or the next one to
        arrive within ``timeout`` seconds: none if none did."""
        pg = self._pg
        if self._reader is None:
            frame = self.read(timeout)
            return [] if frame is None else [frame]
        deadline = None
        try:
            while True:
                items: list[Read]
                items, status = self._reader.read(self._address, READ_LIMIT)
                if status < 0:  # (what came before it is part of a transaction never finished)
                    raise self._end(pg, status)
                if items:
                    return items
                if deadline is None:
                    deadline = time.monotonic() + timeout
                if not self._arrived(pg, deadline - time.monotonic()):
                    return []
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"replication connection lost: {_first_line(exc)}") from exc

    def _wait(self, pg: pq.abc.PGconn, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while True:
            nbytes, data = pg.get_copy_data(1)
            if nbytes > 0:
                return parse_frame(data)
            if nbytes < 0:
                raise self._end(pg, nbytes)
            if not self._arrived(pg, deadline - time.monotonic()):
                return None

    def _arrived(self, pg: pq.abc.PGconn, within: float) -> bool:
        """Whether bytes came on the socket within ``within`` seconds (then in libpq's buffer)."""
        ready, _, _ = select.select([pg.socket], [], [], max(0.0, within))
        if not ready:
            return False
        pg.consume_input()
        if pg.status == pq.ConnStatus.BAD:
            raise SourceUnavailable("replication connection lost")
        return True

    def _end(self, pg: pq.abc.PGconn, nbytes: int) -> SourceUnavailable:
        """The error for PQgetCopyData's ``nbytes`` of -1 (the server ended COPY: its
        reason is in the next result) or -2."""
        text = pg.error_message.decode("utf-8", "replace").strip()
        if nbytes == -1:
            result = pg.get_result()
            if result is not None and result.error_message:
                text = result.error_message.decode("utf-8", "replace").strip()
        return SourceUnavailable(f"replication stream ended: {text or 'server closed the stream'}")

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        pg = self._pg
        try:
            pg.put_copy_data(status_update(write, flush, apply, reply=reply))
            while pg.flush() == 1:
                select.select([], [pg.socket], [], 1.0)
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"replication connection lost: {_first_line(exc)}") from exc

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


READ_LIMIT = 256  # frames a read_many takes at most (a long transaction's rows: in turns)


# The session settings every value capture reads is printed under (the stream's and a
# backfill chunk's alike), whatever the server's or the database's own.
SESSION_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO", "IntervalStyle": "postgres"}


def utc_conninfo(dsn: str) -> str:
    """The DSN with :data:`SESSION_SETTINGS` added to its options (after any the user
    gave, so they win): wal2json then prints every timestamptz as ``...+00``, dates in ISO
    order and intervals as Postgres's default does."""
    params = conninfo_to_dict(dsn)
    # libpq reads PGOPTIONS only when the connection string has no options of its own
    options = str(params.get("options") or os.environ.get("PGOPTIONS", ""))
    settings = " ".join(f"-c {k}={v}" for k, v in SESSION_SETTINGS.items())
    params["options"] = f"{options} {settings}".strip()
    return make_conninfo(**params)  # type: ignore[arg-type]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
