"""``ct1-cdc slot status|drop|skip`` and ``ct1-cdc detach``: the source side of a run."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cdc import source
from cdc.catalog import read_catalog
from cdc.mapping import Mapping, load_mapping
from cdc.schema import check_mapping
from common.errors import ConfigError, SetupError
from common.formats import format_lsn, unix_to_text
from config.settings import Settings
from outbox import source_state, store
from sidecar.console import emit_json, fail, handled, main, settings_of, slot

T = TypeVar("T")


def _when(value: float | None) -> str | None:
    return unix_to_text(value)


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        fail("refusing without --yes")
    click.confirm(question, abort=True)


def _existing_outbox(path: str) -> sqlite3.Connection:
    """The outbox setup made; a missing file is an error here, never a new empty one."""
    if not Path(path).exists():
        raise SetupError(f"outbox {path} does not exist: check outbox.path (setup keeps its records there)")
    return store.open_outbox(path)


@slot.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def slot_status(ctx: click.Context, as_json: bool) -> None:
    """Confirmed LSN, lag in bytes, wal_status and safe_wal_size of the slot; the mapping
    checked against the live schema; transactions asked to be skipped."""
    settings = settings_of(ctx)
    try:
        mapping: Mapping | None = load_mapping(settings.mapping.file)
    except ConfigError as exc:  # the slot's health needs no mapping: still shown
        mapping, mapping_error = None, str(exc)
    problems: list[dict[str, Any]] = []
    with source.connect(settings.source.dsn) as conn:
        status = source.slot_status(conn, settings.source.slot)
        if mapping is not None:
            catalog, names = read_catalog(conn, [mapping.parts(t) for t in mapping.tables])
            problems = [p.as_dict() for p in check_mapping(mapping, catalog, names)]
        else:
            problems = [
                {"kind": "mapping_file", "table": None, "rule": None, "message": mapping_error, "fix": ""}
            ]
    if status is None:
        fail(missing_slot(settings))
    assert status is not None
    # (an outbox older than skips: nothing was asked)
    skips: list[dict[str, Any]] = _from_capture_file(settings, source_state.skips) or []
    if as_json:
        emit_json({**status, "mapping_problems": problems, "skipped_transactions": skips})
        return
    for key, value in status.items():
        if value is None:  # Postgres gives no figure: what that means, not "None"
            value = "unlimited (max_slot_wal_keep_size = -1)" if key == "safe_wal_size" else "-"
        click.echo(f"{key:<20} {value}")
    if not problems and mapping is not None:
        click.echo(f"{'mapping':<20} ok ({len(mapping.tables)} tables)")
    for problem in problems:
        click.echo(f"{'mapping':<20} BROKEN: {problem['message']} -> fix: {problem['fix']}")
    for skip in skips:
        done = (
            f"skipped at lsn {skip['lsn']} ({skip['changes']} changes not captured) {_when(skip['skipped_at'])}"
            if skip["skipped_at"]
            else "to be skipped when capture reaches it"
        )
        click.echo(f"{'skip':<20} transaction {skip['xid']}: {done}")


@slot.command("drop")
@click.option("--yes", is_flag=True, help="do not ask")
@click.pass_context
@handled
def slot_drop(ctx: click.Context, yes: bool) -> None:
    """Drop the replication slot (capture then starts over from a new slot)."""
    settings = settings_of(ctx)
    name = settings.source.slot
    _confirm(yes, f"drop slot {name}? changes not yet captured are lost")
    with source.connect(settings.source.dsn) as conn:
        dropped = source.drop_slot(conn, name)
    click.echo(f"slot {name} {'dropped' if dropped else 'did not exist'}")


@slot.command("skip")
@click.argument("xid", type=click.IntRange(min=1, max=2**32 - 1))
@click.option("--yes", is_flag=True, help="do not ask")
@click.pass_context
@handled
def slot_skip(ctx: click.Context, xid: int, yes: bool) -> None:
    """Pass by one source transaction that capture cannot process.

    Capture names the transaction when it stops (`capture_failed`, and its exit line).
    Its row changes are then not captured; every other transaction is.  The skip is
    recorded in the outbox with the checkpoint that passes it (`slot status` shows it).
    On the JetStream backend it is also put into the cluster, for whichever host
    captures."""
    settings = settings_of(ctx)
    _confirm(yes, f"skip source transaction {xid}? its changes will not be captured")
    conn = _existing_outbox(settings.outbox.capture_path)  # (capture's file on this host)
    try:
        with source.connect(settings.source.dsn) as src:
            ahead = source.xid_not_begun(src, xid)
    except BaseException:
        conn.close()
        raise
    if ahead:
        conn.close()
        fail(
            f"transaction {xid} has not begun on the source (its newest is {ahead}): a skip names"
            " the transaction capture stopped on (its exit line and `capture_failed` say which),"
            " and one named ahead would pass a healthy transaction by"
        )
    asked = time.time()
    try:
        source_state.request_skip(conn, xid, asked)
    finally:
        conn.close()
    if settings.outbox.backend == "jetstream":  # for the capture of any host (a standby's too)
        from outbox.jetstream_shared import share_skip
        from sidecar.runner import events_log

        share_skip(events_log(settings), xid, asked)
    click.echo(
        f"transaction {xid} will be skipped when capture reaches it; restart `ct1-cdc run` "
        "(`ct1-cdc slot status` shows when it was passed)"
    )


@main.command()
@click.option("--yes", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True, help="one line per action")
@click.pass_context
@handled
def detach(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """Drop the slot and restore every replica identity setup changed.

    The outbox (events, keys, the endpoints' signing secrets) is left in place."""
    settings = settings_of(ctx)
    name = settings.source.slot
    _confirm(yes, f"detach from the source: drop slot {name} and restore replica identities?")
    done: list[dict[str, Any]] = []

    def report(action: str, **fields: Any) -> None:
        done.append({"action": action, **fields})
        if as_json:
            emit_json(done[-1])
        else:
            click.echo(f"{action}: " + ", ".join(f"{k} {v}" for k, v in fields.items()))

    outbox = _existing_outbox(settings.outbox.path)  # before anything changes: what to restore
    with source.connect(settings.source.dsn) as conn:
        dropped = source.drop_slot(conn, name)
        report("slot_dropped" if dropped else "slot_absent", slot=name)
        try:
            names = {"d": "DEFAULT", "n": "NOTHING", "i": "USING INDEX"}
            for table, schema, rel, identity, index in source_state.identity_changes(outbox):
                catalog, _ = read_catalog(conn, [(schema, rel)])
                if table not in catalog:
                    report("table_gone", table=table)
                else:
                    source.set_replica_identity(conn, schema, rel, identity, index)
                    report(
                        "replica_identity_restored",
                        table=table,
                        identity=names[identity] + (f" {index}" if index else ""),
                    )
                source_state.forget_identity_change(outbox, table)
        finally:
            outbox.close()
    if not as_json:
        click.echo(
            f"detached; the outbox {settings.outbox.path} is kept (events, API keys, signing secrets):"
            " delete it to remove everything"
        )


def _from_capture_file(settings: Settings, read: Callable[[sqlite3.Connection], T]) -> T | None:
    """``read`` of capture's file on this host (the outbox, or its capture state beside
    it); None where there is no such file, or it is older than what ``read`` asks."""
    try:
        conn = store.connect(settings.outbox.capture_path, readonly=True)
    except store.OutboxError:
        return None
    try:
        return read(conn)
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def missing_slot(settings: Settings) -> str:
    """What to do about a slot that does not exist: a new outbox needs ``setup``; one that
    captured from the slot lost it, and only ``recover`` goes on (``setup`` and ``run``
    refuse, as the changes since are gone from the WAL)."""
    slot = settings.source.slot
    held = _from_capture_file(settings, lambda conn: store.checkpoint_of(conn, slot))
    if held is None or not held[0]:
        return f"slot {slot} does not exist: run `ct1-cdc setup`"
    return lost_slot(slot, held[0])


def lost_slot(slot: str, lsn: int) -> str:
    """The line ``setup`` and ``slot status`` give for a slot this outbox captured from
    and that is gone."""
    return (
        f"replication slot {slot} does not exist, but this outbox captured from it up to LSN"
        f" {format_lsn(lsn)}: what changed since is in no slot. `ct1-cdc recover --yes` makes a"
        " new slot, sends every receiver a ct1.gap event and backfills the mapped tables (or"
        " point outbox.path at a new outbox to start afresh)"
    )
