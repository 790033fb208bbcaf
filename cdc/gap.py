"""``ct1.gap``: history lost with a slot, as receivers are told of it (pure)."""

from __future__ import annotations

from typing import Any

from common.formats import format_lsn, unix_to_iso

GAP = "ct1.gap"


def gap_data(
    slot: str, reason: str, from_lsn: int | None, from_time: float | None, to_lsn: int, now: float
) -> dict[str, Any]:
    """The event's ``data``: the old slot's last position captured (and when, if known)
    and where the new slot starts; the changes between were not captured."""
    record = {
        "slot": slot,
        "reason": reason,  # invalidated | dropped
        "from_lsn": None if not from_lsn else format_lsn(from_lsn),
        "from_time": None if from_time is None else unix_to_iso(from_time),
        "to_lsn": format_lsn(to_lsn),
        "to_time": unix_to_iso(now),
    }
    return {"object": "gap", "id": None, "record": record, "previous": None}
