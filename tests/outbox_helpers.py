"""Putting events straight into an outbox, the way capture's writer does, for tests
that start at the dispatcher or the CLI."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from config import catalogue
from outbox import store
from outbox.deliveries import DeliveryStore
from outbox.store import Route, Router
from outbox.writer import OutboxWriter


def append_events(
    path: str | Path, endpoints: Sequence[str], events: Iterable[tuple[str, str, Any]], *, rows: bool = False
) -> None:
    """Append (type, object, entity id) events routed to ``endpoints`` and commit; each has
    the ``source.op`` of its type in the catalogue (an update's ``previous`` is ``{}``).
    With ``rows`` the endpoints' delivery rows are made too, as the dispatcher makes them
    before it claims (capture appends events only)."""
    writer = OutboxWriter(store.open_outbox(path), Router([Route(e, ("*",)) for e in endpoints]))
    try:
        for n, (etype, obj, key) in enumerate(events):
            known = catalogue.BY_TYPE.get(etype)
            op = known.op if known is not None and known.op else "insert"
            previous = {} if op == "update" else None
            writer.add(
                type=etype,
                object=obj,
                entity_id=key,
                data={"object": obj, "id": key, "record": {"id": key, "n": n}, "previous": previous},
                occurred_at="2026-11-25T00:00:00.000000Z",
                table="public.t",
                op=op,
                lsn="0/1",
                xid=1,
            )
        writer.commit("test", 1)
    finally:
        writer.close()
    if rows:
        deliveries = DeliveryStore(path)
        try:
            for endpoint in endpoints:
                while deliveries.materialize(endpoint):
                    pass
        finally:
            deliveries.close()


def same_json(got: Any, want: Any) -> bool:
    """Equal and of the same JSON kind all the way down (1, 1.0 and true differ), without
    recursion (values nested thousands deep)."""
    stack = [(got, want)]
    while stack:
        a, b = stack.pop()
        if type(a) is not type(b):
            return False
        if isinstance(a, dict):
            if list(a) != list(b):
                return False
            stack.extend((a[k], b[k]) for k in a)
        elif isinstance(a, list):
            if len(a) != len(b):
                return False
            stack.extend(zip(a, b, strict=True))
        elif a != b:
            return False
    return True
