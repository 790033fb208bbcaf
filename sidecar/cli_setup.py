"""``ct1-cdc setup``: check the source, create the slot and the outbox, store secrets and
the first API key, and probe each endpoint."""

from __future__ import annotations

import asyncio
from typing import Any

import click
import psycopg

from cdc import source
from cdc.catalog import identity_index, read_catalog
from cdc.mapping import Mapping, load_mapping
from cdc.schema import Problem, check_mapping, fully_identified, lacking_identity, leaves
from common.errors import ConfigError
from config.settings import Settings
from outbox import endpoints, source_state, store
from outbox.writer import OutboxWriter
from sidecar.cli_source import lost_slot
from sidecar.console import emit_json, fail, handled, main, settings_of

# -- setup ----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--replica-identity-full",
    is_flag=True,
    help="ALTER the tables with when_changed rules to REPLICA IDENTITY FULL",
)
@click.option(
    "--sample-data", is_flag=True, help="create the sample marketplace schema if missing and load sample rows"
)
@click.option("--seed", default=1, show_default=True, help="sample data seed")
@click.option("--scale", default=1.0, show_default=True, help="sample data volume multiplier")
@click.option("--no-probe", is_flag=True, help="do not send a signed webhook.test to each endpoint")
@click.option(
    "--backfill",
    "with_backfill",
    is_flag=True,
    help="queue a backfill of every table the mapping snapshots: existing rows go out once `run` starts",
)
@click.option("--json", "as_json", is_flag=True, help="print the checks as JSON Lines")
@click.pass_context
@handled
def setup(
    ctx: click.Context,
    replica_identity_full: bool,
    sample_data: bool,
    seed: int,
    scale: float,
    no_probe: bool,
    with_backfill: bool,
    as_json: bool,
) -> None:
    """Check the source, create the slot and the outbox, optionally load sample data,
    and probe the endpoints with a signed webhook.test."""
    from sidecar.cli_keys import share_keys
    from sidecar.runner import router_for

    settings = settings_of(ctx)
    mapping = load_mapping(settings.mapping.file)
    conn = source.connect(settings.source.dsn)
    with conn:
        checks = source.run_checks(conn, settings.source.slot)
        checks.append(source.wal2json_probe(conn))
        for check in checks:
            if as_json:
                emit_json(
                    {
                        "check": check.name,
                        "ok": check.ok,
                        "detail": check.detail,
                        "fix": None if check.ok else check.fix,
                    }
                )
            else:
                mark = "ok  " if check.ok else "FAIL"
                click.echo(
                    f"[{mark}] {check.name}: {check.detail}" + ("" if check.ok else f" -> fix: {check.fix}")
                )
        failed = [c for c in checks if not c.ok]
        if failed:
            first = failed[0]
            fail(f"{first.name} check failed ({first.detail}); fix: {first.fix}")
        if sample_data:
            load_sample(conn, seed, scale)
        writer = OutboxWriter(store.open_outbox(settings.outbox.path), router_for(settings))
        closing: list[Any] = []
        try:
            problems = check_source_schema(conn, mapping, writer.conn, replica_identity_full)
            for problem in problems:
                if as_json:
                    emit_json(
                        {"check": "mapping", "ok": False, "detail": problem.message, "fix": problem.fix}
                    )
                else:
                    click.echo(f"[FAIL] mapping: {problem.message} -> fix: {problem.fix}")
            if problems:
                more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
                fail(f"mapping does not fit the source: {problems[0].line()}{more}")
            if as_json:
                emit_json(
                    {"check": "mapping", "ok": True, "detail": f"{len(mapping.tables)} tables", "fix": None}
                )
            else:
                click.echo(f"[ok  ] mapping: {len(mapping.tables)} tables, every column found")
            # what capture keeps on this host: the outbox, or beside it on the JetStream backend
            kept = writer.conn if settings.outbox.backend != "jetstream" else None
            if kept is None:
                kept = store.open_outbox(settings.outbox.capture_path)
                closing.append(kept)
            held = store.checkpoint_of(kept, settings.source.slot)
            if held is not None and held[0] and source.slot_status(conn, settings.source.slot) is None:
                fail(lost_slot(settings.source.slot, held[0]))
            created = create_slot(conn, settings, mapping, writer)
            queued = queue_backfill(kept, settings, mapping) if with_backfill else []
            secrets = store_secrets(writer.conn, settings)
            first_key = first_api_key(writer.conn)
            if first_key is not None:  # (on the JetStream backend: for every API node)
                share_keys(settings, writer.conn, first_key.id)
            signing_secrets = {
                e.name: e.secret or endpoints.stored_secret(writer.conn, e.name) for e in settings.endpoints
            }
        finally:
            for conn_ in closing:
                conn_.close()
            writer.close()
        if first_key is not None:
            click.echo(
                f"created the first API key {first_key.id} (all permissions): {first_key.key}"
                " (shown once; more with `ct1-cdc keys create`)",
                err=True,
            )
        for name, secret in secrets.items():
            click.echo(
                f"endpoint {name}: generated signing secret {secret} (shown once: give it to the receiver)",
                err=True,
            )
    probes = {} if no_probe else probe_endpoints(settings, signing_secrets)
    summary = {
        "api_key": None if first_key is None else {"id": first_key.id, "key": first_key.key},
        "generated_secrets": secrets,
        "endpoints": probes,
        "slot": settings.source.slot,
        "slot_created": created,
        "outbox": settings.outbox.path,
        "mapped_tables": len(mapping.tables),
        "backfill": [j["table"] for j in queued],
    }
    if as_json:
        emit_json(summary)
    else:
        state = "created" if created else "already present"
        click.echo(f"slot {settings.source.slot}: {state}; outbox {settings.outbox.path} ready")
        if queued:
            click.echo(
                f"backfill queued for {len(queued)} tables: their rows go out once `ct1-cdc run` "
                "starts (`ct1-cdc backfill status` shows the progress)"
            )


def create_slot(conn: Any, settings: Settings, mapping: Mapping, writer: OutboxWriter) -> bool:
    """The slot, made if missing, its shadow seeded where capture keeps its state: the
    outbox, or on the JetStream backend the state stream (any host resumes with it)."""
    from cdc.postgres import ensure_slot
    from sidecar.runner import open_sink

    if settings.outbox.backend != "jetstream":
        return ensure_slot(conn, settings.source.dsn, settings.source.slot, mapping, writer)
    sink = open_sink(settings)
    try:
        return ensure_slot(conn, settings.source.dsn, settings.source.slot, mapping, sink)
    finally:
        sink.close()


def queue_backfill(conn: Any, settings: Settings, mapping: Mapping) -> list[dict[str, Any]]:
    """``setup --backfill``: every table the mapping snapshots, unless one is active."""
    from outbox import backfills

    active = {j["table"] for j in backfills.active(conn)}
    tables = [t for t in sorted(mapping.snapshots) if t not in active]
    return backfills.add(conn, tables, None, settings.backfill.rate, "setup") if tables else []


def check_source_schema(
    conn: source.Conn, mapping: Mapping, outbox: Any, replica_identity_full: bool
) -> list[Problem]:
    """The mapping against the live schema.  With ``replica_identity_full``, tables whose
    updates or deletes would be lost and tables with when_changed rules get REPLICA
    IDENTITY FULL, each recorded in the outbox first so `ct1-cdc detach` restores it."""
    tables = [mapping.parts(t) for t in mapping.tables]
    catalog, names = read_catalog(conn, tables)
    shadowed = [
        catalog[t]
        for t in mapping.tables
        if mapping.watched(t)
        and t in catalog
        and catalog[t].kind in "rp"
        and not fully_identified(catalog[t])
    ]
    if not replica_identity_full:
        for relation in shadowed:
            click.echo(
                f"note: {relation.table} has when_changed rules; without REPLICA IDENTITY FULL a shadow"
                " of its watched columns is kept in the outbox (use --replica-identity-full)",
                err=True,
            )
        return check_mapping(mapping, catalog, names)
    relations = [r for _, r in lacking_identity(mapping, catalog)]
    relations += [one for relation in shadowed for one in leaves(relation)]  # each partition: its own
    to_full = {r.table: r for r in relations if r.identity != "f"}
    for relation in to_full.values():
        index = identity_index(conn, relation.schema, relation.name) if relation.identity == "i" else None
        source_state.record_identity_change(
            outbox, relation.table, relation.schema, relation.name, relation.identity, index
        )
        try:
            source.set_replica_identity(conn, relation.schema, relation.name, "f")
        except BaseException:
            source_state.forget_identity_change(outbox, relation.table)  # nothing for detach to undo
            raise
        click.echo(f"set REPLICA IDENTITY FULL on {relation.table} (`ct1-cdc detach` restores it)", err=True)
    if to_full:
        catalog, names = read_catalog(conn, tables)
    return check_mapping(mapping, catalog, names)


def first_api_key(conn: Any) -> Any:
    """An API key with every permission when none is active yet (shown once by setup)."""
    from api import keys as api_keys
    from outbox.keys import active_count

    if active_count(conn):
        return None
    return api_keys.create(conn, "first key (setup)", list(api_keys.PERMISSIONS), [])


def probe_endpoints(settings: Settings, signing_secrets: dict[str, str | None]) -> dict[str, Any]:
    """Send each enabled endpoint a signed webhook.test and say how it answered.  A
    receiver that is not up yet is a warning: deliveries wait and retry for it."""

    from common.version import version
    from dispatcher.probe import send_test
    from dispatcher.sender import Sender, check_url

    cfg = settings.dispatcher

    async def probe_all() -> dict[str, Any]:
        sender = Sender(
            min(cfg.timeout_seconds, 5.0), concurrency=4, refuse_private=cfg.refuse_private_networks
        )
        results: dict[str, Any] = {}
        try:
            for endpoint in settings.endpoints:
                if not endpoint.enabled:
                    continue
                secret = signing_secrets.get(endpoint.name)
                try:
                    check_url(endpoint.name, endpoint.url, cfg.require_https, cfg.refuse_private_networks)
                except ConfigError as exc:
                    results[endpoint.name] = {"delivered": False, "status": 0, "error": str(exc)}
                    continue
                if not secret:
                    continue
                probe = await send_test(sender, endpoint, secret, version())
                results[endpoint.name] = probe.as_dict()
        finally:
            await sender.close()
        return results

    results = asyncio.run(probe_all())
    for name, result in results.items():
        if result["delivered"]:
            click.echo(
                f"endpoint {name}: webhook.test answered {result['status']} in {result['latency_ms']} ms",
                err=True,
            )
        else:
            answer = f"HTTP {result['status']}" if result["status"] else result["error"]
            click.echo(
                f"warning: endpoint {name}: webhook.test not accepted ({answer}); deliveries will retry"
                " until it answers 2xx",
                err=True,
            )
    return results


def store_secrets(conn: Any, settings: Settings) -> dict[str, str]:
    """A whsec_ secret for every configured endpoint that has none, kept in the outbox."""
    from dispatcher.signing import generate_secret

    made: dict[str, str] = {}
    for endpoint in settings.endpoints:
        if endpoint.secret or endpoints.stored_secret(conn, endpoint.name):
            continue
        secret = generate_secret()
        endpoints.store_secret(conn, endpoint.name, secret)
        made[endpoint.name] = secret
    return made


def load_sample(conn: Any, seed: int, scale: float) -> None:
    """``--sample-data``: the sample marketplace, only into a database without its rows,
    with a role that may write it."""
    from sidecar import sample

    try:
        held = sample.tables_with_rows(conn)
        if held:
            fail(
                "--sample-data loads the sample marketplace into an empty database, and"
                f" {', '.join(held)} already hold rows: point source.dsn at an empty"
                " database, or leave out --sample-data"
            )
        if not sample.has_schema(conn):
            sample.create_schema(conn)
            click.echo("created the sample marketplace schema", err=True)
        base = sample.Volume()
        volume = sample.Volume(**{k: max(1, int(v * scale)) for k, v in vars(base).items()})
        counts = sample.generate(
            conn,
            seed=seed,
            volume=volume,
            progress=lambda table, n: click.echo(f"  sample data: {table} {n}", err=True),
        )
    except psycopg.errors.InsufficientPrivilege as exc:
        reason = str(exc).strip().splitlines()[0]
        fail(f"--sample-data needs a role that may create and write the sample tables ({reason})")
    click.echo(f"loaded sample data: {counts}", err=True)
