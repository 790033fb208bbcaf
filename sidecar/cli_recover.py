"""``ct1-cdc recover``: after the slot was lost, a new slot, a ``ct1.gap`` event and a
backfill of every mapped table.

The changes between capture's last checkpoint and the new slot's start are gone from the
WAL; receivers are told so by a ``ct1.gap`` event (sent to every endpoint, whatever its
``events``) with both positions and times, appended in the same outbox commit as the new
checkpoint and a backfill request for every table the mapping snapshots (replacing any
backfill still active), so every receiver converges on the current rows.  Capture then goes
on from the new slot and runs the backfill.
"""

from __future__ import annotations

import time

import click

from cdc import source
from cdc.gap import GAP, gap_data
from cdc.mapping import load_mapping
from cdc.postgres import ensure_slot
from common.errors import ConfigError, SetupError
from common.formats import format_lsn, parse_lsn, unix_to_iso
from outbox import store
from sidecar.console import emit_json, handled, main, settings_of
from sidecar.runner import open_writer


@main.command()
@click.option("--yes", is_flag=True, help="do not ask before dropping a lost slot")
@click.option("--json", "as_json", is_flag=True, help="print the gap as JSON")
@click.pass_context
@handled
def recover(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """After a lost slot: drop it, create a new one and record the gap (ct1.gap).

    Refuses while the slot is healthy.  The changes made between the last checkpoint and
    the new slot are not captured; receivers learn of the hole from the ct1.gap event."""
    settings = settings_of(ctx)
    if settings.outbox.backend == "jetstream":
        raise ConfigError(
            'ct1-cdc recover is not available with [outbox] backend = "jetstream" yet (its gap event'
            ' would stay on this host): set [source] on_slot_lost = "recover" and capture recovers'
            " a lost slot itself, the gap event into the stream (docs/jetstream.md)"
        )
    name, dsn = settings.source.slot, settings.source.dsn
    mapping = load_mapping(settings.mapping.file)
    reader = store.connect(settings.outbox.path, readonly=True)
    try:
        held = store.checkpoint_of(reader, name)
    finally:
        reader.close()
    with source.connect(dsn) as conn:
        status = source.slot_status(conn, name)
        if status is not None and status["wal_status"] != "lost":
            raise SetupError(
                f"replication slot {name} is not lost (wal_status {status['wal_status']}): nothing to recover"
            )
        if status is not None:
            if not yes:
                click.confirm(f"drop the lost slot {name} and create a new one?", abort=True)
            source.drop_slot(conn, name)
        writer = open_writer(settings)
        try:
            ensure_slot(conn, dsn, name, mapping, writer)
            created = source.slot_status(conn, name)
            assert created is not None
            start = parse_lsn(created["confirmed_flush_lsn"])
            now = time.time()
            reason = "dropped" if status is None else "invalidated"
            data = gap_data(name, reason, held and held[0], held and held[1], start, now)
            record = data["record"]
            writer.add(GAP, "gap", None, data, unix_to_iso(now), None, "derived", format_lsn(start), None)
            tables = sorted(mapping.snapshots)
            writer.backfill_request(
                tables, "recover", settings.backfill.rate
            )  # every receiver converges past the hole
            writer.commit(name, start)
        finally:
            writer.close()
    if as_json:
        emit_json({**record, "backfill": tables})
    else:
        click.echo(
            f"slot {name} created anew at {record['to_lsn']}; ct1.gap recorded: changes from "
            f"{record['from_lsn'] or 'the start'} to {record['to_lsn']} were not captured; a backfill "
            f"of {len(tables)} tables is queued and runs in `ct1-cdc run` (`ct1-cdc backfill status`)"
        )
