"""Delivery commands: ``outbox deliveries``, ``outbox replay``, ``endpoints …``.

Registered on the groups of :mod:`sidecar.console`; :mod:`sidecar.cli` imports this module.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from common.formats import unix_to_text
from outbox import deliveries, retention, store
from outbox.endpoints import set_state as set_endpoint_state
from outbox.endpoints import stored_secret
from outbox.writer import OutboxWriter
from sidecar.console import emit_json, endpoints, fail, handled, outbox, settings_of


def _writer_conn(ctx: click.Context) -> sqlite3.Connection:
    path = settings_of(ctx).outbox.path
    store.connect(path, readonly=True).close()  # a missing outbox fails with its fix
    return store.open_outbox(path)


def _when(value: float | None) -> str | None:
    return unix_to_text(value or None)  # 0: never


def _since(text: str | None) -> float:
    if text is None:
        return 0.0
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since {text!r} is not an ISO 8601 time like 2026-11-25T14:00:00Z")
        raise  # unreachable: fail exits
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@outbox.command("deliveries")
@click.option("--status", type=click.Choice(["pending", "delivered", "dead"]))
@click.option("--endpoint", help="only this endpoint")
@click.option("--event", "event_id", type=click.IntRange(min=1), help="only this event")
@click.option("--after", default=0, type=click.IntRange(min=0), help="only events with id > AFTER")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def outbox_deliveries(
    ctx: click.Context,
    status: str | None,
    endpoint: str | None,
    event_id: int | None,
    after: int,
    limit: int,
    as_json: bool,
) -> None:
    """Deliveries with their state, last HTTP status and error."""
    conn = store.connect(settings_of(ctx).outbox.path, readonly=True)
    rows = deliveries.list_deliveries(
        conn, status=status, endpoint=endpoint, event_id=event_id, after=after, limit=limit
    )
    conn.close()
    for row in rows:
        item = {
            **row,
            "next_attempt_at": _when(row["next_attempt_at"]) if row["status"] == "pending" else None,
        }
        if as_json:
            emit_json(item)
        else:
            last_status, last_error = row["last_status"], row["last_error"]
            click.echo(
                f"{row['event_id']:>8}  {row['endpoint']:<8} {row['status']:<9} attempts={row['attempts']} "
                f"last={last_status if last_status is not None else '-'} {row['type']}"
                + (f"  ({last_error})" if last_error else "")
            )


def attempts_of(conn: sqlite3.Connection, event_id: int) -> list[dict[str, Any]]:
    return [
        {
            "endpoint": a["endpoint"],
            "at": _when(a["attempted_at"]),
            "status": a["status"],
            "duration_ms": a["duration_ms"],
            "error": a["error"],
            "response": a["response"],
        }
        for a in deliveries.attempts_of(conn, event_id)
    ]


@outbox.command("replay")
@click.option("--event", "event_id", type=click.IntRange(min=1), help="replay this event")
@click.option("--dead", is_flag=True, help="replay every dead delivery")
@click.option(
    "--from",
    "from_id",
    type=click.IntRange(min=1),
    help="with --endpoint: every event it takes from this id on (history to a new endpoint)",
)
@click.option("--endpoint", help="only to this endpoint")
@click.option("--since", help="with --dead: only events stored since this ISO 8601 time")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def outbox_replay(
    ctx: click.Context,
    event_id: int | None,
    dead: bool,
    from_id: int | None,
    endpoint: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """Deliver events again (same webhook-id), now, with a fresh retry schedule: one
    event, every dead delivery, or with --from every event an endpoint takes from an id
    on (a running dispatcher starts over there within a second or two)."""
    if [event_id is not None, dead, from_id is not None].count(True) != 1:
        fail("give exactly one of --event ID, --dead or --from ID")
    if since and not dead:
        fail("--since goes with --dead")
    if from_id is not None and endpoint is None:
        fail("--from goes with --endpoint NAME")
    if from_id is not None:
        configured = [e for e in settings_of(ctx).endpoints if e.name == endpoint]
        if not configured:
            fail(f"no endpoint {endpoint!r} in the configuration's [[endpoints]]")
        if not configured[0].enabled:
            fail(f"endpoint {endpoint!r} is disabled in the configuration")
    conn = _writer_conn(ctx)
    now = time.time()
    jetstream = settings_of(ctx).outbox.backend == "jetstream"
    try:
        if event_id is not None and store.get_event(conn, event_id) is None:
            fail(f"no event {event_id} in the outbox")
        if jetstream and from_id is None:  # into the cluster: every node's copy makes them due
            count = _share_replays(ctx, conn, event_id, endpoint, since)
        elif jetstream:  # into the cluster: every dispatch node rewinds (see _share_rewind)
            assert endpoint is not None and from_id is not None
            count = _share_rewind(ctx, conn, endpoint, from_id)
        elif from_id is not None:
            assert endpoint is not None
            count = _replay_from(ctx, conn, endpoint, from_id, now)
        elif event_id is not None:
            count = deliveries.replay_event(conn, event_id, endpoint=endpoint, now=now)
        else:
            count = deliveries.replay_dead(conn, endpoint=endpoint, since=_since(since), now=now)
    finally:
        conn.close()
    if as_json:
        emit_json({"replayed": count})
    else:
        click.echo(f"{count} deliver{'y' if count == 1 else 'ies'} queued again")
        if from_id is not None:
            where = " on every dispatch node" if jetstream else ""
            click.echo(
                f"{endpoint} starts again at event {from_id}{where}: `ct1-cdc outbox stats` shows it catch up"
            )


def _share_replays(
    ctx: click.Context,
    conn: sqlite3.Connection,
    event_id: int | None,
    endpoint: str | None,
    since: str | None,
) -> int:
    """On the JetStream backend a replay goes into the cluster, not into this file alone:
    every node's copy makes the deliveries due (this host's too, now if it runs, else
    when it starts), and the node holding each one's partition sends it."""
    from outbox.jetstream_shared import share_replays
    from sidecar.runner import events_log

    if event_id is not None:
        rows = deliveries.rows_of_event(conn, event_id, endpoint=endpoint)
    else:
        rows = deliveries.replayable_dead(conn, endpoint=endpoint, since=_since(since))
    if rows:
        share_replays(events_log(settings_of(ctx)), rows)
    return len(rows)


def _share_rewind(ctx: click.Context, conn: sqlite3.Connection, endpoint: str, first: int) -> int:
    """On the JetStream backend ``--from`` goes into the cluster: every dispatch node
    rewinds its copy (this host's too, if it runs one), and a partition changing hands
    meanwhile goes on from below it (outbox/jetstream_rewinds.py).  The count is this
    copy's."""
    from outbox.jetstream_rewinds import ask
    from outbox.jetstream_shared import blocking
    from sidecar.runner import events_log

    log = events_log(settings_of(ctx))
    blocking(log, ask(log, endpoint, first))
    return deliveries.count_from(conn, endpoint, first)


def _replay_from(ctx: click.Context, conn: sqlite3.Connection, endpoint: str, first: int, now: float) -> int:
    settings = settings_of(ctx)
    # an endpoint new to the outbox gets its cursor and routes, as capture gives them
    OutboxWriter(conn, store.Router(store.routes_of(settings.endpoints)))
    return deliveries.replay_from(conn, endpoint, first, now=now)


@outbox.command("prune")
@click.option(
    "--older-than-days", type=click.FloatRange(min=0), default=None, help="default: outbox.retention_days"
)
@click.option("--dry-run", is_flag=True, help="count what would go, change nothing")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def outbox_prune(ctx: click.Context, older_than_days: float | None, dry_run: bool, as_json: bool) -> None:
    """Delete settled events (every delivery delivered or dead) older than the retention,
    with their deliveries and attempts.  Pending deliveries are never pruned; event ids
    are never reused."""
    settings = settings_of(ctx)
    days = settings.outbox.retention_days if older_than_days is None else older_than_days
    cutoff = time.time() - days * 86400
    show = sys.stderr.isatty() and not as_json
    conn = _writer_conn(ctx)
    try:
        if dry_run:
            removed = retention.prunable(conn, cutoff)
        else:
            progress = (
                (lambda n: click.echo(f"\rpruned {n} events ...", nl=False, err=True)) if show else None
            )
            removed = retention.prune(conn, cutoff, progress=progress)
    finally:
        conn.close()
    if show and removed and not dry_run:
        click.echo("", err=True)
    if as_json:
        emit_json(
            {
                "pruned": 0 if dry_run else removed,
                "would_prune": removed if dry_run else None,
                "older_than_days": days,
            }
        )
    else:
        verb = "would prune" if dry_run else "pruned"
        click.echo(f"{verb} {removed} events older than {days:g} days")


@endpoints.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def endpoints_list(ctx: click.Context, as_json: bool) -> None:
    """Endpoints with their state (active, paused, disabled) and backlog."""
    settings = settings_of(ctx)
    configured = {e.name: e for e in settings.endpoints}
    conn = store.connect(settings.outbox.path, readonly=True)
    try:
        rows = store.endpoint_status(conn, configured, time.time())
        signed = {n for n, cfg in configured.items() if cfg.secret or stored_secret(conn, n)}
    finally:
        conn.close()
    for row in rows:
        name, state, pending, dead = row["name"], row["state"], row["pending"], row["dead"]
        last = row["last_attempt"]
        cfg = configured.get(name)
        # without a secret the dispatcher sends nothing to it (`endpoint_without_secret`)
        unsigned = cfg is not None and name not in signed
        item = {
            "name": name,
            "url": cfg.url if cfg else None,
            "enabled": bool(cfg and cfg.enabled),
            "state": state,
            "failures": row["failures"],
            "pending": pending,
            "dead": dead,
            "paused_until": _when(row["paused_until"]) if state == "paused" else None,
            "last_attempt_at": _when(last[0] if last else None),
            "events": list(cfg.events) if cfg else [],
            "has_secret": not unsigned if cfg else None,
        }
        if as_json:
            emit_json(item)
        else:
            no_secret = " (no signing secret: nothing is sent; run `ct1-cdc setup`)" if unsigned else ""
            click.echo(
                f"{name:<8} {state:<9} pending={pending} dead={dead}"
                f" {item['url'] or '(not configured)'}{no_secret}"
            )


def _set_state(ctx: click.Context, name: str, state: str) -> None:
    conn = _writer_conn(ctx)
    try:
        known = set_endpoint_state(conn, name, state, time.time())
        settings = settings_of(ctx)
        if known and settings.outbox.backend == "jetstream":  # for every node
            from outbox.jetstream_shared import ENDPOINTS, share
            from sidecar.runner import events_log

            share(events_log(settings), conn, ENDPOINTS, only=name)
    finally:
        conn.close()
    if not known:
        fail(f"no endpoint {name!r} in the outbox (see `ct1-cdc endpoints list`)")
    click.echo(f"endpoint {name} {'enabled' if state == 'active' else 'disabled'}")


@endpoints.command("enable")
@click.argument("name")
@click.pass_context
@handled
def endpoints_enable(ctx: click.Context, name: str) -> None:
    """Resume deliveries to NAME (also after a 410 or a pause)."""
    _set_state(ctx, name, "active")


@endpoints.command("disable")
@click.argument("name")
@click.pass_context
@handled
def endpoints_disable(ctx: click.Context, name: str) -> None:
    """Stop deliveries to NAME; they wait, pending, until it is enabled."""
    _set_state(ctx, name, "disabled")
