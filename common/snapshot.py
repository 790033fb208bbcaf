"""A Postgres snapshot as ``pg_current_snapshot()`` prints it, and which transactions it
sees (pure).

Postgres writes a transaction's commit record to the WAL slightly before the transaction
becomes visible to new snapshots, so "the WAL up to position P" and "what a snapshot taken
at P sees" can differ by a transaction.  Whoever must cut the stream exactly where a
snapshot stands (a backfill chunk, an export's resume position) classifies the streamed
transactions by their xid against the snapshot instead of by position.
"""

from __future__ import annotations

from dataclasses import dataclass

XID_SPACE = 1 << 32
HALF = 1 << 31


@dataclass(frozen=True, slots=True)
class Snapshot:
    """``xmin:xmax:xip`` of a snapshot, as 32-bit xids (what the WAL carries)."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """``'727:731:727,729'`` (xid8 values: their low 32 bits are kept)."""
        try:
            xmin, xmax, xip = text.strip().split(":")
            running = frozenset(int(x) % XID_SPACE for x in xip.split(",") if x)
            return cls(int(xmin) % XID_SPACE, int(xmax) % XID_SPACE, running)
        except ValueError:
            raise ValueError(f"not a snapshot: {text!r}") from None

    def sees(self, xid: int) -> bool:
        """Whether a transaction that committed (``xid``, 32-bit) is visible in the
        snapshot: it started before ``xmax`` (modulo wraparound) and was not running."""
        if xid in self.xip:
            return False
        return 0 < (self.xmax - xid) % XID_SPACE < HALF
