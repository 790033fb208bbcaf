"""The outbox's event log on a replicated NATS JetStream stream (issue 16, first part).

One stream (``[outbox.jetstream] stream``, subject ``subject``) holds every event, one
message each, in the order capture appends them.  An event's id is its stream sequence:
gap-free, as the SQLite outbox's ids are, because nothing else publishes to the subject,
messages are never deleted one by one (the stream denies it) and a publish JetStream
refuses takes no sequence.

**Ordered, exactly once.**  :meth:`JetStreamLog.append` sends a group of events pipelined
(up to ``window`` unacknowledged), each with

* ``Nats-Expected-Last-Sequence`` = the sequence of the one before it, and
  ``Nats-Expected-Last-Msg-Id`` = its key: the stream stores a message only right after
  its predecessor, so a message lost in flight (a leader change, a timeout) makes every
  later one of the group fail too, never land out of order; and a second writer (a
  standby that took over) fences the first, whose appends fail from then on instead of
  interleaving (the sequence alone would not do: another writer's message can take the
  very sequence a later message of ours expects);
* ``Nats-Msg-Id`` = the event's key (capture's are deterministic: slot, LSN and position),
  so the same event sent twice within the stream's duplicate window is stored once;
* on the group's last message, ``Ct1-Commit`` = the group's checkpoint (capture's LSN):
  the group is whole in the stream once that message is.

After a failure nothing is assumed: :meth:`JetStreamLog.tail` reads the stream's end, the
last checkpoint and the keys stored after it (a group cut short: a prefix of it, by the
chain above), and the writer goes on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
import structlog
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from common.errors import Ct1Error, SourceUnavailable
from config.settings import Settings

log = structlog.get_logger("ct1_cdc.jetstream")

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST = "Nats-Expected-Last-Sequence"
EXPECTED_LAST_ID = "Nats-Expected-Last-Msg-Id"
COMMIT = "Ct1-Commit"
ORIGIN = "Ct1-Origin"  # beside Ct1-Commit: whose checkpoint it is (capture's slot)
KEY = "Ct1-Key"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code: the stream's last sequence is another
WRONG_LAST_MSG_ID = 10070  # ... its last message id is another
NO_PLACEMENT = 10005  # ... fewer nodes up (or known yet) than the replicas asked for
MAX_GROUP_SCAN = 100_000  # messages read back from the end to find the last checkpoint


class JetStreamError(Ct1Error):
    """The stream refused or lost an append, or cannot be reached."""


class Unavailable(JetStreamError):
    """The stream did not take an append for now: no leader (an election), no answer."""


class Fenced(JetStreamError):
    """Another writer appended since this one last read the stream's end."""


class Moved(Fenced, SourceUnavailable):
    """Another writer appended after this one read the stream's end and before it stored
    anything (a standby that read the end while the writer before it still ran): nothing
    of this writer's is in the stream, so it may read the end again and start over, which
    capture does as it does for a lost source (a new session)."""


class LastIdUnknown(JetStreamError):
    """The stream refused the first message for its expected last id (see append_whole)."""


@dataclass(frozen=True)
class Tail:
    """The stream's end as read: its last sequence, the last whole group's checkpoint and
    the sequence of that group's last message, and the keys stored after it (the prefix
    of a group cut short)."""

    last_seq: int
    checkpoint: int | None
    checkpoint_seq: int
    after: list[str] = field(default_factory=list)
    last_key: str | None = None
    origin: str | None = None


@dataclass(frozen=True)
class Stored:
    seq: int
    key: str | None
    commit: int | None
    body: bytes
    origin: str | None = None


class JetStreamLog:
    """One writer's (or reader's) handle on the stream; every method runs on one event loop."""

    def __init__(
        self,
        servers: list[str],
        *,
        stream: str = "CT1_EVENTS",
        subject: str = "ct1.events",
        partitions: int = 0,
        replicas: int = 3,
        timeout: float = 5.0,
        duplicate_window: float = 120.0,
        window: int = 512,
    ) -> None:
        self.servers = servers
        self.stream = stream
        self.subject = subject
        # with partitions, an event of partition p goes to ``<subject>.<p>`` (a dispatcher
        # reads its partitions alone); without, everything to ``subject``
        self.partitions = partitions
        self.subjects = [f"{subject}.*"] if partitions else [subject]
        self.filter = self.subjects[0]  # what a reader of every message subscribes to
        self.replicas = replicas
        self.timeout = timeout
        self.duplicate_window = duplicate_window
        self.window = window
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._last: int | None = None  # the stream's last sequence, as this writer knows it
        self._last_key: str | None = None  # and the key of that message
        self._mine: int | None = None  # where this writer's last whole group ends
        self._fenced = False  # another writer appended: this one never appends again
        self._base = 0  # where this writer started, or its last whole group ends
        self._base_key: str | None = None  # that message's key
        self._open: list[str] = []  # the keys this writer stored after it (chunks of an open group)
        self._tried: list[str] = []  # the keys of an append not yet acknowledged
        self._id_forgotten = False
        self.created = ""  # when the stream was made (tells one stream of a name from another)
        self._fresh = False  # adopted the end and stored nothing since (see Moved)
        self._moved = False  # found moved: appends refused until adopt() reads the end again
        self._replies: str | None = None  # the inbox acks come to
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._token = 0
        self._buckets: dict[str, Any] = {}  # key-value buckets found or made, by name
        self._bucket_lock: asyncio.Lock | None = None

    async def connect(self) -> None:
        try:
            # (nats-py keeps trying the first connection as long as its reconnects: bound it)
            self._nc = await _abandonable(
                nats.connect(
                    servers=self.servers,
                    connect_timeout=self.timeout,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    allow_reconnect=True,
                    # a server that stops answering (paused, cut off) is left for another
                    # within about three timeouts, not nats-py's default four minutes
                    ping_interval=max(1, round(self.timeout)),
                    max_outstanding_pings=2,
                    name="ct1-cdc",
                ),
                self.timeout * 3,
            )
        except Exception as exc:
            reason = (
                f"no server answered within {self.timeout * 3:g} s"
                if isinstance(exc, TimeoutError)
                else _reason(exc)
            )
            raise JetStreamError(f"cannot reach NATS at {', '.join(self.servers)}: {reason}") from exc
        self._js = self._nc.jetstream(timeout=self.timeout)
        self._buckets.clear()
        self._bucket_lock = asyncio.Lock()

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            try:
                await asyncio.wait_for(nc.drain(), self.timeout)
            except (Exception, asyncio.CancelledError):  # closing: what it says no longer matters
                await nc.close()

    @property
    def position_unknown(self) -> bool:
        """Whether an append failed and the stream's end must be read again."""
        return self._last is None

    @property
    def last_seq(self) -> int:
        """The stream's last sequence as this writer last knew it (0 before it read it)."""
        return self._last or 0

    @property
    def last_key(self) -> str | None:
        """The key of the stream's last message as this writer last knew it."""
        return self._last_key

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise JetStreamError("not connected to NATS")
        return self._js

    async def ensure_stream(self, within: float = 30.0) -> None:
        """Create the stream when it is missing, or check the one there; waits (up to
        ``within`` s) for the cluster to elect the leaders it needs."""
        config = StreamConfig(
            name=self.stream,
            subjects=self.subjects,
            description=f"ct1-cdc; partitions={self.partitions}",
            num_replicas=self.replicas,
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            duplicate_window=self.duplicate_window,
            deny_delete=True,  # an event is never removed alone: ids stay gap-free
        )
        deadline = time.monotonic() + within
        while True:
            try:
                try:
                    info = await self.js.stream_info(self.stream)
                except NotFoundError:
                    info = await self.js.add_stream(config)
                    self.created = str(info.created)
                    log.info("jetstream_stream_created", stream=self.stream, replicas=self.replicas)
                    return
                self.created = str(info.created)
                if list(info.config.subjects or []) != self.subjects:
                    raise JetStreamError(
                        f"stream {self.stream} exists with subjects {info.config.subjects}, not "
                        f"{self.subjects}: another application's stream, or made with another number"
                        " of partitions? choose another [outbox.jetstream] stream"
                    )
                if (info.config.num_replicas or 1) != self.replicas:
                    log.warning(
                        "jetstream_replicas_differ",
                        stream=self.stream,
                        configured=self.replicas,
                        actual=info.config.num_replicas,
                    )
                return
            except JetStreamError:
                raise
            except Exception as exc:  # no leader yet, a node starting: again, until within
                if time.monotonic() >= deadline:
                    raise JetStreamError(
                        f"stream {self.stream} unavailable after {within:.0f} s: {_reason(exc)}"
                    ) from exc
                await asyncio.sleep(0.2)

    async def adopt(self) -> int:
        """Take the stream's end as this writer's starting point (a writer starting, or a
        standby taking over: whoever appended before is fenced once this one appends).
        Reads the end alone (two requests, whatever the stream holds); returns it."""
        if self._fenced:
            raise Fenced(f"stream {self.stream} was taken over by another writer")
        last, key = await self._end()
        self._last, self._last_key, self._mine = last, key, last
        self._base, self._base_key, self._open, self._tried = last, key, [], []
        self._fresh, self._moved = True, False
        return last

    async def _end(self) -> tuple[int, str | None]:
        """The stream's last sequence and that message's key."""
        first, last = await self.bounds()
        return last, (await self.get(last)).key if last >= max(first, 1) else None

    async def _since(self, seq: int, most: int) -> tuple[int, list[str] | None]:
        """The stream's last sequence, and the keys stored after ``seq`` when there are at
        most ``most`` of them (None: more, or fewer than none)."""
        _, last = await self.bounds()
        if not 0 <= last - seq <= most:
            return last, None
        return last, [stored.key or "" async for stored in self.scan(seq, last)]

    @property
    def fresh(self) -> bool:
        """Whether this writer adopted the end and has stored nothing since."""
        return self._fresh

    def _fence(self, reason: str) -> Fenced:
        """The error for an end that is another writer's: :class:`Moved` while this one
        has stored nothing since it adopted the end, else :class:`Fenced`, for good."""
        if self._fresh:
            self._moved, self._last, self._mine = True, None, None
            return Moved(f"stream {self.stream} moved on before this writer's first append: {reason}")
        self._fenced = True
        return Fenced(f"stream {self.stream} {reason}")

    async def resync(self) -> list[str]:
        """After a failed append, read the stream's end and check it is this writer's: the
        messages after where it started (or its last group ended) must be what it sent
        since (chunks stored, then a prefix of the failed append).  Returns their keys;
        raises :class:`Fenced` (for good) when the end is another writer's."""
        if self._fenced:
            raise Fenced(f"stream {self.stream} was taken over by another writer")
        sent = self._open + self._tried
        last, keys = await self._since(self._base, len(sent))
        if keys is None or keys != sent[: len(keys)]:
            raise self._fence("ends with events this writer did not send")
        if keys:
            self._fresh = False
        self._last, self._last_key, self._mine = last, keys[-1] if keys else self._base_key, last
        self._open, self._tried = list(keys), []
        return keys

    async def tail(self) -> Tail:
        """Read the stream's end (see :class:`Tail`)."""
        info = await self._api(self.js.stream_info, self.stream)
        last = int(info.state.last_seq)
        first = int(info.state.first_seq or 1)
        after: list[str] = []
        checkpoint: int | None = None
        checkpoint_seq = 0
        origin: str | None = None
        last_key: str | None = None
        seq = last
        while seq >= max(first, 1) and last - seq < MAX_GROUP_SCAN:
            stored = await self.get(seq)
            if seq == last:
                last_key = stored.key
            if stored.commit is not None:
                checkpoint, checkpoint_seq, origin = stored.commit, seq, stored.origin
                break
            after.append(stored.key or "")
            seq -= 1
        else:
            if seq >= max(first, 1):
                raise JetStreamError(
                    f"stream {self.stream}: no checkpoint in its last {MAX_GROUP_SCAN} messages "
                    "(a transaction that large cut short by a crash): not resumed, to send nothing twice"
                )
        after.reverse()
        return Tail(last, checkpoint, checkpoint_seq, after, last_key, origin)

    async def append(
        self, events: Sequence[tuple[Any, ...]], checkpoint: int | None, origin: str | None = None
    ) -> int:
        """Append ``events`` (key, body[, partition]) in order; the last carries ``checkpoint`` (None: a
        chunk of a group still open, e.g. of a huge transaction).  Returns the id (sequence)
        of the first.  Raises :class:`Fenced` when another writer appended since (and from
        then on), :class:`JetStreamError` when any of them was not stored (a prefix may
        have been: :meth:`append_whole` goes on from there)."""
        if self._fenced:
            raise Fenced(f"stream {self.stream} was taken over by another writer")
        if self._moved:
            raise Moved(f"stream {self.stream} moved on: read its end again (adopt) first")
        if self._last is None:
            if self._mine is not None:
                raise JetStreamError(f"the end of {self.stream} is unknown after a failed append")
            await self.adopt()
        assert self._last is not None
        if not events:
            return self._last + 1
        base, previous, last = self._last, self._last_key, len(events) - 1
        if self._id_forgotten:  # the stream no longer knows its last id: the sequence guards
            previous, self._id_forgotten = None, False
        self._last = None  # until every ack below checks out
        self._tried = [event[0] for event in events]
        acks = await self._publish(
            [
                (
                    self._subject_of(event),
                    event[1],
                    _headers(
                        base + i,
                        events[i - 1][0] if i else previous,
                        event[0],
                        checkpoint if i == last else None,
                        origin,
                    ),
                )
                for i, event in enumerate(events)
            ]
        )
        for i, ack in enumerate(acks):
            error = ack.get("error")
            if error:
                if error.get("err_code") == WRONG_LAST_MSG_ID and i == 0:
                    # another writer's message, or a stream restarted after more than its
                    # duplicate window without a message, which forgets its last id: the
                    # stream's end tells which (append_whole reads it)
                    raise LastIdUnknown(f"append to {self.stream}: the stream's last message id differs")
                if error.get("err_code") in (WRONG_LAST_SEQUENCE, WRONG_LAST_MSG_ID):
                    if i == 0:
                        raise self._fence("was appended to by another writer")
                    self._fresh = False  # (a prefix of this append may be stored)
                    raise JetStreamError(f"append to {self.stream}: message {i + 1} of {len(events)} lost")
                kind = Unavailable if error.get("code") == 503 else JetStreamError
                raise kind(f"append to {self.stream} refused: {error.get('description', error)}")
            if ack.get("duplicate") or ack.get("seq") != base + i + 1:
                raise JetStreamError(
                    f"append to {self.stream}: message {i + 1} stored at {ack.get('seq')}, expected {base + i + 1}"
                    + (" (a duplicate)" if ack.get("duplicate") else "")
                )
        self._last, self._last_key = base + len(events), events[-1][0]
        self._mine = self._last
        self._fresh = False
        self._settled(checkpoint, self._tried)
        return base + 1

    def _settled(self, checkpoint: int | None, keys: list[str]) -> None:
        """``keys`` are stored, the last at the stream's end: a whole group's end is the
        new base; a chunk of an open group waits in ``_open``."""
        if checkpoint is not None:
            self._base, self._base_key, self._open = self._last or 0, self._last_key, []
        else:
            self._open += keys
        self._tried = []

    async def append_whole(
        self,
        events: Sequence[tuple[Any, ...]],
        checkpoint: int | None,
        origin: str | None = None,
        within: float = 60.0,
    ) -> None:
        """:meth:`append` exactly once, through leader changes and lost acks: after a
        failure, read the stream's end; what of ``events`` it holds (a prefix, by the chain
        of expected sequences) is not sent again, the rest is.  Raises :class:`Fenced` when
        the end is not this writer's, and :class:`JetStreamError` after ``within`` s."""
        deadline = time.monotonic() + within
        pending = events
        delay = 0.1
        fruitless = 0  # failures in a row that stored nothing
        while True:
            start, start_key = self._last, self._last_key
            try:
                await self.append(pending, checkpoint, origin)
                return
            except LastIdUnknown as exc:
                end, end_key = await self._end()
                if end != start or end_key != start_key:
                    raise self._fence("was appended to by another writer") from exc
                self._last, self._last_key, self._id_forgotten = start, start_key, True
                log.info("jetstream_last_id_forgotten", stream=self.stream, seq=start)
                continue
            except Fenced:
                raise
            except JetStreamError as exc:
                failure = exc
            if start is None:
                raise failure
            while True:  # learn what was stored; the cluster may still be electing
                if time.monotonic() >= deadline:
                    raise JetStreamError(f"{failure} (gave up after {within:.0f} s)") from failure
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    keys = [event[0] for event in pending]
                    last, got = await self._since(start, len(keys))
                    break
                except Exception as exc:
                    log.info("jetstream_tail_retry", error=_reason(exc))
            if got is None or got != keys[: len(got)]:
                raise self._fence("ends with events this writer did not send")
            stored = len(got)
            if stored:
                self._fresh = False
            self._last, self._last_key, self._mine = last, got[-1] if got else start_key, last
            if stored == len(keys):
                self._settled(checkpoint, got)
                return  # all of it landed; only the acks were lost
            self._open += got
            self._tried = []
            # (a refusal that stores nothing, five times in a row, is not waited out: the
            # stream having no leader or no answer is, up to ``within``)
            fruitless = 0 if stored or isinstance(failure, Unavailable) else fruitless + 1
            if fruitless >= 5:
                raise failure
            log.warning("jetstream_append_resumed", stored=stored, left=len(keys) - stored)
            pending = pending[stored:]

    async def bucket(self, name: str, ttl: float | None = None) -> Any:
        """A key-value bucket beside the stream (made, with the stream's replicas and a
        time to live of ``ttl`` seconds if given, when missing)."""
        from nats.js.api import KeyValueConfig
        from nats.js.errors import BucketNotFoundError, NotFoundError

        found = self._buckets.get(name)
        if found is not None:
            return found
        assert self._bucket_lock is not None, "not connected"
        async with self._bucket_lock:  # (two tasks asking at once would both make it)
            if name not in self._buckets:
                try:
                    found = await self._api(self.js.key_value, name)
                except (BucketNotFoundError, NotFoundError):  # (or "stream not found", being made)
                    config = KeyValueConfig(
                        bucket=name, history=1, replicas=self.replicas, storage=StorageType.FILE, ttl=ttl
                    )
                    found = await self._api(self.js.create_key_value, config)
                self._buckets[name] = found
            return self._buckets[name]

    async def watch(self, bucket: Any) -> AsyncIterator[Any]:
        """``bucket.watchall()``: every entry, and one None once every value the bucket held
        at the start has come.  nats-py's own marker can come before those values: when the
        server has pushed them before its consumer info answers, it sees nothing pending and
        nothing received yet.  So the marker here is the entry that had nothing pending
        behind it, or nats-py's for a bucket that held nothing."""
        held = (await self._api(bucket.status)).values
        watcher = await self._api(bucket.watchall)
        done = False
        async for entry in watcher:
            if entry is None:
                if not done and (held == 0 or (await self._api(bucket.status)).values == 0):
                    done = True
                    yield None
                continue
            yield entry
            if not done and entry.delta == 0:
                done = True
                yield None

    async def retrying(self, call: Any, *args: Any) -> Any:
        """``call(*args)``, a JetStream request, asked again while the cluster cannot answer
        it yet (see :meth:`_api`)."""
        return await self._api(call, *args)

    async def keys(self, bucket: Any) -> list[str]:
        """A key-value bucket's keys (none: empty).  nats-py may answer "no keys" while
        the consumer that lists them starts, so that answer is asked again twice."""
        from nats.js.errors import NoKeysError

        for attempt in range(3):
            try:
                return list(await self._api(bucket.keys))
            except NoKeysError:
                if attempt == 2:
                    return []
                await asyncio.sleep(0.05)
        return []

    async def put(self, bucket: Any, key: str, value: bytes) -> None:
        """A key-value put, asked again while the bucket's stream has no leader."""
        await self._api(bucket.put, key, value)

    async def keys_since(self, seq: int) -> list[tuple[str, int | None]]:
        """The keys of the messages after sequence ``seq``, oldest first, each with the
        checkpoint of the group it belongs to (None: a group not whole, chunks of a
        transaction cut short).  At most :data:`MAX_GROUP_SCAN` of them: past that, an
        error rather than a guess."""
        first, last = await self.bounds()
        if last - seq > MAX_GROUP_SCAN:
            raise JetStreamError(
                f"stream {self.stream}: {last - seq} messages past the state's last checkpoint"
                f" (more than {MAX_GROUP_SCAN}): not resumed, to send nothing twice"
            )
        keys: list[tuple[str, int | None]] = []
        open_from = 0
        async for stored in self.scan(max(seq, first - 1), last):
            keys.append((stored.key or "", None))
            if stored.commit is not None:  # the group ends here: its keys get its checkpoint
                keys[open_from:] = [(key, stored.commit) for key, _ in keys[open_from:]]
                open_from = len(keys)
        return keys

    async def bounds(self) -> tuple[int, int]:
        """The stream's first and last sequence (first = last + 1 when it is empty)."""
        info = await self._api(self.js.stream_info, self.stream)
        return int(info.state.first_seq or 1), int(info.state.last_seq)

    async def purge_before(self, seq: int) -> None:
        """Drop every message before sequence ``seq`` (a snapshot made them redundant)."""
        await self._api(self.js.purge_stream, self.stream, seq)

    async def scan(self, after: int, upto: int) -> AsyncIterator[Stored]:
        """The messages after ``after`` up to ``upto``, oldest first, through an ordered
        consumer (one request per message, as :meth:`get` does, is slow for thousands)."""
        if upto <= after:
            return
        if upto - after <= 4:  # a few: cheaper one by one than through a consumer
            for seq in range(after + 1, upto + 1):
                yield await self.get(seq)
            return
        nc = self._nc
        if nc is None:
            raise JetStreamError("not connected to NATS")
        sub = await self._api(
            functools.partial(
                self.js.subscribe,
                self.filter,
                stream=self.stream,
                ordered_consumer=True,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
                ),
            )
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.timeout * 2)
                except (nats.errors.TimeoutError, TimeoutError) as exc:
                    raise JetStreamError(f"reading {self.stream} after {after}: nothing came") from exc
                seq = int(msg.metadata.sequence.stream)
                if seq > upto:
                    return
                yield _stored(seq, msg.headers, msg.data)
                if seq >= upto:
                    return
        finally:
            await sub.unsubscribe()

    async def follow(
        self, after: int, batch: int = 1000, linger: float = 0.02, partition: int | None = None
    ) -> AsyncIterator[list[Stored]]:
        """The messages after ``after`` as they come, for good, in batches: up to ``batch``
        of them, or what came within ``linger`` s of the batch's first (an ordered consumer,
        which nats-py creates again after a gap or a lost connection).  With
        ``partition``, that partition's alone (their sequences have gaps: the others')."""
        if self._nc is None:
            raise JetStreamError("not connected to NATS")
        whole = partition is None
        subject = self.filter if whole else f"{self.subject}.{partition}"

        async def subscribe(start: int) -> Any:
            return await self._api(
                functools.partial(
                    self.js.subscribe,
                    subject,
                    stream=self.stream,
                    ordered_consumer=True,
                    config=ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                    ),
                )
            )

        sub = await subscribe(after + 1)
        try:
            while True:
                first = await sub.next_msg(timeout=None)
                got = [first]
                deadline = time.monotonic() + linger
                while len(got) < batch:
                    left = deadline - time.monotonic()
                    if left <= 0 and sub.pending_msgs == 0:
                        break
                    try:
                        got.append(await sub.next_msg(timeout=max(left, 0.001)))
                    except (nats.errors.TimeoutError, TimeoutError):
                        break
                out = []
                replayed = False
                for msg in got:
                    seq = int(msg.metadata.sequence.stream)
                    if seq <= after:
                        replayed = True  # a consumer made again from before where we are
                        continue
                    if whole and seq != after + 1:
                        raise JetStreamError(f"reading {self.stream}: message {seq} came after {after}")
                    out.append(_stored(seq, msg.headers, msg.data))
                    after = seq
                if out:
                    yield out
                elif replayed:
                    # (nats-py makes a lost ordered consumer again from the last message it
                    # delivered: before any, from the stream's start) start over from here
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = await subscribe(after + 1)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _subject_of(self, event: tuple[Any, ...]) -> str:
        if not self.partitions:
            return self.subject
        return f"{self.subject}.{event[2] if len(event) > 2 else 0}"

    async def _publish(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> list[dict[str, Any]]:
        """Publish in order, up to ``window`` unacknowledged; every ack (or error) parsed.
        (Our own replies rather than nats-py's ``publish_async``, whose error path raises
        in its callback and never completes the future.)"""
        nc = self._nc
        if nc is None:
            raise JetStreamError("not connected to NATS")
        if self._replies is None:
            self._replies = nc.new_inbox()
            await nc.subscribe(f"{self._replies}.*", cb=self._on_ack)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[dict[str, Any]]] = []
        try:
            for subject, body, headers in messages:
                if len(futures) >= self.window and not futures[-self.window].done():
                    # (acks come in order: the one ``window`` back bounds what is in flight)
                    await asyncio.wait_for(asyncio.shield(futures[-self.window]), self.timeout)
                self._token += 1
                token = str(self._token)
                future: asyncio.Future[dict[str, Any]] = loop.create_future()
                self._waiting[token] = future
                futures.append(future)
                await nc.publish(subject, body, reply=f"{self._replies}.{token}", headers=headers)
            await nc.flush(timeout=max(1, round(self.timeout)))
            return list(await asyncio.wait_for(asyncio.gather(*futures), self.timeout * 2))
        except Exception as exc:
            raise Unavailable(f"append to {self.stream} failed: {_reason(exc)}") from exc
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
            self._waiting = {t: f for t, f in self._waiting.items() if not f.done()}

    async def _on_ack(self, msg: Any) -> None:
        future = self._waiting.pop(msg.subject.rsplit(".", 1)[1], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_result(
                {"error": {"code": 503, "description": "no responders: the stream has no leader"}}
            )
            return
        try:
            future.set_result(orjson.loads(msg.data))
        except ValueError:
            future.set_result({"error": {"code": 0, "description": f"unreadable ack {msg.data[:100]!r}"}})

    async def _api(self, call: Any, *args: Any) -> Any:
        """A JetStream API request, asked again while the cluster answers "temporarily
        unavailable", "no suitable peers for placement" (fewer nodes up or known than the
        replicas asked for: a cluster forming, a node restarting) or not at all (a node
        catching up, a leader being elected), for up to five timeouts."""
        deadline = time.monotonic() + self.timeout * 5
        while True:
            try:
                return await call(*args)
            except (
                ServiceUnavailableError,
                NoRespondersError,
                NoStreamResponseError,  # (a stream just made, no leader yet)
                nats.errors.TimeoutError,
                TimeoutError,
                BadRequestError,
            ) as exc:
                if isinstance(exc, BadRequestError) and getattr(exc, "err_code", None) != NO_PLACEMENT:
                    raise
                if time.monotonic() >= deadline:
                    raise JetStreamError(f"stream {self.stream} unavailable: {_reason(exc)}") from exc
                await asyncio.sleep(0.2)

    async def get(self, seq: int) -> Stored:
        msg = await self._api(self.js.get_msg, self.stream, seq)
        return _stored(int(msg.seq or seq), msg.headers, msg.data)

    async def read(self, after: int, limit: int) -> list[Stored]:
        """Up to ``limit`` events with id > ``after``, oldest first."""
        first, last = await self.bounds()
        return [stored async for stored in self.scan(max(after, first - 1), min(last, after + limit))]


def events_log(settings: Settings) -> JetStreamLog:
    """A handle on the events stream that ``[outbox.jetstream]`` names (not connected)."""
    js = settings.outbox.jetstream
    return JetStreamLog(
        js.servers,
        stream=js.stream,
        subject=js.subject,
        partitions=js.partitions,
        replicas=js.replicas,
        timeout=js.timeout_seconds,
    )


def _stored(seq: int, headers: dict[str, str] | None, data: bytes | None) -> Stored:
    headers = headers or {}
    commit = headers.get(COMMIT)
    return Stored(
        seq, _text(headers.get(KEY)), int(commit) if commit else None, data or b"", _text(headers.get(ORIGIN))
    )


def _headers(
    after: int, previous: str | None, key: str, checkpoint: int | None, origin: str | None = None
) -> dict[str, str]:
    """A message's headers: its key, and the message it must follow (sequence ``after``,
    key ``previous``); the message id is the pair, so keys need not be unique alone."""
    headers = {KEY: key, MSG_ID: f"{after + 1}:{key}", EXPECTED_LAST: str(after)}
    if previous is not None:
        headers[EXPECTED_LAST_ID] = f"{after}:{previous}"
    if checkpoint is not None:
        headers[COMMIT] = str(checkpoint)
        if origin:
            headers[ORIGIN] = origin
    return headers


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


async def _abandonable(connecting: Awaitable[Client], within: float) -> Client:
    """``connecting`` awaited for at most ``within`` seconds, and given up for sure when
    that runs out or the caller is cancelled: nats-py swallows a cancellation that lands
    while it closes a failed attempt and then goes on trying (a node told to stop waited
    for its connect), so it is cancelled again until it ends."""
    task = asyncio.ensure_future(connecting)
    try:
        return await asyncio.wait_for(asyncio.shield(task), within)
    except BaseException:
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
        if not task.cancelled() and task.exception() is None:  # connected just then: not kept
            with contextlib.suppress(Exception):
                await task.result().close()
        raise


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
