"""Where capture's CPU goes, per stage, without the socket: a breakdown to go with
bench/capture.py.

    .venv/bin/python bench/capture_stages.py [--rows 100000] [--repeat 3]

The backlog of bench/capture.py is written to a throwaway cluster and its wal2json
messages are read once from a slot into memory.  They are then replayed, in this
process, through each stage on its own and through the whole capture handler with the
outbox writer (a fresh SQLite outbox, two endpoints, group commits as `ct1-cdc run` makes
them), and through capture's whole stream loop fed from memory (``stream_loop``: the frames
parsed, commits, confirmations and housekeeping too; all but the socket), timed with
``time.process_time``; best of ``--repeat``.  The Python reference
decoder is timed on the same messages as the baseline of the compiled one.  The last line
is JSON; ``ratio`` = Python decoder time / compiled decoder time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from capture import backlog_source, current_lsn, write_backlog  # noqa: E402

from cdc import decode as decoding  # noqa: E402
from cdc.capture import Capture, wal2json_options  # noqa: E402
from cdc.decode import Commit, RowChange  # noqa: E402
from cdc.mapping import apply, load_mapping  # noqa: E402
from cdc.stream import ReplicationStream, XLogData, parse_frame  # noqa: E402
from config.settings import Settings  # noqa: E402
from outbox.writer import OutboxWriter  # noqa: E402
from sidecar.runner import build_capture, open_writer, tune_gc  # noqa: E402
from sidecar.throwaway import create_cluster  # noqa: E402


def capture_messages(rows: int, work: Path) -> list[bytes]:
    cluster = create_cluster(work / "pg")
    try:
        dsn = backlog_source(cluster)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('stages', 'wal2json')")
        print(f"writing a backlog of {rows} row changes ...", file=sys.stderr)
        write_backlog(dsn, rows)
        end = current_lsn(dsn)
        stream = ReplicationStream(dsn, "stages", wal2json_options(Settings(source={"dsn": dsn})))
        stream.start(0)
        messages: list[bytes] = []
        try:
            while True:
                frame = stream.read(timeout=5.0)
                if frame is None:
                    raise TimeoutError("the slot stopped before the end of the backlog")
                if isinstance(frame, XLogData):
                    messages.append(bytes(frame.payload))
                    if frame.wal_end >= end:
                        break
                elif frame.wal_end >= end:
                    break
        finally:
            stream.close()
        return messages
    finally:
        cluster.destroy()


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def fresh_capture(outbox: Path) -> tuple[OutboxWriter, Capture]:
    """Capture over a fresh outbox at ``outbox`` (two endpoints), its source unused."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{outbox}{suffix}").unlink(missing_ok=True)
    settings = Settings(
        source={"dsn": "postgresql:///unused", "slot": "stages"},
        outbox={"path": str(outbox)},
        mapping={"file": str(ROOT / "config" / "mapping.toml")},
    )
    writer = open_writer(settings)
    return writer, build_capture(settings, writer)


def replay(messages: list[bytes], outbox: Path) -> float:
    """The capture handler and the outbox writer over every message; CPU seconds."""
    writer, capture = fresh_capture(outbox)
    batch_s = capture.settings.outbox.batch_max_ms / 1000
    try:
        handle, should_commit = capture._handle, capture._should_commit
        started = time.process_time()
        for payload in messages:
            handle(XLogData(0, 0, memoryview(payload)))
            if should_commit(batch_s):
                capture._commit()
        capture._commit()
        return time.process_time() - started
    finally:
        writer.close()


def replay_loop(messages: list[bytes], outbox: Path) -> float:
    """Capture's whole stream loop (frames in batches as the native reader gives them,
    handled, group commits, confirmations, housekeeping) over every message, fed from
    memory instead of the socket; CPU seconds."""
    writer, capture = fresh_capture(outbox)
    decode_row = decoding._compiled.decode_row if decoding.COMPILED else None
    header = struct.Struct(">QQq")
    frames = [b"w" + header.pack(n * 100, n * 100 + 50, 0) + m for n, m in enumerate(messages)]

    class Frames:  # the replication stream's side of the loop, from memory
        def __init__(self) -> None:
            self.next = 0

        reads = "memory"

        def read_many(self, timeout: float) -> list[object]:
            """As cdc/_frames.c batches: rows, begins and commits decoded, up to a commit
            or a frame that is none of those."""
            if self.next == len(frames):
                capture.stopping.set()
                return []
            batch: list[object] = []
            while self.next < len(frames) and len(batch) < 256:
                frame = frames[self.next]
                self.next += 1
                row = decode_row(memoryview(frame)[25:]) if decode_row is not None else None
                if row is None:
                    batch.append(parse_frame(memoryview(frame)))
                    break
                batch.append(row)
                if isinstance(row, Commit):
                    break
            return batch

        def send_status(self, *_: object, **__: object) -> None:
            pass

    class Source:
        def heartbeat(self) -> None:
            pass

    capture.frames = Frames()  # type: ignore[assignment]
    capture.source = Source()  # type: ignore[assignment]
    capture._check_slot = lambda: None  # type: ignore[method-assign]
    capture._read_schema = lambda: []  # type: ignore[method-assign]
    try:
        started = time.process_time()
        capture._stream_loop()
        return time.process_time() - started
    finally:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not decoding.COMPILED:
        sys.exit("cdc._wal2json is not built: reinstall with a C compiler (pip install -e .)")

    work = Path(tempfile.mkdtemp(prefix="ct1-stages-"))
    work.chmod(0o711)
    try:
        messages = capture_messages(args.rows, work)
        n = len(messages)
        views = [memoryview(m) for m in messages]
        tune_gc()
        mapping = load_mapping(str(ROOT / "config" / "mapping.toml"))

        def decode_all(fn: Callable[[memoryview], object]) -> Callable[[], None]:
            def run() -> None:
                for view in views:
                    fn(view)

            return run

        compiled = best_of(args.repeat, decode_all(decoding.decode))
        python = best_of(args.repeat, decode_all(decoding.decode_python))
        changes = [c for c in map(decoding.decode, views) if isinstance(c, RowChange)]

        def map_all() -> None:
            for change in changes:
                apply(mapping, change.table, change)

        mapped = best_of(args.repeat, map_all)
        whole = min(replay(messages, work / "outbox.db") for _ in range(args.repeat))
        loop = min(replay_loop(messages, work / "outbox.db") for _ in range(args.repeat))
        us = {
            "decode_compiled": compiled,
            "decode_python": python,
            "mapping": mapped,
            "handler_and_outbox": whole,
            "stream_loop": loop,
        }
        for stage, seconds in us.items():
            print(f"{stage:20s} {seconds / n * 1e6:6.2f} µs per message", file=sys.stderr)
        result = {
            "bench": "capture_stages",
            "messages": n,
            **{f"{stage}_us": round(seconds / n * 1e6, 2) for stage, seconds in us.items()},
            "ratio": round(python / compiled, 2),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
