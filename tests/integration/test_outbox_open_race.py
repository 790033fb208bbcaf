"""Several processes opening a new outbox at the same moment (``run --role api`` and
``run --role capture`` started together) wait for each other: no "database is locked",
no migration applied twice."""

from __future__ import annotations

import threading

from outbox import store


def test_a_new_outbox_opened_at_once_by_many(tmp_path):
    for round in range(10):
        path = tmp_path / f"outbox{round}.db"
        errors: list[BaseException] = []
        ready = threading.Barrier(4)

        def open_it() -> None:
            ready.wait()
            try:
                store.open_outbox(path).close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        conn = store.connect(path, readonly=True)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        conn.close()
