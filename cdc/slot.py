"""The slot's health as capture checks it while streaming, and what capture does when the
slot is gone: stop with one line, or (``on_slot_lost = "recover"``) make a new slot and
record the hole as a ``ct1.gap`` event with a backfill, so receivers converge.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from cdc.gap import GAP, gap_data
from cdc.mapping import Mapping
from cdc.ports import Sink, SourceDatabase
from common.errors import SlotLost
from common.formats import format_lsn, parse_lsn, unix_to_iso
from common.metrics import CAPTURE_LAG
from config.settings import Settings

log = structlog.get_logger("ct1_cdc.capture")


def check(source: SourceDatabase, slot: str, lag_warning_bytes: int) -> dict[str, Any]:
    """The slot's status (``cdc.source.slot_status``), its lag logged (as a warning past
    ``lag_warning_bytes`` or near invalidation) and set on the metric; ``SlotLost`` when
    it was dropped or invalidated."""
    status = source.slot_status()
    if status is None:
        raise SlotLost("it was dropped while capture ran")
    if status["wal_status"] == "lost":
        raise SlotLost("Postgres invalidated it: its WAL went past max_slot_wal_keep_size")
    fields = {
        "slot": slot,
        "lag_bytes": status["lag_bytes"],
        "confirmed_flush_lsn": status["confirmed_flush_lsn"],
        "wal_status": status["wal_status"],
        "safe_wal_size": status["safe_wal_size"],
    }
    lag = status["lag_bytes"] or 0
    CAPTURE_LAG.set(lag)
    if lag > lag_warning_bytes or status["wal_status"] in ("unreserved", "lost"):
        log.warning("slot_lag", **fields)
    else:
        log.debug("slot_lag", **fields)
    return status


def lost(slot: str, lsn: int, reason: str) -> SlotLost:
    """The one line capture stops with when its slot is gone: what was lost from where,
    and how to capture again."""
    log.error("slot_lost", slot=slot, lsn=format_lsn(lsn), reason=reason)
    return SlotLost(
        f"replication slot {slot} was lost ({reason}): the outbox holds every change up to "
        f"LSN {format_lsn(lsn)}, and what changed after it is no longer in the WAL. To capture "
        "again from now: `ct1-cdc recover` (a new slot, and a ct1.gap event that tells every "
        "receiver of the hole)"
    )


def recover(
    source: SourceDatabase,
    sink: Sink,
    mapping: Mapping,
    settings: Settings,
    shadowed: set[str],
    held: int,
    reason: str,
) -> int:
    """A new slot in place of the lost one; the ``ct1.gap`` (from ``held``, the last
    position captured) and a backfill of every snapshotted table, so every receiver
    converges past the hole, commit with the checkpoint at the new slot's start, which is
    returned."""
    name = settings.source.slot
    source.drop_slot()
    source.ensure_slot(mapping, sink, shadowed)
    status = source.slot_status()
    if status is None:
        raise SlotLost("the new slot is gone too")
    start = parse_lsn(status["confirmed_flush_lsn"])
    now = time.time()
    data = gap_data(name, reason, held, None, start, now)
    sink.add(GAP, "gap", None, data, unix_to_iso(now), None, "derived", format_lsn(start), None)
    sink.backfill_request(sorted(mapping.snapshots), "recover", settings.backfill.rate)
    sink.commit(name, start)
    log.warning("slot_recovered", slot=name, from_lsn=format_lsn(held), to_lsn=format_lsn(start))
    return start
