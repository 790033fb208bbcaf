"""The frame reader (cdc._frames) fed by a libpq of our own: ``PQgetCopyData`` and
``PQfreemem`` are ctypes functions handing out frames a test chose (short, damaged, rows
the compiled decoder leaves to Python, the ends of a stream), so every path of the C code
runs without a server, and under the sanitizers too (tests/integration/test_decoder_sanitized.py).

Whatever the frames, the reader gives what a frame at a time gives: each row change the
compiled decoder takes, decoded; anything else as ``parse_frame`` makes it, or its error;
and it stops after a frame that is not a row change, at its limit, or where libpq does."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc import native_read
from cdc.decode import Begin, Commit, RowChange
from cdc.stream import parse_frame
from common.errors import SourceUnavailable
from tests.unit.test_decode_compiled import _row_message

try:
    from cdc import _frames, _wal2json
except ImportError:  # built without a C compiler
    _frames = None

pytestmark = pytest.mark.skipif(_frames is None, reason="cdc._frames is not built (no C compiler at install)")

_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
GET_COPY_DATA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int)
FREEMEM = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class FakeLibpq:
    """Frames handed out one a call, then ``end`` (0: nothing buffered, -1, -2); every
    buffer handed out must come back through PQfreemem."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.end = 0
        self.out: set[int] = set()
        self.get_copy_data = GET_COPY_DATA(self._get)
        self.freemem = FREEMEM(self._free)

    def _get(self, conn: int, buffer: ctypes.POINTER(ctypes.c_void_p), async_: int) -> int:  # type: ignore[valid-type]
        assert async_ == 1, "the reader must never block"
        if not self.frames:
            return self.end
        frame = self.frames.pop(0)
        address = _libc.malloc(max(1, len(frame)))
        ctypes.memmove(address, frame, len(frame))
        self.out.add(address)
        buffer[0] = address  # type: ignore[index]
        return len(frame)

    def _free(self, address: int) -> None:
        self.out.remove(address)
        _libc.free(address)


def install(fake: FakeLibpq) -> None:
    """The reader set up with ``fake`` for libpq."""
    _frames.setup(
        ctypes.cast(fake.get_copy_data, ctypes.c_void_p).value,
        ctypes.cast(fake.freemem, ctypes.c_void_p).value,
        parse_frame,
        _wal2json,
    )


@pytest.fixture
def libpq() -> Iterator[FakeLibpq]:
    fake = FakeLibpq()
    install(fake)
    try:
        yield fake
    finally:
        native_read.load.cache_clear()  # (the next stream sets the reader up with the real libpq)
    assert not fake.out, "a frame's buffer was never freed"


def xlog(payload: bytes, lsn: int = 0x1000) -> bytes:
    return b"w" + struct.pack(">QQq", lsn, lsn + 8, 0) + payload


def keepalive(lsn: int = 0x2000, reply: bool = False) -> bytes:
    return b"k" + struct.pack(">QqB", lsn, 0, 1 if reply else 0)


def expected(frames: list[bytes], limit: int) -> tuple[list[object], BaseException | None]:
    """What a frame at a time makes of ``frames``, batched as the reader batches."""
    items: list[object] = []
    for frame in frames:
        if len(items) >= limit:
            break
        if frame[:1] == b"w" and len(frame) > 25:
            try:
                row = _wal2json.decode_row(frame[25:])
            except ValueError:
                row = None
            if row is not None:
                items.append(row)
                if isinstance(row, Commit):
                    break  # a transaction's end ends the batch
                continue
        try:
            items.append(parse_frame(frame))
        except SourceUnavailable as exc:
            return items, exc
        break
    return items, None


def same(got: list[object], want: list[object]) -> None:
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        assert type(mine) is type(theirs)
        if hasattr(mine, "payload"):  # XLogData: its payload a view or bytes
            assert (mine.wal_start, mine.wal_end, bytes(mine.payload)) == (
                theirs.wal_start,  # type: ignore[attr-defined]
                theirs.wal_end,  # type: ignore[attr-defined]
                bytes(theirs.payload),  # type: ignore[attr-defined]
            )
        else:
            assert mine == theirs


BEGIN = b'{"action":"B","xid":7,"timestamp":"2026-11-25 15:07:53.877066+00","lsn":"0/1","nextlsn":"0/2"}'
COMMIT = b'{"action":"C","xid":7,"timestamp":"2026-11-25 15:07:53.877066+00","lsn":"0/3","nextlsn":"0/4"}'
MESSAGE = b'{"action":"M","transactional":false,"prefix":"ct1-cdc","content":"x","lsn":"0/5"}'


def _frame() -> st.SearchStrategy[bytes]:
    return st.one_of(
        _row_message().map(xlog),
        _row_message().map(lambda m: xlog(m[: len(m) // 2])),  # cut short
        st.sampled_from([xlog(BEGIN), xlog(COMMIT), xlog(MESSAGE)]),
        st.sampled_from([BEGIN, COMMIT]).map(lambda m: xlog(m[: len(m) // 2])),  # cut short
        st.binary(min_size=1, max_size=40),  # anything: short frames, unknown kinds (libpq gives none empty)
        st.binary(max_size=30).map(lambda b: b"w" + b),  # an XLogData header cut short
        st.binary(max_size=20).map(lambda b: b"k" + b),  # a keepalive cut short
        st.booleans().map(lambda r: keepalive(reply=r)),
    )


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(_frame(), max_size=12), limit=st.integers(1, 8), end=st.sampled_from([0, -1, -2]))
def test_the_reader_gives_what_a_frame_at_a_time_gives(frames: list[bytes], limit: int, end: int) -> None:
    fake = FakeLibpq()
    install(fake)
    try:
        fake.frames, fake.end = list(frames), end
        want, error = expected(frames, limit)
        if error is not None:
            with pytest.raises(SourceUnavailable, match=re.escape(str(error))):
                _frames.read(1, limit)
            return
        items, status = _frames.read(1, limit)
        same(items, want)
        ran_out = (
            len(frames) == len(want)
            and (not want or isinstance(want[-1], (RowChange, Begin)))
            and len(want) < limit
        )
        assert status == (end if ran_out else 1)
        assert len(fake.frames) == len(frames) - len(want)  # nothing taken that was not given
        assert not fake.out, "a frame's buffer was never freed"
    finally:
        native_read.load.cache_clear()


def test_transactions_come_decoded_one_a_read(libpq: FakeLibpq) -> None:
    row = b'{"action":"I","xid":7,"lsn":"0/10","schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1}],"pk":[{"name":"id","type":"integer"}]}'
    libpq.frames = [
        xlog(BEGIN),
        xlog(row),
        xlog(row),
        xlog(COMMIT),
        xlog(BEGIN),
        xlog(row),
        keepalive(),
        xlog(row),
    ]
    items, status = _frames.read(1, 100)
    assert [type(i).__name__ for i in items] == ["Begin", "RowChange", "RowChange", "Commit"] and status == 1
    assert items[0].commit_time == "2026-11-25T15:07:53.877066Z" and (items[3].lsn, items[3].end_lsn) == (
        3,
        4,
    )
    assert items[1].new == {"id": 1} and items[1].table == "public.t"
    items, status = _frames.read(1, 100)
    assert [type(i).__name__ for i in items] == ["Begin", "RowChange", "Keepalive"] and status == 1
    items, status = _frames.read(1, 100)
    assert len(items) == 1 and status == 0  # then nothing buffered


def test_a_batch_ends_past_a_megabyte_of_frames(libpq: FakeLibpq) -> None:
    wide = (
        b'{"action":"I","xid":7,"lsn":"0/10","schema":"public","table":"t","columns":[{"name":"s","type":"text","value":"'
        + b"x" * 300_000
        + b'"}],"pk":[]}'
    )
    libpq.frames = [xlog(wide)] * 8
    items, status = _frames.read(1, 100)
    assert len(items) == 4 and status == 1  # (4 × 300 kB reach it)
    assert len(_frames.read(1, 100)[0]) == 4
