"""The dispatcher's state while it runs: per endpoint (:class:`Runtime`), per entity
held in memory (:class:`Chain`), and a change of the partitions it holds
(:class:`Assignment`, docs/jetstream.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from config.settings import EndpointSettings
from outbox.deliveries import Due
from outbox.endpoints import EndpointState


@dataclass(eq=False)
class Chain:
    """One entity's events held in memory for one endpoint: sent one at a time, in order,
    the next once the outcome of the one before is committed (so a crash repeats at most
    the newest one sent: a receiver never gets an older event of an entity after a newer
    one).  ``open``: sent, outcome not committed yet (0 or 1); once a delivery of the
    entity is pending (a retry) or too many wait, ``to_rows``: its later events queue as
    rows behind it."""

    waiting: deque[Due] = field(default_factory=deque)
    open: int = 0
    to_rows: bool = False


@dataclass(eq=False)
class Runtime:
    """One endpoint while the dispatcher runs."""

    cfg: EndpointSettings
    keys: list[bytes]
    state: EndpointState
    limit: int
    max_limit: int
    cursor: int = 0  # the committed cursor: every event up to it is settled
    generation: int = -1  # the cursor's generation (-1: not registered yet)
    handed_generation: int = -1  # the generation what is in `handed` was measured under
    horizon: int = 0  # events read up to here
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # rows claimed and not yet recorded (never claimed twice)
    inflight: set[int] = field(default_factory=set)
    # entities with events in memory (their rows are not claimed meanwhile)
    chains: dict[str, Chain] = field(default_factory=dict)
    # events read without a row, in order, until their outcome is committed
    unsettled: deque[int] = field(default_factory=deque)
    settled: set[int] = field(default_factory=set)
    # events past the cursor delivered on their first try before a crash: not sent again
    delivered_ahead: set[int] = field(default_factory=set)
    # events past a rewound cursor delivered on their first try: sent again, and logged
    # as attempts (their batch keeps counting them once)
    batched: set[int] = field(default_factory=set)
    # entities whose later events went to rows, by the commit that made them visible ...
    to_rows_at: dict[str, int] = field(default_factory=dict)
    # ... and those with a queued row not committed yet (how many)
    queuing: dict[str, int] = field(default_factory=dict)
    # events read ahead, the first of their entity, waiting for a free slot
    ready: deque[tuple[Chain, Due]] = field(default_factory=deque)
    rows_at: float = 0.0  # when to look for due rows next
    rewinding: bool = False  # `replay --from` moved the cursor: drain, then start there
    cursor_moved_at: float = 0.0
    # waiting for the receiver (what the limit counts) ...
    sending: int = 0
    # ... and sent with the outcome not committed yet (a paused endpoint's one probe)
    outstanding: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    durations: Any = None  # the attempt-duration histogram of this endpoint
    delivered_total: Any = None  # its counter of successful attempts
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    # the read on the read thread, if one runs, and what it was asked (read_seq, rows,
    # events, when)
    reading: asyncio.Future[tuple[list[Due], list[Due], int, float | None]] | None = None
    reading_as: tuple[int, int, int, float, float] = (0, 0, 0, 0.0, 0.0)
    delivered: int = 0
    failed: int = 0
    # the partitions this endpoint's reads take (None: every event) and, per partition,
    # an event id up to which another dispatcher settled it (read past, not sent)
    parts: frozenset[int] | None = None
    floors: dict[int, int] = field(default_factory=dict)
    assigning: Assignment | None = None
    entity_of: dict[int, str] = field(default_factory=dict)  # of events read, with partitions
    # read and not sent, of partitions being given up: held back, forgotten once they go
    parked: list[Due] = field(default_factory=list)
    # partitions given up and where each was settled, until an assignment reports them
    handed: dict[int, int] = field(default_factory=dict)
    cut: set[int] = field(default_factory=set)  # events whose sends were cut short
    sends: dict[asyncio.Task[None], Due] = field(default_factory=dict)  # what each send task sends


@dataclass(eq=False)
class Assignment:
    """The partitions this dispatcher holds from now on (JetStream backend: several
    dispatchers share the events by partition, docs/jetstream.md).  ``starts``: per
    endpoint, the partitions taken over and the event id up to which another dispatcher
    settled them.  ``done`` gets, per endpoint, how far it had read (``horizon``) and,
    for each partition given up, the event id up to which it is settled here."""

    parts: frozenset[int]
    starts: dict[str, dict[int, int]]
    done: concurrent.futures.Future[dict[str, dict[str, Any]]]
    urgent: bool = False  # the leases may lapse: sends of partitions given up are cut short
    left: set[str] = field(default_factory=set)
    applied: dict[str, dict[str, Any]] = field(default_factory=dict)
