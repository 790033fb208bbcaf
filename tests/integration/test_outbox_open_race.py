"""Several processes opening a new outbox at the same moment (``run --role api`` and
``run --role capture`` started together) wait for each other: no "database is locked",
no migration applied twice."""

from __future__ import annotations

import threading
from pathlib import Path

from outbox import store


def open_at_once(path: Path, openers: int) -> list[BaseException]:
    errors: list[BaseException] = []
    ready = threading.Barrier(openers)

    def open_it() -> None:
        ready.wait()
        try:
            store.open_outbox(path).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_a_new_outbox_opened_at_once_by_many(tmp_path):
    for round in range(10):
        path = tmp_path / f"outbox{round}.db"
        assert open_at_once(path, 4) == []
        conn = store.connect(path, readonly=True)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        conn.close()
