"""The memory sink the capture loop's tests use passes the sink contract (the outbox
writer passes the same tests in tests/integration/test_sink_outbox.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cdc.ports import Sink
from tests.fakes import MemoryOutbox, MemorySink
from tests.sink_contract import SinkContract


class MemoryBackend:
    def __init__(self) -> None:
        self.outbox = MemoryOutbox()

    def open(self) -> Sink:
        return MemorySink(self.outbox)

    def close(self, sink: Sink) -> None:
        assert isinstance(sink, MemorySink)
        sink.close()

    def events(self) -> list[tuple[int, str, Any, dict[str, Any], int | None]]:
        return [(e.id, e.type, e.entity_id, e.data, e.xid) for e in self.outbox.events]

    def request_skip(self, xid: int) -> None:
        self.outbox.request_skip(xid)

    def skips(self) -> dict[int, tuple[str, int] | None]:
        return dict(self.outbox.skips)

    def problems(self) -> list[tuple[str, str]]:
        return [(p["kind"], p["message"]) for p in self.outbox.problems]


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


class TestMemorySink(SinkContract):
    pass
