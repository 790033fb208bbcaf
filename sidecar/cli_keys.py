"""``ct1-cdc keys create|list|revoke``: API keys, shown once and stored hashed."""

from __future__ import annotations

import sqlite3

import click

from api import keys as api_keys
from common.formats import unix_to_text
from config.settings import Settings
from outbox import store
from sidecar.console import emit_json, handled, keys, settings_of


def _when(value: float | None) -> str | None:
    return unix_to_text(value)


@keys.command("create")
@click.option("--name", required=True, help="who or what uses the key")
@click.option(
    "--permissions",
    "permissions",
    required=True,
    multiple=True,
    help=f"comma list of {', '.join(api_keys.PERMISSIONS)}",
)
@click.option(
    "--allow-ip",
    "allow_ips",
    multiple=True,
    metavar="CIDR",
    help="only from these addresses or networks (repeat); default anywhere",
)
@click.option("--json", "as_json", is_flag=True, help='print {"id", "name", "key", "permissions"}')
@click.pass_context
@handled
def keys_create(
    ctx: click.Context, name: str, permissions: tuple[str, ...], allow_ips: tuple[str, ...], as_json: bool
) -> None:
    """Create an API key; the key is shown this once and only its hash is kept."""
    chosen = api_keys.parse_permissions(list(permissions))
    networks = api_keys.parse_networks(list(allow_ips))
    settings = settings_of(ctx)
    conn = store.open_outbox(settings.outbox.path)
    try:
        made = api_keys.create(conn, name, chosen, networks)
        share_keys(settings, conn, made.id)
    finally:
        conn.close()
    if as_json:
        emit_json(
            {
                "id": made.id,
                "name": made.name,
                "key": made.key,
                "permissions": made.permissions,
                "allow_ips": made.allow_ips,
            }
        )
    else:
        click.echo(f"created API key {made.id} ({made.name}): {made.key}")
        click.echo("  shown once: store it now; only its hash is kept", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """API keys without their secrets."""
    conn = store.connect(settings_of(ctx).outbox.path, readonly=True)
    try:
        rows = api_keys.listing(conn)
    finally:
        conn.close()
    for row in rows:
        item = {
            **row,
            "created_at": _when(row["created_at"]),
            "revoked_at": _when(row["revoked_at"]),
            "last_used_at": _when(row["last_used_at"]),
        }
        if as_json:
            emit_json(item)
        else:
            state = "revoked" if row["revoked_at"] else "active"
            click.echo(
                f"{row['id']}  {state:<7} {row['name']:<20} {row['prefix']}…  "
                f"{','.join(row['permissions'])}  {' '.join(row['allow_ips']) or 'any address'}  "
                f"{row['requests']} requests, last used {_when(row['last_used_at']) or 'never'}"
            )


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
@handled
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key at once: requests with it then get 401."""
    settings = settings_of(ctx)
    conn = store.open_outbox(settings.outbox.path)
    try:
        api_keys.revoke(conn, key_id)
        share_keys(settings, conn, key_id)
    finally:
        conn.close()
    click.echo(f"API key {key_id} revoked")


def share_keys(settings: Settings, conn: sqlite3.Connection, key_id: str) -> None:
    """On the JetStream backend, the key made or revoked into the cluster, for every API
    node (that key alone: this file's other rows may be older than the cluster's)."""
    if settings.outbox.backend != "jetstream":
        return
    from outbox.jetstream_shared import KEYS, share
    from sidecar.runner import events_log

    share(events_log(settings), conn, KEYS, only=key_id)
