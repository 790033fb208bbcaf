"""Which committed transactions a snapshot sees, as backfill and exports rely on it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.snapshot import XID_SPACE, Snapshot


def test_a_snapshot_sees_what_committed_before_it_and_nothing_that_was_running() -> None:
    snap = Snapshot.parse("727:731:727,729")
    assert snap == Snapshot(727, 731, frozenset({727, 729}))
    assert snap.sees(700)
    assert snap.sees(728) and snap.sees(730)
    assert not snap.sees(727) and not snap.sees(729)  # running when it was taken
    assert not snap.sees(731) and not snap.sees(900)  # started after it


def test_xid8_values_are_cut_to_the_32_bits_the_wal_carries() -> None:
    epoch = 3 << 32
    snap = Snapshot.parse(f"{epoch + 10}:{epoch + 20}:{epoch + 15}")
    assert snap.sees(12) and not snap.sees(15) and not snap.sees(20)


def test_wraparound_keeps_order() -> None:
    snap = Snapshot.parse(f"{XID_SPACE - 5}:{XID_SPACE + 3}:")  # xmax has wrapped to 3
    assert snap.sees(XID_SPACE - 4)
    assert snap.sees(1)
    assert not snap.sees(3) and not snap.sees(10)


@pytest.mark.parametrize("text", ["", "1:2", "a:b:", "1:2:x"])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a snapshot"):
        Snapshot.parse(text)


@given(st.integers(0, XID_SPACE - 1), st.integers(1, 1000), st.integers(0, 2000))
def test_within_half_the_xid_space_before_xmax_is_seen(xmax: int, back: int, ahead: int) -> None:
    snap = Snapshot(xmax, xmax, frozenset())
    assert snap.sees((xmax - back) % XID_SPACE)
    assert not snap.sees((xmax + ahead) % XID_SPACE)
