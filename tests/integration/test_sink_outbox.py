"""The outbox writer on a real SQLite file passes the sink contract capture relies on
(tests/sink_contract.py), as the memory sink of the capture loop's unit tests does: with
its events inserted by sqlite3's executemany, and on the native thread capture's writer
uses (outbox/append.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from cdc.ports import Sink
from outbox import source_state, store
from outbox.store import Route, Router
from outbox.writer import OutboxWriter
from tests.sink_contract import SinkContract


class OutboxBackend:
    def __init__(self, path: Path, on_thread: bool = False) -> None:
        self.path = path
        self.on_thread = on_thread

    def open(self) -> Sink:
        writer = OutboxWriter(
            store.open_outbox(self.path), Router([Route("ct2", ("*",))]), appends_on_thread=self.on_thread
        )
        assert writer.appends_on_thread is self.on_thread
        return writer

    def close(self, sink: Sink) -> None:
        assert isinstance(sink, OutboxWriter)
        sink.close()

    def _read(self, fn: Any) -> Any:
        conn = store.open_outbox(self.path)
        try:
            return fn(conn)
        finally:
            conn.close()

    def events(self) -> list[tuple[int, str, Any, dict[str, Any], int | None]]:
        def read(conn: Any) -> list[tuple[int, str, Any, dict[str, Any], int | None]]:
            envelopes = [orjson.loads(store.envelope_json(r)) for r in store.iter_events(conn)]
            return [
                (
                    e["id"],
                    e["type"],
                    None if e["data"]["id"] is None else str(e["data"]["id"]),
                    e["data"],
                    e["source"]["xid"],
                )
                for e in envelopes
            ]

        return self._read(read)  # type: ignore[no-any-return]

    def request_skip(self, xid: int) -> None:
        self._read(lambda conn: source_state.request_skip(conn, xid))

    def skips(self) -> dict[int, tuple[str, int] | None]:
        rows = self._read(source_state.skips)
        return {r["xid"]: None if r["skipped_at"] is None else (r["lsn"], r["changes"]) for r in rows}

    def problems(self) -> list[tuple[str, str]]:
        return [(p["kind"], p["message"]) for p in self._read(source_state.problems_of)]


@pytest.fixture(params=[False, True], ids=["executemany", "on_thread"])
def backend(tmp_path: Path, request: pytest.FixtureRequest) -> OutboxBackend:
    return OutboxBackend(tmp_path / "outbox.db", request.param)


class TestOutboxWriter(SinkContract):
    pass
