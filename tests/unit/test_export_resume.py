"""Where an export hands over to /events, on the API's side: the cursor that carries the
first page's position, the retry of an unclean cut, and the heartbeat the seam emits."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError

from api.handover import Handover, Seam
from api.models import MAX_ID, PageCursor, decode_cursor, encode_cursor, read_cursor
from cdc.source import HEARTBEAT_PREFIX
from common import sqlfile
from common.snapshot import Snapshot
from outbox.handover import Cut


@given(st.integers(0, MAX_ID), st.none() | st.integers(0, MAX_ID))
def test_cursors_carry_the_first_pages_position(after, resume):
    raw = encode_cursor(after, resume)
    assert read_cursor(raw) == PageCursor(after, resume)
    assert decode_cursor(raw) == after


def test_a_cursor_from_before_the_position_reads_as_none():
    old = base64.urlsafe_b64encode(orjson.dumps({"after": 42})).decode().rstrip("=")
    assert read_cursor(old) == PageCursor(42, None)


@pytest.mark.parametrize(
    "doc",
    [{"after": 1, "resume": -1}, {"after": 1, "resume": "7"}, {"after": 1, "resume": True}, [1], "x"],
)
def test_a_forged_cursor_is_refused(doc):
    raw = base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")
    with pytest.raises(PydanticCustomError, match="is not one this API returned"):
        read_cursor(raw)  # a 422 naming cursor (tests/integration/test_export_handover.py)


def test_the_seam_emits_captures_own_heartbeat():
    assert f"'{HEARTBEAT_PREFIX}', 'heartbeat '" in sqlfile.load("api", "seam.sql")["seam"]


class Unclean(Handover):
    """Every snapshot races: a transaction it saw reached the outbox after one it did not."""

    def __init__(self, cuts: list[Cut]) -> None:
        super().__init__("slot", 0)
        self.cuts = cuts
        self.snapshots = 0

    async def seam(self, conn: Any, offload: Any) -> Seam | None:
        self.snapshots += 1
        return Seam(Snapshot.parse("1:2:"), 0, 0)

    async def cut(self, conn: Any, seam: Seam, offload: Any) -> Cut | None:
        return self.cuts.pop(0)


@contextlib.asynccontextmanager
async def transaction() -> AsyncIterator[str]:
    yield "conn"


async def reads(conn: str, resume: int | None) -> int | None:
    return resume


async def test_an_unclean_cut_is_tried_again_with_a_new_snapshot():
    handover = Unclean([Cut(4, False), Cut(6, True)])
    assert await handover.read(transaction, None, reads) == 6  # type: ignore[arg-type]
    assert handover.snapshots == 2


async def test_an_unclean_cut_is_accepted_after_three_snapshots_and_logged():
    handover = Unclean([Cut(4, False), Cut(5, False), Cut(7, False)])
    with structlog.testing.capture_logs() as logs:
        assert await handover.read(transaction, None, reads) == 7  # type: ignore[arg-type]
    assert handover.snapshots == 3
    assert [(e["event"], e["resume_event_id"], e["attempts"]) for e in logs] == [
        ("export_resume_overlap", 7, 3)
    ]
