"""The cut of the outbox by an export's snapshot (plain values): the last event id whose
change the snapshot holds, judged by transaction visibility, across xid wraparound."""

from __future__ import annotations

import pytest

from common.snapshot import Snapshot
from outbox.handover import Cut, cut


def snap(text: str) -> Snapshot:
    return Snapshot.parse(text)


def test_a_snapshot_sees_what_committed_before_it_and_not_what_ran_or_came_after():
    s = snap("100:105:100,103")
    assert [x for x in range(95, 110) if s.sees(x)] == [95, 96, 97, 98, 99, 101, 102, 104]


def test_xid8_values_are_compared_by_their_low_32_bits_across_wraparound():
    epoch = 7 << 32
    s = snap(f"{epoch + 2**32 - 3}:{epoch + 2**32 + 2}:{epoch + 2**32 - 1}")  # xmax wrapped to 2
    assert s.sees(2**32 - 3) and s.sees(2**32 - 2) and s.sees(0) and s.sees(1)
    assert not s.sees(2**32 - 1)  # in progress
    assert not s.sees(2) and not s.sees(3)  # at or past xmax
    assert not s.sees(2 + 2**31)  # half the space ahead: the future, not the past


def test_a_malformed_snapshot_is_refused():
    with pytest.raises(ValueError, match="not a snapshot"):
        Snapshot.parse("100:105")


def test_every_event_seen_hands_over_at_the_newest_id():
    s = snap("100:105:")
    assert cut(s, [(10, 101), (11, 102), (12, 104)], newest=14) == Cut(14, True)


def test_the_tail_starts_at_the_first_event_not_seen():
    s = snap("100:105:103")
    events = [(10, 101), (11, 102), (12, 103), (13, 103), (14, 105), (15, 106)]
    assert cut(s, events, newest=15) == Cut(11, True)


def test_an_event_seen_after_one_not_seen_makes_the_cut_unclean():
    s = snap("100:105:102")
    # 102 was still running when the snapshot was taken, but reached the outbox before 104
    assert cut(s, [(10, 101), (11, 102), (12, 104), (13, 106)], newest=13) == Cut(10, False)


def test_events_without_an_xid_are_passed_by():
    s = snap("100:105:")
    assert cut(s, [(10, 101), (11, None), (12, None)], newest=12) == Cut(12, True)
    assert cut(s, [(10, 101), (11, None), (12, 107), (13, None), (14, 102)], newest=14) == Cut(11, False)
    assert cut(s, [(10, None), (11, 107), (12, None)], newest=12) == Cut(10, True)


def test_an_empty_outbox_hands_over_at_its_newest_id():
    assert cut(snap("1:1:"), [], newest=0) == Cut(0, True)


def test_the_cut_around_wraparound():
    s = snap(f"{2**32 - 2}:{2**32 + 1}:{2**32 - 1}")  # sees 2^32-2 and 0; not 2^32-1, 1, 2
    events = [(1, 2**32 - 2), (2, 0), (3, 2**32 - 1), (4, 1)]
    assert cut(s, events, newest=4) == Cut(2, True)
